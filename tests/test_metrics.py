"""FLOPs per token (SPEC §4, per layer), MFU, and the metrics writers."""
import json
import time

import pytest

from configs import tiny as tiny_config
from elmjax.config import load_config_file
from elmjax.training import metrics as mt
from elmjax.layers.decoder import abstract_model, count_params
from elmjax.models.openelm.layerwise import schedule_from_config

# SPEC §1, OpenELM-270M per-layer schedule (d 1280, head_dim 64, vocab 32000).
Q_HEADS = [12] * 5 + [16] * 7 + [20] * 4
KV_HEADS = [3] * 5 + [4] * 7 + [5] * 4
FFN = [768, 1024, 1280, 1536, 1792, 2048, 2560, 2816, 3072, 3328, 3584, 3840, 4352, 4608, 4864, 5120]


def config_270m():
    from pathlib import Path

    return load_config_file(Path(__file__).parents[1] / "configs" / "270m.py")


def test_270m_flops_per_token_is_spec_section_4_per_layer():
    d, hd, seq = 1280, 64, 2048
    weights = sum(d * (q + 2 * k) * hd + q * hd * d + 3 * d * i for q, k, i in zip(Q_HEADS, KV_HEADS, FFN))
    # non-embedding parameters of the derived 271,527,168 minus the norm weights
    assert weights == 271_527_168 - 32000 * d - (16 * (2 * d + 2 * hd) + d)
    attention = sum(6 * seq * q * hd for q in Q_HEADS)
    model = config_270m().model
    assert mt.flops_per_token(model, seq, include_output_head=False) == 6 * weights + attention
    assert mt.flops_per_token(model, seq) == 6 * weights + attention + 6 * 32000 * d


def test_mfu_is_achieved_over_peak_flops():
    assert mt.mfu(1000.0, 6e6, 1e10, 2) == pytest.approx(0.3)
    assert mt.mfu(1000.0, 6e6, None, 2) is None


def test_cpu_peak_is_measured_and_positive():
    peak, source = mt.device_peak_flops()
    assert peak > 1e8 and "measured" in source


def test_remeasured_cpu_peak_replaces_one_measured_under_load(monkeypatch):
    monkeypatch.setattr(mt, "_measured_cpu_peak", 1e3)  # as if measured with the cores busy
    assert mt.remeasure_cpu_peak() > 1e8
    assert mt.device_peak_flops()[0] == mt._measured_cpu_peak


def test_writer_appends_jsonl_and_tensorboard_events(tmp_path):
    writer = mt.MetricsWriter(tmp_path)
    writer.write(10, {"loss": 2.5, "lr": 1e-3, "mfu": None, "grad_norm": float("nan")})
    writer.write(20, {"loss": 2.0, "lr": 1e-3, "mfu": 0.4, "grad_norm": 0.5})
    writer.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 10, "loss": 2.5, "lr": 1e-3, "mfu": None, "grad_norm": "nan"}
    assert lines[1]["step"] == 20 and lines[1]["mfu"] == 0.4
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_writer_resuming_drops_the_records_of_steps_it_will_train_again(tmp_path):
    """A run killed after step 5 with checkpoint 4 on disk resumes at 4: step 5 is logged
    again, so its first record goes (held-out records too); earlier ones and stray lines stay."""
    lines = [json.dumps({"step": step, "loss": 10.0 - step}) for step in range(1, 6)]
    lines.insert(4, json.dumps({"step": 4, "heldout/loss": 6.5}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines + ["not json"]) + "\n")
    writer = mt.MetricsWriter(tmp_path, first_step=5)
    writer.write(5, {"loss": 4.75})
    writer.close()
    records = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert records == lines[:5] + ["not json", json.dumps({"step": 5, "loss": 4.75})]


def test_writer_starting_afresh_drops_every_record_of_the_run_before(tmp_path):
    """A run that died before its first checkpoint starts again at step 0: its held-out record
    of step 0 (eval.at_start) is written again, so the old one goes too."""
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "heldout/loss": 7.0}) + "\n")
    writer = mt.MetricsWriter(tmp_path, first_step=0)
    writer.write(0, {"heldout/loss": 7.0})
    writer.close()
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == [json.dumps({"step": 0, "heldout/loss": 7.0})]


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
    """A run logged steps 1-5 and died with checkpoint 3; the rerun logs 4-6 again. TensorBoard's
    own loader (purging orphaned data, its default) shows the rerun's 4 and 5 only."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = mt.MetricsWriter(tmp_path, first_step=0)
    for step in range(1, 6):
        first.write(step, {"loss": 10.0 - step})
    first.close()
    time.sleep(1.1)  # event files are named by the second they were opened in
    rerun = mt.MetricsWriter(tmp_path, first_step=4)
    for step in range(4, 7):
        rerun.write(step, {"loss": 100.0 + step})
    rerun.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [
        (1, 9.0), (2, 8.0), (3, 7.0), (4, 104.0), (5, 105.0), (6, 106.0)]


def test_writer_without_a_first_step_keeps_the_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 9, "loss": 1.0}) + "\n")
    mt.MetricsWriter(tmp_path).close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 9, "loss": 1.0}


def test_writer_on_other_processes_writes_nothing(tmp_path):
    writer = mt.MetricsWriter(tmp_path, enabled=False)
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_console_line_is_readable():
    line = mt.console_line(120, 600, {"loss": 5.4321, "lr": 2.9e-3, "grad_norm": 0.81,
                                      "tokens_per_sec": 5432.1, "mfu": 0.412, "step_time": 0.38})
    assert line == "step 120/600 | loss 5.4321 | lr 2.90e-03 | gnorm 0.81 | 5,432 tok/s | mfu 41.2% | 0.380 s/step"


def test_tiny_flops_count_matches_its_parameters():
    model = tiny_config.get_config().model
    total = count_params(abstract_model(model))
    norms = model.num_layers * (2 * model.model_dim + 2 * model.head_dim) + model.model_dim
    matmul_weights = total - model.vocab_size * model.model_dim - norms
    attention = sum(6 * 128 * layer.num_query_heads * model.head_dim for layer in schedule_from_config(model))
    assert mt.flops_per_token(model, 128, include_output_head=False) == 6 * matmul_weights + attention
