"""The UI's training worker: `python -m studio.ui.worker JOB_DIR` runs `run_training` on JOB_DIR/config.json.

Started by studio.ui.jobs.JobManager in its own process so the web app stays responsive. It writes
JOB_DIR/result.json last (atomically), so its existence means the job ended and says how.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path


def _write_result(job_dir: Path, result: dict) -> None:
    tmp = job_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, job_dir / "result.json")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m studio.ui.worker JOB_DIR", file=sys.stderr)
        return 2
    job_dir = Path(argv[0]).absolute()
    from studio.errors import StudioError

    try:
        from studio.train import TrainConfig, run_training

        cfg = TrainConfig(**json.loads((job_dir / "config.json").read_text()))
        print(f"job {job_dir.name}: training {cfg.base} on {cfg.dataset} (pid {os.getpid()})", flush=True)
        result = run_training(cfg, log=lambda *a: print(*a, flush=True))
    except StudioError as exc:  # a user-fixable problem: the message names the fix
        print(f"error: {exc}", flush=True)
        _write_result(job_dir, {"status": "failed", "error": str(exc), "error_type": type(exc).__name__})
        return 2
    except BaseException as exc:  # a bug or a crash: keep the traceback in the log, a summary in the result
        traceback.print_exc()
        sys.stdout.flush()
        _write_result(job_dir, {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                "error_type": type(exc).__name__})
        return 1
    _write_result(job_dir, {"status": "cancelled" if result.cancelled else "done",
                            "registry_ref": result.registry_ref, "metrics": result.metrics,
                            "run_dir": result.run_dir, "adapter_dir": result.adapter_dir,
                            "error": "cancelled: the adapter of the last step was saved but not registered"
                            if result.cancelled else None})
    return 0


if __name__ == "__main__":
    sys.exit(main())
