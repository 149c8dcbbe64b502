"""``python -m benchmarks.optimizers`` end to end at tiny sizes, and its building blocks.

Nothing here asserts on timings: the benchmark's numbers are only read by people. What is
checked is that the tables and files have the promised columns and records, and that every
timed step computes the update it claims to: each Optax pair the same rule, and the flat
variant (the stored layout) the per-leaf step's parameters.
"""

from __future__ import annotations

import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import optimizers as bench
from benchmarks import report

# elementwise, factored (its flat layout has a buffer per shape), a chain with a global norm
SUBSET = ("sgd_momentum", "adafactor", "clip_adamw_cosine")
RATIO = "ratio ours/optax"
LAST = "best ours/optax"  # the last column of both tables
FLAT_COLUMNS = ("flat ms", "flat % ceiling", "ratio flat/optax")
FAULTS = "page faults/step ours/flat/optax"
# Optimizers whose rule needs each tensor's shape (factored moments): a buffer per shape.
BY_SHAPE = {"adafactor"}
# Norm-based rules and means over tensors: the same sums in another order, so equal to
# float32 rounding.
ROUNDING = {"lamb", "clip_adamw_cosine", "adafactor"}


def test_end_to_end_tiny(tmp_path, capsys):
    argv = ["--size", "20000", "--leaves", "20", "--repeats", "2", "--warmup", "1"]
    argv += ["--compile-leaves", "2", "--optimizers", ",".join(SUBSET), "--out", str(tmp_path)]
    result = bench.main(argv)
    printed = capsys.readouterr().out

    # The step table is printed, its last column is the best ratio, one row per optimizer and
    # pytree; every row ends in a number, flat optimizer or not.
    step_header = next(line for line in printed.splitlines() if line.startswith("optimizer"))
    assert step_header.endswith(LAST)
    for name in SUBSET:
        rows = [line for line in printed.splitlines() if line.startswith(name + " ")]
        # two step rows (transformer, split) and three compile rows (2, 20, 51 leaves)
        assert len(rows) == 5, rows
        for row in rows:
            assert float(row.split()[-1]) > 0
    assert "pack ms" in printed

    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2
    assert files[0].startswith("optimizers_cpu_") and files[0].endswith(".json")
    assert files[1] == files[0].removesuffix(".json") + ".md"

    saved = json.loads((tmp_path / files[0]).read_text())
    table = saved["tables"]["steps"]
    assert table["headers"][-1] == LAST
    assert {RATIO, *FLAT_COLUMNS} <= set(table["headers"])
    assert [row[:2] for row in table["rows"]] == [
        [name, f"{tree} ({leaves} leaves)"]
        for tree, leaves in (("transformer", bench.TRANSFORMER_LEAVES), ("split", 20))
        for name in SUBSET
    ]
    for record, row in zip(saved["steps"], table["rows"], strict=True):
        assert record["flat_by_shape"] == (record["optimizer"] in BY_SHAPE)
        variants = ["ours", "flat", "optax"]
        for key in ("step_s", "compile_s", "samples_s", "fraction_of_ceiling"):
            assert sorted(record[key]) == sorted(variants), key
        assert all(len(record["samples_s"][v]) == 2 for v in variants)
        seconds = record["step_s"]
        assert record["ratio"] == pytest.approx(seconds["ours"] / seconds["optax"])
        best = min(seconds["ours"], seconds["flat"])
        assert record["best_ratio"] == pytest.approx(best / seconds["optax"])
        cells = dict(zip(table["headers"], row, strict=True))
        assert record["ratio_flat"] == pytest.approx(seconds["flat"] / seconds["optax"])
        assert all(float(cells[column]) >= 0 for column in FLAT_COLUMNS)
        assert record["bytes_per_param"] == bench.BYTE_MODELS[record["optimizer"]][0]
        faults = record["page_faults_per_step"]
        assert sorted(faults) == sorted(variants)
        assert all(count is None or count >= 0 for count in faults.values())
        faults_cell = cells[FAULTS].split("/")
        assert len(faults_cell) == 3
    # One pack time per pytree, as many samples as timed steps.
    assert sorted(saved["pack"]) == ["split", "transformer"]
    for pack in saved["pack"].values():
        assert len(pack["samples_s"]) == 2 and pack["pack_s"] > 0

    compiled = {(r["optimizer"], r["leaves"]) for r in saved["compile"]}
    assert compiled == {(n, k) for n in SUBSET for k in (2, 20, bench.TRANSFORMER_LEAVES)}
    compile_table = saved["tables"]["compile"]
    assert compile_table["headers"][-1] == LAST
    assert {"flat s", "pack s", "ratio flat/optax"} <= set(compile_table["headers"])
    for record, row in zip(saved["compile"], compile_table["rows"], strict=True):
        assert "flat" in record["compile_s"] and record["pack_compile_s"] is not None
        for column in ("flat s", "pack s"):
            assert row[compile_table["headers"].index(column)] != "-"
    assert saved["meta"]["command"].startswith("python -m benchmarks.optimizers --size 20000")
    assert "settings: " in printed and "settings" in saved["meta"]
    assert saved["tables"] == result["tables"]

    markdown = (tmp_path / files[1]).read_text()
    header = "| " + " | ".join(table["headers"]) + " |"
    assert header in markdown
    for row in table["rows"]:
        assert "| " + " | ".join(row) + " |" in markdown


def test_state_bytes_per_param():
    """AdamW keeps two float32 moments (8 B/param), Adafactor's factored state far less."""
    result = {}
    shapes = {"w": (256, 512), "b": (512,)}
    for name in ("adamw", "adafactor", "sgd_momentum"):
        entry = next(e for e in bench.ENTRIES if e.name == name)
        tx = entry.make_ours()
        abstract = bench.abstract_tree(shapes)
        result[name] = bench.tree_bytes(jax.eval_shape(tx.init, abstract)) / bench.num_params(
            shapes
        )
    assert result["adamw"] == pytest.approx(8.0, abs=1e-3)
    assert result["sgd_momentum"] == pytest.approx(4.0, abs=1e-3)
    assert result["adafactor"] < 0.1


@pytest.mark.parametrize(
    ("size", "n_leaves"),
    [(bench.DEFAULT_SIZE, bench.TRANSFORMER_LEAVES), (bench.DEFAULT_SIZE, 1000)]
    + [(bench.DEFAULT_SIZE, n) for n in (10, 100, 3000)]
    + [(20_000, 20), (1_000_000, 1), (1_000_000, 2)],
)
def test_tree_shapes(size, n_leaves):
    shapes = bench.tree_shapes(size, n_leaves)
    assert len(shapes) == n_leaves
    total = bench.num_params(shapes)
    assert abs(total - size) <= 0.01 * size
    d = shapes["embed/embedding"][1]
    if n_leaves >= 5:  # a full attention block starts: kernels are (d, 3d), (d, d), ...
        assert shapes["layer_000/attn/qkv/kernel"] == (d, 3 * d)
    tree = bench.abstract_tree(shapes)
    assert len(jax.tree.leaves(tree)) == n_leaves


def test_transformer_tree_is_a_few_big_matrices():
    shapes = bench.tree_shapes(bench.DEFAULT_SIZE, bench.TRANSFORMER_LEAVES)
    sizes = sorted((math.prod(s) for s in shapes.values()), reverse=True)
    # the 4 x 4 kernels and the embedding hold nearly everything
    assert sum(sizes[:17]) > 0.999 * sum(sizes)
    assert shapes["embed/embedding"][1] == 1024


def test_tree_shapes_rejects_empty():
    with pytest.raises(ValueError, match="n_leaves"):
        bench.tree_shapes(1000, 0)


@pytest.mark.parametrize("entry", bench.ENTRIES, ids=lambda e: e.name)
def test_pairs_compute_the_same_update(entry):
    """Each benchmark pair is the same update rule, so the timings compare like with like.

    Two steps on a pytree with a matrix over Adafactor's factoring threshold (128),
    an unfactored matrix, a vector and a scalar.
    """
    shapes = {"big": (130, 160), "small": (4, 6), "vector": (6,), "scalar": ()}
    params = bench.random_tree(shapes, seed=0, scale=0.5)
    grads = [bench.random_tree(shapes, seed=s, scale=1.0) for s in (1, 2)]
    out = {}
    for lib in bench.LIBS:
        tx = entry.make(lib)
        p, state = params, tx.init(params)
        for g in grads:
            updates, state = tx.update(g, state, p)
            p = optax.apply_updates(p, updates)
        out[lib] = p
    for path in shapes:
        ours, theirs = (np.asarray(out[lib][path]) for lib in bench.LIBS)
        start = np.asarray(params[path])
        assert not np.allclose(theirs, start), path  # the step moved the parameters
        np.testing.assert_allclose(ours - start, theirs - start, rtol=2e-4, atol=1e-7, err_msg=path)


def test_only_adafactor_takes_a_buffer_per_shape():
    """Adafactor reduces over each stack of same-shaped tensors, which on CPU wants whole
    buffers; the elementwise and norm-based rules keep one buffer per dtype."""
    assert {entry.name for entry in bench.ENTRIES if entry.flat_by_shape} == BY_SHAPE
    params = bench.random_tree(FLAT_SHAPES, seed=0, scale=0.5)
    for entry in bench.ENTRIES:
        groups = len(entry.flat_layout(params).groups)
        assert groups == (len(FLAT_SHAPES) if entry.flat_by_shape else 1), entry.name
    with pytest.raises(ValueError, match="no variant"):
        bench.ENTRIES[0].make("flax")


# Leaves of several ranks and sizes, a scalar included, so that the layout has columns of
# several leaves side by side in its one float32 buffer.
FLAT_SHAPES = {"matrix": (24, 40), "small": (3, 5), "vector": (40,), "scalar": ()}


def _two_steps(step: Any, params: Any, state: Any, grads: list[Any]) -> Any:
    for g in grads:
        params, state = step(params, state, g)
    return params


def _flat_setup(entry: bench.Entry) -> tuple[Any, Any, list[Any], Any]:
    """``(tx, params, two gradients, layout)`` on :data:`FLAT_SHAPES`."""
    params = bench.random_tree(FLAT_SHAPES, seed=0, scale=0.5)
    # scale 1: the gradients' global norm is about 30, so the chain's clipping to 1 acts
    grads = [bench.random_tree(FLAT_SHAPES, seed=s, scale=1.0) for s in (1, 2)]
    return entry.make_ours(), params, grads, entry.flat_layout(params)


@pytest.mark.parametrize("entry", bench.ENTRIES, ids=lambda e: e.name)
def test_flat_benchmark_step_computes_the_per_leaf_update(entry):
    """The compiled flat step of the benchmark (the stored layout: what "flat ms" and "flat s"
    time) gives the compiled per-leaf step's params: bit for bit for elementwise rules; the
    clip chain's global norm and LAMB's per-tensor norms add the same squares in another
    order, so they agree to float32 rounding of those sums: rtol 1e-6 (a few ulps; float32
    eps is 1.2e-7).
    """
    tx, params, grads, layout = _flat_setup(entry)
    per_leaf_step, _, _ = bench.compile_step(tx, params)
    # donated: fresh copies of the parameters and state
    expected = _two_steps(per_leaf_step, jax.tree.map(jnp.copy, params), tx.init(params), grads)
    _, abstract_params = bench.abstract_flat(params, by_shape=entry.flat_by_shape)
    stored_step, seconds, abstract_state = bench.compile_step(tx, abstract_params)
    assert seconds > 0
    assert jax.tree.map(lambda x: (x.shape, x.dtype), tx.init(layout.pack(params))) == (
        jax.tree.map(lambda x: (x.shape, x.dtype), abstract_state)
    )
    got = _two_steps(
        stored_step,
        layout.pack(params),
        tx.init(layout.pack(params)),
        [layout.pack(g) for g in grads],
    )
    got = layout.unpack(got)
    for path in FLAT_SHAPES:
        want, have = np.asarray(expected[path]), np.asarray(got[path])
        assert not np.array_equal(want, np.asarray(params[path])), path  # the steps moved it
        if entry.name in ROUNDING:
            np.testing.assert_allclose(have, want, rtol=1e-6, atol=0, err_msg=path)
        else:
            np.testing.assert_array_equal(have, want, err_msg=path)


def test_pack_timing_returns_one_time_per_call():
    grads = bench.random_tree(FLAT_SHAPES, seed=1, scale=1.0)
    times = bench.time_pack(grads, warmup=1, repeats=3)
    assert len(times) == 3 and all(t > 0 for t in times)


def test_ratios_pick_the_faster_optim_jax_variant():
    with_flat = bench.ratios({"ours": 2.0, "flat": 1.0, "optax": 4.0})
    assert with_flat == {"ratio": 0.5, "ratio_flat": 0.25, "best_ratio": 0.25}
    slow_flat = bench.ratios({"ours": 2.0, "flat": 3.0, "optax": 4.0})
    assert slow_flat["best_ratio"] == 0.5
    assert bench.ratios({"ours": 2.0, "optax": 4.0}) == {
        "ratio": 0.5,
        "ratio_flat": None,
        "best_ratio": 0.5,
    }


def test_cli_rejects_unknown_optimizer(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--optimizers", "adamw,nope"])
    assert "nope" in capsys.readouterr().err


def test_quick_drops_large_compile_counts():
    args = bench.parse_args(["--quick", "--compile-leaves", "10,1000,3000"])
    assert args.compile_leaves == [10, 1000]


def test_render_text_and_markdown():
    table = report.build_table(
        [("name", lambda r: r["n"]), (RATIO, lambda r: f"{r['x']:.2f}")],
        [{"n": "a", "x": 0.5}, {"n": "bbb", "x": 12.0}],
    )
    assert report.render(table).splitlines() == [
        "name  ratio ours/optax",
        "----  ----------------",
        "a                 0.50",
        "bbb              12.00",
    ]
    assert report.render(table, markdown=True).splitlines() == [
        f"| name | {RATIO} |",
        "| --- | ---: |",
        "| a | 0.50 |",
        "| bbb | 12.00 |",
    ]


def test_ceiling_measures_both_kernels():
    rates = bench.measure_ceiling(1000, warmup=1, repeats=2)
    assert set(rates) == {"scale", "triad"}
    assert all(r > 0 for r in rates.values())


@pytest.mark.skipif(report.resource is None, reason="the OS does not count page faults")
def test_page_faults_tell_a_fresh_buffer_from_a_donated_one():
    """A step writing a fresh 128 MiB buffer faults on its pages (4 KiB, or 2 MiB where the
    kernel backs it with huge pages); the same step on a donated buffer reuses it."""
    n = 32 * 2**20
    scale = lambda x, c: (x * c,)  # noqa: E731
    c = jnp.float32(1.0)
    fresh = bench.Loop(jax.jit(scale), (jnp.ones(n, jnp.float32),), c)
    donated = bench.Loop(jax.jit(scale, donate_argnums=0), (jnp.ones(n, jnp.float32),), c)
    bench.time_interleaved({"fresh": fresh, "donated": donated}, warmup=1, repeats=3)
    fresh_faults, donated_faults = min(fresh.faults[1:]), max(donated.faults[1:])
    assert fresh_faults >= 64, fresh.faults
    assert donated_faults < fresh_faults / 4, (donated.faults, fresh.faults)


def test_tree_bytes_counts_every_leaf():
    tree = {"x": jnp.arange(4.0), "c": jnp.int32(0), "h": jax.ShapeDtypeStruct((3,), jnp.bfloat16)}
    assert bench.tree_bytes(tree) == 4 * 4 + 4 + 3 * 2
