"""Multi-process runs as a cluster launcher starts them, on this machine's CPU: two processes
given the environment SLURM gives its tasks (`--distributed`, jax.distributed.initialize()
detects SLURM; JAX_COORDINATOR_PORT points its coordinator at a free port of 127.0.0.1),
4 forced host devices each. A lost peer (process 1, or process 0 which hosts JAX's
coordination service) ends the survivor within the bound with one line and exit code 75;
the restarted job resumes bitwise; a checkpoint written by 2 processes resumes on 1, and one
written by 1 resumes on 2 (the pods of launch/jobset.yaml's indexed Job), with the same
batches (elmjax/data/layout.py).
"""
import shlex
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from tests.test_train_multiprocess import free_port
from tests.test_train_resume import CONFIG, ROOT, env, metrics_by_step

sys.path.insert(0, str(ROOT / "launch"))
import render  # noqa: E402  (launch/ is not a package)

FAILURE_TIMEOUT = 5  # seconds; the default (30) is for real clusters


def slurm_env(cache, index: int, port: int, **extra):
    """What srun sets for task `index` of 2 on one node (the coordinator is the first node
    of SLURM_STEP_NODELIST; JAX_COORDINATOR_PORT replaces the port jax derives from the job id)."""
    return env(cache, devices=4, SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2",
               SLURM_PROCID=str(index), SLURM_LOCALID=str(index), JAX_COORDINATOR_PORT=str(port), **extra)


def start_slurm_tasks(cache, workdir, *overrides, killed_task=None, kill_after=4):
    """Both tasks of a SLURM job step; `killed_task` runs under tests/kill_after_checkpoint.py
    (SIGKILLed once checkpoint `kill_after` is on disk and the step after it has run)."""
    port = free_port()
    processes = []
    for index in range(2):
        killed = index == killed_task
        program = [str(ROOT / "tests" / "kill_after_checkpoint.py")] if killed else ["-m", "elmjax.train"]
        extra = {"KILL_AFTER_CHECKPOINT": str(kill_after)} if killed else {}
        processes.append(subprocess.Popen(
            [sys.executable, *program, f"--config={CONFIG}", f"--workdir={workdir}", "--distributed",
             f"--failure_timeout={FAILURE_TIMEOUT}", *overrides],
            cwd=ROOT, env=slurm_env(cache, index, port, **extra), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        ))
    return processes


def finish(processes, timeout=400):
    outputs = [process.communicate(timeout=timeout) for process in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    return outputs


def run_single(cache, workdir, devices=8):
    result = subprocess.run([sys.executable, "-m", "elmjax.train", f"--config={CONFIG}", f"--workdir={workdir}"],
                            cwd=ROOT, env=env(cache, devices=devices), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def two_task_run(tmp_path_factory, cache):
    """8 steps on 2 SLURM tasks x 4 devices, checkpoints at 4 and 8."""
    workdir = tmp_path_factory.mktemp("slurm_straight")
    outputs = finish(start_slurm_tasks(cache, workdir))
    assert "'data': 8" in outputs[0][0]  # one mesh over both tasks' devices
    return workdir


def copy_until(workdir, tmp_path, step: int):
    """A copy of `workdir` as it was after checkpoint `step` (later checkpoints removed)."""
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    for path in (copy / "checkpoints").iterdir():
        if path.name.isdigit() and int(path.name) > step:
            shutil.rmtree(path)
    return copy


@pytest.mark.slow
def test_lost_task_ends_the_survivor_in_bounded_time_and_the_rerun_resumes_bitwise(two_task_run, tmp_path, cache):
    workdir = tmp_path / "killed"
    processes = start_slurm_tasks(cache, workdir, killed_task=1)
    processes[1].wait(timeout=400)
    killed_at = time.monotonic()
    _, stderr = processes[0].communicate(timeout=120)
    survivor_seconds = time.monotonic() - killed_at
    assert processes[1].returncode == -9
    assert processes[0].returncode == 75, stderr[-3000:]
    # The heartbeat timeout, then at most a second to notice; the rest is a busy machine's slack.
    assert survivor_seconds < FAILURE_TIMEOUT + 10, survivor_seconds
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: lost process 1 of 2"), stderr[-3000:]
    assert f"the last saved step is step 4 ({workdir}/checkpoints/4)" in errors[0]
    assert "exit code 75" in errors[0] and "stack trace" not in stderr and "Traceback" not in stderr

    outputs = finish(start_slurm_tasks(cache, workdir))
    assert f"resumed from {workdir}/checkpoints/4 (step 4)" in outputs[0][0]
    straight, resumed = metrics_by_step(two_task_run), metrics_by_step(workdir)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step]["loss"] == straight[step]["loss"], step  # bitwise


@pytest.mark.slow
def test_lost_coordinator_ends_the_other_task_with_one_line_and_the_job_resumes_on_one_process(
        two_task_run, tmp_path, cache):
    """Process 0 hosts JAX's coordination service; when it dies JAX aborts the others at
    once, and their parent process (elmjax/training/supervisor.py) turns that into the line.
    The job then resumes on 1 process (2 -> 1) with the same batches. "resumed from" means the
    restored parameters and optimizer state passed the checksum check against what the 2
    tasks wrote (elmjax/training/checksums.py)."""
    workdir = tmp_path / "killed"
    processes = start_slurm_tasks(cache, workdir, killed_task=0)
    processes[0].wait(timeout=400)
    killed_at = time.monotonic()
    _, stderr = processes[1].communicate(timeout=120)
    assert processes[0].returncode == -9
    assert processes[1].returncode == 75, stderr[-3000:]
    assert time.monotonic() - killed_at < 10
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: lost process 0 (the coordinator"), stderr[-3000:]
    assert f"the last saved step is step 4 ({workdir}/checkpoints/4)" in errors[0]
    assert "stack trace" not in stderr and "Fatal Python error" not in stderr

    result = run_single(cache, workdir)
    assert f"resumed from {workdir}/checkpoints/4 (step 4)" in result.stdout
    assert "keep the layout of the 2 process(es)" in result.stdout
    straight, resumed = metrics_by_step(two_task_run), metrics_by_step(workdir)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):  # the same batches; the sums' order differs (1 process, not 2)
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-6), step
    assert [p.name for p in (workdir / "checkpoints" / "8" / "data").glob("*.json")] == ["process_0-of-1.json"]


def start_jobset_pods(cache, workdir):
    """The two pods of launch/jobset.yaml's indexed Job, as this machine's processes: each
    runs the container's command with the JOB_COMPLETION_INDEX Kubernetes gives it (the
    coordinator's hostname rendered as 127.0.0.1)."""
    manifest = yaml.safe_load(render.render_jobset(CONFIG, str(workdir), NUM_PROCESSES=2, GPUS_PER_PROCESS=4,
                                                   COORDINATOR_HOST="127.0.0.1", PORT=free_port()))
    pod = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = [*container["command"], *container["args"]]
    assert command[2].startswith(f"python -m elmjax.train --config={CONFIG} ")
    command[2] = command[2].replace("python", shlex.quote(sys.executable), 1)
    return [subprocess.Popen(command, cwd=ROOT, env=env(cache, devices=4, JOB_COMPLETION_INDEX=str(index)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for index in range(2)]


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two_indexed_job_pods_with_the_same_batches(tmp_path, cache):
    """1 -> 2, the other direction (and the 2 processes' checksum check, as above), on the
    two pods of launch/jobset.yaml."""
    straight = tmp_path / "single"
    run_single(cache, straight)
    workdir = copy_until(straight, tmp_path, 4)
    outputs = finish(start_jobset_pods(cache, workdir))
    assert f"resumed from {workdir}/checkpoints/4 (step 4)" in outputs[0][0]
    assert "keep the layout of the 1 process(es)" in outputs[0][0]
    reference, resumed = metrics_by_step(straight), metrics_by_step(workdir)
    for step in range(5, 9):
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-6), step


def test_a_stalled_step_ends_the_process_with_one_line_and_exit_code_75(tmp_path):
    """The step watchdog alone (what bounds a process hanging in a collective: every process
    then stops finishing steps): armed by a finished step, it fires after its limit."""
    (tmp_path / "checkpoints" / "6" / "state").mkdir(parents=True)  # no _CHECKPOINT_METADATA: not complete
    code = ("import time; from elmjax.training import peers; "
            f"w = peers.Watchdog(2, {str(tmp_path)!r}); w.step_done(7); time.sleep(60)")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(tmp_path / "cache"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 75 and time.monotonic() - start < 30
    assert result.stderr.strip() == ("error: no training step finished for 4 s after step 7: a process hangs "
                                     "(e.g. in a collective) or was lost; the last saved step is none yet; "
                                     "restart the job to resume from it (exit code 75)")


@pytest.mark.parametrize("flag, message", [
    ("--failure_timeout=0", "error: --failure_timeout is 0; need >= 1 (seconds)"),
    ("--local_device_ids=0,x", "error: --local_device_ids is 0,x; need device numbers like 0,1,2,3"),
])
def test_bad_multi_process_flags_are_one_line_errors(tmp_path, flag, message):
    result = subprocess.run([sys.executable, "-m", "elmjax.train", f"--config={CONFIG}", f"--workdir={tmp_path}",
                             "--distributed", flag], cwd=ROOT, env=env(tmp_path / "cache"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == message
