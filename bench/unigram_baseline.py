"""The unigram baseline for a config's held-out loss: the best model that ignores context.

Counts every target token of the training stream the run sees (`train.steps` batches of the
real loader), then scores the held-out batches that `train.eval` scores (`eval.batches`) with
those frequencies (add-half smoothing so unseen tokens stay finite). Prints the held-out
cross-entropy in nats and the entropy of the training stream's unigram distribution.

    PYTHONPATH=. python bench/unigram_baseline.py --config=configs/tiny.py
"""
from __future__ import annotations

import argparse
import itertools

import numpy as np

from elmjax.config import load_config_file, validate
from elmjax.data.pipeline import make_eval_iterator, make_train_iterator


def counts(batches, vocab_size: int) -> np.ndarray:
    """Occurrences of each token id among the loss-masked targets of `batches`."""
    total = np.zeros(vocab_size, np.float64)
    for batch in batches:
        np.add.at(total, batch["targets"][batch["loss_mask"] > 0], 1.0)
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.py")
    args = parser.parse_args(argv)
    config = validate(load_config_file(args.config))
    vocab = config.model.vocab_size
    train = counts(itertools.islice(make_train_iterator(config), config.train.steps), vocab)
    probabilities = (train + 0.5) / (train.sum() + 0.5 * vocab)
    held_out = counts(itertools.islice(make_eval_iterator(config), config.eval.batches), vocab)
    cross_entropy = -(held_out * np.log(probabilities)).sum() / held_out.sum()
    seen = train / train.sum()
    entropy = -(seen[seen > 0] * np.log(seen[seen > 0])).sum()
    print(f"training tokens: {int(train.sum()):,}; held-out tokens: {int(held_out.sum()):,}")
    print(f"unigram held-out loss: {cross_entropy:.4f} nats (perplexity {np.exp(cross_entropy):.1f})")
    print(f"unigram entropy of the training stream: {entropy:.4f} nats")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
