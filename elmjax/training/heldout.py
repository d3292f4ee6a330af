"""Held-out evaluation during training: perplexity over the held-out documents' loss tokens
(`train.objective="lm"`), or DPO's loss, preference accuracy and reward margin over held-out
preference pairs (`"dpo"`)."""
from __future__ import annotations

import math

import jax

from elmjax.training import step as ts


class Evaluator:
    """`evaluate(setup, params, frozen)` -> (results dict, one log line) over up to
    `config.eval.batches` held-out batches of the (stage's) setup's shape, under the training
    shardings."""

    def __init__(self, setup):
        self.dpo = setup.config.train.objective == "dpo"
        self.step = ts.make_jit_eval_step(
            setup.config, setup.graphdef, setup.param_shardings, setup.frozen_shardings, setup.batch_sharding,
            setup.mesh,
        )

    def _batches(self, setup):
        from elmjax.data.pipeline import make_eval_iterator
        from elmjax.data.preference import make_preference_iterator
        from elmjax.training.setup import global_batch

        config = setup.config
        batches = make_preference_iterator(config, "eval") if self.dpo else make_eval_iterator(config)
        for index, batch in enumerate(batches):
            if index >= config.eval.batches:
                break
            yield global_batch(setup, batch)

    def evaluate(self, setup, params, frozen) -> tuple[dict, str]:
        totals = None
        for batch in self._batches(setup):
            sums = jax.device_get(self.step(params, frozen, batch))
            totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
        if self.dpo:
            return self._preferences(totals)
        ce_sum, tokens = (0.0, 0.0) if totals is None else (float(totals[0]), float(totals[1]))
        loss = ce_sum / max(tokens, 1.0)
        results = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0)), "eval_tokens": tokens}
        return results, f"held-out loss {loss:.4f}, perplexity {results['eval_perplexity']:.2f}"

    @staticmethod
    def _preferences(totals) -> tuple[dict, str]:
        terms, pairs = totals if totals is not None else ({}, 0.0)
        pairs = max(float(pairs), 1.0)
        results = {f"eval_{name}": float(value) / pairs for name, value in terms.items()}
        results["eval_pairs"] = pairs
        return results, (f"held-out DPO loss {results.get('eval_loss', float('nan')):.4f}, preference accuracy "
                         f"{results.get('eval_preference_accuracy', float('nan')):.3f}, reward margin "
                         f"{results.get('eval_reward_margin', float('nan')):.4f} ({pairs:.0f} pairs)")
