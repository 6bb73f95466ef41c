"""`python -m tdm_train`: the embedded demo, or TDM distillation of a real teacher (see cli.py)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
