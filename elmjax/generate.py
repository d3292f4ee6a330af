"""`python -m elmjax.generate`: text from a checkpoint (elmjax/inference/generate.py)."""
import sys

from elmjax import cli

if __name__ == "__main__":
    from elmjax.inference.generate import main

    sys.exit(cli.run_command(main))
