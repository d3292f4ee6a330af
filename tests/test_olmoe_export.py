"""OLMoE export and import with the real consumers: transformers' OlmoeForCausalLM loads the
`--to torch` export (same logits, same greedy generation), mlx-lm's `olmoe` loads the
`--to mlx` export (logits within 1e-4; quantized exports equal mlx-lm's own quantizer),
and a transformers checkpoint comes back bit-exact through elmjax."""
import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model, quantize_model
from safetensors.numpy import load_file

from elmjax.convert.export import export_checkpoint, export_params
from elmjax.convert.hf_import import params_from_flat
from elmjax.inference.generate import generate
from elmjax.layers.decoder import abstract_model
from export_support import logits as elmjax_logits
from olmoe_support import hf_olmoe, micro_moe_config, random_moe_params

VOCAB = 384


@pytest.fixture(scope="module")
def tiny():
    """A 2-layer OLMoE (8 experts, top-2) with random weights, and its logits for a batch."""
    config = micro_moe_config(vocab_size=VOCAB)
    params = random_moe_params(config.model, seed=0)
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(2, 20)).astype(np.int32)
    return config.model, params, tokens, elmjax_logits(config.model, params, tokens)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    model_config, params, _, _ = tiny
    root = tmp_path_factory.mktemp("olmoe_exports")
    for target in ("torch", "mlx"):
        export_params(root / target, model_config, params, target=target)
    return root


def transformers_model(directory):
    from transformers import OlmoeForCausalLM

    return OlmoeForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def test_torch_export_has_transformers_names_and_shapes(tmp_path, exported):
    """The same tensor names and shapes as transformers' own save_pretrained of this config."""
    config = json.loads((exported / "torch" / "config.json").read_text())
    reference = hf_olmoe(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_experts=8, num_experts_per_tok=2)
    reference.save_pretrained(tmp_path / "reference")
    theirs = load_file(str(tmp_path / "reference" / "model.safetensors"))
    ours = load_file(str(exported / "torch" / "model.safetensors"))
    assert {n: t.shape for n, t in ours.items()} == {n: t.shape for n, t in theirs.items()}
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in ours and "lm_head.weight" in ours
    spec_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                 "tie_word_embeddings", "rope_parameters", "attention_bias", "clip_qkv", "num_experts_per_tok",
                 "num_experts", "output_router_logits", "router_aux_loss_coef", "norm_topk_prob")
    theirs_config = json.loads((tmp_path / "reference" / "config.json").read_text())
    for key in spec_keys:
        assert config[key] == theirs_config[key] or key in ("max_position_embeddings", "output_router_logits"), key
    assert (config["model_type"], config["architectures"]) == ("olmoe", ["OlmoeForCausalLM"])


def test_transformers_loads_the_torch_export_with_equal_logits(tiny, exported):
    _, _, tokens, logits = tiny
    with torch.no_grad():
        theirs = transformers_model(exported / "torch")(torch.from_numpy(tokens).long()).logits.numpy()
    np.testing.assert_allclose(theirs, logits, atol=1e-4, rtol=0)


def test_transformers_greedy_generation_equals_elmjax(tiny, exported):
    from flax import nnx

    model_config, params, _, _ = tiny
    prompts = [[5, 17, 300, 42, 9], [250, 3, 77]]
    graphdef, _ = nnx.split(abstract_model(model_config))
    ours = generate(nnx.merge(graphdef, params), prompts, max_new_tokens=16, temperature=0.0)
    hf = transformers_model(exported / "torch")
    for prompt, mine in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        assert out[0, len(prompt):].tolist() == mine


def mlx_logits(model_dir, tokens):
    model, _ = load_model(model_dir)
    return np.array(model(mx.array(tokens)).astype(mx.float32))


def test_mlx_export_stacks_experts_and_mlx_lm_logits_equal_elmjax(tiny, exported):
    _, _, tokens, logits = tiny
    names = set(mx.load(str(exported / "mlx" / "model.safetensors")))
    assert "model.layers.0.mlp.switch_mlp.gate_proj.weight" in names
    assert not any(".experts." in name for name in names)
    np.testing.assert_allclose(mlx_logits(exported / "mlx", tokens), logits, atol=1e-4, rtol=0)


def test_mlx_lm_loads_the_torch_export_too(tiny, exported):
    """mlx-lm's olmoe `sanitize` stacks the per-expert HF names itself."""
    _, _, tokens, logits = tiny
    np.testing.assert_allclose(mlx_logits(exported / "torch", tokens), logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32)])
def test_quantized_mlx_export_equals_mlx_lm_quantize_model(tiny, tmp_path, bits, group_size):
    """Packed weights, scales, biases (stacked experts included) and config equal what
    mlx-lm's quantizer makes of the float export."""
    model_config, params, _, _ = tiny
    export_params(tmp_path / "float", model_config, params, target="mlx")
    export_params(tmp_path / "q", model_config, params, target="mlx", quantize=bits, group_size=group_size)
    reference, config = load_model(tmp_path / "float")
    reference, reference_config = quantize_model(reference, config, group_size=group_size, bits=bits)
    ours = mx.load(str(tmp_path / "q" / "model.safetensors"))
    theirs = dict(tree_flatten(reference.parameters()))
    assert sorted(ours) == sorted(theirs)
    assert "model.layers.0.mlp.switch_mlp.gate_proj.scales" in ours  # stacked experts quantized
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype, name
        assert mx.array_equal(ours[name], value).item(), name
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"] == reference_config["quantization"]


def test_quantized_mlx_export_runs_the_dequantized_weights(tiny, tmp_path):
    """mlx-lm's 8-bit model equals elmjax run on the dequantized weights (1e-4)."""
    model_config, params, tokens, _ = tiny
    out = tmp_path / "q8"
    export_params(out, model_config, params, target="mlx", quantize=8, group_size=32)
    stored = mx.load(str(out / "model.safetensors"))
    hf_tensors = {}
    for name, value in stored.items():
        if name.endswith((".scales", ".biases")):
            continue
        prefix = name[: -len(".weight")]
        if f"{prefix}.scales" in stored:
            value = mx.dequantize(value, stored[f"{prefix}.scales"], stored[f"{prefix}.biases"], group_size=32, bits=8)
        value = np.array(value)
        if ".switch_mlp." in name:  # back to transformers' per-expert names
            for j in range(value.shape[0]):
                hf_tensors[name.replace("switch_mlp.", f"experts.{j}.")] = value[j]
        else:
            hf_tensors[name] = value
    from elmjax.convert.hf import from_hf_state_dict

    dequantized = params_from_flat(model_config, from_hf_state_dict(hf_tensors, model_config))
    np.testing.assert_allclose(mlx_logits(out, tokens), elmjax_logits(model_config, dequantized, tokens),
                               atol=1e-4, rtol=0)


def test_transformers_checkpoint_through_elmjax_is_bit_exact(tmp_path):
    """transformers save_pretrained -> tools/import_hf.py -> export --to torch: every tensor
    and every architecture key of config.json come back identical. (This checkpoint has no
    tokenizer files, so export writes none.)"""
    from tools import import_hf as import_tool

    hf = hf_olmoe(seed=7, num_experts=16, num_experts_per_tok=8, norm_topk_prob=True)
    hf.save_pretrained(tmp_path / "hf")
    assert import_tool.main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "workdir")]) == 0
    export_checkpoint(tmp_path / "workdir", tmp_path / "back", target="torch", with_tokenizer=False)
    original = load_file(str(tmp_path / "hf" / "model.safetensors"))
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(original) == sorted(back)
    for name, value in original.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
    theirs = json.loads((tmp_path / "hf" / "config.json").read_text())
    ours = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "rope_parameters",
                "num_experts_per_tok", "num_experts", "norm_topk_prob", "router_aux_loss_coef",
                "max_position_embeddings", "hidden_act", "attention_bias", "clip_qkv"):
        assert ours[key] == theirs[key], key


def test_a_trained_moe_checkpoint_exports_with_its_tokenizer(tmp_path):
    """The real trainer on the embedded corpus, then tools/export.py: transformers runs the
    result with elmjax's logits, and the tokenizer's ids land in config.json."""
    from elmjax.data.tokenizer_choice import load_tokenizer
    from elmjax.training.checkpoint import load_model as load_checkpoint
    from elmjax.training.loop import train
    from transformers import PreTrainedTokenizerFast

    from export_support import model_logits
    from tools import export as export_tool

    config = micro_moe_config()
    config.train.steps, config.checkpoint.every_steps, config.checkpoint.async_save = 2, 2, False
    train(config, tmp_path / "run", log=lambda *_: None)
    assert export_tool.main(["--checkpoint", str(tmp_path / "run"), "--to", "torch", "--out", str(tmp_path / "hf")]) == 0
    tokenizer = load_tokenizer(config)
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (tokenizer.bos_id, tokenizer.eos_id)
    # config.json's special ids are those transformers reads from the exported tokenizer files
    # (pad was OlmoeConfig's default 1, the tiny tokenizer's bos)
    theirs_tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "hf")
    assert [exported[f"{kind}_token_id"] for kind in ("bos", "eos", "pad")] == [
        theirs_tokenizer.bos_token_id, theirs_tokenizer.eos_token_id, theirs_tokenizer.pad_token_id]
    _, model = load_checkpoint(tmp_path / "run")
    tokens = np.random.default_rng(1).integers(0, tokenizer.vocab_size, size=(1, 12)).astype(np.int32)
    with torch.no_grad():
        theirs = transformers_model(tmp_path / "hf")(torch.from_numpy(tokens).long()).logits.numpy()
    np.testing.assert_allclose(theirs, model_logits(model, tokens)[..., : theirs.shape[-1]], atol=1e-4, rtol=0)
