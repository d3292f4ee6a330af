"""Checkpoints: round trip onto another mesh, damaged/partial steps, policies, params-only."""
import logging
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from elmjax.training import checkpoint as ckpt
from elmjax.training import step as ts
from elmjax.layers.decoder import build_model
from elmjax.training.setup import build_setup, fresh_params
from tests.train_micro_config import get_config


def micro(**mesh):
    config = get_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1  # data takes the rest
    config.mesh.update(mesh)
    config.checkpoint.async_save = True
    return config


def data_iterator(skip: int = 0):
    """A real grain DatasetIterator (the data item of a checkpoint)."""
    iterator = iter(grain.MapDataset.range(1000).shuffle(seed=1).to_iter_dataset())
    for _ in range(skip):
        next(iterator)
    return iterator


def state_for(setup):
    init = jax.jit(lambda p: ts.init_train_state(p, setup.optimizer), out_shardings=setup.state_shardings)
    state = init(fresh_params(setup))
    return {**state, "step": jnp.asarray(7, jnp.int32)}


def save_steps(workdir, config, steps, state, iterator):
    manager = ckpt.make_manager(workdir, config.checkpoint)
    for step in steps:
        ckpt.save(manager, step, state, iterator, config, force=True)
    manager.wait_until_finished()
    manager.close()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Steps 1 and 2 saved from an 8-way FSDP mesh, the iterator 5 elements in."""
    workdir = tmp_path_factory.mktemp("run")
    config = micro(data=1, fsdp=8)
    setup = build_setup(config)
    state = state_for(setup)
    iterator = data_iterator(skip=5)
    save_steps(workdir, config, [1, 2], state, iterator)
    return workdir, config, jax.device_get(state), next(iterator)


def copy_run(saved, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(saved[0], workdir)
    return workdir


def test_restore_onto_a_different_mesh_gives_identical_state_and_data_position(saved, tmp_path):
    workdir = copy_run(saved, tmp_path)
    setup = build_setup(micro(data=2, tensor=4))
    iterator = data_iterator()
    step, state, kind = ckpt.restore_train_state(workdir, setup.abstract_state, iterator)
    assert (step, kind) == (2, "train")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), saved[2])
    embeddings = state["params"]["token_embeddings"]
    assert embeddings.sharding == setup.param_shardings["token_embeddings"]
    assert next(iterator) == saved[3]  # the element after the saved position


def test_damaged_latest_step_is_skipped_with_a_warning(saved, tmp_path, caplog):
    workdir = copy_run(saved, tmp_path)
    for data_file in (workdir / "checkpoints" / "2" / "state").rglob("d/*"):
        data_file.write_bytes(b"truncated")
    setup = build_setup(micro())
    with caplog.at_level(logging.WARNING, logger="elmjax.training.checkpoint"):
        step, _, kind = ckpt.restore_train_state(workdir, setup.abstract_state, data_iterator())
    assert (step, kind) == (1, "train")
    assert "checkpoints/2 is unreadable" in caplog.text
    assert ckpt.complete_steps(workdir) == [1]  # moved aside, so a new step 2 can be saved


def test_a_damaged_step_is_reported_in_one_line_without_the_reads_tracebacks(saved, tmp_path):
    """One truncated array file: orbax gives up at the first failed read and the reads in
    flight fail after it (over a hundred tracebacks on stderr before); the user sees one line
    naming the step and the array, and the resume falls back to step 1."""
    import os
    import subprocess
    import sys

    workdir = copy_run(saved, tmp_path)
    largest = max((workdir / "checkpoints" / "2" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[:100])
    code = ("import logging; logging.basicConfig(); from elmjax.training import checkpoint as c; "
            "from elmjax.training.setup import build_setup; from tests.test_checkpoint import micro, data_iterator; "
            f"print(c.restore_train_state({str(workdir)!r}, build_setup(micro()).abstract_state, data_iterator())[0])")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300,
                            env={**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "1"
    warnings = [line for line in result.stderr.splitlines() if "checkpoint" in line or "Traceback" in line
                or "never retrieved" in line or "Exception" in line]
    assert len(warnings) == 1, result.stderr[-3000:]
    assert f"checkpoint {workdir}/checkpoints/2 is unreadable (Exception: Encountered error while reading array index" in warnings[0]
    assert " of array " in warnings[0] and warnings[0].endswith("); skipping it")


def test_reading_parameters_of_a_damaged_step_names_the_earlier_step(saved, tmp_path):
    """generate / export / evaluate read parameters only: damaged metadata is one error that
    says which --step still reads."""
    workdir = copy_run(saved, tmp_path)
    (workdir / "checkpoints" / "2" / "state" / "_METADATA").write_text("garbage")
    expected = (rf"^checkpoint {workdir}/checkpoints/2 cannot be read \(.*\); if its files are damaged, the newest "
                rf"earlier complete step is {workdir}/checkpoints/1 \(pass it, or --step 1 where the command takes a step\)$")
    with pytest.raises(ckpt.DamagedCheckpointError, match=expected):
        ckpt.restore_params(workdir)
    with pytest.raises(ckpt.DamagedCheckpointError, match=expected):  # the step directory itself: the same advice
        ckpt.restore_params(workdir / "checkpoints" / "2")
    assert ckpt.restore_params(workdir, step=1)[1]["token_embeddings"].shape == saved[2]["params"]["token_embeddings"].shape
    # Step 2 readable, step 1 damaged: --step 1 is not pointed at the newer step 2.
    for step, text in ((2, (saved[0] / "checkpoints" / "2" / "state" / "_METADATA").read_text()), (1, "garbage")):
        (workdir / "checkpoints" / str(step) / "state" / "_METADATA").write_text(text)
    with pytest.raises(ckpt.DamagedCheckpointError, match=r"there is no earlier complete step to use instead$"):
        ckpt.restore_params(workdir, step=1)


def test_a_hugging_face_directory_given_as_a_checkpoint_points_to_the_importer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match=rf"^{tmp_path} is a Hugging Face model directory, not an elmjax "
                       rf"checkpoint; import it first: python tools/import_hf.py --hf {tmp_path} --out WORKDIR"):
        ckpt.restore_params(tmp_path)


def test_checkpoint_of_another_model_fails_clearly_and_is_kept(saved, tmp_path):
    """A readable step that does not fit this run's model is a config mistake, not damage:
    a clear error, and no step is set aside (a restart from scratch would lose them all)."""
    workdir = copy_run(saved, tmp_path)
    config = micro()
    config.model.num_layers += 1
    setup = build_setup(config)
    with pytest.raises(ckpt.CheckpointError, match=r"written for another model or optimizer: .* "
                       r"arrays this run needs are not in it \(e.g. opt_state/inner_states/decay/inner_state/0/mu/layers/"):
        ckpt.restore_train_state(workdir, setup.abstract_state, data_iterator())
    assert ckpt.complete_steps(workdir) == [1, 2]


def test_params_only_checkpoint_of_another_shape_fails_clearly(tmp_path):
    config = micro()
    params = nnx.to_pure_dict(nnx.split(build_model(config.model), nnx.Param)[1])
    ckpt.save_params_checkpoint(tmp_path, config, params, step=0)
    config.model.vocab_size += 8
    setup = build_setup(config)
    with pytest.raises(ckpt.CheckpointError, match=r"have other shapes \(e.g. params/token_embeddings"):
        ckpt.restore_train_state(tmp_path, setup.abstract_state, data_iterator())
    assert ckpt.complete_steps(tmp_path) == [0]


def test_checkpoint_with_another_optimizer_layout_points_to_init_from(saved, tmp_path):
    """E.g. a step written while clipping was an optax chain: (EmptyState, adamw state)."""
    config = micro()
    setup = build_setup(config)
    state = state_for(setup)
    save_steps(tmp_path, config, [3], {**state, "opt_state": (optax.EmptyState(), state["opt_state"])},
               data_iterator())
    with pytest.raises(ckpt.CheckpointError, match="Only the optimizer state differs.*init_from="):
        ckpt.restore_train_state(tmp_path, setup.abstract_state, data_iterator())


def test_init_from_a_checkpoint_of_another_model_fails_clearly(saved, tmp_path):
    from elmjax.training.setup import initial_state

    config = micro()
    config.model.model_dim *= 2
    config.train.init_from = str(saved[0])
    with pytest.raises(ckpt.CheckpointError, match="init_from needs the same model"):
        initial_state(build_setup(config), tmp_path / "new_run", data_iterator(), print)


def test_unfinished_saves_are_not_complete_steps(saved, tmp_path):
    workdir = copy_run(saved, tmp_path)
    root = workdir / "checkpoints"
    (root / "3.orbax-checkpoint-tmp-1234").mkdir()  # a save killed before its rename
    shutil.copytree(root / "2", root / "4")
    (root / "4" / "_CHECKPOINT_METADATA").unlink()  # finalisation never happened
    assert ckpt.complete_steps(workdir) == [1, 2]
    assert ckpt.latest_complete_step(workdir) == 2


def test_max_to_keep_and_keep_every(tmp_path):
    config = micro()
    config.checkpoint.max_to_keep, config.checkpoint.keep_every = 2, 3
    setup = build_setup(config)
    save_steps(tmp_path, config, range(1, 8), state_for(setup), data_iterator())
    assert ckpt.complete_steps(tmp_path) == [3, 6, 7]


def test_restore_params_reads_parameters_and_config_and_load_model_rebuilds_it(saved):
    workdir, config, state, _ = saved
    restored_config, params = ckpt.restore_params(workdir)
    assert restored_config.model.to_dict() == config.model.to_dict()
    assert restored_config.mesh.rules == tuple(config.mesh.rules)
    jax.tree.map(np.testing.assert_array_equal, params, state["params"])
    _, model = ckpt.load_model(workdir / "checkpoints" / "1")
    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    reference = nnx.merge(nnx.split(build_model(config.model))[0], state["params"])
    np.testing.assert_array_equal(model(tokens), reference(tokens))


def test_params_only_checkpoint_starts_a_fresh_optimizer(tmp_path):
    config = micro()
    params = nnx.to_pure_dict(nnx.split(build_model(config.model, seed=3), nnx.Param)[1])
    ckpt.save_params_checkpoint(tmp_path, config, params, step=0)
    setup = build_setup(config)
    step, restored, kind = ckpt.restore_train_state(tmp_path, setup.abstract_state, data_iterator())
    assert (step, kind) == (0, "params")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored["params"]), params)


def test_missing_or_unusable_paths_fail_with_clear_messages(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.restore_params(tmp_path / "nowhere")
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.restore_params(tmp_path)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ckpt.CheckpointError, match="not a directory"):
        ckpt.prepare_workdir(a_file)


def test_init_from_another_run_takes_its_params_with_a_fresh_optimizer(saved, tmp_path):
    from elmjax.training.setup import initial_state

    config = micro()
    config.train.init_from = str(saved[0])
    messages = []
    step, state, _ = initial_state(build_setup(config), tmp_path / "new_run", data_iterator(), messages.append)
    assert step == 0 and int(state["step"]) == 0
    assert "starting from the parameters of" in messages[0] and "checkpoints/2" in messages[0]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]), saved[2]["params"])
    # every group's adamw = chain(scale_by_adam, ...): all first moments start at zero
    for group in state["opt_state"].inner_states.values():
        assert all(not np.any(leaf) for leaf in jax.tree.leaves(jax.device_get(group.inner_state[0].mu)))


def test_bytes_changed_in_an_array_file_are_detected_and_the_step_before_is_used(saved, tmp_path, caplog):
    """In-place damage that orbax cannot see (the file keeps its size and format) fails the
    checksums written with the step: the step is set aside and the one before it restored."""
    workdir = copy_run(saved, tmp_path)
    data_file = max((workdir / "checkpoints" / "2" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    raw = bytearray(data_file.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 64] = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
    data_file.write_bytes(bytes(raw))
    setup = build_setup(micro())
    with caplog.at_level(logging.WARNING, logger="elmjax.training.checkpoint"):
        step, state, kind = ckpt.restore_train_state(workdir, setup.abstract_state, data_iterator())
    assert (step, kind) == (1, "train")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), saved[2])  # step 1 holds the same state
    assert "checkpoints/2 is unreadable" in caplog.text
    assert ckpt.complete_steps(workdir) == [1]


def test_changed_bytes_are_caught_when_export_reads_the_parameters(saved, tmp_path):
    workdir = copy_run(saved, tmp_path)
    data_file = max((workdir / "checkpoints" / "2" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="differ from what step 2 wrote"):
        ckpt.restore_params(workdir)


@pytest.mark.parametrize("lost", ["state", "state/_METADATA"])
def test_a_step_missing_its_state_is_set_aside_with_a_warning(saved, tmp_path, caplog, lost):
    """Left in place, the step's number could never be saved again (StepAlreadyExistsError)."""
    workdir = copy_run(saved, tmp_path)
    target = workdir / "checkpoints" / "2" / lost
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    setup = build_setup(micro())
    with caplog.at_level(logging.WARNING, logger="elmjax.training.checkpoint"):
        step, _, _ = ckpt.restore_train_state(workdir, setup.abstract_state, data_iterator())
    assert step == 1
    assert "checkpoints/2 is incomplete" in caplog.text
    assert [p.name.split(".")[0] for p in (workdir / "checkpoints").iterdir() if "incomplete" in p.name] == ["2"]
    config = micro()
    save_steps(workdir, config, [2], jax.device_put(saved[2]), data_iterator())  # step 2 can be saved again
    assert ckpt.complete_steps(workdir) == [1, 2]


def test_an_unreadable_step_directory_is_skipped_with_a_warning(saved, tmp_path):
    """A user who cannot read one step (another user's files, mode 000) still sees the others."""
    import os
    import subprocess
    import sys

    workdir = copy_run(saved, tmp_path)
    os.chmod(workdir / "checkpoints" / "2", 0o000)
    code = ("import logging; logging.basicConfig(); from elmjax.training import checkpoint as c; "
            f"print(c.complete_steps({str(workdir)!r}))")
    command = [sys.executable, "-c", code]
    if os.getuid() == 0:  # root reads everything: drop the capabilities that let it
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(command, capture_output=True, text=True, cwd=root, timeout=120,
                            env={**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"})
    os.chmod(workdir / "checkpoints" / "2", 0o755)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[1]"
    assert f"cannot read checkpoint {workdir}/checkpoints/2 (Permission denied); skipping it" in result.stderr


def test_when_every_step_is_damaged_the_run_is_refused_not_started_over(saved, tmp_path):
    """Starting from step 0 would train over the lost steps' metrics (and, had a damaged step's
    data position been restored before its arrays failed, on the wrong data)."""
    workdir = copy_run(saved, tmp_path)
    for data_file in (workdir / "checkpoints").rglob("d/*"):
        data_file.write_bytes(b"truncated")
    setup = build_setup(micro())
    with pytest.raises(ckpt.DamagedCheckpointError, match=r"every checkpoint in .*checkpoints is damaged \(set aside "
                       r"as 1\.damaged-\d+, 2\.damaged-\d+\), so nothing can be resumed; to start over from step 0, "
                       r"move those directories out of"):
        ckpt.restore_train_state(workdir, setup.abstract_state, data_iterator())
    with pytest.raises(ckpt.DamagedCheckpointError, match="every checkpoint"):  # and again on a rerun
        ckpt.restore_train_state(workdir, setup.abstract_state, data_iterator())


def test_a_save_that_died_before_any_step_finished_does_not_block_a_fresh_start(saved, tmp_path):
    """A job preempted during its first save restarts from step 0: nothing finished was lost."""
    workdir = copy_run(saved, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / "1")
    shutil.rmtree(workdir / "checkpoints" / "2" / "state")
    setup = build_setup(micro())
    assert ckpt.restore_train_state(workdir, setup.abstract_state, data_iterator()) == (None, None, None)
    assert [p.name.split("-")[0] for p in (workdir / "checkpoints").iterdir()] == ["2.incomplete"]


def test_a_damaged_steps_restored_data_position_is_undone_before_the_step_before_it(saved, tmp_path):
    """Step 2's data item restores before its arrays fail; a params-only step 1 then starts the
    data from the beginning, not from step 2's position."""
    workdir = tmp_path / "run"
    config = micro(data=1, fsdp=8)
    setup = build_setup(config)
    ckpt.save_params_checkpoint(workdir, config, fresh_params(setup), step=1)
    save_steps(workdir, config, [2], jax.device_put(saved[2]), data_iterator(skip=5))
    for data_file in (workdir / "checkpoints" / "2" / "state").rglob("d/*"):
        data_file.write_bytes(b"truncated")
    iterator = data_iterator()
    step, _, kind = ckpt.restore_train_state(workdir, setup.abstract_state, iterator)
    assert (step, kind) == (1, "params")
    assert next(iterator) == next(data_iterator())


@pytest.mark.parametrize("damage", ["{bad", "", "[1, 2]"])
def test_a_damaged_saved_config_sets_the_step_aside_and_the_one_before_is_used(saved, tmp_path, caplog, damage):
    workdir = copy_run(saved, tmp_path)
    (workdir / "checkpoints" / "2" / "config" / "metadata").write_text(damage)
    setup = build_setup(micro())
    with caplog.at_level(logging.WARNING, logger="elmjax.training.checkpoint"):
        step, _, kind = ckpt.restore_train_state(workdir, setup.abstract_state, data_iterator())
    assert (step, kind) == (1, "train")
    assert "the config saved with checkpoint step 2" in caplog.text and "is unreadable" in caplog.text


def test_reading_a_step_with_a_damaged_saved_config_names_the_file_and_the_earlier_step(saved, tmp_path):
    workdir = copy_run(saved, tmp_path)
    metadata = workdir / "checkpoints" / "2" / "config" / "metadata"
    metadata.write_text("{bad")
    with pytest.raises(ckpt.DamagedCheckpointError) as raised:
        ckpt.restore_params(workdir)
    message = str(raised.value)
    assert f"the config saved with checkpoint step 2 ({metadata}) is unreadable: JSONDecodeError: Expecting property name" in message
    assert f"the newest earlier complete step is {workdir / 'checkpoints' / '1'}" in message
