"""``python -m benchmarks.trainer`` end to end at tiny sizes, and the fairness of its comparison.

What is proved (nothing asserts on timings: those are only read by people):

* the command runs, prints the table whose last column is the trainer/minimal tokens/s ratio,
  and writes the same as JSON and Markdown;
* the two sides train the same model with the same update rule on the same data: same loss on
  the first batch, same loss after several steps, same parameters at the end, in float32;
* the minimal loop's parameters and optimizer moments carry the trainer's shardings on an
  FSDP mesh (so it is not faster for holding less per device);
* recipes the minimal loop cannot reproduce are refused, and per-recipe overrides are routed.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics

import jax
import pytest

from benchmarks import trainer as bench
from train import loop

# Float32 compute, so that "the same" means float32 rounding, not bf16's; a large weight decay,
# so that a different decay mask (embeddings or biases decayed) moves parameters by ~1e-1.
FAIR = ("precision.compute=float32", "optimizer.options.weight_decay=10.0")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer_bench")
    argv = ["--quick", "--out", str(out)] + [arg for o in FAIR for arg in ("--override", o)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = bench.main(argv)
    return result, printed.getvalue(), out


# The shared run takes 12-18 s on 2 loaded cores (two compilations on 8 simulated devices).
@pytest.mark.slow
def test_end_to_end_prints_table_and_writes_results(quick_run):
    result, printed, out = quick_run
    lines = printed.splitlines()
    header = next(line for line in lines if line.startswith("recipe "))
    assert header.endswith(bench.RATIO)
    rows = [line for line in lines if line.startswith("default ")]
    assert len(rows) == 1  # CPU: the default recipe only, unless asked
    assert float(rows[0].split()[-1]) > 0

    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 2
    assert files[0].startswith("trainer_cpu_") and files[0].endswith(".json")
    assert files[1] == files[0].removesuffix(".json") + ".md"

    saved = json.loads((out / files[0]).read_text())
    assert saved["table"] == result["table"]
    assert saved["table"]["headers"][-1] == bench.RATIO
    (record,) = saved["records"]
    assert record["recipe"] == "default"
    assert record["overrides"] == [*bench.QUICK_OVERRIDES, *FAIR]
    assert record["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert record["tokens_per_step"] == 16 * 16  # data.batch_size x model.seq_len
    paired = [m / t for t, m in zip(*(record["samples_s"][s] for s in bench.SIDES), strict=True)]
    assert record["ratio_paired"] == pytest.approx(statistics.median(paired))
    assert record["ratio"] == pytest.approx(
        record["tokens_per_s"]["trainer"] / record["tokens_per_s"]["minimal"]
    )
    for side in bench.SIDES:
        assert record["mfu"][side] is None  # no known peak for a CPU
        assert len(record["samples_s"][side]) == 2  # --quick: 2 windows per side
        assert record["compile_s"][side] > 0
        faults = record["page_faults_per_step"][side]
        assert faults is None or faults >= 0
    assert saved["meta"]["command"].startswith("python -m benchmarks.trainer --quick")
    assert saved["meta"]["device_count"] == 8
    assert "page faults/step trainer / minimal" in saved["table"]["headers"]

    markdown = (out / files[1]).read_text()
    assert "| " + " | ".join(saved["table"]["headers"]) + " |" in markdown
    assert "| " + " | ".join(saved["table"]["rows"][0]) + " |" in markdown


@pytest.mark.slow
def test_both_sides_train_the_same_model(quick_run):
    """Same initial parameters, batches and update rule: the losses and the final parameters
    agree to float32 rounding.

    Tolerances: the two steps are different XLA programs (the trainer's adds selects, checks
    and metrics), so reductions may sum in another order: relative 1e-5 on a loss is ~100
    float32 ulps. Parameters: 2e-5 is under 1% of one AdamW step (lr 3e-3); a wrong b2 moves
    them by ~1e-4 in these 6 steps, a wrong decay mask by ~1e-1.
    """
    (record,) = quick_run[0]["records"]
    first, last = record["first_loss"], record["last_loss"]
    assert first["trainer"] == pytest.approx(first["minimal"], rel=1e-5)
    assert last["trainer"] == pytest.approx(last["minimal"], rel=1e-5)
    assert record["steps_run"] == 1 + 1 + 2 * 2  # first call, warm-up, 2 windows of 2
    assert last["trainer"] < first["trainer"] - 0.1  # training moved: updates were compared
    assert record["param_max_abs_diff"] < 2e-5


@pytest.mark.parametrize("library", bench.MINIMAL_OPTIMIZERS)
def test_minimal_loop_has_the_trainers_shardings(library):
    """On an FSDP mesh the minimal loop's params and AdamW moments are split like the
    trainer's (moments like their parameters), not replicated, with either library."""
    cfg = bench.recipe_config("default", [*bench.QUICK_OVERRIDES, "mesh.data=1", "mesh.fsdp=-1"])
    setup = loop.build(cfg)
    minimal = bench.MinimalLoop(setup, library)
    trainer_shardings = jax.tree.leaves(setup.state_shardings.params)
    minimal_shardings = jax.tree.leaves(minimal.param_shardings)
    assert [s.spec for s in minimal_shardings] == [s.spec for s in trainer_shardings]
    assert any("fsdp" in str(s.spec) for s in minimal_shardings)  # something is split
    # Optax's ScaleByAdamState and optim_jax's AdamState both hold the moments as mu and nu.
    (adam,) = [
        s
        for s in jax.tree.leaves(minimal.opt_state, is_leaf=lambda x: hasattr(x, "nu"))
        if hasattr(s, "nu")
    ]
    for moments in (adam.mu, adam.nu):
        got = [x.sharding.spec for x in jax.tree.leaves(moments)]
        assert got == [x.sharding.spec for x in jax.tree.leaves(minimal.params)]


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("optimizer.name=lion", "optimizer.name"),
        ("optimizer.accumulation_steps=2", "accumulation_steps"),
        ("optimizer.sam_rho=0.05", "SAM"),
        ("optimizer.schedule=one_cycle", "optimizer.schedule"),
        ("precision.compute=float16", "float16"),
    ],
)
def test_refuses_what_the_minimal_loop_does_not_reproduce(override, problem):
    cfg = bench.recipe_config("default", [override])
    with pytest.raises(bench.UnsupportedRecipeError, match=problem):
        bench.check_supported(cfg)


def test_gpt2_small_recipe_is_supported():
    bench.check_supported(bench.recipe_config("gpt2_small", []))


def test_overrides_are_routed_per_recipe():
    routed = bench.split_overrides(
        ["run.seed=1", "gpt2_small:model.n_layers=2", "default:data.batch_size=8"],
        ["default", "gpt2_small"],
    )
    assert routed == {
        "default": ["run.seed=1", "data.batch_size=8"],
        "gpt2_small": ["run.seed=1", "model.n_layers=2"],
    }
    # A recipe not being run ignores its overrides; an unknown recipe is an error.
    assert bench.split_overrides(["gpt2_small:model.n_layers=2"], ["default"]) == {"default": []}
    with pytest.raises(ValueError, match="unknown recipe"):
        bench.split_overrides(["gpt3:model.n_layers=2"], ["default"])


def test_cli_rejects_unknown_recipe(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--recipes", "default,nope"])
    assert "nope" in capsys.readouterr().err
