"""``python -m train [--config FILE] [key=value ...] [--workdir DIR] [--resume]``.

With no arguments, trains the default recipe (a small GPT on the embedded
corpus of the Python standard library's source, AdamW + warmup-cosine +
global-norm clipping, bf16 compute with float32 master weights) on whatever
devices JAX sees; on a machine with no accelerator, over 8 simulated CPU
devices, so the sharded code path is the one that runs.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n\n")[1])
    parser.add_argument("--config", type=pathlib.Path, help="a YAML recipe (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. run.steps=100")
    parser.add_argument("--workdir", type=pathlib.Path, help="default: runs/<recipe name>")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="require a checkpoint in the workdir (resuming is automatic when one exists)",
    )
    return parser.parse_args(argv)


def use_simulated_cpu_devices(count: int = 8) -> None:
    """Gives the CPU backend ``count`` devices (harmless where an accelerator is the default).

    Must run before JAX starts a backend; respects a device count the user set.
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    import jax

    jax.config.update("jax_num_cpu_devices", count)


def _fmt(value: float | None) -> str:
    """A loss for the summary line; a resumed run that had nothing left to do logged none."""
    return "n/a" if value is None else f"{value:.4f}"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    use_simulated_cpu_devices()

    from train import config as config_lib
    from train import distributed, loop
    from train.checkpoint import CheckpointError

    overrides = list(args.overrides)
    if args.resume:
        overrides.append("checkpoint.resume=require")
    try:
        cfg = config_lib.load(args.config, overrides)
        distributed.maybe_initialize(cfg.run.distributed)
        name = args.config.stem if args.config else "default"
        workdir = args.workdir or pathlib.Path("runs") / name
        summary = loop.fit(cfg, workdir)
    except (config_lib.ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    per = "token" if summary["unit"] == "tokens" else "example"
    print(
        f"train loss {_fmt(summary['first_train_loss'])} -> {_fmt(summary['last_train_loss'])}, "
        f"eval loss {summary['initial_eval_loss']:.4f} -> {summary['final_eval_loss']:.4f} "
        f"(nats/{per}), eval accuracy {summary['initial_eval_accuracy']:.4f} -> "
        f"{summary['final_eval_accuracy']:.4f} after {summary['steps']} steps; "
        f"{summary['skipped_steps']} non-finite steps skipped; outputs in {workdir}"
    )
    if summary["preempted"]:
        # 128 + SIGTERM, as if the signal had ended the process: schedulers requeue the job.
        raise SystemExit(128 + signal.SIGTERM)
    return summary


if __name__ == "__main__":
    main()
