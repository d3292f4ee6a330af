"""Generation and lm-eval scoring of an OLMoE checkpoint: `elmjax.evaluate`'s log-likelihoods
equal mlx-lm's on the exported model, and `elmjax.generate` runs from the checkpoint."""
import numpy as np
import pytest
from flax import nnx
from lm_eval.api.instance import Instance

from elmjax.convert.export import export_checkpoint
from elmjax.inference import evaluate as ev
from elmjax.inference import generate as gen
from elmjax.training.checkpoint import save_params_checkpoint
from olmoe_support import micro_moe_config, random_moe_params


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A params-only checkpoint of a random-weight micro OLMoE (tokenizer trained on the corpus)."""
    config = micro_moe_config(max_seq_len=128)
    workdir = tmp_path_factory.mktemp("moe_eval")
    save_params_checkpoint(workdir, config, random_moe_params(config.model, seed=5))
    return workdir


def test_loglikelihoods_equal_mlx_lm_on_the_exported_model(checkpoint, tmp_path):
    from mlx_lm.evaluate import MLXLM

    export_checkpoint(str(checkpoint), str(tmp_path / "mlx"), target="mlx")
    pairs = [("And God said, Let there be light:", " and there was light."),
             ("To be, or not to be,", " that is the question"), ("", "In the beginning")]
    requests = [Instance("loglikelihood", doc={}, arguments=pair, idx=0) for pair in pairs]
    ours = ev.ElmjaxLM(checkpoint=str(checkpoint)).loglikelihood(requests)
    theirs = MLXLM(str(tmp_path / "mlx"), max_tokens=128, batch_size=8).loglikelihood(requests)
    np.testing.assert_allclose([lp for lp, _ in ours], [lp for lp, _ in theirs], rtol=1e-4)
    assert [g for _, g in ours] == [g for _, g in theirs]


def test_generate_command_runs_an_moe_checkpoint(checkpoint, capsys):
    assert gen.main(["--checkpoint", str(checkpoint), "--prompt", "KING HENRY:", "--max_new_tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("KING HENRY:")


def test_kv_cache_decoding_equals_recomputing_the_whole_sequence(checkpoint):
    """Greedy decoding with the cache picks, at every step, the argmax of a full forward pass
    over the sequence so far."""
    from elmjax.training.checkpoint import load_model

    _, model = load_model(checkpoint)
    prompt = [1, 17, 200, 42, 9]
    new = gen.generate(model, [prompt], max_new_tokens=10, temperature=0.0)[0]
    sequence = list(prompt)
    forward = nnx.jit(lambda m, t: m(t))
    for token in new:
        logits = np.asarray(forward(model, np.asarray([sequence], np.int32)))
        assert int(np.argmax(logits[0, -1])) == token
        sequence.append(token)
