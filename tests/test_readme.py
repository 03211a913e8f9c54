"""Every command in README.md's fenced blocks, run in order from a fresh copy of the repository, as a new user would.

Slow by nature (about 5 minutes on 2 idle CPU cores; a machine shared with other CPU-bound jobs can take 10x): the quickstart fine-tunes tiny-moe twice (~1 min each), the
evaluation, the web UI and the server start real processes. Commands marked `# needs: GPU` or `# needs: network`
are skipped (listed in the output). A command marked `# runs until Ctrl-C` is a server: it is started, must answer
HTTP, then gets Ctrl-C and must exit 0; the python block that follows it in the README runs against it meanwhile.

The README's `pip install ... -e .` must not touch the environment this suite runs in (an editable install pointing
at a temporary copy would break every later test). So the commands run in a fresh virtual environment whose
site-packages has a .pth naming this environment's site-packages: pip sees every dependency as installed and
installs only the project, offline (PIP_NO_INDEX) and without build isolation (setuptools comes from this
environment). pip never uninstalls a distribution outside its own environment; the test also checks that this
environment's installed distributions are unchanged afterwards.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NEEDS = re.compile(r"#\s*needs:\s*(GPU|network)", re.IGNORECASE)
SERVER = "# runs until Ctrl-C"
NOISE = ("kernels-community", "FutureWarning", "Traceback")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # ~5 min on 2 idle cores; far more on a busy machine


def readme_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(language, commands) per fenced block; bash lines joined across backslash continuations, comment-only lines
    dropped; a python block is one command (its whole text)."""
    blocks = []
    for lang, body in re.findall(r"^```(\w+)\n(.*?)^```", text, flags=re.S | re.M):
        if lang == "python":
            blocks.append((lang, [body]))
            continue
        commands, current = [], ""
        for line in body.splitlines():
            if current:
                current += "\n" + line
            elif line.strip() and not line.lstrip().startswith("#"):
                current = line
            else:
                continue
            if not line.endswith("\\"):
                commands.append(current)
                current = ""
        blocks.append((lang, commands))
    return blocks


def test_readme_blocks_are_parsed():
    """The parser sees the commands a reader sees (a cheap check that runs before the slow test)."""
    blocks = readme_blocks((REPO / "README.md").read_text())
    flat = [c for _, cmds in blocks for c in cmds]
    assert flat[0].startswith("pip install torch==2.13.0 -e . -c constraints.txt && python -m studio.finetune")
    assert any(c.startswith("studio registry diff law@v1 law@v3") for c in flat)
    assert any(SERVER in c for c in flat) and any(l == "python" for l, _ in blocks)
    assert not any("[" in c.split("#")[0] and "'.[" not in c for l, cmds in blocks if l == "bash" for c in cmds), \
        "a README command has [optional] syntax that a shell cannot run"
    multi = [c for c in flat if "\\\n" in c]
    assert multi and all(NEEDS.search(c) for c in multi)  # the Mixtral example is one command, marked GPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _installed(paths: list[str]) -> set[str]:
    return {p.name for d in paths if Path(d).is_dir() for p in Path(d).iterdir() if p.name.endswith(".dist-info")
            or p.suffix == ".pth"}


def _copy_checkout(dest: Path) -> None:
    """A fresh clone of the working tree: tracked and untracked-but-not-ignored files (no registries, no runs)."""
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _isolated_env(tmp: Path) -> tuple[Path, dict]:
    venv = tmp / "venv"
    # no pip or setuptools of its own (ensurepip's older setuptools cannot build without `wheel`): both come from
    # this environment through the .pth, and `pip` is a launcher for that pip running in the new environment
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (venv / "lib" / ver / "site-packages" / "_suite_env.pth").write_text(
        "\n".join(p for p in site.getsitepackages() if Path(p).is_dir()) + "\n")
    for name in ("pip", "pip3"):
        launcher = venv / "bin" / name
        launcher.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom pip._internal.cli.main import main\n"
                            "sys.exit(main())\n")
        launcher.chmod(0o755)
    # the dependencies come through the .pth, their console scripts do not: a user's `pip install -e .` would put
    # `accelerate` (the multi-device section's launcher) in the venv's bin, so put it there the same way
    for ep in importlib.metadata.entry_points(group="console_scripts", name="accelerate"):
        module, _, attr = ep.value.partition(":")
        launcher = venv / "bin" / ep.name
        launcher.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom {module} import {attr}\n"
                            f"sys.exit({attr}())\n")
        launcher.chmod(0o755)
    ours = Path(sysconfig.get_paths()["scripts"])
    path = os.pathsep.join([str(venv / "bin")] + [p for p in os.environ["PATH"].split(os.pathsep)
                                                  if Path(p) != ours])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STUDIO_", "PYTHON", "VIRTUAL_ENV", "PIP_"))
           and k not in ("GRADIO_SERVER_PORT",)}
    env.update(PATH=path, VIRTUAL_ENV=str(venv), HOME=str(tmp / "home"), HF_HUB_OFFLINE="1",
               PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0", PIP_DISABLE_PIP_VERSION_CHECK="1",
               STUDIO_MODELS_CACHE=os.environ.get("STUDIO_MODELS_CACHE", str(tmp / "models")))
    (tmp / "home").mkdir()
    return venv, env


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"no answer from {url} within {timeout}s")


def test_every_readme_command_runs_in_a_fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    _copy_checkout(clone)
    venv, env = _isolated_env(tmp_path)
    suite_dirs = site.getsitepackages()
    before = _installed(suite_dirs)
    log = []

    def run(cmd: str, timeout: float = 2400) -> str:
        t0 = time.time()
        r = subprocess.run(["bash", "-c", cmd], cwd=clone, env=env, capture_output=True, text=True,
                           timeout=timeout)
        out = r.stdout + r.stderr
        log.append(f"$ {cmd}  [{time.time() - t0:.0f}s, exit {r.returncode}]")
        assert r.returncode == 0, f"README command failed ({r.returncode}): {cmd}\n{out[-4000:]}"
        return out

    blocks = readme_blocks((clone / "README.md").read_text())
    skipped, first = [], True
    i = 0
    while i < len(blocks):
        lang, commands = blocks[i]
        i += 1
        if lang != "bash":
            run(f"python - <<'EOF'\n{commands[0]}\nEOF")
            continue
        for cmd in commands:
            if NEEDS.search(cmd):
                skipped.append(cmd.splitlines()[0])
                continue
            if SERVER not in cmd:
                out = run(cmd)
                if first:  # the quickstart's fine-tune: a new user sees no alarming noise
                    first = False
                    assert "registered law@v1 in the adapter registry" in out, out[-3000:]
                    assert "\x1b[" not in out, "progress-bar escape codes in output that is not a terminal"
                    for noise in NOISE:
                        assert noise not in out, f"{noise!r} in the quickstart's output:\n{out[-6000:]}"
                continue
            # a server: on a free port (the README's port may be taken on a shared machine)
            port = _free_port()
            readme_port = re.search(r"--port (\d+)", cmd).group(1)
            proc = subprocess.Popen(["bash", "-c", "exec " + cmd.replace(readme_port, str(port))], cwd=clone,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                health = "/health" if "studio serve" in cmd else "/"
                _wait_http(f"http://127.0.0.1:{port}{health}", proc)
                if i < len(blocks) and blocks[i][0] == "python":  # the client example, against this server
                    code = blocks[i][1][0].replace(readme_port, str(port))
                    run(f"python - <<'EOF'\n{code}\nEOF", timeout=300)
                    i += 1
            finally:
                proc.send_signal(signal.SIGINT)
                try:
                    out, _ = proc.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, _ = proc.communicate()
            log.append(f"$ {cmd}  [server on {port}, exit {proc.returncode}]")
            assert proc.returncode == 0, f"{cmd} exited {proc.returncode} on Ctrl-C:\n{out[-4000:]}"
    print("\n".join(log + ["skipped (marked): " + s for s in skipped]))
    assert skipped  # the GPU example and the CI script (it runs this suite: it cannot run inside it)
    # the suite's own environment is untouched: same distributions, same .pth files
    assert _installed(suite_dirs) == before
    # what the README says happened did: three law versions (quickstart, Python API, short run), pushed and pulled
    reg = subprocess.run(["studio", "registry", "list", "law", "--json"], cwd=clone, env=env, capture_output=True,
                         text=True, check=True).stdout
    assert all(f'"law@v{i}"' in reg for i in (1, 2, 3)) and '"law@v4"' not in reg, reg[:2000]
    assert (clone / "shared-registry").is_dir()
    assert list((clone / "runs" / "eval-law").glob("report.*"))
