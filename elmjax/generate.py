"""`python -m elmjax.generate`: text from a checkpoint (elmjax/inference/generate.py)."""
import sys

from elmjax.inference.generate import main

if __name__ == "__main__":
    sys.exit(main())
