"""Launch the MoE LoRA Studio web app: `python app.py [--host 127.0.0.1] [--port 7860] [--auth user:pass]`.

The same as `studio ui`; `python app.py --help` lists every option. The app lives in studio/ui/.
"""

import sys

from studio import _openmp

_openmp.spin_between_operators()  # as `studio ui` does, before torch is imported (studio/_openmp.py)

from studio.ui.app import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
