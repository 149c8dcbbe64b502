"""``python -m benchmarks.low_precision`` end to end on a tiny GPT, and its state-bytes count.

What is proved here: the command trains the recipe once per moment dtype (float32 first, the
reference), prints a table whose last column is the relative difference from the float32 run,
writes the same as JSON and Markdown, and the option really reached the optimizer (the state
of the big leaves takes 8, 4 and at most 2.1 bytes per parameter). Its step part times
AdamW's step per moment dtype, plain and with ``stored_after``, against the float32 step.
The state-bytes count is checked on its own against the 8-bit format's documented layout.
Nothing asserts on losses or times beyond the arithmetic of the last columns: a few steps
say nothing about the 2% target, which is the real benchmark's business.
"""

from __future__ import annotations

import json
import math

import jax
import optax
import pytest

import optim_jax
from benchmarks import low_precision as bench

# A one-layer GPT with a single 128-wide head: every kernel's last axis is 128 or 256, so the
# quantised leaves carry at most one 4-byte block maximum per 128 values.
TINY = [
    "model.n_layers=1",
    "model.d_model=128",
    "model.n_heads=1",
    "model.seq_len=16",
    "data.batch_size=16",
    "data.max_bytes=200000",
    "run.eval_batches=1",
    "optimizer.warmup_steps=1",
    "precision.compute=float32",
    "run.plot=false",
]
LAST_COLUMN = "vs float32"


def int8_bytes(shape: tuple[int, ...], block: int = 256) -> int:
    """Bytes of one int8 moment of ``shape``, from the format's description in
    optim_jax/quantization.py: one byte per value, plus a float32 maximum per block of
    ``block`` consecutive values along a row: the last axis, or the last axes merged until
    a row holds a block (a shorter last block per row)."""
    merged = len(shape) - 1
    while merged > 0 and math.prod(shape[merged:]) < block:
        merged -= 1
    rows, row = math.prod(shape[:merged]), math.prod(shape[merged:])
    return math.prod(shape) + 4 * rows * math.ceil(row / block)


@pytest.mark.slow  # three short trainings: about 30-45 s on 2 shared cores, mostly compiling
def test_end_to_end_tiny(tmp_path, capsys):
    result = bench.main(["--steps", "2", "--step-size", "20000", "--out", str(tmp_path), *TINY])
    printed = capsys.readouterr().out

    # The table is printed, its last column is the comparison with float32, float32 first.
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("moment dtype"))
    assert lines[header].endswith(LAST_COLUMN)
    rows = [line.split() for line in lines[header + 2 : header + 5]]
    assert [row[0] for row in rows] == ["float32", "bfloat16", "int8"]
    assert rows[0][-1] == "+0.00%"
    assert all(row[-1].endswith("%") for row in rows)

    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2
    assert files[0].startswith("low_precision_cpu_") and files[0].endswith(".json")
    assert files[1] == files[0].removesuffix(".json") + ".md"
    markdown = (tmp_path / files[1]).read_text()
    assert f"| {LAST_COLUMN} |" in markdown

    saved = json.loads((tmp_path / files[0]).read_text())
    assert saved["tables"]["train"]["headers"][-1] == LAST_COLUMN
    assert saved["tables"]["step"]["headers"][-1] == LAST_COLUMN
    runs = {run["moment_dtype"]: run for run in saved["runs"]}
    reference = runs["float32"]["final_eval_loss"]
    for run in runs.values():
        assert run["steps"] == 2 and math.isfinite(run["final_eval_loss"])
        assert run["relative_difference"] == pytest.approx(
            (run["final_eval_loss"] - reference) / reference
        )
    assert saved["int8_within_target"] == (abs(runs["int8"]["relative_difference"]) <= 0.02)
    assert result["runs"] == saved["runs"]

    # The option reached the optimizer: AdamW's two moments of the big leaves take 2 x 4,
    # 2 x 2 and 2 x (1 + 4/128 at most) bytes per parameter (exact up to float rounding).
    big = {name: run["big_leaf_moment_bytes_per_param"] for name, run in runs.items()}
    assert big["float32"] == pytest.approx(8.0, rel=1e-12)
    assert big["bfloat16"] == pytest.approx(4.0, rel=1e-12)
    assert 2.0 < big["int8"] <= 2 * (1 + 4 / 128)
    assert big["int8"] <= 2.1
    # Over the whole state the small leaves (float32 in every run) and counters add a little.
    total = {name: run["state_bytes_per_param"] for name, run in runs.items()}
    assert total["int8"] < total["bfloat16"] < total["float32"]


def test_step_part_times_each_format_plain_and_stored_after(tmp_path, capsys):
    result = bench.main(
        ["--parts", "step", "--step-size", str(2**18), "--repeats", "2", "--warmup", "1"]
        + ["--dtypes", "bfloat16,int8", "--out", str(tmp_path)]
    )
    printed = capsys.readouterr().out
    assert "Optimizer step" in printed and "Training runs" not in printed
    assert "train" not in result["tables"] and "runs" not in result
    runs = result["step_runs"]
    assert [(r["moment_dtype"], r["stored_after"]) for r in runs] == [
        (dtype, stored) for dtype in ("float32", "bfloat16", "int8") for stored in (False, True)
    ]
    reference = runs[0]["step_s"]
    assert runs[0]["vs_float32"] == 1.0
    for run in runs:
        assert run["params"] >= 2**18 and len(run["samples_s"]) == 2
        assert run["vs_float32"] == pytest.approx(run["step_s"] / reference)
    state = {(r["moment_dtype"], r["stored_after"]): r["state_bytes_per_param"] for r in runs}
    assert state["int8", True] < state["bfloat16", True] < state["float32", True]
    assert state["bfloat16", False] == state["bfloat16", True]
    # On CPU, stored_after adds one read of the parameters per bfloat16 moment (the
    # dependency) and takes away the moments' copies.
    xla = {(r["moment_dtype"], r["stored_after"]): r["xla_bytes_per_param"] for r in runs}
    assert xla["float32", False] == xla["float32", True]


def test_state_bytes_follow_the_int8_layout():
    """The count on a hand-made AdamW state: two leaves big enough to be quantised (one with
    a ragged last block, one whose short last axes merge into rows of a block or more) and one
    left float32."""
    shapes = {"ragged": (64, 300), "short_rows": (128, 4, 32), "small": (100,)}
    params = {k: jax.ShapeDtypeStruct(s, "float32") for k, s in shapes.items()}
    tx = optax.chain(optim_jax.clip_by_global_norm(1.0), optim_jax.adamw(1e-3, moment_dtype="int8"))
    counted = bench.state_bytes(params, jax.eval_shape(tx.init, params))

    big = [shapes["ragged"], shapes["short_rows"]]
    big_params = sum(math.prod(s) for s in big)
    assert counted["params"] == big_params + 100
    assert counted["big_leaf_params"] == big_params
    expected = 2 * sum(int8_bytes(s) for s in big) / big_params  # mu and nu
    assert counted["big_leaf_moment_bytes_per_param"] == pytest.approx(expected, rel=1e-12)
    # All of the state: those moments, the small leaf's two float32 moments, and a few 4-byte
    # scalars (step counters, the clip's norm): more than none, fewer than 16.
    moments = 2 * sum(int8_bytes(s) for s in big) + 2 * 4 * 100
    scalars = counted["state_bytes_per_param"] * (big_params + 100) - moments
    assert 4 - 1e-6 <= scalars <= 16 * 4  # 1e-6: float rounding of the per-parameter ratio


def test_state_bytes_needs_an_adam_state():
    params = {"w": jax.ShapeDtypeStruct((64, 64), "float32")}
    state = jax.eval_shape(optim_jax.lion(1e-4).init, params)
    with pytest.raises(ValueError, match="AdamState"):
        bench.state_bytes(params, state)
