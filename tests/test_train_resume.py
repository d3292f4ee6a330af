"""`python -m elmjax.train` end to end (subprocesses, real data): exact resume after SIGKILL,
SIGTERM saves and exits, metrics files, dry run, and clear workdir errors."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "tests/train_micro_config.py"
MOE_CONFIG = "tests/train_micro_moe_config.py"  # an OLMoE: 8 experts, top-2, aux losses


def env(tmp_cache, devices: int = 1, **extra):
    variables = dict(os.environ)
    variables.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=str(ROOT),
        ELMJAX_COMPILATION_CACHE=str(tmp_cache),
        JAX_PLATFORMS="cpu",
    )
    variables.update(extra)
    return variables


def train_command(workdir, *overrides, config=CONFIG):
    return [sys.executable, "-m", "elmjax.train", f"--config={config}", f"--workdir={workdir}", *overrides]


def killed_train_command(workdir, *overrides, config=CONFIG):
    """`train_command`, SIGKILLed after checkpoint KILL_AFTER_CHECKPOINT (tests/kill_after_checkpoint.py)."""
    return [sys.executable, str(ROOT / "tests" / "kill_after_checkpoint.py"), f"--config={config}",
            f"--workdir={workdir}", *overrides]


def run(command, environment, timeout=300):
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)


def metrics_by_step(workdir) -> dict:
    """The record logged for each step."""
    records = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            records[record["step"]] = record
    return records


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, cache):
    """8 steps in one go (checkpoint every 4)."""
    workdir = tmp_path_factory.mktemp("straight")
    result = run(train_command(workdir), env(cache))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def check_sigkill_resume(straight_workdir, workdir, cache, config=CONFIG):
    """Killed after checkpoint 4 and rerun: steps 5..8 log the straight run's values bitwise."""
    killed = run(killed_train_command(workdir, config=config), env(cache, KILL_AFTER_CHECKPOINT="4"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert max(metrics_by_step(workdir)) == 5  # died after step 5, checkpoint 4 on disk
    resumed = run(train_command(workdir, config=config), env(cache))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {workdir}/checkpoints/4 (step 4)" in resumed.stdout
    straight, after = metrics_by_step(straight_workdir), metrics_by_step(workdir)
    logged = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    # Step 5, logged before the kill and trained again, appears once: the rerun dropped it.
    assert [record["step"] for record in logged if "loss" in record] == list(range(1, 9))
    for step in range(5, 9):
        assert after[step]["loss"] == straight[step]["loss"], step  # bitwise: same float32
        assert after[step]["grad_norm"] == straight[step]["grad_norm"], step
        assert after[step]["batch_crc32"] == straight[step]["batch_crc32"], step  # same data
        for key in straight[step]:
            if key.startswith("aux/"):  # MoE: load balance, router z-loss, expert loads
                assert after[step][key] == straight[step][key], (step, key)
    return straight


def test_sigkill_after_checkpoint_then_rerun_resumes_bitwise(straight_run, tmp_path, cache):
    check_sigkill_resume(straight_run[0], tmp_path / "killed", cache)


def test_moe_sigkill_after_checkpoint_then_rerun_resumes_bitwise(tmp_path, cache):
    """The same for an OLMoE (routing, dropless dispatch and its auxiliary losses)."""
    straight = tmp_path / "straight"
    result = run(train_command(straight, config=MOE_CONFIG), env(cache))
    assert result.returncode == 0, result.stderr[-3000:]
    records = check_sigkill_resume(straight, tmp_path / "killed", cache, config=MOE_CONFIG)
    assert {"aux/load_balance", "aux/router_z_loss", "aux/layer1/expert_load"} <= set(records[8])


def test_metrics_jsonl_tensorboard_and_console(straight_run):
    workdir, result = straight_run
    records = metrics_by_step(workdir)
    assert sorted(records) == list(range(1, 9))
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "step_time"):
        assert isinstance(records[8][key], float), key
    assert records[8]["loss"] < records[1]["loss"]
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 8
    assert "step 8/8 | loss" in result.stdout
    assert "GFLOP/s per host (measured float32" in result.stdout  # the CPU peak behind MFU, once: the host's


def test_sigterm_saves_a_checkpoint_and_exits_for_a_restart(tmp_path, cache):
    workdir = tmp_path / "preempted"
    process = subprocess.Popen(
        train_command(workdir, "--config.train.steps=100000", "--config.checkpoint.every_steps=100000"),
        cwd=ROOT, env=env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 4, stderr[-3000:]  # saved, not finished: rerun to resume
    assert "received SIGTERM" in stdout
    from elmjax.training.checkpoint import latest_complete_step

    assert latest_complete_step(workdir) == max(metrics_by_step(workdir))


def test_a_closed_output_pipe_saves_the_step_reached_and_exits(tmp_path, cache):
    """`train ... | head -5`: once stdout's reader is gone the run saves where it is and exits
    4 (not finished), instead of dying on BrokenPipeError with every step since its last
    checkpoint."""
    workdir = tmp_path / "piped"
    with open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen(
            train_command(workdir, "--config.train.steps=100000", "--config.checkpoint.every_steps=100000"),
            cwd=ROOT, env=env(cache), stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
        while not process.stdout.readline().startswith("step 2/"):  # a few steps trained, unsaved
            assert process.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
        process.stdout.close()
        assert process.wait(timeout=240) == 4, (tmp_path / "stderr").read_text()[-3000:]
    from elmjax.training.checkpoint import latest_complete_step

    assert latest_complete_step(workdir) == max(metrics_by_step(workdir)) >= 3


def test_unusable_workdir_fails_with_a_clear_message(tmp_path, cache):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    result = run(train_command(not_a_dir), env(cache))
    assert result.returncode == 2
    assert f"workdir {not_a_dir} exists but is not a directory" in result.stderr


def test_a_second_run_into_a_workdir_in_use_is_refused_before_writing_anything(tmp_path, cache):
    """Two runs in one workdir interleave their checkpoints and metrics.jsonl."""
    from elmjax.training import workdir_lock

    workdir = tmp_path / "run"
    workdir.mkdir()
    with workdir_lock.holding(workdir):  # as a running training process holds it
        result = run(train_command(workdir), env(cache))
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith(f"error: workdir {workdir} is in use by another training run (process "
                                    f"{os.getpid()} on ")
    assert result.stderr.strip().endswith("); wait for it to end, or train in another --workdir")
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in workdir.iterdir()) == [".train.lock"]


def test_dry_run_reports_params_memory_and_compile_time_on_an_fsdp_mesh(tmp_path, cache):
    result = run(
        [sys.executable, "-m", "elmjax.train", f"--config={CONFIG}", "--dry_run",
         "--config.mesh.data=1", "--config.mesh.fsdp=8"],
        env(cache, devices=8),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parameters: 108,928" in result.stdout
    assert "per-device memory (XLA estimate)" in result.stdout
    assert "compile time" in result.stdout
    assert "'fsdp': 8" in result.stdout


def test_nonfinite_abort_stops_with_a_message_and_skip_keeps_going(tmp_path, cache):
    """An absurd learning rate blows the parameters up after the first update, so every
    later step is non-finite."""
    blow_up = ["--config.optim.peak_lr=1e30", "--config.optim.init_lr=1e30",
               "--config.optim.warmup_steps=0", "--config.optim.schedule=constant",
               "--config.optim.clip_norm=0", "--config.train.steps=3"]
    aborted = run(train_command(tmp_path / "abort", *blow_up, "--config.train.nonfinite=abort"), env(cache))
    assert aborted.returncode != 0
    assert "non-finite loss or gradient" in aborted.stderr
    skipped = run(train_command(tmp_path / "skip", *blow_up, "--config.train.nonfinite=skip"), env(cache))
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "update" in skipped.stdout and "skipped" in skipped.stdout
    assert metrics_by_step(tmp_path / "skip")[3]["nonfinite_steps"] == 2


def test_skipping_stops_after_too_many_nonfinite_steps_in_a_row(tmp_path, cache):
    """With nonfinite=skip, a state that stays non-finite would skip every remaining step and
    exit 0; after train.max_nonfinite_streak skips in a row it stops (exit 3) with advice."""
    blow_up = ["--config.optim.peak_lr=1e30", "--config.optim.init_lr=1e30",
               "--config.optim.warmup_steps=0", "--config.optim.schedule=constant",
               "--config.optim.clip_norm=0", "--config.train.steps=8",
               "--config.train.nonfinite=skip", "--config.train.max_nonfinite_streak=2"]
    result = run(train_command(tmp_path / "streak", *blow_up), env(cache))
    assert result.returncode == 3, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: 2 steps in a row up to step 3 had a non-finite loss or gradient")
    assert "the parameters are those of step 1" in error and "--config.optim.peak_lr (now 1e+30)" in error
    assert f"--config.train.init_from={tmp_path / 'streak'}/checkpoints/STEP" in error
    assert max(metrics_by_step(tmp_path / "streak")) == 3


def copy_workdir(straight_run, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(straight_run[0], workdir)
    return workdir


def test_the_suggested_commands_quote_a_workdir_with_spaces(straight_run, tmp_path):
    """Copied into a shell, each path stays one argument."""
    import shlex

    from elmjax.training.run_state import finished_summary
    from tests.train_micro_config import get_config

    workdir = tmp_path / "my runs" / "ü run"
    shutil.copytree(straight_run[0], workdir)
    lines = finished_summary(workdir, get_config(), 8, None, {})
    generate = next(line for line in lines if "elmjax.generate" in line).split("next", 1)[1]
    assert shlex.split(generate)[3:5] == ["--checkpoint", str(workdir)]
    export = next(line for line in lines if "tools/export.py" in line)
    assert shlex.split(export)[-1] == f"{workdir}/hf"


def test_rerunning_a_finished_run_says_so_without_compiling(straight_run, tmp_path, cache):
    workdir = copy_workdir(straight_run, tmp_path)
    result = run(train_command(workdir), env(cache))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{workdir} already holds the final checkpoint (step 8 of 8); nothing to train" in result.stdout
    # The hint is what the next test does to train on: both fields, not steps alone (refused).
    assert "raise --config.train.steps and pass --config.train.allow_config_change=true" in result.stdout
    assert "compiled" not in result.stdout
    assert f"python -m elmjax.generate --checkpoint {workdir}" in result.stdout


def test_a_finished_run_ends_with_where_its_outputs_are_and_what_to_run_next(straight_run):
    _, result = straight_run
    lines = result.stdout.splitlines()
    assert any(line.startswith("done: step 8 of 8 in ") for line in lines)
    assert any("checkpoints/" in line or "checkpoints (steps 4, 8)" in line for line in lines)
    assert any("tensorboard --logdir" in line for line in lines)
    progress = [line for line in lines if line.startswith("step ")]
    assert progress and all(" elapsed, ETA " in line for line in progress)
    assert progress[-1].endswith("ETA 0:00:00")


def test_resuming_with_a_changed_batch_is_refused_naming_the_fields(straight_run, tmp_path, cache):
    workdir = copy_workdir(straight_run, tmp_path)
    result = run(train_command(workdir, "--config.train.batch_size=16", "--config.train.steps=12"), env(cache))
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: config field `train.allow_config_change`: resuming")
    assert "train.batch_size 8 -> 16; train.steps 8 -> 12" in error
    allowed = run(train_command(workdir, "--config.train.steps=10", "--config.train.allow_config_change=true"),
                  env(cache))
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "config changed since checkpoint step 8: train.steps 8 -> 10\n" in allowed.stdout  # not the permission
    assert "step 10/10" in allowed.stdout


def test_resuming_with_a_changed_log_interval_is_logged_and_allowed(straight_run, tmp_path, cache):
    workdir = copy_workdir(straight_run, tmp_path)
    result = run(train_command(workdir, "--config.train.log_every=2"), env(cache))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "config changed since checkpoint step 8: train.log_every 1 -> 2" in result.stdout
