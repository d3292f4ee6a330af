"""Fine-tuning runs end to end with `python -m elmjax.train` from a trained base
(`train.init_from`): a LoRA run's checkpoints hold only the adapters and their optimizer
state, and a SIGKILL after a checkpoint resumes bitwise (adapter dropout included); DPO runs,
with LoRA over the frozen base or every weight against a frozen copy, start exactly at the
loss of a zero reward margin (policy = reference: log 2 for the sigmoid loss, 1 for hinge)."""
import json

import numpy as np
import orbax.checkpoint as ocp
import pytest

from elmjax import tree
from test_train_resume import env, killed_train_command, metrics_by_step, run, train_command

LORA = ("--config.model.adapter.kind=lora", "--config.model.adapter.rank=4", "--config.model.adapter.dropout=0.1",
        "--config.optim.weight_decay=0")


def _dir_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache):
    workdir = tmp_path_factory.mktemp("base")
    result = run(train_command(workdir, "--config.train.steps=4"), env(cache))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base, cache):
    workdir = tmp_path_factory.mktemp("lora")
    result = run(train_command(workdir, *LORA, f"--config.train.init_from={base}"), env(cache))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"frozen base model from {base}/checkpoints/4" in result.stdout
    return workdir


def _saved_state(step_dir):
    metadata = ocp.PyTreeCheckpointer().metadata((step_dir / "state").absolute()).item_metadata
    return metadata.tree if hasattr(metadata, "tree") else metadata


def test_lora_checkpoint_holds_only_adapters_and_their_optimizer_state(lora_run, base):
    saved = _saved_state(lora_run / "checkpoints" / "8")
    params = tree.flatten(jax_free(saved["params"]))
    assert params and all("/adapter/" in name or name.startswith("embedding_adapter/") for name in params)
    adapter_shapes = sorted(tuple(v) for v in params.values())
    moment_shapes = sorted(tuple(v) for v in tree.flatten(jax_free(saved["opt_state"])).values() if v.size)
    # AdamW's two moments per adapter tensor, nothing of the base
    assert moment_shapes == sorted(adapter_shapes * 2)
    base_bytes, lora_bytes = _dir_bytes(base / "checkpoints" / "4"), _dir_bytes(lora_run / "checkpoints" / "8")
    assert lora_bytes < base_bytes / 2, (lora_bytes, base_bytes)


def jax_free(node):
    """Array metadata -> shape tuples (scalars: ())."""
    if isinstance(node, dict):
        return {k: jax_free(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return {str(i): jax_free(v) for i, v in enumerate(node)}
    return np.asarray(getattr(node, "shape", ()))


def test_the_readmes_peft_recipe_loads_the_exported_adapters_onto_the_exported_base(lora_run, base, tmp_path):
    """tools/export.py --adapters peft --base DIR, loaded as README.md says, gives the merged
    export's logits (peft is the oracle of the adapter math; the merged model elmjax's own)."""
    import torch
    from peft import LoraConfig, PeftModel

    from elmjax.models.openelm.torch_model import OpenELMForCausalLM
    from tools import export as export_tool

    hf, adapters, merged = tmp_path / "hf", tmp_path / "peft", tmp_path / "merged"
    assert export_tool.main(["--checkpoint", str(base), "--to", "torch", "--out", str(hf)]) == 0
    assert export_tool.main(["--checkpoint", str(lora_run), "--adapters", "peft", "--base", str(hf),
                             "--out", str(adapters)]) == 0
    assert export_tool.main(["--checkpoint", str(lora_run), "--to", "torch", "--out", str(merged)]) == 0
    assert json.loads((adapters / "adapter_config.json").read_text())["base_model_name_or_path"] == str(hf)
    peft_config = LoraConfig.from_pretrained(adapters)
    peft_config.task_type = None
    model = PeftModel.from_pretrained(OpenELMForCausalLM.from_pretrained(hf), adapters, config=peft_config).eval()
    tokens = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4]])
    with torch.no_grad():
        theirs = model.get_base_model()(tokens).numpy()
        ours = OpenELMForCausalLM.from_pretrained(merged)(tokens).numpy()
        base_logits = OpenELMForCausalLM.from_pretrained(hf)(tokens).numpy()
    assert np.abs(ours - base_logits).max() > 1e-4  # the trained adapters changed the model
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_lora_run_resumes_bitwise_after_sigkill(lora_run, base, tmp_path, cache):
    workdir = tmp_path / "killed"
    overrides = (*LORA, f"--config.train.init_from={base}")
    killed = run(killed_train_command(workdir, *overrides), env(cache, KILL_AFTER_CHECKPOINT="4"))
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = run(train_command(workdir, *overrides), env(cache))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {workdir}/checkpoints/4 (step 4)" in resumed.stdout
    straight, after = metrics_by_step(lora_run), metrics_by_step(workdir)
    for step in range(5, 9):
        assert (after[step]["loss"], after[step]["grad_norm"]) == (straight[step]["loss"], straight[step]["grad_norm"])
    assert json.loads((workdir / "config.json").read_text())["model"]["adapter"]["kind"] == "lora"


DPO = ("--config.train.objective=dpo", "--config.data.source=embedded:chat", "--config.data.chat_template=openelm",
       "--config.train.steps=2", "--config.eval.every_steps=2", "--config.eval.batches=1")


@pytest.mark.parametrize("reference,loss,start", [("base", "sigmoid", np.log(2.0)), ("initial", "hinge", 1.0)])
def test_dpo_starts_at_a_zero_margin_and_reports_preferences(base, tmp_path, cache, reference, loss, start):
    overrides = (*DPO, f"--config.dpo.reference={reference}", f"--config.dpo.loss={loss}",
                 f"--config.train.init_from={base}", *(LORA if reference == "base" else ()))
    result = run(train_command(tmp_path / "dpo", *overrides), env(cache))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(records[0]["loss"], start, rtol=1e-6)
    assert abs(records[0]["dpo/reward_margin"]) < 1e-5  # zero up to the order of two forward passes
    held_out = [r for r in records if "eval_preference_accuracy" in r][-1]
    assert 0.0 <= held_out["eval_preference_accuracy"] <= 1.0 and held_out["eval_pairs"] == 4  # one batch of 4 pairs, none padding
    assert "held-out DPO loss" in result.stdout
