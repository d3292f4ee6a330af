"""Training across two JAX processes (jax.distributed on CPU with gloo collectives)."""
import json
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from elmjax.training import checkpoint as ckpt
from tests.test_train_resume import CONFIG, ROOT, env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def start_two_processes(tmp_path, workdir, *overrides, devices=2):
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, "-m", "elmjax.train", f"--config={CONFIG}", f"--workdir={workdir}",
             f"--coordinator=localhost:{port}", "--num_processes=2", f"--process_id={index}",
             *overrides],
            cwd=ROOT, env=env(tmp_path / "cache", devices=devices), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        for index in range(2)
    ]


def test_two_processes_train_checkpoint_and_share_one_model(tmp_path):
    workdir = tmp_path / "run"
    processes = start_two_processes(tmp_path, workdir)
    outputs = [process.communicate(timeout=400) for process in processes]
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    assert "'data': 4" in outputs[0][0]  # one mesh over both processes' 2 devices each
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    data_files = sorted(p.name for p in (workdir / "checkpoints" / "8" / "data").glob("*.json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
    config, params = ckpt.restore_params(workdir)
    assert config.train.steps == 8 and params["token_embeddings"].shape == (512, 64)


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    """A preemption notice may reach one host only: the processes agree (every
    `stop_check_every` steps), save one checkpoint together and exit 4 (not finished: rerun to resume)."""
    workdir = tmp_path / "preempted"
    processes = start_two_processes(tmp_path, workdir, "--config.train.steps=100000",
                                    "--config.train.stop_check_every=2", "--config.checkpoint.every_steps=100000")
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    processes[1].send_signal(signal.SIGTERM)
    outputs = [process.communicate(timeout=200) for process in processes]
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 4, stderr[-3000:]
    assert "another process received a stop signal" in outputs[0][0]  # process 0 logs
    assert "process 1 received SIGTERM: saving step" in outputs[1][1]  # and the signalled one says so
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) == 1 and steps[0] % 2 == 0
    data_files = sorted(p.name for p in (workdir / "checkpoints" / str(steps[0]) / "data").glob("*.json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]


def test_a_peer_lost_during_a_host_collective_ends_the_survivor_with_one_line(tmp_path):
    """Killed while the survivor waits in the stop check's all-gather (every step here), Gloo
    raises "Connection closed by peer" in the survivor's main thread: the watchdog's one line
    (naming the lost process) is all it prints, not that exception's traceback first."""
    workdir = tmp_path / "killed"
    processes = start_two_processes(tmp_path, workdir, "--config.train.steps=100000", "--config.train.log_every=1",
                                    "--config.train.stop_check_every=1", "--failure_timeout=5", devices=1)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.2)
    processes[1].kill()  # its supervising parent: the training child dies with it
    _, stderr = processes[0].communicate(timeout=120)
    processes[1].communicate(timeout=60)
    assert processes[0].returncode == 75, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: lost process 1 of 2"), stderr[-3000:]
