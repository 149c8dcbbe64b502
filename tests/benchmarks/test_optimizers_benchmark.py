"""``python -m benchmarks.optimizers`` end to end at tiny sizes, and its building blocks.

Nothing here asserts on timings: the benchmark's numbers are only read by people.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import optimizers as bench
from benchmarks import report

SUBSET = ("sgd_momentum", "adafactor", "clip_adamw_cosine")
RATIO = "ratio ours/optax"


def test_end_to_end_tiny(tmp_path, capsys):
    argv = ["--size", "20000", "--leaves", "20", "--repeats", "2", "--warmup", "1"]
    argv += ["--compile-leaves", "2,5", "--optimizers", ",".join(SUBSET), "--out", str(tmp_path)]
    result = bench.main(argv)
    printed = capsys.readouterr().out

    # The step table is printed, its last column is the ratio, one row per optimizer and pytree.
    step_header = next(line for line in printed.splitlines() if line.startswith("optimizer"))
    assert step_header.split()[-2:] == RATIO.split()[-2:]
    for name in SUBSET:
        rows = [line for line in printed.splitlines() if line.startswith(name + " ")]
        # two step rows (transformer, split) and four compile rows (2, 5, 20, 51 leaves)
        assert len(rows) == 6, rows
        for row in rows:
            assert float(row.split()[-1]) > 0

    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2
    assert files[0].startswith("optimizers_cpu_") and files[0].endswith(".json")
    assert files[1] == files[0].removesuffix(".json") + ".md"

    saved = json.loads((tmp_path / files[0]).read_text())
    table = saved["tables"]["steps"]
    assert table["headers"][-1] == RATIO
    assert [row[:2] for row in table["rows"]] == [
        [name, f"{tree} ({leaves} leaves)"]
        for tree, leaves in (("transformer", bench.TRANSFORMER_LEAVES), ("split", 20))
        for name in SUBSET
    ]
    for record in saved["steps"]:
        assert record["ratio"] == pytest.approx(
            record["step_s"]["ours"] / record["step_s"]["optax"]
        )
        assert len(record["samples_s"]["ours"]) == len(record["samples_s"]["optax"]) == 2
        assert record["bytes_per_param"] == bench.BYTE_MODELS[record["optimizer"]][0]
    compiled = {(r["optimizer"], r["leaves"]) for r in saved["compile"]}
    assert compiled == {(n, k) for n in SUBSET for k in (2, 5, 20, bench.TRANSFORMER_LEAVES)}
    assert saved["tables"]["compile"]["headers"][-1] == RATIO
    assert saved["meta"]["command"].startswith("python -m benchmarks.optimizers --size 20000")
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


def test_tree_bytes_counts_every_leaf():
    tree = {"x": jnp.arange(4.0), "c": jnp.int32(0), "h": jax.ShapeDtypeStruct((3,), jnp.bfloat16)}
    assert bench.tree_bytes(tree) == 4 * 4 + 4 + 3 * 2
