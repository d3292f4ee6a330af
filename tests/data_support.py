"""Shared helper of the data tests: a validated config with a small model and batch."""
from elmjax.config import base_config, validate


def data_config(source="embedded", *, seq: int, batch: int, **data):
    """`base_config()` with a 4096-token vocabulary, rows of `seq` tokens, `batch` rows per
    step, `data.source=source` and the given `data` fields; validated."""
    config = base_config()
    config.model.vocab_size = 4096
    config.model.max_seq_len = 256
    config.train.seq_len = seq
    config.train.batch_size = batch
    config.data.source = source
    for name, value in data.items():
        config.data[name] = value
    return validate(config)
