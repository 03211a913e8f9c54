"""Launch the MoE LoRA Studio web app: `python app.py [--host 127.0.0.1] [--port 7860] [--auth user:pass]`.

The same as `studio ui`; `python app.py --help` lists every option. The app lives in studio/ui/.
"""

import sys

from studio.ui.app import main

if __name__ == "__main__":
    sys.exit(main())
