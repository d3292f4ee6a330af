"""The training loop: step, log, evaluate, checkpoint, until `config.train.steps`.

`train(config, workdir)` resumes from WORKDIR's newest complete checkpoint; the command line
around it is `python -m elmjax.train` (elmjax/train.py).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import zlib

import jax

from elmjax import storage
from elmjax.training import checkpoint as ckpt
from elmjax.training import heldout
from elmjax.training import memory
from elmjax.training import metrics as mt
from elmjax.training import optim
from elmjax.training import peers
from elmjax.training import run_state
from elmjax.training import setup as setup_lib
from elmjax.training import stages
from elmjax.training import workdir_lock


class StopRequest:
    """Why the loop should save a checkpoint and exit at the next step (with several
    processes: at the next step where they agree, see `requested`): SIGTERM or SIGINT once
    `listen` has run, or a closed stdout behind the log that `guard` wraps."""

    def __init__(self):
        self.signal = None

    def listen(self) -> None:
        """Installs the SIGTERM/SIGINT handlers (only once the loop starts: Ctrl-C while
        building or compiling still interrupts at once, with nothing to save yet)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def guard(self, log):
        """`log`, which on a closed stdout (`train ... | head`) prints nothing more and
        requests a stop: the loop then saves the step it reached, as on SIGINT, instead of
        dying on BrokenPipeError with the steps since the last checkpoint."""
        def write(*args):
            if self.signal == OUTPUT_CLOSED:
                return
            try:
                log(*args)
            except BrokenPipeError:
                self.signal = self.signal or OUTPUT_CLOSED
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())  # quiet Python's flush at exit too
                os.close(devnull)
        return write

    def requested(self, step: int, agree_every: int) -> bool:
        """Whether to save and stop after `step`.

        With several processes all must stop at the same step, so they agree by an allgather
        every `agree_every` steps (`train.stop_check_every`). The allgather waits for the
        step's device work; a larger interval lets the host dispatch further ahead but delays
        the save after a signal by up to that many steps (mind the preemption grace period).
        """
        import jax
        from jax.experimental import multihost_utils

        if jax.process_count() == 1:
            return self.signal is not None
        if step % agree_every:
            return False
        return bool(multihost_utils.process_allgather(self.signal is not None).any())

    def describe(self) -> str:
        return f"received {self.signal}" if self.signal else "another process received a stop signal"


OUTPUT_CLOSED = "no reader of stdout"  # StopRequest.signal when the log's pipe closed
# Exit code of a run stopped on request before its last step, after saving: not finished, so
# not 0 (a Kubernetes Job would count a preempted pod that exits 0 as completed and end the
# run), nor 75 (a lost process: launch/slurm.sbatch restarts the job step on it, which a
# deliberate `scancel --signal=TERM` or the signal before a time limit must not trigger).
STOPPED_EXIT = 4


def train(config, workdir, log=print) -> dict:
    """Trains to `config.train.steps`, resuming from WORKDIR; returns the last metrics, with
    "stopped" (why) when a signal or a closed stdout stopped it earlier, after saving."""
    run_start = time.perf_counter()
    primary = jax.process_index() == 0
    tokenizer = None
    if primary:  # before anything is written: a config no tokenizer fits leaves no workdir behind
        from elmjax.data.tokenizer_choice import load_tokenizer

        tokenizer = load_tokenizer(config)
    workdir = ckpt.prepare_workdir(workdir)
    with workdir_lock.holding(workdir) if primary else contextlib.nullcontext():
        return _train(config, workdir, log, run_start, tokenizer)


def _train(config, workdir, log, run_start: float, tokenizer) -> dict:
    """`train` in WORKDIR, made and locked; `tokenizer` is process 0's (None elsewhere)."""
    primary = jax.process_index() == 0
    stop = StopRequest()
    log = stop.guard(log) if primary else (lambda *args: None)
    saved_step = run_state.check_resume_config(workdir, config, log)
    if saved_step is not None and saved_step >= config.train.steps:
        log(f"{workdir} already holds the final checkpoint (step {saved_step} of {config.train.steps}); "
            "nothing to train (to train further, raise --config.train.steps and pass "
            "--config.train.allow_config_change=true; the learning-rate schedule then spans the new total)")
        for line in run_state.finished_summary(workdir, config, saved_step, None, {})[1:]:
            log(line)
        return {}
    if primary:
        # The tokenizer stays with the run: a fine-tune or generate from this workdir finds it
        # (checked first: another tokenizer than the run's fails before anything is written).
        from elmjax.data.tokenizer_choice import keep_with_run

        keep_with_run(workdir, tokenizer)
        storage.write_text(workdir / "config.json", config.to_json(indent=2))
    setup = setup_lib.build_setup(config)
    log(f"workdir {storage.absolute(workdir)} | mesh {dict(setup.mesh.shape)} | {setup.num_params:,} parameters"
        + ("" if setup.num_trainable == setup.num_params else f" ({setup.num_trainable:,} trainable)"))
    memory.check_fits(setup)  # before restoring or compiling anything
    warning = optim.schedule_warning(config.optim, config.train.steps)
    if warning:
        log(warning)
    plan = stages.plan(config)
    data = stages.train_data(config, plan)  # a staged run's data state carries its stage
    step, state, frozen = setup_lib.initial_state(setup, workdir, data, log)
    evaluator = heldout.Evaluator(setup)
    manager = ckpt.make_manager(workdir, config.checkpoint)
    writer = mt.MetricsWriter(workdir, enabled=primary, first_step=step + 1 if step else 0)
    if config.eval.get("at_start", False) and config.eval.every_steps and step == 0:
        results, line = evaluator.evaluate(setup, state["params"], frozen)
        writer.write(0, results)
        log(f"step 0: {line}")
    peak, peak_source = mt.device_peak_flops()
    # A CPU peak is measured for the whole host (its devices share the cores).
    on_cpu = jax.devices()[0].platform == "cpu"
    peak_units = jax.process_count() if on_cpu else jax.device_count()
    if peak:
        log(f"peak {peak / 1e9:,.1f} GFLOP/s per {'host' if on_cpu else 'device'} ({peak_source})")
    stop.listen()
    watchdog = peers.watch(workdir)  # a lost or hanging peer ends the run within a bound
    seen_nonfinite, last, run = int(jax.device_get(state["nonfinite_steps"])), {}, None
    interval_start, interval_steps, remeasured = time.perf_counter(), 0, False
    while step < config.train.steps:
        if run is None or step >= run.stage.last_step:  # the first step, or a stage boundary
            with watchdog.paused():
                run = stages.begin(setup, plan, step, data, log)
            tokens_per_step = run.stage.tokens_per_step
            flops_per_token = mt.flops_per_token(config.model, run.stage.seq_len)
            log(f"compiled the train step in {run.compile_seconds:.1f} s; {flops_per_token / 1e6:.1f} MFLOPs/token")
            interval_start, interval_steps = time.perf_counter(), 0  # compiling is not step time
        local = next(data)
        state, metrics = run.train_step(state, frozen, setup_lib.global_batch(run.setup, local))
        step, interval_steps = step + 1, interval_steps + 1
        stopping = stop.requested(step, config.train.stop_check_every)
        watchdog.step_done(step)
        if step % config.train.log_every == 0 or step == config.train.steps or stopping:
            metrics = {k: v.item() for k, v in jax.device_get(metrics).items()}
            elapsed = time.perf_counter() - interval_start
            tokens_per_sec = tokens_per_step * interval_steps / elapsed
            nonfinite = int(jax.device_get(state["nonfinite_steps"]))
            last = {
                "loss": metrics["loss"], "ce_loss": metrics["ce_loss"], "z_loss": metrics["z_loss"],
                "lr": metrics["lr"], "grad_norm": metrics["grad_norm"], "tokens_per_sec": tokens_per_sec,
                "mfu": mt.mfu(tokens_per_sec, flops_per_token, peak, peak_units),
                "step_time": elapsed / interval_steps, "nonfinite_steps": nonfinite,
                "batch_crc32": zlib.crc32(local["inputs"].tobytes()), "stage": run.stage.index + 1,
                "elapsed": time.perf_counter() - run_start,
                **{name: value for name, value in metrics.items() if name.startswith(("aux/", "dpo/"))},
            }
            last["eta"] = last["step_time"] * (config.train.steps - step)
            if on_cpu and last["mfu"] and last["mfu"] > 1.0 and not remeasured:  # peak measured under load
                remeasured, peak = True, mt.remeasure_cpu_peak()
                log(f"MFU above 100%: the peak was measured while the host was busier; "
                    f"measured again: {peak / 1e9:,.1f} GFLOP/s")
                last["mfu"] = mt.mfu(tokens_per_sec, flops_per_token, peak, peak_units)
            writer.write(step, last)
            log(mt.console_line(step, config.train.steps, last)
                + (f" | stage {run.stage.index + 1}/{len(plan)}" if len(plan) > 1 else ""))
            if nonfinite > seen_nonfinite:
                log(f"warning: {nonfinite - seen_nonfinite} step(s) up to {step} had a non-finite loss or "
                    f"gradient; their updates were skipped (train.nonfinite={config.train.nonfinite})")
                streak = int(jax.device_get(state["nonfinite_streak"]))
                if config.train.nonfinite == "abort" or streak >= config.train.max_nonfinite_streak:
                    watchdog.stop()  # the final save may take longer than a step
                    ckpt.save(manager, step, state, data, config, force=True)  # skipped steps changed nothing
                    ckpt.wait(manager)
                    raise FloatingPointError(_nonfinite_advice(config, workdir, step, streak))
                seen_nonfinite = nonfinite
            interval_start, interval_steps = time.perf_counter(), 0
        # Saved before the held-out evaluation, so a failing evaluation loses no trained step.
        if step % config.checkpoint.every_steps == 0 or step == config.train.steps or stopping:
            with watchdog.paused():
                ckpt.save(manager, step, state, data, config, force=True)
        if config.eval.every_steps and (step % config.eval.every_steps == 0 or step == config.train.steps):
            with watchdog.paused():
                results, line = evaluator.evaluate(run.setup, state["params"], frozen)
            writer.write(step, results)
            log(f"step {step}: {line}")
            interval_start = time.perf_counter()
        if stopping:
            log(f"{stop.describe()}: saving step {step} and exiting")
            if not primary and stop.signal:  # only process 0 logs; the one signalled says so too
                print(f"process {jax.process_index()} {stop.describe()}: saving step {step} with the others and "
                      "exiting", file=sys.stderr)
            if step < config.train.steps:
                last["stopped"] = stop.describe()
            break
    watchdog.stop()
    ckpt.wait(manager)
    manager.close()
    writer.close()
    if primary and config.train.sample_at_end and step >= config.train.steps:
        _print_sample(config, state, frozen, setup, log)
    if step >= config.train.steps:
        for line in run_state.finished_summary(workdir, config, step, time.perf_counter() - run_start, last):
            log(line)
    return last


def _nonfinite_advice(config, workdir, step: int, streak: int) -> str:
    """Why training stopped on non-finite values, and what to try."""
    if config.train.nonfinite == "abort":
        what = f"non-finite loss or gradient at or before step {step} (train.nonfinite=abort)"
    else:
        what = (f"{streak} steps in a row up to step {step} had a non-finite loss or gradient and were "
                f"skipped (train.max_nonfinite_streak={config.train.max_nonfinite_streak}); the parameters "
                f"are those of step {step - streak}")
    return (f"{what}. Try a lower --config.optim.peak_lr (now {config.optim.peak_lr:g}) or a longer "
            f"--config.optim.warmup_steps (now {config.optim.warmup_steps}), or restart from an earlier "
            f"checkpoint in a new --workdir with --config.train.init_from={workdir}/checkpoints/STEP")


def _print_sample(config, state, frozen, setup, log) -> None:
    """A short greedy continuation from the trained model (elmjax.generate)."""
    from flax import nnx

    try:
        from elmjax.data.tokenizer_choice import load_tokenizer
        from elmjax.inference.generate import sample_text
    except ImportError as error:  # generation is optional for training
        log(f"(no sample: {error})")
        return
    from elmjax.training.dpo import model_frozen

    model = nnx.merge(setup.graphdef, jax.device_get(state["params"]), jax.device_get(model_frozen(config, frozen)))
    text = sample_text(model, load_tokenizer(config), "The", 40, max_seq_len=config.model.max_seq_len)
    log("sample: " + ("The" + text).replace("\n", "\\n"))  # one log line, however many lines it wrote


