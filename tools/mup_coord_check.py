"""muP coordinate check: activation scale against width, with and without muP.

    python tools/mup_coord_check.py --out coord_check [--base_width 64 --multipliers 1,2,4,8
        --steps 4 --layers 2 --head_dim 16 --lr 1.2e-2 --seq_len 64 --batch_size 8]

The standard check of Tensor Programs V (arXiv 2203.03466, Fig. 5): BTLM-style models whose
width runs from the base width up by 8x train a few steps on the embedded corpus with the same
hyperparameters, and the RMS of each layer's activations (embedding output, each block's
output on the residual stream, the logits) is recorded after every step on a fixed batch.
- "mup": muP relative to the base width (elmjax/mup.py: init std / sqrt(m), hidden learning
  rate / m, logits x alpha / m, attention 1/head_dim). Activation scales stay flat in width.
- "sp": the same model and hyperparameters with the width corrections off (muP's base width
  set to each model's own width: the init std, learning rate and multipliers of the base
  model at every width), i.e. the standard parameterization. Activations grow with width.
Writes OUT/coord_check.csv (every measurement), OUT/coord_check.md (the last step's table and
each layer's slope of log2 RMS against log2 width) and OUT/coord_check.png (RMS against width,
one panel per parameterization and step). Heads keep `head_dim`; their number grows with width.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = ("sp", "mup")


@dataclasses.dataclass
class CheckSettings:
    base_width: int = 64
    multipliers: tuple = (1, 2, 4, 8)  # widths = base_width x these
    steps: int = 4
    layers: int = 2
    head_dim: int = 16
    lr: float = 1.2e-2  # BTLM's base learning rate
    seq_len: int = 64
    batch_size: int = 8
    vocab_size: int = 512
    seed: int = 0

    @property
    def widths(self) -> list[int]:
        return [self.base_width * m for m in self.multipliers]


def model_config(settings: CheckSettings, width: int, mode: str):
    """A validated BTLM-style config of `width` (muP relative to the base width, or SP)."""
    from elmjax.config import family_config, validate

    if width % settings.head_dim:
        raise ValueError(f"width {width} is not a multiple of --head_dim {settings.head_dim}; choose a --base_width "
                         "whose multiples are")
    config = family_config(
        "btlm", num_layers=settings.layers, model_dim=width, head_dim=settings.head_dim,
        num_heads=width // settings.head_dim, ffn_dim=8 * width // 3, vocab_size=settings.vocab_size,
        max_seq_len=settings.seq_len, norm_type="layer_norm", norm_eps=1e-5, qk_norm="none",
        position_encoding="alibi", use_bias=True, embedding_scale=14.6, mup_output_alpha=2.22,
        mup_init_std=0.073, mup_base_width=settings.base_width if mode == "mup" else width,
        peak_lr=settings.lr,
    )
    config.train.steps, config.train.seq_len, config.train.batch_size = settings.steps, settings.seq_len, settings.batch_size
    config.train.seed, config.train.z_loss, config.train.sample_at_end = settings.seed, 0.0, False
    config.optim.update(init_lr=settings.lr, warmup_steps=0, schedule="constant", clip_norm=0.0)
    config.mesh.data = 1  # one device: the check is about widths, not meshes
    config.eval.every_steps = 0
    return validate(config)


def _activation_rms(model, tokens, segment_ids, positions) -> dict:
    """RMS over all coordinates of each layer's output for one batch."""
    import jax.numpy as jnp

    rms = lambda x: jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))  # noqa: E731
    h = model.embed(tokens)
    out = {"embedding": rms(h)}
    rope = model.rope(positions)
    for index, block in enumerate(model.layers):
        h, _ = block(h, rope, segment_ids)
        out[f"block {index}"] = rms(h)
    out["logits"] = rms(model.head(model.norm(h)))
    return out


def measure(settings: CheckSettings, width: int, mode: str, log=print) -> list[dict]:
    """Trains one model `settings.steps` steps; rows {mode, width, step, layer, rms} for step
    0 (initialisation) to the last."""
    import jax
    from flax import nnx

    from elmjax.data.pipeline import make_train_iterator
    from elmjax.training import setup as setup_lib
    from elmjax.training import step as ts

    config = model_config(settings, width, mode)
    setup = setup_lib.build_setup(config, devices=jax.devices()[:1])
    init = jax.jit(lambda params: ts.init_train_state(params, setup.optimizer), out_shardings=setup.state_shardings)
    state = init(setup_lib.fresh_params(setup))
    train_step, _ = setup_lib.compile_train_step(setup)
    data = make_train_iterator(config, process_index=0, process_count=1)
    probe = next(make_train_iterator(config, process_index=0, process_count=1))  # the same batch every time

    @jax.jit
    def activations(params):
        model = nnx.merge(setup.graphdef, params)
        return _activation_rms(model, probe["inputs"], probe["segment_ids"], probe["positions"])

    frozen, rows = setup.abstract_frozen, []
    for step in range(settings.steps + 1):
        if step:
            state, _ = train_step(state, frozen, setup_lib.global_batch(setup, next(data)))
        for layer, value in jax.device_get(activations(state["params"])).items():
            rows.append({"mode": mode, "width": width, "step": step, "layer": layer, "rms": float(value)})
    log(f"{mode} width {width}: " + ", ".join(f"{r['layer']} {r['rms']:.3g}" for r in rows[-len(rows) // (settings.steps + 1):]))
    return rows


def slopes(rows: list[dict], step: int) -> dict:
    """{(mode, layer): least-squares slope of log2 RMS against log2 width at `step`}."""
    import numpy as np

    out = {}
    for mode in MODES:
        for layer in sorted({r["layer"] for r in rows}):
            points = [(r["width"], r["rms"]) for r in rows if r["mode"] == mode and r["layer"] == layer and r["step"] == step]
            if len(points) >= 2:
                x, y = np.log2([p[0] for p in points]), np.log2([p[1] for p in points])
                out[(mode, layer)] = float(np.polyfit(x, y, 1)[0])
    return out


def check(settings: CheckSettings) -> None:
    """Every width's config, checked before any of them trains (ValueError / ConfigError)."""
    if len(settings.multipliers) < 2 or min(settings.multipliers) < 1 or len(set(settings.multipliers)) < 2:
        raise ValueError(f"--multipliers {','.join(map(str, settings.multipliers))}: need at least two different "
                         "positive integers (the widths are base_width times each)")
    for width in settings.widths:
        for mode in MODES:
            model_config(settings, width, mode)


def run(settings: CheckSettings, out_dir, log=print) -> dict:
    """Measures every width in both parameterizations and writes the CSV, table and plot.
    Returns {"rows": [...], "slopes": {(mode, layer): slope at the last step}}."""
    check(settings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for mode in MODES for width in settings.widths for row in measure(settings, width, mode, log)]
    last = slopes(rows, settings.steps)
    with open(out / "coord_check.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["mode", "width", "step", "layer", "rms"])
        writer.writeheader()
        writer.writerows(rows)
    (out / "coord_check.md").write_text(_table(rows, last, settings))
    _plot(rows, settings, out / "coord_check.png")
    return {"rows": rows, "slopes": last}


def _table(rows, last, settings) -> str:
    layers = sorted({r["layer"] for r in rows}, key=_layer_order)
    lines = [f"Activation RMS after {settings.steps} steps (lr {settings.lr}, base width {settings.base_width}); "
             "slope = d log2(RMS) / d log2(width)", "",
             "| mode | layer | " + " | ".join(f"width {w}" for w in settings.widths) + " | slope |",
             "|---|---|" + "---|" * (len(settings.widths) + 1)]
    for mode in MODES:
        for layer in layers:
            values = {r["width"]: r["rms"] for r in rows if r["mode"] == mode and r["layer"] == layer and r["step"] == settings.steps}
            lines.append(f"| {mode} | {layer} | " + " | ".join(f"{values[w]:.4g}" for w in settings.widths)
                         + f" | {last[(mode, layer)]:+.3f} |")
    return "\n".join(lines) + "\n"


def _layer_order(name: str):
    if name == "embedding":
        return (0, 0)
    if name.startswith("block"):
        return (1, int(name.split()[1]))
    return (2, 0)


def _plot(rows, settings, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({0, max(1, settings.steps // 2), settings.steps})
    layers = sorted({r["layer"] for r in rows}, key=_layer_order)
    figure, axes = plt.subplots(len(MODES), len(steps), figsize=(4 * len(steps), 3.4 * len(MODES)), sharey=True, squeeze=False)
    for i, mode in enumerate(MODES):
        for j, step in enumerate(steps):
            axis = axes[i][j]
            for layer in layers:
                points = sorted((r["width"], r["rms"]) for r in rows if r["mode"] == mode and r["layer"] == layer and r["step"] == step)
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=layer)
            axis.set_xscale("log", base=2)
            axis.set_yscale("log", base=2)
            axis.set_title(f"{'muP' if mode == 'mup' else 'SP'}, step {step}")
            axis.set_xlabel("width")
            if j == 0:
                axis.set_ylabel("activation RMS")
    axes[0][0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def parse_args(argv=None) -> tuple[CheckSettings, str]:
    defaults = CheckSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for coord_check.{csv,md,png}")
    parser.add_argument("--base_width", type=int, default=defaults.base_width, help="width of the narrowest model")
    parser.add_argument("--multipliers", default=",".join(map(str, defaults.multipliers)),
                        help="widths as multiples of the base width, e.g. 1,2,4,8")
    for name, text in (("steps", "training steps per width"), ("layers", "decoder layers"),
                       ("head_dim", "attention head width"), ("seq_len", "tokens per sequence"),
                       ("batch_size", "sequences per step"), ("vocab_size", "vocabulary size"),
                       ("seed", "initialisation and data seed")):
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name), help=text)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="base learning rate (BTLM's)")
    args = parser.parse_args(argv)
    try:
        multipliers = tuple(int(m) for m in args.multipliers.split(","))
    except ValueError:
        parser.error(f"--multipliers {args.multipliers}: need comma-separated integers, e.g. 1,2,4,8")
    settings = CheckSettings(
        base_width=args.base_width, multipliers=multipliers,
        steps=args.steps, layers=args.layers, head_dim=args.head_dim, lr=args.lr, seq_len=args.seq_len,
        batch_size=args.batch_size, vocab_size=args.vocab_size, seed=args.seed,
    )
    return settings, args.out


def main(argv=None) -> int:
    settings, out = parse_args(argv)
    run(settings, out)
    print((Path(out) / "coord_check.md").read_text())
    print(f"wrote {out}/coord_check.csv, coord_check.md, coord_check.png")
    return 0


if __name__ == "__main__":
    from elmjax import cli  # one-line errors, and the CPU pinned before a JAX backend starts

    sys.exit(cli.run_command(main))
