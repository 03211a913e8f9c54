"""Training jobs of the web UI: each one a worker process (`python -m studio.ui.worker JOB_DIR`) with its own
run directory and log, tracked in a SQLite table under `jobs_root()` so jobs survive page reloads and restarts.

    jobs = JobManager()                      # root: $STUDIO_JOBS_ROOT, else runs/ui-jobs in the checkout
    job = jobs.submit(TrainConfig(dataset="law@v1", max_steps=20))
    jobs.get(job.id).progress()              # step, losses, tokens/s, ETA (read from training_log.jsonl)
    jobs.cancel(job.id)
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from studio import paths
from studio.errors import StudioError
from studio.train import TrainConfig

QUEUED, RUNNING, CANCELLING, DONE, FAILED, CANCELLED = "queued", "running", "cancelling", "done", "failed", "cancelled"
ACTIVE = (QUEUED, RUNNING, CANCELLING)
TERMINAL = (DONE, FAILED, CANCELLED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id           TEXT PRIMARY KEY,
    created      REAL NOT NULL,
    started      REAL,
    finished     REAL,
    status       TEXT NOT NULL,
    config       TEXT NOT NULL,
    dataset      TEXT NOT NULL,
    domain       TEXT NOT NULL,
    pid          INTEGER,
    pid_created  REAL,
    registry_ref TEXT,
    error        TEXT,
    metrics      TEXT
);
"""
_COLUMNS = ("id", "created", "started", "finished", "status", "config", "dataset", "domain", "pid", "pid_created",
            "registry_ref", "error", "metrics")


class JobError(StudioError):
    """A job id is unknown, or an action does not apply to the job's state."""


def jobs_root() -> Path:
    """Root of the UI's job table and job directories (`$STUDIO_JOBS_ROOT`, else `runs/ui-jobs` in the source
    checkout, git-ignored like every run, else `~/.cache/studio/jobs`). Defined here, not in studio.paths,
    because only the UI runs jobs."""
    env = os.environ.get("STUDIO_JOBS_ROOT")
    if env:
        return Path(env).expanduser()
    root = paths.repo_root()
    return root / "runs" / "ui-jobs" if root else paths.studio_home() / "jobs"


@dataclass
class Job:
    id: str
    created: float
    status: str
    config: dict
    dataset: str
    domain: str
    dir: Path
    started: float | None = None
    finished: float | None = None
    pid: int | None = None
    pid_created: float | None = None
    registry_ref: str | None = None
    error: str | None = None
    metrics: dict = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.dir / "run"

    @property
    def log_path(self) -> Path:
        return self.dir / "worker.log"

    @property
    def cancel_path(self) -> Path:
        return self.dir / "cancel"

    @property
    def result_path(self) -> Path:
        return self.dir / "result.json"

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def events(self) -> list[dict]:
        """The trainer's event log (training_log.jsonl); a half-written last line is skipped."""
        path = self.run_dir / "training_log.jsonl"
        if not path.is_file():
            return []
        out = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def progress(self) -> dict:
        """What the UI shows: phase, step / max_steps, loss and eval-loss points, tokens/s, ETA."""
        events = self.events()
        max_steps = next((e["max_steps"] for e in reversed(events) if e.get("max_steps")), None)
        if max_steps is None and int(self.config.get("max_steps") or -1) > 0:
            max_steps = int(self.config["max_steps"])
        logs = [e for e in events if e.get("event") == "log"]
        step = max((e.get("step", 0) for e in logs), default=0)
        began = any(e.get("event") == "train_begin" for e in events)
        loss = [(e["step"], e.get("lm_loss", e["loss"])) for e in logs if "loss" in e]
        eval_loss = [(e["step"], e["eval_loss"]) for e in logs if "eval_loss" in e]
        aux = [(e["step"], e["aux_loss"]) for e in logs if "aux_loss" in e]
        speed = next((e["tokens_per_s"] for e in reversed(logs) if "tokens_per_s" in e), None)
        eta = next((e["eta_s"] for e in reversed(logs) if "eta_s" in e), None)
        if self.status == QUEUED:
            phase = "waiting for a free worker slot"
        elif self.status == CANCELLING:
            phase = "cancel requested: finishing the current step and saving a checkpoint"
        elif self.status == RUNNING and not began:
            phase = "preparing: loading the base model and the dataset"
        elif self.status == RUNNING and max_steps and step >= max_steps:
            phase = "final held-out evaluation, saving and registering the adapter"
            eta = None
        elif self.status == RUNNING:
            phase = "training"
        else:
            phase = self.status
        fraction = min(1.0, step / max_steps) if max_steps else 0.0
        if self.status == DONE:
            fraction = 1.0
        return {"phase": phase, "step": step, "max_steps": max_steps, "fraction": fraction, "loss": loss,
                "eval_loss": eval_loss, "aux_loss": aux, "tokens_per_s": speed, "eta_s": eta, "began": began}

    def log_tail(self, max_chars: int = 6000) -> str:
        """The end of the worker's output, with progress-bar carriage returns collapsed to their last state."""
        if not self.log_path.is_file():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * max_chars))
            text = f.read().decode("utf-8", errors="replace")
        lines = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
        return "\n".join(lines)[-max_chars:]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dir"] = str(self.dir)
        return d


class JobManager:
    """The job table plus the worker processes; `max_running` jobs run at once, the rest wait in order."""

    def __init__(self, root: str | os.PathLike | None = None, max_running: int = 1, env: dict | None = None):
        self.root = Path(root).expanduser().absolute() if root is not None else jobs_root().absolute()
        if max_running < 1:
            raise JobError(f"max_running must be at least 1, got {max_running}")
        self.max_running = max_running
        self.env = dict(env or {})  # extra environment for workers (registry roots)
        self._procs: dict[str, subprocess.Popen] = {}
        self._exiting: list[subprocess.Popen] = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JobError(f"cannot create the jobs root {self.root}: {exc}; set STUDIO_JOBS_ROOT to a writable "
                           "directory") from None
        self.db_path = self.root / "jobs.sqlite"

    # ---- table plumbing

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        con.execute("PRAGMA busy_timeout = 30000")
        con.executescript(_SCHEMA)
        return con

    def _row(self, row) -> Job:
        d = dict(zip(_COLUMNS, row))
        return Job(id=d["id"], created=d["created"], started=d["started"], finished=d["finished"],
                   status=d["status"], config=json.loads(d["config"]), dataset=d["dataset"], domain=d["domain"],
                   dir=self.root / d["id"], pid=d["pid"], pid_created=d["pid_created"],
                   registry_ref=d["registry_ref"], error=d["error"], metrics=json.loads(d["metrics"] or "{}"))

    def _update(self, con, job_id: str, **values) -> None:
        cols = ", ".join(f"{k} = ?" for k in values)
        con.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*values.values(), job_id))

    def _fetch(self, con, where: str = "", args=()) -> list[Job]:
        rows = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs {where}", args).fetchall()
        return [self._row(r) for r in rows]

    # ---- public API

    def submit(self, cfg: TrainConfig, domain: str | None = None) -> Job:
        """Queue a training run; it starts at once when a worker slot is free. The run directory is the job's."""
        cfg.lora_settings()  # rank / alpha / dropout errors now, not in the worker
        domain = domain or cfg.domain or str(cfg.dataset).partition("@")[0]
        job_id = f"{domain}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        job_dir = self.root / job_id
        job_dir.mkdir(parents=True)
        cfg = dataclasses.replace(cfg, output=str(job_dir / "run"), cancel_file=str(job_dir / "cancel"))
        config = dataclasses.asdict(cfg)
        (job_dir / "config.json").write_text(json.dumps(config, indent=2))
        con = self._connect()
        try:
            con.execute(f"INSERT INTO jobs (id, created, status, config, dataset, domain) VALUES (?,?,?,?,?,?)",
                        (job_id, time.time(), QUEUED, json.dumps(config), str(cfg.dataset), domain))
        finally:
            con.close()
        self.refresh()
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        if not job_id:
            raise JobError("no job selected: start a training run or pick one in the Jobs list")
        con = self._connect()
        try:
            found = self._fetch(con, "WHERE id = ?", (job_id,))
        finally:
            con.close()
        if not found:
            raise JobError(f"no job {job_id!r} under {self.root}; pick one from the Jobs list")
        return found[0]

    def list(self, limit: int | None = None) -> list[Job]:
        """Newest first."""
        con = self._connect()
        try:
            return self._fetch(con, "ORDER BY created DESC" + (f" LIMIT {int(limit)}" if limit else ""))
        finally:
            con.close()

    def queue_position(self, job_id: str) -> int | None:
        queued = [j.id for j in sorted(self.list(), key=lambda j: j.created) if j.status == QUEUED]
        return queued.index(job_id) + 1 if job_id in queued else None

    def cancel(self, job_id: str) -> Job:
        """Queued: dropped. Running: the trainer stops after the current step and saves a checkpoint (the
        adapter is not registered). Asked again while it is still stopping: the worker is terminated."""
        with self._lock:
            job = self.get(job_id)
            con = self._connect()
            try:
                if job.status == QUEUED:
                    self._update(con, job_id, status=CANCELLED, finished=time.time(), error="cancelled before start")
                elif job.status == RUNNING:
                    job.cancel_path.touch()
                    self._update(con, job_id, status=CANCELLING)
                elif job.status == CANCELLING:
                    self._terminate(job)
                    self._update(con, job_id, status=CANCELLED, finished=time.time(),
                                 error="worker terminated on a second cancel")
                else:
                    raise JobError(f"job {job_id} already ended ({job.status}); nothing to cancel")
            finally:
                con.close()
        self.refresh()
        return self.get(job_id)

    def register_saved(self, job_id: str, registry) -> str:
        """Register the adapter a cancelled job saved at its last step (the cancel did not register it), as the next
        version of the job's domain. Returns the new ref; it is recorded on the job."""
        job = self.get(job_id)
        adapter = job.run_dir / "adapter"
        if job.status != CANCELLED or job.registry_ref:
            raise JobError(f"job {job_id} is {job.status}" + (f" and registered as {job.registry_ref}"
                                                               if job.registry_ref else "")
                           + "; only a cancelled job's saved adapter can be registered this way")
        if not (adapter / "adapter_config.json").is_file():
            raise JobError(f"job {job_id} saved no adapter (it was cancelled before its first step, or the adapter "
                           "was discarded)")
        version = registry.register(adapter, domain=job.domain,
                                    notes=f"from job {job.id}, cancelled at step {job.progress()['step']}")
        con = self._connect()
        try:
            self._update(con, job_id, registry_ref=version.ref)
        finally:
            con.close()
        return version.ref

    def discard_saved(self, job_id: str) -> None:
        """Delete the run directory (adapter, checkpoints) of a cancelled, unregistered job; its log is kept."""
        import shutil

        job = self.get(job_id)
        if job.status != CANCELLED or job.registry_ref:
            raise JobError(f"job {job_id} is {job.status}; only a cancelled, unregistered job's files are discarded")
        shutil.rmtree(job.run_dir, ignore_errors=True)
        con = self._connect()
        try:
            self._update(con, job_id, error="cancelled; its saved adapter was discarded")
        finally:
            con.close()

    def refresh(self) -> None:
        """Reconcile the table with the workers: collect finished ones, then start queued jobs in order."""
        with self._lock:
            self._exiting = [p for p in self._exiting if p.poll() is None]
            con = self._connect()
            try:
                for job in self._fetch(con, "WHERE status IN (?, ?)", (RUNNING, CANCELLING)):
                    self._reconcile(con, job)
                con.execute("BEGIN IMMEDIATE")  # claim slots atomically against other app processes
                try:
                    running = con.execute("SELECT COUNT(*) FROM jobs WHERE status IN (?, ?)",
                                          (RUNNING, CANCELLING)).fetchone()[0]
                    queued = self._fetch(con, "WHERE status = ? ORDER BY created", (QUEUED,))
                    for job in queued[:max(0, self.max_running - running)]:
                        self._launch(con, job)
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
            finally:
                con.close()

    def start_scheduler(self, interval: float = 1.0) -> None:
        """A daemon thread that calls refresh() every `interval` seconds (queued jobs start without a viewer)."""
        if self._thread and self._thread.is_alive():
            return

        def loop():
            while not self._stop.wait(interval):
                try:
                    self.refresh()
                except Exception as exc:  # keep scheduling; the next tick retries
                    print(f"studio ui: job scheduler: {exc}", file=sys.stderr)

        self._stop.clear()
        self._thread = threading.Thread(target=loop, name="studio-jobs", daemon=True)
        self._thread.start()

    def stop_scheduler(self) -> None:
        self._stop.set()

    # ---- workers

    def _launch(self, con, job: Job) -> None:
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        log = open(job.log_path, "ab")
        try:
            proc = subprocess.Popen([sys.executable, "-m", "studio.ui.worker", str(job.dir)], cwd=str(job.dir),
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)  # a Ctrl-C of the app does not kill the job
        except OSError as exc:
            self._update(con, job.id, status=FAILED, finished=time.time(), error=f"cannot start the worker: {exc}")
            return
        finally:
            log.close()
        self._procs[job.id] = proc
        self._update(con, job.id, status=RUNNING, started=time.time(), pid=proc.pid,
                     pid_created=_create_time(proc.pid))

    def _alive(self, job: Job) -> bool:
        proc = self._procs.get(job.id)
        if proc is not None:
            return proc.poll() is None
        # a worker started by an earlier app process: same pid *and* same start time (pids are reused)
        created = _create_time(job.pid) if job.pid else None
        return created is not None and job.pid_created is not None and abs(created - job.pid_created) < 1e-3

    @staticmethod
    def _result(job: Job) -> dict | None:
        try:
            return json.loads(job.result_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return None  # written atomically (rename), so this is damage, not a half-written file

    def _reconcile(self, con, job: Job) -> None:
        alive = self._alive(job)
        result = self._result(job)  # read after the liveness check: a worker writes it, then exits
        if result is not None:
            proc = self._procs.pop(job.id, None)
            if proc is not None and proc.poll() is None:
                self._exiting.append(proc)  # polled on later refreshes so it does not linger as a zombie
            self._update(con, job.id, status=result.get("status", FAILED), finished=time.time(),
                         registry_ref=result.get("registry_ref"), error=result.get("error"),
                         metrics=json.dumps(result.get("metrics") or {}))
            return
        if alive:
            return
        proc = self._procs.pop(job.id, None)
        code = f" with code {proc.returncode}" if proc is not None else ""
        self._update(con, job.id, status=FAILED, finished=time.time(),
                     error=f"the worker process exited{code} without a result; the end of its log says why")

    def _terminate(self, job: Job) -> None:
        proc = self._procs.pop(job.id, None)
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            return
        if job.pid and self._alive(job):
            import psutil

            try:
                psutil.Process(job.pid).terminate()
            except psutil.Error:
                pass


def _create_time(pid: int) -> float | None:
    """A process's start time, or None when it is gone (psutil ships with accelerate)."""
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p.create_time()
    except psutil.Error:
        return None
