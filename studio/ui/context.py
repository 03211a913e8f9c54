"""What the web app works on: the datasets registry, the adapter registry, the job table and one shared inference
engine (created on first use). The tabs receive a StudioContext and call the Python API through it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from studio import paths
from studio.data import DatasetRegistry
from studio.registry import AdapterRegistry
from studio.ui.jobs import JobManager, jobs_root


@dataclass
class StudioContext:
    datasets_root: Path | None = None
    adapters_root: Path | None = None
    jobs_root: Path | None = None
    base: str = "tiny-moe"          # the base the Playground and Compare serve
    quant: str = "4bit"             # its quantization
    max_running_jobs: int = 1
    max_upload_bytes: int | None = None
    _engine: object = field(default=None, repr=False)
    _engine_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        self.datasets_root = Path(self.datasets_root or paths.datasets_root()).absolute()
        self.adapters_root = Path(self.adapters_root or paths.adapters_root()).absolute()
        self.jobs_root = Path(self.jobs_root or jobs_root()).absolute()
        self.datasets = DatasetRegistry(self.datasets_root)
        self.adapters = AdapterRegistry(self.adapters_root)
        # workers resolve datasets and register adapters through the default roots: point them at ours
        self.jobs = JobManager(self.jobs_root, max_running=self.max_running_jobs,
                               env={"STUDIO_DATASETS_ROOT": str(self.datasets_root),
                                    "STUDIO_ADAPTERS_ROOT": str(self.adapters_root)})

    @property
    def engine_loaded(self) -> bool:
        return self._engine is not None

    def engine(self):
        """The shared studio.engine.Engine: the base is loaded once, on first use; adapters hot-swap on it."""
        if self._engine is None:
            with self._engine_lock:
                if self._engine is None:
                    from studio.engine import Engine
                    from studio.models.loading import QuantSpec

                    self._engine = Engine(base=self.base, quant=QuantSpec(mode=self.quant), registry=self.adapters)
        return self._engine

    def close(self) -> None:
        self.jobs.stop_scheduler()
        if self._engine is not None:
            self._engine.close()
