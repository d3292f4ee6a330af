"""Validation of the `config.data` fields: each rule names its field."""
import pytest

from elmjax.config import ConfigError, base_config, validate


def with_data(**fields):
    config = base_config()
    for name, value in fields.items():
        config.data[name] = value
    return config


def test_defaults_are_valid():
    validate(base_config())


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"source": "  "}, "data.source"),
        ({"format": "csv"}, "data.format"),
        ({"text_unit": "sentence"}, "data.text_unit"),
        ({"text_field": ""}, "data.text_field"),
        ({"source": "a.txt,b.txt", "mixture_weights": "1"}, "data.mixture_weights"),
        ({"source": "a.txt,b.txt", "mixture_weights": "1,0"}, "data.mixture_weights"),
        ({"source": "a.txt,b.txt", "mixture_weights": "1,x"}, "data.mixture_weights"),
        ({"pad_id": -2}, "data.pad_id"),
        ({"pad_id": 32000}, "data.pad_id"),
        ({"seed": -1}, "data.seed"),
        ({"num_workers": -1}, "data.num_workers"),
        ({"prefetch": 0}, "data.prefetch"),
        ({"eval_fraction": 1.0}, "data.eval_fraction"),
        ({"eval_fraction": -0.1}, "data.eval_fraction"),
    ],
)
def test_bad_data_field_is_rejected_by_name(fields, field):
    with pytest.raises(ConfigError) as error:
        validate(with_data(**fields))
    assert error.value.field == field


def test_weights_one_per_source_are_accepted():
    validate(with_data(source="a.txt, b.txt", mixture_weights="0.7,0.3"))
