"""gs:// storage against a local GCS emulator (tests/conftest.py `gcs_emulator`): a run whose
workdir is on GCS resumes bitwise after SIGKILL and writes nothing locally; a token store
prepared onto GCS trains; text, JSONL and Parquet sources read from GCS; clear one-line errors."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from elmjax import storage
from tests.test_train_resume import env

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "tests" / "train_micro_config.py")  # absolute: the runs start in an empty cwd


def run_in(cwd: Path, command, environment, timeout=300):
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)


def train(workdir, *overrides, killed=False):
    script = [str(ROOT / "tests" / "kill_after_checkpoint.py")] if killed else ["-m", "elmjax.train"]
    return [sys.executable, *script, f"--config={CONFIG}", f"--workdir={workdir}", *overrides]


def metrics_by_step(workdir) -> dict:
    """The last record logged for each step of a local or gs:// workdir (a resumed run re-logs
    the steps after its checkpoint)."""
    records = {}
    for line in (storage.path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            records[record["step"]] = record
    return records


@pytest.fixture
def empty_cwd(tmp_path):
    """The working directory of the runs: anything written there is a local leak."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd


def assert_nothing_written_locally(cwd: Path):
    assert list(cwd.iterdir()) == []  # e.g. no `gs:` folder from a URL taken as a local path
    assert not (ROOT / "gs:").exists()


def test_sigkill_on_gcs_then_rerun_resumes_bitwise_and_writes_nothing_locally(gcs_emulator, tmp_path, empty_cwd):
    """Train 8 steps (checkpoint every 4) with the workdir on GCS, SIGKILL once checkpoint 4 is
    committed and step 5 has run, rerun the same command: steps 5..8 log the values of an
    uninterrupted run bitwise (same losses, gradient norms and batches)."""
    environment = env(tmp_path / "xla_cache", **gcs_emulator.env)
    straight = tmp_path / "straight"  # the uninterrupted reference, on local disk
    result = run_in(empty_cwd, train(straight), environment)
    assert result.returncode == 0, result.stderr[-3000:]
    empty_cwd.rmdir()  # the reference run's cwd is not the one checked below
    cwd = tmp_path / "gcs_cwd"
    workdir = gcs_emulator.url("run")
    killed = run_in(cwd, train(workdir, killed=True), environment | {"KILL_AFTER_CHECKPOINT": "4"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert max(metrics_by_step(workdir)) == 5  # died after step 5, with checkpoint 4 committed
    resumed = run_in(cwd, train(workdir), environment)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {workdir}/checkpoints/4 (step 4)" in resumed.stdout
    expected, after = metrics_by_step(straight), metrics_by_step(workdir)
    assert sorted(after) == list(range(1, 9))
    for step in range(5, 9):
        for key in ("loss", "grad_norm", "batch_crc32"):
            assert after[step][key] == expected[step][key], (step, key)
    run_dir = storage.path(workdir)
    assert json.loads((run_dir / "config.json").read_text())["train"]["steps"] == 8
    assert [p.name for p in (run_dir / "tensorboard").iterdir() if p.name.startswith("events.out.tfevents.")]
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} >= {"4", "8"}
    from elmjax.training.checkpoint import restore_params  # what generate/evaluate/export read

    config, params = restore_params(workdir)
    assert config.train.steps == 8 and "token_embeddings" in params
    assert_nothing_written_locally(cwd)


def write_jsonl(url: str, texts) -> None:
    storage.write_text(url, "".join(json.dumps({"text": text}) + "\n" for text in texts))


def test_prepare_a_token_store_on_gcs_and_train_from_it(gcs_emulator, tmp_path, empty_cwd):
    """tools/prepare_data.py reads JSONL from gs:// and writes the store to gs://; training
    reads its documents (and its tokenizer) from there."""
    from elmjax.data.corpus import embedded_documents
    from elmjax.data.token_store import TokenStoreSource
    from elmjax.data.tokenizer import open_tokenizer
    from tools.train_tokenizer import main as train_tokenizer

    texts = [text for _, text in embedded_documents("shakespeare")[:60]]
    prefix = gcs_emulator.url("data")
    write_jsonl(f"{prefix}/text/part-0.jsonl", texts[:30])
    write_jsonl(f"{prefix}/text/part-1.jsonl", texts[30:])
    tokenizer = tmp_path / "tok.model"
    assert train_tokenizer(["--source=embedded:kjv", "--vocab_size=400", "--max_documents=30",
                            f"--output={tokenizer}"]) == 0
    store = f"{prefix}/store"
    environment = env(tmp_path / "xla_cache", **gcs_emulator.env)
    prepared = run_in(empty_cwd, [sys.executable, str(ROOT / "tools" / "prepare_data.py"), f"--config={CONFIG}",
                                  f"--source={prefix}/text/*.jsonl", f"--tokenizer={tokenizer}",
                                  f"--output={store}"], environment)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert json.loads(prepared.stdout[prepared.stdout.index("{"):])["documents"] == 60
    source = TokenStoreSource(store)
    assert open_tokenizer(str(tokenizer)).decode(source[31]) == texts[31]
    workdir = gcs_emulator.url("store-run")
    trained = run_in(empty_cwd, train(workdir, f"--config.data.source={store}", "--config.train.steps=2"),
                     environment)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "done: step 2 of 2" in trained.stdout
    assert sorted(metrics_by_step(workdir)) == [1, 2]
    assert_nothing_written_locally(empty_cwd)


def test_text_jsonl_and_parquet_sources_read_from_gcs(gcs_emulator):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from elmjax.data.sources import JsonlSource, ParquetSource, TextSource

    prefix = gcs_emulator.url("sources")
    storage.write_text(f"{prefix}/a.txt", "first line\n\nsecond line\n")
    write_jsonl(f"{prefix}/b.jsonl", ["one", "", "two"])
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": ["x", None, "y"]}), buffer)
    with storage.path(f"{prefix}/c.parquet").open("wb") as f:
        f.write(buffer.getvalue())
    lines = TextSource(f"{prefix}/*.txt", unit="line")
    assert [lines[i] for i in range(len(lines))] == ["first line", "second line"]
    assert lines.key(0).startswith(f"{prefix}/a.txt@")
    records = JsonlSource(f"{prefix}/b.jsonl", "text")
    assert [records[i] for i in range(len(records))] == ["one", "two"]
    rows = ParquetSource(f"{prefix}/c.parquet", "text")
    assert [rows[i] for i in range(len(rows))] == ["x", "y"]


def test_metrics_append_on_gcs_keeps_earlier_lines(gcs_emulator):
    """metrics.jsonl grows by compose on GCS; a second writer (a resumed run) appends."""
    location = gcs_emulator.url("append") + "/metrics.jsonl"
    first = storage.AppendFile(location)
    first.write("1\n")
    first.write("2\n")
    first.close()
    storage.AppendFile(location).write("3\n")
    assert storage.path(location).read_text() == "1\n2\n3\n"
    assert not storage.path(location + ".append").exists()


def test_a_gcs_workdir_in_a_missing_bucket_is_one_line(gcs_emulator):
    from elmjax.training.checkpoint import prepare_workdir

    with pytest.raises(storage.StorageError) as error:
        prepare_workdir("gs://no-such-bucket-here/run")
    assert str(error.value).startswith("bucket gs://no-such-bucket-here does not exist")
    assert "gcloud storage buckets create gs://no-such-bucket-here" in str(error.value)
    assert "\n" not in str(error.value)


def test_gs_without_gcsfs_names_the_install_command(monkeypatch):
    from elmjax.data.sources import expand_glob

    monkeypatch.setitem(sys.modules, "gcsfs", None)  # how Python reports a package that is not installed
    with pytest.raises(storage.StorageError, match=r"needs gcsfs: pip install 'elmjax\[gcs\]'"):
        storage.path("gs://bucket/run")
    with pytest.raises(storage.StorageError, match=r"gs://bucket/\*.jsonl is on Google Cloud Storage"):
        expand_glob("gs://bucket/*.jsonl")


def test_other_url_schemes_are_refused_for_run_files():
    with pytest.raises(storage.StorageError, match="only local paths and gs:// URLs"):
        storage.path("s3://bucket/run")


def test_a_gcs_step_without_its_commit_file_is_incomplete_and_set_aside(gcs_emulator):
    """On GCS orbax writes a step in place and commit_success.txt last: a step without it is a
    save that died, which is not restored and is moved aside (copy + delete) so the step
    number can be saved again."""
    import numpy as np

    from elmjax.training import checkpoint as ckpt
    from tests.train_micro_config import get_config

    workdir = gcs_emulator.url("aside")
    ckpt.save_params_checkpoint(workdir, get_config(), {"w": np.arange(4, dtype=np.float32)}, step=3)
    assert ckpt.complete_steps(workdir) == [3]
    step_dir = storage.path(workdir) / "checkpoints" / "3"
    (step_dir / "commit_success.txt").unlink()
    assert ckpt.complete_steps(workdir) == []
    ckpt.set_aside_incomplete_steps(workdir)
    names = [p.name for p in (storage.path(workdir) / "checkpoints").iterdir()]
    assert len(names) == 1 and names[0].startswith("3.incomplete-"), names
    assert (storage.path(workdir) / "checkpoints" / names[0] / "state" / "_METADATA").exists()


def test_export_and_averaging_read_a_gcs_workdir_and_write_locally(gcs_emulator, tmp_path, capsys):
    """The commands a finished gs:// run names next: export (the local --out it suggests) and
    checkpoint averaging read the workdir on GCS; a gs:// --out is one line."""
    from tools import average_checkpoints, export

    workdir = gcs_emulator.url("to_export")
    # in a process of its own: tensorboardX uploads a gs:// event file once more at exit
    result = run_in(tmp_path / "cwd", train(workdir, "--config.train.steps=2", "--config.checkpoint.every_steps=1"),
                    env(tmp_path / "xla_cache", **gcs_emulator.env))
    assert result.returncode == 0, result.stderr[-3000:]
    local_out = workdir.rsplit("/", 1)[-1] + "-hf"  # the run's name, in the working directory
    assert f"python tools/export.py --checkpoint {workdir} --to torch --out {local_out}" in result.stdout
    assert export.main(["--checkpoint", workdir, "--to", "torch", "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert average_checkpoints.main(["--workdir", workdir, "--last", "2", "--out", str(tmp_path / "avg")]) == 0
    assert json.loads((tmp_path / "avg" / "average.json").read_text()) == {"source": workdir, "steps": [1, 2]}
    capsys.readouterr()
    assert export.main(["--checkpoint", workdir, "--to", "torch", "--out", f"{workdir}/hf"]) == 2
    assert f"--out {workdir}/hf: write to a local directory" in capsys.readouterr().err
