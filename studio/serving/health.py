"""Waiting for a `studio serve` process to answer: what a script or test that starts the server in a subprocess
runs before its first request (bench/serve.py's stream figures, the server tests)."""

from __future__ import annotations

import subprocess
import time

from studio.errors import StudioError


def wait_until_serving(proc: subprocess.Popen, url: str, timeout: float = 120, interval: float = 0.3) -> None:
    """Poll `url`/health until the server answers 200. Raises StudioError with the tail of the process's output
    (when it was started with stdout=PIPE) if it exits first or is not up within `timeout` seconds."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        exited = proc.poll() is not None
        if exited or time.monotonic() > deadline:
            output = proc.stdout.read()[-4000:] if exited and proc.stdout is not None else ""
            state = f"exited with code {proc.returncode}" if exited else f"did not answer within {timeout:.0f} s"
            raise StudioError(f"studio serve at {url} {state}" + (f"; its output ended with:\n{output}" if output
                                                                   else ""))
        time.sleep(interval)
