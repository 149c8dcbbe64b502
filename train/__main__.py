"""``python -m train [--config FILE] [key=value ...] [--workdir DIR] [--resume]``.

With no arguments, trains the default recipe (a small GPT on the embedded
corpus of the Python standard library's source, AdamW + warmup-cosine +
global-norm clipping, bf16 compute with float32 master weights) on whatever
devices JAX sees; on a machine with no accelerator, over 8 simulated CPU
devices, so the sharded code path is the one that runs.
"""

from __future__ import annotations

import argparse
import signal

from train import cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.recipe_parser(
        "python -m train",
        __doc__.split("\n\n")[1],
        workdir_help="default: runs/<recipe name>",
        resume_help="require a checkpoint in the workdir (resuming is automatic when one exists)",
    )
    return parser.parse_args(argv)


def _fmt(value: float | None) -> str:
    """A loss for the summary line; a resumed run that had nothing left to do logged none."""
    return "n/a" if value is None else f"{value:.4f}"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from train import config as config_lib

    with cli.user_errors():
        # The recipe is checked before JAX loads: a typo is reported at once.
        cfg = config_lib.load(args.config, cli.overrides(args))
        cli.use_simulated_cpu_devices()
        from train import distributed, loop

        distributed.maybe_initialize(cfg.run.distributed)
        workdir = args.workdir or cli.default_workdir(args.config)
        summary = loop.fit(cfg, workdir)
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
