"""`python -m elmjax.evaluate`: lm-eval zero-shot tasks on a checkpoint (elmjax/inference/evaluate.py)."""
import sys

from elmjax.inference.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
