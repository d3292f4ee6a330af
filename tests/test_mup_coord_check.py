"""The muP coordinate check (tools/mup_coord_check.py): widths from the base width up by 8x
train a few steps; with muP every layer's activation RMS stays flat in width, without it
(the same hyperparameters at every width) the blocks' outputs grow."""
import csv

import pytest

from tools import mup_coord_check as cc

# |d log2(RMS) / d log2(width)| of every recorded layer after the last step, with muP. Flat
# means within this; without muP the blocks' slopes exceed SP_BLOCK_SLOPE (measured: about
# 1.7-2 at lr 1.2e-2 after 4 steps, while muP's stay within 0.06).
MUP_SLOPE_BOUND = 0.15
SP_BLOCK_SLOPE = 0.75


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    settings = cc.CheckSettings(base_width=32, multipliers=(1, 2, 4, 8), steps=4, layers=2, head_dim=16,
                                seq_len=32, batch_size=8)
    out = tmp_path_factory.mktemp("coord_check")
    return settings, out, cc.run(settings, out, log=lambda *_: None)


def test_mup_keeps_every_layers_activation_scale_flat_in_width(result):
    _, _, outcome = result
    mup = {layer: slope for (mode, layer), slope in outcome["slopes"].items() if mode == "mup"}
    assert set(mup) == {"embedding", "block 0", "block 1", "logits"}
    for layer, slope in mup.items():
        assert abs(slope) < MUP_SLOPE_BOUND, (layer, slope)


def test_without_mup_the_blocks_activations_grow_with_width(result):
    _, _, outcome = result
    for layer in ("block 0", "block 1"):
        assert outcome["slopes"][("sp", layer)] > SP_BLOCK_SLOPE, layer


def test_at_the_base_width_both_parameterizations_are_the_same_model(result):
    settings, _, outcome = result
    at_base = {}
    for row in outcome["rows"]:
        if row["width"] == settings.base_width:
            at_base.setdefault((row["step"], row["layer"]), []).append(row["rms"])
    assert all(len(set(values)) == 1 for values in at_base.values())  # bitwise: m = 1


def test_it_writes_the_table_csv_and_plot(result):
    settings, out, _ = result
    with open(out / "coord_check.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(settings.widths) * (settings.steps + 1) * 4
    table = (out / "coord_check.md").read_text()
    assert "| mup | block 1 |" in table and "| sp | logits |" in table and "slope" in table
    assert (out / "coord_check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("settings, message", [
    (dict(base_width=60, multipliers=(4, 2)), "width 120 is not a multiple of --head_dim 16"),  # after width 240 trained
    (dict(multipliers=(1, 0)), "--multipliers 1,0: need at least two different positive integers"),
])
def test_every_width_is_checked_before_any_trains(tmp_path, settings, message):
    trained = []
    with pytest.raises(ValueError, match=message):
        cc.run(cc.CheckSettings(**settings), tmp_path, log=trained.append)
    assert trained == [] and not list(tmp_path.iterdir())
