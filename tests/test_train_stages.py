"""Context-length stages (elmjax/training/stages.py): the plan, its config errors, the loader's
re-packing at a boundary, and `python -m elmjax.train` crossing a boundary and resuming
bitwise from checkpoints taken before, at and after it (SIGKILL, as in test_train_resume)."""
import signal

import numpy as np
import pytest

from configs.btlm_3b_8k import get_config as btlm_3b_config
from elmjax.config import ConfigError, validate
from elmjax.data.pipeline import make_train_iterator
from elmjax.training import stages as st
from tests.test_train_resume import env, killed_train_command, metrics_by_step, run, train_command
from tests.train_micro_config import get_config as micro_config

STAGES = "--config.train.stages=((4,32,8),(8,64,4))"  # 256 tokens per batch in both


def staged_micro(stages=((4, 32, 8), (8, 64, 4)), **train):
    config = micro_config()
    config.train.stages = stages
    config.train.update(train)
    return config


def test_btlm_plan_counts_tokens_into_steps():
    """SPEC §3: 470B tokens at 2048 x 1920, then to 627B at 8192 x 480 (3,932,160 per batch)."""
    plan = st.plan(validate(btlm_3b_config()))
    assert [(s.first_step, s.last_step, s.seq_len, s.batch_size) for s in plan] == [
        (0, 119_528, 2048, 1920), (119_528, 159_455, 8192, 480)]
    assert {s.tokens_per_step for s in plan} == {3_932_160}
    assert plan[0].last_step * 3_932_160 >= 470e9 > (plan[0].last_step - 1) * 3_932_160


def test_plan_in_steps_and_the_stage_of_each_step():
    plan = st.plan(validate(staged_micro()))
    assert [(s.first_step, s.last_step) for s in plan] == [(0, 4), (4, 8)]
    assert [st.stage_for_step(plan, step).index for step in range(9)] == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    unstaged = st.plan(validate(micro_config()))
    assert [(s.last_step, s.seq_len, s.batch_size) for s in unstaged] == [(8, 32, 8)]


@pytest.mark.parametrize("change, field, message", [
    (dict(stages=((8, 64, 4), (4, 32, 8))), "train.stages", "entry 1 ends at 4, not after entry 0's 8"),
    (dict(stages=((4, 32, 8), (8, 64, 8))), "train.stages", "entry 1 has 64 x 8 = 512 tokens per batch, entry 0 has 256"),
    (dict(stages=((4, 32, 8), (9, 64, 4))), "train.stages", "the stages end at step 9 but train.steps is 8"),
    (dict(stages=((4, 32, 8), (8, 128, 2))), "train.stages", "entry 1 has seq_len 128 > model.max_seq_len=64"),
    (dict(stages=((4, 32), (8, 64, 4))), "train.stages", "entry 0 is (4, 32); expected (end, seq_len, batch_size)"),
    (dict(stages=((4, 32, 8), (8, 64, 4)), grad_accum_steps=8), "train.stages", "batch_size 4, not divisible by train.grad_accum_steps=8"),
    (dict(stage_unit="epochs"), "train.stage_unit", "allowed: steps, tokens"),
    (dict(stages=((1024, 32, 8), (1024 + 256, 64, 4)), stage_unit="tokens"), "train.stages", "set train.steps=5"),
])
def test_bad_stage_configs_are_one_line_errors_naming_the_field(change, field, message):
    config = micro_config()
    config.train.update(change)
    with pytest.raises(ConfigError) as error:
        validate(config)
    assert error.value.field == field
    assert message in str(error.value) and "\n" not in str(error.value)


def test_unequal_tokens_are_allowed_when_the_config_says_so():
    config = staged_micro(stages=((4, 32, 8), (8, 64, 8)), stages_equal_tokens=False)
    assert [s.tokens_per_step for s in st.plan(validate(config))] == [256, 512]


def test_stages_need_the_in_process_loader():
    config = staged_micro()
    config.data.num_workers = 2
    with pytest.raises(ConfigError, match="`data.num_workers`: is 2; train.stages re-packs"):
        validate(config)


def rows(batch):
    """The packed rows [batch, seq + 1] a model-input batch was cut from."""
    return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)


def test_the_next_stage_continues_the_token_stream_exactly():
    """Stage 1's rows then stage 2's (longer) rows are the same token stream as one pipeline
    that never changed shape: nothing skipped, nothing repeated, mid-document included."""
    config = validate(staged_micro())
    plan = st.plan(config)
    data = st.StagedData(config, plan)
    tokens = [rows(next(data)) for _ in range(3)]
    assert data.enter(plan[1])
    tokens += [rows(next(data)) for _ in range(3)]
    assert tokens[-1].shape == (4, 65)
    staged = np.concatenate([r.ravel() for r in tokens])
    unchanged = make_train_iterator(st.stage_config(config, plan[0]), process_index=0, process_count=1)
    reference = np.concatenate([rows(next(unchanged)).ravel() for _ in range(9)])
    np.testing.assert_array_equal(staged, reference[: staged.size])


def test_re_packing_a_mixture_re_packs_each_source_and_keeps_the_mix_position():
    config = staged_micro()
    config.data.source = "embedded:kjv,embedded:shakespeare"
    config = validate(config)
    plan = st.plan(config)
    data = st.StagedData(config, plan)
    for _ in range(3):
        next(data)
    before = data._iterator.get_state()
    data.enter(plan[1])
    after = data._iterator.get_state()
    assert after["index"] == before["index"]
    assert [p["elements_from_buffer_after_checkpoint"] for p in after["parents"]] == [0, 0]
    assert rows(next(data)).shape == (4, 65)


def test_a_restored_staged_state_opens_its_stage():
    config = validate(staged_micro())
    plan = st.plan(config)
    data = st.StagedData(config, plan)
    for _ in range(4):
        next(data)
    data.enter(plan[1])
    next(data)
    saved = data.get_state()
    expected = rows(next(data))
    restored = st.StagedData(config, plan)
    restored.set_state(saved)
    assert restored.stage.index == 1
    np.testing.assert_array_equal(rows(next(restored)), expected)


# ---- end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, cache):
    """8 steps across the boundary after step 4 in one go, checkpoints every 2 steps."""
    workdir = tmp_path_factory.mktemp("staged")
    result = run(train_command(workdir, STAGES, "--config.checkpoint.every_steps=2"), env(cache))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_a_two_stage_run_crosses_the_boundary_once(straight_run):
    workdir, result = straight_run
    records = metrics_by_step(workdir)
    assert [records[step]["stage"] for step in range(1, 9)] == [1] * 4 + [2] * 4
    assert "stage 1/2: steps 1-4 at 8 x 32 tokens" in result.stdout
    assert "stage 2/2: steps 5-8 at 4 x 64 tokens: the loader re-packs into rows of 64 tokens" in result.stdout
    assert result.stdout.count("compiled the train step") == 2  # once per stage
    assert "step 8/8 | loss" in result.stdout and "| stage 2/2" in result.stdout


@pytest.mark.parametrize("checkpoint", [2, 4, 6], ids=["before", "at", "after"])
def test_sigkill_and_resume_around_the_boundary_is_bitwise(straight_run, tmp_path, cache, checkpoint):
    workdir = tmp_path / "killed"
    overrides = (STAGES, "--config.checkpoint.every_steps=2")
    killed = run(killed_train_command(workdir, *overrides), env(cache, KILL_AFTER_CHECKPOINT=str(checkpoint)))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run(train_command(workdir, *overrides), env(cache))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {workdir}/checkpoints/{checkpoint} (step {checkpoint})" in resumed.stdout
    straight, after = metrics_by_step(straight_run[0]), metrics_by_step(workdir)
    for step in range(checkpoint + 1, 9):
        for key in ("loss", "grad_norm", "batch_crc32", "stage"):
            assert after[step][key] == straight[step][key], (step, key)
