"""`python -m studio.eval ...` is `studio eval ...` (same flags, same error handling)."""

import sys

from studio.eval.cli import main

sys.exit(main())
