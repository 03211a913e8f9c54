"""OpenMP's wait policy for the decoding entry points (`studio serve`, `studio ui`, `studio eval`, app.py), set
before torch is imported.

torch's CPU wheels run their operators on GNU OpenMP (libgomp) worker threads. Every Python thread that runs torch
operators gets a team of its own, kept while the thread lives; once the process holds more OpenMP threads than
CPUs, libgomp by default cuts an idle worker's spin to 100 rounds, so it sleeps between operators and every
operator pays its wake-up. A serving process is in that state on a small machine: the engine's scheduler thread
and the threads that load adapters or tokenize each hold a team, and a decode step is hundreds of small operators.
Measured on a 2-vCPU VM (torch 2.13, 2 torch threads):
* a [12, 512] x [512, 512] matmul plus an add, in a loop: 96 us per pair, 302 us while another live thread held a
  team; 110 us with OMP_WAIT_POLICY=ACTIVE and GOMP_SPINCOUNT=300000;
* a decode step of bench/serve.py's 64-expert model (12 rows), kinds alternating every step: 98-123 ms with the
  library's default, 62-65 ms with these settings in the same hour (later in the day, with the machine slower,
  107 against 123 ms); one torch thread took 62 ms either way; GOMP_SPINCOUNT alone did not help;
* `studio serve`, 1 / 8 / 32 concurrent streams: 1.25-1.82x the decode tokens/s (BENCHMARKS.md, fifth pass);
* a training step (bench/train_step.py --isolation inline, 2 torch threads) was unchanged within noise, so the
  training entry points keep the library's default.

GOMP_SPINCOUNT bounds the spin (300000 rounds, libgomp's documented default: a few milliseconds), so an idle
process sleeps: 0.009 CPU-seconds over 3 idle seconds, against 3.0 with OMP_WAIT_POLICY=ACTIVE alone (its spin is
30 billion rounds). A user's own setting of either variable is left alone; STUDIO_OPENMP=library keeps libgomp's
defaults (bench/serve.py --openmp library, for an A/B).
"""

from __future__ import annotations

import os
import sys

SETTINGS = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}
OPT_OUT = "STUDIO_OPENMP"


def spin_between_operators(environ=None) -> bool:
    """Set SETTINGS in `environ` (os.environ) unless the user set either variable or STUDIO_OPENMP=library, or
    torch is already imported (libgomp reads them once, when torch loads it). Returns whether it set them."""
    environ = os.environ if environ is None else environ
    if "torch" in sys.modules or environ.get(OPT_OUT) == "library" or any(name in environ for name in SETTINGS):
        return False
    environ.update(SETTINGS)
    return True


def slow_decoding_warning(device, threads: int, environ=None) -> str | None:
    """For an Engine built in one's own program (where no entry point set SETTINGS before torch loaded): why CPU
    decoding there runs slower than under `studio serve`, and the fix; None when it does not apply (another device,
    one torch thread, SETTINGS or either variable set, or STUDIO_OPENMP=library)."""
    environ = os.environ if environ is None else environ
    if (str(device) != "cpu" or threads < 2 or environ.get(OPT_OUT) == "library"
            or any(name in environ for name in SETTINGS)):
        return None
    return (f"torch runs {threads} OpenMP threads with libgomp's default wait policy: CPU decoding runs 1.15-1.9x "
            "slower than it could once the engine's scheduler thread holds an OpenMP team of its own "
            "(studio/_openmp.py). Start Python with OMP_WAIT_POLICY=ACTIVE GOMP_SPINCOUNT=300000, as `studio serve`, "
            "`studio ui` and `studio eval` do for themselves, or call studio._openmp.spin_between_operators() before "
            "torch is imported; STUDIO_OPENMP=library keeps the defaults and silences this")


def describe(environ=None) -> str:
    """The OpenMP wait settings in effect, for logs and benchmark headers."""
    environ = os.environ if environ is None else environ
    return ", ".join(f"{name}={environ.get(name, '(unset)')}" for name in SETTINGS)
