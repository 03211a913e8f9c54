"""Test hook: pause a registry operation at a named point so a test can SIGKILL it there.

Set `STUDIO_REGISTRY_PAUSE_AT=register:before-commit` (comma-separated for several points).
On reaching a listed point the process prints `studio-registry: paused at <point>` to
stderr and sleeps (`STUDIO_REGISTRY_PAUSE_SECONDS`, default 300) before carrying on.
Points: register:blobs-written, register:before-commit, pull:blob-staged,
pull:before-commit, push:blobs-uploaded. Unset in normal use: costs one getenv.
"""

from __future__ import annotations

import os
import sys
import time

ENV_POINTS = "STUDIO_REGISTRY_PAUSE_AT"
ENV_SECONDS = "STUDIO_REGISTRY_PAUSE_SECONDS"


def pause_point(name: str) -> None:
    points = os.environ.get(ENV_POINTS)
    if not points or name not in {p.strip() for p in points.split(",")}:
        return
    print(f"studio-registry: paused at {name}", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get(ENV_SECONDS, "300")))
