"""The documented Python API runs as documented: examples/quickstart.py, examples/quickstart.ipynb (executed with
nbclient on this interpreter's kernel, offline) and every ```python block of README.md.

Slow by nature (each trains two tiny adapters, serves and evaluates them: ~1-2 min each on 2 idle cores, 4-8 min
on 2 cores shared by five test runs); they keep the steps few for that reason. The subprocess timeouts (30 min)
are only a net for a hung run.
"""

import base64
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from serving_fixtures import wait_until_serving

ROOT = Path(__file__).resolve().parent.parent
LOSS_LINE = re.compile(r"^(law|medicine): held-out loss before ([\d.]+) -> after ([\d.]+), registered as (\S+)$",
                       re.M)

pytestmark = pytest.mark.slow


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    # the checkout's studio, also where it is not installed (CI installs it editable; this is a no-op there)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _check_losses(text: str) -> dict[str, tuple[float, float, str]]:
    """The printed before/after held-out losses are the ones recorded in the (isolated) adapter registry."""
    from studio.registry import AdapterRegistry

    found = {m[0]: (float(m[1]), float(m[2]), m[3]) for m in LOSS_LINE.findall(text)}
    assert set(found) == {"law", "medicine"}, text
    registry = AdapterRegistry()
    for domain, (before, after, ref) in found.items():
        assert ref == f"{domain}@v1"
        metrics = registry.show(ref).metrics
        assert f"{metrics['eval_loss_before']:.4f}" == f"{before:.4f}" and f"{metrics['eval_loss']:.4f}" == f"{after:.4f}"
        assert after < before, f"{domain}: {STEPS_NOTE}"
    assert registry.aliases("law") == {"prod": 1}
    return found


STEPS_NOTE = "a few steps at lr 3e-3 lower the held-out loss of the random base on its own domain"


def test_quickstart_script(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--steps", "6"], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    _check_losses(out)
    assert "trainable parameters (LoRA):" in out and "TOTAL (estimated peak)" in out  # the plan and its memory table
    # the printed training losses are the trainer's logged ones
    printed = re.search(r"law training losses: (.*) \(plot", out)[1].split(", ")
    logged = [json.loads(line) for line in open(tmp_path / "runs/quickstart/law/training_log.jsonl")]
    assert printed == [f"{e['loss']:.3f}" for e in logged if "loss" in e]
    assert (tmp_path / "runs/quickstart/law_loss.png").read_bytes().startswith(b"\x89PNG")
    # three rows, two adapters and the base, in one generate call
    rows = re.findall(r"^(law@v1|medicine@v1|base) +'", out, re.M)
    assert rows == ["law@v1", "medicine@v1", "base"]
    stats = eval(re.search(r"^engine: (\{.*\})$", out, re.M)[1])  # the printed dict literal
    assert stats["requests"] == 3 and stats["adapter_loads"] == 2
    report = json.loads((tmp_path / "runs/quickstart/report/report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["base", "law@v1", "medicine@v1"]
    assert set(report["domains"]) == {"law-mini", "medicine-mini"}
    assert "# Evaluation of base, law@v1, medicine@v1 on law-mini@v1" in out


def _outputs(cell) -> list[dict]:
    return [o for o in cell.get("outputs", [])]


def _stdout(cell) -> str:
    """What the cell printed (stderr holds progress bars and library warnings)."""
    return "".join(o["text"] for o in _outputs(cell) if o["output_type"] == "stream" and o["name"] == "stdout")


def _markdown(cell) -> str:
    """The cell's rendered Markdown result (its text/markdown output)."""
    found = [o["data"]["text/markdown"] for o in _outputs(cell) if "text/markdown" in o.get("data", {})]
    assert len(found) == 1, _outputs(cell)
    return found[0]


def _pngs(cell) -> list[bytes]:
    return [base64.b64decode(o["data"]["image/png"]) for o in _outputs(cell) if "image/png" in o.get("data", {})]


def test_quickstart_notebook(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    # a kernelspec for this very interpreter, found only through JUPYTER_PATH: no user or system kernel is used
    spec = tmp_path / "jupyter" / "kernels" / "studio-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "studio tests", "language": "python"}))
    for key, value in _env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    nb = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")  # shipped without outputs
    NotebookClient(nb, kernel_name="studio-test", timeout=1800, allow_errors=False,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    nbformat.write(nb, tmp_path / "executed.ipynb")  # to read when an assertion below fails
    code = [c for c in nb.cells if c.cell_type == "code"]
    by_source = {c.source.split("\n")[0]: c for c in code}
    plan_cell = by_source['options = dict(base="tiny-moe", quant="4bit", targets="attention,experts", r=8, alpha=16, '
                          'seq_len=128, batch_size=4)']
    assert "trainable LoRA parameters" in _markdown(plan_cell)
    train_cell = by_source["curve = studio.LossCurve()"]
    found = _check_losses(_stdout(train_cell))
    assert re.search(r"law training losses: (\d+\.\d{3}, ){5}\d+\.\d{3}", _stdout(train_cell))  # STEPS = 6 ... 8
    live = _pngs(train_cell)
    assert live and all(p.startswith(b"\x89PNG") for p in live)  # the live curve, drawn while training
    final = _pngs(by_source["curve   # the final loss curve of the law adapter"])
    assert len(final) == 1 and final[0].startswith(b"\x89PNG")
    report_cell = by_source['report = studio.evaluate(engine, models=["base", "law@prod", "medicine"], '
                            'dataset=datasets["law"],']
    md = _markdown(report_cell)
    assert md.startswith("# Evaluation of base, law@v1, medicine@v1 on law-mini@v1")
    assert "## Cross-domain held-out loss" in md and "| medicine@v1 |" in md
    assert found["law"][2] == "law@v1"
    plots = _pngs(by_source["from IPython.display import Image, display"])
    assert len(plots) == 3 and all(p.startswith(b"\x89PNG") for p in plots)


def _readme_blocks() -> list[str]:
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    assert len(blocks) >= 2  # the Python API quickstart and the OpenAI client
    return blocks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_python_blocks(tmp_path):
    """Every ```python block of README.md, in order, each in a fresh interpreter sharing the registries. A block that talks to a server on
    127.0.0.1:8000 runs against `studio serve` started here on a free port, after the blocks before it (which
    train and promote the adapters it asks for)."""
    blocks = _readme_blocks()
    port, server = _free_port(), None
    env = _env()
    try:
        for i, block in enumerate(blocks):
            if "http://127.0.0.1:8000" in block:
                if server is None:
                    server = subprocess.Popen([sys.executable, "-m", "studio.server", "--port", str(port),
                                               "--max-wait-ms", "0"], cwd=tmp_path, env=env,
                                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                    wait_until_serving(server, f"http://127.0.0.1:{port}", timeout=180, interval=0.5)
                block = block.replace("http://127.0.0.1:8000", f"http://127.0.0.1:{port}")
            proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True,
                                  text=True, timeout=1800)
            assert proc.returncode == 0, f"README python block {i + 1} failed:\n{block}\n{proc.stderr[-3000:]}"
            if "studio.finetune" in block:
                out = proc.stdout
                assert re.search(r"^law@v1 [\d.]+ -> [\d.]+$", out, re.M) and "medicine@v1" in out
                assert re.search(r"^step 0: \d+\.\d{4}$", out, re.M)  # the on_event callback printed
                assert "# Evaluation of base, law@v1, medicine@v1 on law@v1" in out
    finally:
        if server is not None:
            server.terminate()
            server.communicate(timeout=30)
