"""Shared builders of the OLMoE tests: small transformers OlmoeForCausalLM oracles and the
elmjax model that imports them."""
import numpy as np
import torch

from elmjax.config import family_config, validate
from elmjax.tree import path_name

# SPEC §2's small CPU oracle, with three layers.
ORACLE = dict(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4)


def hf_olmoe(seed=0, **overrides):
    """A float32 transformers `OlmoeForCausalLM` in eval mode with random weights; norm
    weights are 1 + N(0, 0.1) (not all ones, so a swapped or dropped norm changes the logits)."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    config = OlmoeConfig(**{**ORACLE, "num_experts": 8, "num_experts_per_tok": 2, **overrides},
                         output_router_logits=True, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    model = OlmoeForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                parameter.copy_(1.0 + 0.1 * torch.randn_like(parameter))
            elif name.endswith("mlp.gate.weight"):
                # Larger router weights than the 0.02 init, so routing differs clearly by token.
                parameter.copy_(0.5 * torch.randn_like(parameter))
    return model


def hf_logits(model, tokens):
    """(float32 logits [batch, seq, vocab], per-layer router logits [batch * seq, E])."""
    with torch.no_grad():
        out = model(torch.from_numpy(np.asarray(tokens)).long(), output_router_logits=True)
    return out.logits.numpy(), [r.numpy() for r in out.router_logits]


def micro_moe_config(**model_overrides):
    """A validated tiny OLMoE config for training tests (8 experts, top-2, d 64)."""
    fields = dict(
        num_layers=2, model_dim=64, head_dim=16, num_heads=4, num_kv_heads=4, vocab_size=512,
        max_seq_len=64, tie_embeddings=False, norm_eps=1e-5, qk_norm="full", ffn_dim=32,
        num_experts=8, num_experts_per_tok=2, moe_tile=16,
    )
    fields.update(model_overrides)
    config = family_config("olmoe", peak_lr=1e-2, **fields)
    config.train.steps, config.train.batch_size, config.train.seq_len = 8, 8, 32
    config.train.log_every, config.train.sample_at_end, config.train.z_loss = 1, False, 0.0
    config.optim.warmup_steps = 2
    config.optim.weight_decay_on = "all"
    config.checkpoint.every_steps = 4
    config.eval.every_steps = 0
    return validate(config)


def random_moe_params(model_config, seed=0):
    """float32 parameters shaped like `nnx.state(model, nnx.Param)`: matrices ~ N(0, fan_in^-1/2),
    router N(0, 0.5^2) (distinct routing per token), norm weights 1 + N(0, 0.1)."""
    from flax import nnx

    from elmjax.layers.decoder import abstract_model

    rng = np.random.default_rng(seed)
    abstract = nnx.state(abstract_model(model_config), nnx.Param)

    def draw(path, variable):
        name = path_name(path)
        shape = variable.shape
        if name.endswith("/weight"):  # norms
            value = 1.0 + rng.normal(0.0, 0.1, shape)
        elif name.endswith("router/kernel"):
            value = rng.normal(0.0, 0.5, shape)
        elif name == "token_embeddings":
            value = rng.normal(0.0, shape[1] ** -0.5, shape)
        elif name.endswith("experts/gate_up") or name.endswith("experts/down"):
            value = rng.normal(0.0, shape[1] ** -0.5, shape)  # [E, in, ...]
        else:  # [in, out] kernels
            value = rng.normal(0.0, shape[0] ** -0.5, shape)
        return path, variable.replace(value=value.astype(np.float32))

    return nnx.from_flat_state([draw(path, v) for path, v in nnx.to_flat_state(abstract)])
