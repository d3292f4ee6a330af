"""LoRA and DoRA (elmjax/layers/adapters.py) against implementations no one here wrote:
mlx-lm's adapter layers loading the exported mlx-lm adapters, and peft's loading the exported
peft adapters onto the exported PyTorch OpenELM; and merging equals the adapted model."""
import numpy as np
import pytest

from adapter_support import LINEAR_TARGETS, adapted_model, adapted_params, adapter_config, base_config_of
from elmjax import trainable, tree
from elmjax.convert import adapters as adapter_export
from elmjax.convert.export import export_params
from elmjax.layers.decoder import build_model
from model_helpers import forward

TOKENS = np.random.default_rng(7).integers(0, 256, size=(2, 24))
ALL_TARGETS = "token_embeddings," + LINEAR_TARGETS


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merged_model_equals_adapted_model(kind):
    config = adapter_config(kind, targets=ALL_TARGETS)
    params = adapted_params(config)
    merged_config, merged = adapter_export.merge(config, params)
    assert merged_config.model.tie_embeddings is False  # the head keeps the base table
    adapted = forward(adapted_model(config, params), TOKENS)
    np.testing.assert_allclose(forward(adapted_model(merged_config, merged), TOKENS), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fresh_adapters_leave_the_base_unchanged(kind):
    config = adapter_config(kind, targets=ALL_TARGETS)
    model = build_model(config.model, seed=0)
    from elmjax.layers import adapters

    adapters.init_magnitudes(model)
    base = build_model(base_config_of(config).model, seed=0)
    # equal up to float rounding (DoRA's m / ||W|| is 1 up to the order of a sum)
    np.testing.assert_allclose(forward(model, TOKENS), forward(base, TOKENS), atol=1e-5, rtol=0)


def test_only_adapter_parameters_train():
    config = adapter_config("lora", targets=ALL_TARGETS)
    model = build_model(config.model, seed=0)
    _, train_state, frozen = trainable.split(model, config.model)
    trained = sorted(tree.flatten(train_state))
    assert trained and all("adapter" in name for name in trained)
    assert "token_embeddings" in tree.flatten(frozen) and "layers/0/attn/qkv_proj/kernel" in tree.flatten(frozen)
    # r x (in + out) per adapted layer: 2 layers x 4 linear layers + the embedding
    assert trainable.count(model, config.model)[0] == sum(v.size for v in tree.flatten(train_state).values())


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_mlx_lm_with_exported_adapters_equals_elmjax(tmp_path, kind):
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    from model_helpers import mlx_logits

    config = adapter_config(kind)
    params = adapted_params(config)
    base = {k: v for k, v in tree.flatten(params).items() if "adapter" not in k}
    export_params(tmp_path / "base", base_config_of(config).model, tree.unflatten(base), target="mlx")
    files = adapter_export.export_adapters(tmp_path / "adapters", config, params, to="mlx")
    assert files == ["adapter_config.json", "adapters.safetensors"]
    model, _ = load_model(tmp_path / "base")
    model = load_adapters(model, str(tmp_path / "adapters"))
    model.eval()
    np.testing.assert_allclose(
        mlx_logits(model, TOKENS), forward(adapted_model(config, params), TOKENS), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("kind,rslora", [("lora", False), ("lora", True), ("dora", False)])
def test_peft_with_exported_adapters_equals_elmjax(tmp_path, kind, rslora):
    import torch
    from peft import LoraConfig, PeftModel

    from elmjax.models.openelm.torch_model import OpenELMForCausalLM

    config = adapter_config(kind, targets=ALL_TARGETS, rslora=rslora)
    params = adapted_params(config)
    base = {k: v for k, v in tree.flatten(params).items() if "adapter" not in k}
    export_params(tmp_path / "base", base_config_of(config).model, tree.unflatten(base), target="torch")
    adapter_export.export_adapters(tmp_path / "peft", config, params, to="peft", base_model=str(tmp_path / "base"))
    peft_config = LoraConfig.from_pretrained(tmp_path / "peft")
    assert (peft_config.r, peft_config.use_dora, peft_config.use_rslora) == (4, kind == "dora", rslora)
    # task_type CAUSAL_LM is for transformers models; the reference model is a plain module
    peft_config.task_type = None
    model = PeftModel.from_pretrained(OpenELMForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "peft",
                                      config=peft_config)
    model.eval()
    with torch.no_grad():
        theirs = model.get_base_model()(torch.from_numpy(TOKENS).long()).numpy()
    np.testing.assert_allclose(theirs, forward(adapted_model(config, params), TOKENS), atol=1e-4, rtol=0)


def test_mlx_adapters_refuse_an_embedding_adapter(tmp_path):
    config = adapter_config("lora", targets=ALL_TARGETS)
    with pytest.raises(ValueError, match="mlx-lm adapts only layers inside the transformer blocks"):
        adapter_export.export_adapters(tmp_path / "a", config, adapted_params(config), to="mlx")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("config_file,targets", [
    ("configs/tiny_moe.py", "token_embeddings,qkv_proj,out_proj,lm_head"),  # experts take no adapters
    ("configs/tiny_btlm.py", "token_embeddings,qkv_proj,out_proj,proj_1,proj_2"),  # the default
])
def test_other_families_adapt_their_linear_layers_and_export_merged(tmp_path, config_file, targets):
    from elmjax.config import load_config_file

    config = load_config_file(config_file)
    config.model.num_layers = 2
    config.model.adapter.kind, config.model.adapter.targets, config.model.adapter.rank = "dora", targets, 4
    model = build_model(config.model, seed=1)
    flat = tree.flatten(model)
    rng = np.random.default_rng(0)
    params = tree.unflatten({k: (rng.normal(0, 0.05, v.shape).astype(v.dtype) if "lora_b" in k else v)
                             for k, v in flat.items()})
    tokens = TOKENS % config.model.vocab_size
    merged_config, merged = adapter_export.merge(config, params)
    np.testing.assert_allclose(forward(adapted_model(merged_config, merged), tokens),
                               forward(adapted_model(config, params), tokens), atol=1e-5, rtol=0)
    assert "model.safetensors" in export_params(tmp_path / "merged", merged_config.model, merged, target="torch")
    # OLMoE: its out_proj is one module (o_proj), but no family but OpenELM maps adapters
    with pytest.raises(ValueError, match="adapters export alone for OpenELM models only.*export the merged model"):
        adapter_export.export_adapters(tmp_path / "a", config, params, to="peft")


def test_count_params_counts_a_lora_config_as_peft_does_before_its_base_exists(tmp_path):
    """tools/count_params.py reads shapes only, so a LoRA config needs no `train.init_from`
    there; its counts are peft's for the same adapters on the exported PyTorch OpenELM."""
    import subprocess
    import sys
    from pathlib import Path

    from flax import nnx
    from peft import LoraConfig, get_peft_model

    from elmjax.config import load_config_file
    from elmjax.models.openelm.torch_model import OpenELMForCausalLM
    from export_support import random_params

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "tools/count_params.py", "--config=configs/lora_sft_tiny.py"],
                            cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    config = load_config_file(root / "configs" / "lora_sft_tiny.py")
    base = base_config_of(config).model
    export_params(tmp_path / "base", base, nnx.to_pure_dict(random_params(base)), target="torch")
    adapter = config.model.adapter
    model = get_peft_model(OpenELMForCausalLM.from_pretrained(tmp_path / "base"), LoraConfig(
        r=adapter.rank, lora_alpha=adapter.alpha, target_modules=adapter.targets.split(",")))
    trainable_count, total = model.get_nb_trainable_parameters()
    lines = result.stdout.splitlines()
    assert f"trainable params: {trainable_count}" in lines and f"params: {total}" in lines


def test_the_peft_recipe_on_an_olmoe_config_adapts_what_the_family_has():
    """`with_adapters` on OLMoE: its default targets name only layers the family has (the
    experts take no adapters), so the config validates as it comes."""
    from elmjax.config import load_config_file, validate, with_adapters

    config = validate(with_adapters(load_config_file("configs/tiny_moe.py"), "lora"), reads_inputs=False)
    adapted = {key.split("/adapter/")[0].rsplit("/", 1)[-1] for key in tree.flatten(build_model(config.model, seed=0))
               if "/adapter/" in key}
    assert adapted == {"qkv_proj", "out_proj"}


@pytest.mark.parametrize("written", ["qkv_proj,out_proj", "('qkv_proj', 'out_proj')", "[qkv_proj, out_proj]",
                                     " qkv_proj , out_proj ,"])
def test_adapter_targets_read_as_a_list_however_a_command_line_brackets_them(written):
    from ml_collections import ConfigDict

    from elmjax.layers.adapters import target_names

    assert target_names(ConfigDict({"targets": written})) == ("qkv_proj", "out_proj")


def test_validation_saves_the_targets_in_one_spelling_so_a_resume_compares_alike():
    from configs.lora_sft_tiny import get_config

    from elmjax.config import validate

    config = get_config()
    config.model.adapter.targets = "[qkv_proj, out_proj]"
    assert validate(config, reads_inputs=False).model.adapter.targets == "qkv_proj,out_proj"
