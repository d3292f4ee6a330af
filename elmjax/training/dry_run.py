"""`python -m elmjax.train --dry_run [--topology=v5p:2x2x1]`: compile the real train step for
the configured mesh and report memory, FLOPs and compile time; trains nothing.

Without `--topology` the mesh is this host's devices. With it, the mesh is made of abstract
TPU devices (`jax.experimental.topologies`; needs libtpu: `pip install -e ".[tpu]"`) and the
real TPU compiler runs on this machine: its memory analysis says whether the step fits a
chip's HBM, and its cost analysis gives FLOPs and an estimated step time (`optimal_seconds`,
a roofline estimate of the compiler, not a measurement), hence an estimated MFU.
"""
from __future__ import annotations

from elmjax import accelerators
from elmjax.training import memory
from elmjax.training.loop_costs import whole_step_costs
from elmjax.training.metrics import accelerator_spec, flops_per_token
from elmjax.training.setup import build_setup, compile_train_step
from elmjax.validation import first_line

GiB = 2.0**30
COUNTED = " with every loop iteration counted"  # elmjax/training/loop_costs.py


def tpu_devices(topology: str):
    """Abstract TPU devices of a topology name such as `v5p:2x2x1` (nothing runs on them)."""
    accelerators.quiet_tpu_compiler()
    from jax.experimental import topologies

    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
        if any(getattr(device, "core_on_chip", 0) for device in devices):
            # A device per TensorCore (v4's default description); jax runs such chips as one
            # device each (megacore), and its meshes refuse the cores.
            devices = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                                   chip_config_name="megacore").devices
        return devices
    except Exception as error:  # noqa: BLE001 - no libtpu, or a name it does not know
        names = "give a name such as v5p:2x2x1, v5e:2x2, v6e:2x2 or v4:2x2x1"
        fix = names if accelerators.tpu_compiler_installed() else f"install it with pip install -e \".[tpu]\" and {names}"
        raise ValueError(f"--topology={topology}: the TPU compiler cannot describe it ({first_line(error)}); {fix}") from None


def memory_report(compiled) -> dict:
    """Per-device bytes from XLA's memory analysis of a compiled step."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    report = {
        "argument_bytes": analysis.argument_size_in_bytes,
        "output_bytes": analysis.output_size_in_bytes,
        "alias_bytes": analysis.alias_size_in_bytes,
        "temp_bytes": analysis.temp_size_in_bytes,
        # The compiler's largest sum of live buffers, arguments included; the total it reserves
        # (arguments + outputs - aliased + temporaries) can be larger, where buffers of
        # different lifetimes are not packed into the same bytes.
        "peak_bytes": getattr(analysis, "peak_memory_in_bytes", 0),
    }
    report["total_bytes"] = (
        report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"] + report["temp_bytes"]
    )
    return report


def dry_run(config, topology: str | None = None, log=print) -> dict:
    """Builds, lowers and compiles the train step; logs and returns the figures. A staged run
    (`train.stages`) compiles each stage's batch shape, as training will; the figures are
    the last stage's, with every stage's under "stages"."""
    from elmjax.training import stages

    devices = tpu_devices(topology) if topology else None
    plan = stages.plan(config)
    if len(plan) == 1:
        return _dry_run_shape(config, devices, topology, log)
    reports = []
    for stage in plan:
        log(f"{stage.describe()}:")
        reports.append(_dry_run_shape(stages.stage_config(config, stage), devices, topology, log))
    return {**reports[-1], "stages": reports}


def _dry_run_shape(config, devices, topology: str | None, log) -> dict:
    """`dry_run` of the step at `train.batch_size` x `train.seq_len`."""
    setup = build_setup(config, devices)
    # A chip's memory is a hard limit: stop before a long compile. Forced CPU devices, which
    # stand in for accelerators, only split this host's memory between them: report it.
    bound = memory.check_fits(setup, log, refuse=setup.mesh.devices.flat[0].platform != "cpu")
    compiled, seconds = compile_train_step(setup)
    device = setup.mesh.devices.flat[0]
    chips = setup.mesh.devices.size
    report = {"num_params": setup.num_params, "compile_seconds": seconds, "platform": device.platform,
              "device_kind": device.device_kind, "devices": chips, "lower_bound_bytes": bound["total"],
              **memory_report(compiled)}
    tokens = config.train.batch_size * config.train.seq_len
    report["spec_flops_per_device"] = flops_per_token(config.model, config.train.seq_len) * tokens / chips
    log(f"mesh {dict(setup.mesh.shape)} on {chips} {device.platform} devices ({device.device_kind})"
        + (f", topology {topology} (abstract devices; the real TPU compiler)" if topology else ""))
    log(f"parameters: {setup.num_params:,} ({setup.num_trainable:,} trainable)")
    log(f"batch {config.train.batch_size} x {config.train.seq_len} tokens, grad_accum_steps "
        f"{config.train.grad_accum_steps}, remat {config.model.remat_policy}, attention {config.model.attention_impl}")
    log(setup.model.plan.describe())
    log(f"compile time: {seconds:.1f} s")
    if "total_bytes" in report:
        capacity, source = memory.device_capacity(device)
        fits = "" if capacity is None else (
            f"; {'fits' if report['total_bytes'] <= capacity else 'does NOT fit'} in {capacity / GiB:.1f} GiB ({source})")
        log(f"per-device memory (XLA estimate): {report['total_bytes'] / GiB:.2f} GiB "
            f"(arguments {report['argument_bytes'] / GiB:.2f}, outputs {report['output_bytes'] / GiB:.2f}, "
            f"aliased {report['alias_bytes'] / GiB:.2f}, temporaries {report['temp_bytes'] / GiB:.2f})"
            + (f"; peak of live buffers {report['peak_bytes'] / GiB:.2f} GiB" if report["peak_bytes"] else "")
            + f"{fits}; "
            f"analytic lower bound {bound['total'] / GiB:.2f} GiB")
    report.update(whole_step_costs(setup, compiled, log))
    if report["corrected"]:
        log(f"compiles for the loop counts: {report['loop_compile_seconds']:.1f} s")
    counted = COUNTED if report["corrected"] else ""
    if report.get("flops"):
        log(f"compiled FLOPs per device per step{counted}: {report['flops']:.4g} "
            f"({report['flops'] / report['spec_flops_per_device']:.2f}x SPEC §4's {report['spec_flops_per_device']:.4g})")
    spec = accelerator_spec(device.device_kind)
    if report.get("optimal_seconds") and report["optimal_seconds"] > 0 and spec is not None:
        report["estimated_mfu"] = report["spec_flops_per_device"] / report["optimal_seconds"] / spec[0]
        log(f"estimated step time (compiler's optimal_seconds, an estimate{counted}): "
            f"{report['optimal_seconds']:.4g} s; "
            f"estimated MFU {100 * report['estimated_mfu']:.1f}% of {spec[0] / 1e12:.0f} TFLOP/s per chip "
            f"({tokens / report['optimal_seconds']:,.0f} tokens/s estimated)")
    elif device.platform == "tpu" and (report.get("optimal_seconds") or 0) <= 0:  # v4 and v5e report negatives
        log(f"no step-time estimate: the TPU compiler's cost analysis for {device.device_kind} gives no usable "
            f"optimal_seconds (it reports {report.get('optimal_seconds', 'none')})")
    elif device.platform == "tpu":
        log(f"no MFU estimate: no peak FLOP/s known for {device.device_kind}")
    return report
