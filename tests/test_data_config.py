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


def test_format_and_text_unit_names_have_one_home_in_the_data_package():
    from elmjax import config_checks as config_module
    from elmjax.data import formats, sources

    assert config_module.DATA_FORMATS is formats.DATA_FORMATS
    assert config_module.TEXT_UNITS is formats.TEXT_UNITS
    assert formats.DATA_FORMATS == ("auto", "text", "jsonl", "parquet", "token_store")
    assert formats.TEXT_UNITS == ("file", "line")
    spec = sources.SourceSpec("csv", "x.csv")
    with pytest.raises(ValueError, match="allowed: auto, text, jsonl, parquet, token_store"):
        sources.open_source(spec, with_data().data)


@pytest.mark.parametrize(
    "source, weights, message",
    [
        ("a.txt,b.txt", "1", ("is '1'; need 2 positive comma-separated numbers, one per data.source "
                              "entry (or empty for equal weights)")),
        ("a.txt,b.txt", "1,x", ("is '1,x'; need 2 positive comma-separated numbers, one per "
                                "data.source entry (or empty for equal weights)")),
        ("a.txt, b.txt,c.txt", "1,0,2", ("is '1,0,2'; need 3 positive comma-separated numbers, one "
                                         "per data.source entry (or empty for equal weights)")),
        ("a.txt,b.txt", "1,inf", ("is '1,inf'; need 2 positive comma-separated numbers, one per "
                                  "data.source entry (or empty for equal weights)")),
    ],
)
def test_mixture_weights_are_parsed_once_for_validate_and_the_pipeline(source, weights, message):
    from elmjax.data import pipeline

    config = with_data(source=source, mixture_weights=weights)
    with pytest.raises(ConfigError) as by_validate:
        validate(config)
    assert str(by_validate.value) == f"config field `data.mixture_weights`: {message}"
    with pytest.raises(ConfigError) as by_pipeline:
        pipeline.mixture_weights(config.data, len([e for e in source.split(",") if e.strip()]))
    assert by_pipeline.value.field == "data.mixture_weights"
    assert str(by_pipeline.value) == str(by_validate.value)


def test_mixture_weights_parse_to_floats_or_equal_weights():
    from elmjax.data import pipeline
    from elmjax.data.formats import parse_mixture_weights

    assert parse_mixture_weights(" 0.7, 0.3 ", 2) == [0.7, 0.3]
    assert parse_mixture_weights("", 3) == [1.0, 1.0, 1.0]
    assert pipeline.mixture_weights(with_data(source="a.txt,b.txt", mixture_weights="3,1").data, 2) == [3.0, 1.0]
