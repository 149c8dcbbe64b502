"""AdamW with float32, bfloat16 and 8-bit optimizer state on the same training recipe.

Run ``python -m benchmarks.low_precision`` (``--help`` for the options). It trains
the default recipe of ``python -m train`` (or ``--config FILE``, with ``key=value``
overrides and ``--steps N``) once per moment dtype (``--dtypes``, by default
``float32,bfloat16,int8``), in one process and one after the other, changing
nothing but ``optimizer.options.moment_dtype``: same seed, data, schedule and
mesh. For each run it reports:

* **Final eval loss** (``train.loop.fit``'s summary, the mean over
  ``run.eval_batches`` held-out batches) and its **relative difference** from the
  float32-state run's, ``(loss - loss_float32) / loss_float32``: the last column.
  The target of issue 6 is int8 within 2%.
* **Optimizer-state bytes per parameter**, counted from the state the run ended
  with (every array, counters and quantisation block maxima included), over all
  parameters, and over the *big* leaves alone: the parameters with at least
  ``quantization.MomentFormat().min_size`` (4096) values, the ones int8 quantises
  (smaller ones keep float32 moments, Dettmers et al.'s rule). For AdamW the big
  leaves take 8, 4 and ``2 x (1 + 4/256) = 2.03`` bytes per parameter.
* **Wall time** of the whole ``fit`` (model and state built, steps compiled,
  trained, evaluated, checkpointed), for orientation only: other processes on a
  shared machine change it.

Results go to stdout and, as JSON and Markdown, to ``--out`` (default
``benchmarks/results/``) as ``low_precision_<device kind>_<date>_<time>.{json,md}``.
Each run's workdir (checkpoints, metrics log) is a temporary directory, deleted
afterwards. On a machine without an accelerator the trainer uses 8 simulated CPU
devices, as ``python -m train`` does.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax

from benchmarks import report
from optim_jax import base, quantization
from optim_jax.transforms import AdamState
from train import cli

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results"
DTYPES = ("float32", "bfloat16", "int8")
TARGET = 0.02  # issue 6: int8-state final eval loss within 2% of the float32-state run's
# Parameters with at least this many values are the ones int8 quantises ("big leaves").
BIG_LEAF = quantization.MomentFormat().min_size

COLUMNS: list[tuple[str, Any]] = [
    ("moment dtype", lambda r: r["moment_dtype"]),
    ("final eval loss", lambda r: f"{r['final_eval_loss']:.4f}"),
    ("state B/param", lambda r: f"{r['state_bytes_per_param']:.3f}"),
    (f"B/param (leaves >= {BIG_LEAF})", lambda r: f"{r['big_leaf_moment_bytes_per_param']:.3f}"),
    ("wall s", lambda r: f"{r['wall_s']:.1f}"),
    ("vs float32", lambda r: f"{100 * r['relative_difference']:+.2f}%"),
]


# ----------------------------------------------------------------------------- state bytes


def _nbytes(tree: Any) -> int:
    """Bytes of every array in ``tree`` (global sizes: all shards of a sharded array)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def state_bytes(params: Any, opt_state: Any) -> dict[str, float]:
    """Optimizer-state bytes per parameter: over the whole state, and the moments of the
    big leaves (``>= BIG_LEAF`` values) over those leaves' parameters.

    The moments are those of every :class:`~optim_jax.transforms.AdamState` in the state
    (AdamW, Adam and LAMB keep theirs there), matched to the parameters leaf by leaf.
    """
    param_leaves, treedef = jax.tree.flatten(params)
    n_params = sum(p.size for p in param_leaves)
    adam_states = base.find_states(opt_state, AdamState)
    if not adam_states:
        raise ValueError("no AdamState in the optimizer state: the benchmark is for AdamW")
    big = [i for i, p in enumerate(param_leaves) if p.size >= BIG_LEAF]
    big_params = sum(param_leaves[i].size for i in big)
    big_bytes = 0
    for state in adam_states:
        for moments in (state.mu, state.nu):
            per_param = treedef.flatten_up_to(moments)  # a QuantizedArray stays one entry
            big_bytes += sum(_nbytes(per_param[i]) for i in big)
    return {
        "params": n_params,
        "big_leaf_params": big_params,
        "state_bytes_per_param": _nbytes(opt_state) / n_params,
        "big_leaf_moment_bytes_per_param": big_bytes / big_params if big_params else math.nan,
    }


# ----------------------------------------------------------------------------- runs


def train_once(
    config: pathlib.Path | None, overrides: Sequence[str], moment_dtype: str
) -> dict[str, Any]:
    """One ``fit`` of the recipe with ``optimizer.options.moment_dtype=moment_dtype``."""
    from train import config as config_lib
    from train import loop

    cfg = config_lib.load(config, [*overrides, f"optimizer.options.moment_dtype={moment_dtype}"])
    with tempfile.TemporaryDirectory(prefix=f"low_precision_{moment_dtype}_") as workdir:
        start = time.perf_counter()
        summary = loop.fit(cfg, workdir, progress=False)
        wall_s = time.perf_counter() - start
    state = summary["state"]
    return {
        "moment_dtype": moment_dtype,
        "optimizer": cfg.optimizer.name,
        "steps": summary["steps"],
        "initial_eval_loss": summary["initial_eval_loss"],
        "final_eval_loss": summary["final_eval_loss"],
        "final_eval_accuracy": summary["final_eval_accuracy"],
        "first_train_loss": summary["first_train_loss"],
        "last_train_loss": summary["last_train_loss"],
        "skipped_steps": summary["skipped_steps"],
        "wall_s": wall_s,
        **state_bytes(state.params, state.opt_state),
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    meta = result["meta"]
    lines = [
        *report.machine_lines(meta),
        f"recipe: {meta['recipe']}, {meta['optimizer']}, {meta['steps']} steps, "
        f"{meta['params']:,} parameters ({meta['big_leaf_params']:,} in leaves of "
        f">= {BIG_LEAF} values)",
    ]
    verdict = result.get("int8_within_target")
    if verdict is not None:
        lines.append(
            f"int8 within {100 * TARGET:.0f}% of float32's final eval loss: "
            f"{'yes' if verdict else 'NO'}"
        )
    return lines


def format_report(result: dict[str, Any], markdown: bool) -> str:
    table = report.render(result["table"], markdown)
    title = "Optimizer state in float32, bfloat16 and int8 (AdamW, same recipe)"
    if markdown:
        return "\n".join(
            [f"# {title}", ""] + [f"- {line}" for line in summary_lines(result)] + ["", table, ""]
        )
    return "\n".join([title, *summary_lines(result), "", table, ""])


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Every training run, float32 first (the reference), and the result."""
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"run.steps={args.steps}")
    meta = report.environment() | {
        "command": command,
        "load_start": report.load_average(),
        "recipe": str(args.config) if args.config else "default",
        "overrides": overrides,
    }
    records = []
    for moment_dtype in args.dtypes:
        print(f"training with {moment_dtype} optimizer state", file=sys.stderr, flush=True)
        records.append(train_once(args.config, overrides, moment_dtype))
    reference = records[0]["final_eval_loss"]
    for record in records:
        record["relative_difference"] = (record["final_eval_loss"] - reference) / reference
    first = records[0]
    meta |= {
        "load_end": report.load_average(),
        "optimizer": first["optimizer"],
        "steps": first["steps"],
        "params": first["params"],
        "big_leaf_params": first["big_leaf_params"],
    }
    int8 = [r for r in records if r["moment_dtype"] == "int8"]
    return {
        "meta": meta,
        "target_relative_difference": TARGET,
        "int8_within_target": abs(int8[0]["relative_difference"]) <= TARGET if int8 else None,
        "runs": records,
        "table": report.build_table(COLUMNS, records),
    }


# ----------------------------------------------------------------------------- driver


def _dtypes(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(DTYPES))
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected distinct names from {', '.join(DTYPES)}, got {text!r}"
        )
    # float32 is the reference every other run is compared with: always run, and first.
    return ["float32", *(n for n in names if n != "float32")]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.low_precision",
        description="AdamW trained with float32, bfloat16 and int8 optimizer state: final eval "
        "loss against the float32 run, state bytes per parameter, wall time.",
    )
    parser.add_argument("--config", type=pathlib.Path, help="a YAML recipe (default: built in)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. model.n_layers=2")
    parser.add_argument(
        "--steps", type=report.positive_int, help="run.steps (default: the recipe's)"
    )
    parser.add_argument(
        "--dtypes",
        type=_dtypes,
        default=list(DTYPES),
        help=f"comma-separated moment dtypes from {','.join(DTYPES)} (float32 always runs)",
    )
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="results directory")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cli.use_simulated_cpu_devices()  # before anything starts a JAX backend
    with cli.user_errors():
        result = run(args, report.command_line("benchmarks.low_precision", argv))
    report.publish(result, args.out, "low_precision", format_report)
    return result


if __name__ == "__main__":
    main()
