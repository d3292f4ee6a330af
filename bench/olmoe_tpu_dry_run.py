"""OLMoE-1B-7B's train step compiled for abstract TPU devices (libtpu's compiler, no TPU):
per-device memory of the accelerator path (ragged all-to-all, megablox grouped matmuls).

    TPU_SKIP_MDS_QUERY=1 ALLOW_MULTIPLE_LIBTPU_LOAD=1 PYTHONPATH=. python bench/olmoe_tpu_dry_run.py \
        [--topology v5p:2x2x1 --expert 4 --batch 4 --seq 4096 --attention xla]

The CPU dry run (`python -m elmjax.train --dry_run`) cannot use this path: XLA:CPU has no
`ragged_all_to_all`, so it compiles the dense worst-case buffers instead (bench/README.md).
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", default="v5p:2x2x1")
    parser.add_argument("--expert", type=int, default=4, help="mesh.expert; fsdp takes the other chips")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--attention", default="xla", help="model.attention_impl")
    args = parser.parse_args(argv)

    from jax.experimental import topologies

    from elmjax.config import load_config_file, validate
    from elmjax.training.dry_run import memory_report
    from elmjax.training.setup import build_setup, compile_train_step

    devices = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices
    config = load_config_file("configs/olmoe_1b_7b.py")
    config.model.moe_matmul, config.model.moe_dispatch = "megablox", "ragged"
    config.model.attention_impl, config.model.compute_dtype = args.attention, "bfloat16"
    config.mesh.data, config.mesh.expert, config.mesh.fsdp = 1, args.expert, len(devices) // args.expert
    config.train.batch_size, config.train.seq_len = args.batch, args.seq
    validate(config)
    compiled, seconds = compile_train_step(build_setup(config, devices))
    memory = memory_report(compiled)
    gib = 2.0**30
    print(f"{args.topology}: {len(devices)} chips, mesh expert {args.expert} fsdp {config.mesh.fsdp}, batch "
          f"{args.batch} x {args.seq}, bfloat16, attention {args.attention}: compile {seconds:.1f} s, per-device "
          f"{memory['total_bytes'] / gib:.2f} GiB (arguments {memory['argument_bytes'] / gib:.2f}, "
          f"temporaries {memory['temp_bytes'] / gib:.2f})")


if __name__ == "__main__":
    main()
