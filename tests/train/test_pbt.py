"""Population-based training (``train.pbt``) on the tiny image recipe.

What is proved here:

* the vmapped population step of member i equals ``python -m train``'s own single-run step
  (``train.loop.build``, the plain optimizer with Python-number hyperparameters) run with
  member i's learning rate and weight decay, to float32 rounding, with the population split
  over the mesh's ``data`` axis (``pbt.shard_population``);
* exploit copies every leaf of the chosen member's state (params, optimizer buffers, loss
  watch) bit for bit, leaves the other members bit for bit alone, and explore sets the copy's
  hyperparameters to the parent's times a factor in ``pbt.perturb``; the bottom quantile (a
  non-finite loss counting as worst) copies from the top quantile, clipped to ``max``;
* a whole run through the CLI (``python -m train.pbt``): hyperparameters change over the run,
  ``pbt.json`` / ``pbt.png`` / the best member's checkpoint are written, and the best final eval
  loss is no worse than the best member of the same population trained without
  exploit/explore (same seeds, same draws), while its worst member ends far better than the
  fixed population's worst (members with a hopeless learning rate are rescued);
* ``pbt:`` config errors are one ``ConfigError`` naming the key; the CLI exits 2 on them.
"""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest

from tests.train.recipes import IMAGE_MLP
from tests.train.recipes import IMAGE_RECIPE as RECIPE
from train import config, loop, pbt

# The image recipe shrunk to seconds (as tests/train/test_loss_spikes.py SMALL): an MLP on
# 16x16 shapes in float32, plain SGD at a constant learning rate.
SMALL = (
    *IMAGE_MLP,
    "model.hidden=32",
    "model.n_layers=2",
    "optimizer.schedule=constant",
    "optimizer.cycle_momentum=false",
    "optimizer.options={nesterov: false, momentum: 0.9, weight_decay: 0.0}",
)


def cfg_of(*overrides: str) -> config.Config:
    return config.load(RECIPE, [*SMALL, *overrides])


def host(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ------------------------------------------------------------------ one step, vmapped


@pytest.mark.slow
def test_population_step_equals_single_runs_with_each_members_hyperparameters():
    cfg = cfg_of(
        "pbt.population=8",
        "pbt.shard_population=true",
        "pbt.hyperparams={optimizer.learning_rate: {log_uniform: [1.0e-3, 0.3]}, "
        "optimizer.options.weight_decay: {uniform: [0.0, 0.01]}}",
    )
    population = pbt.build_population(cfg)
    values = population.hyperparams()
    state = population.state
    steps = 3
    for step in range(steps):
        state, _ = population.train_step(state, population.batch(step))
    assert len(set(values["optimizer.learning_rate"].tolist())) == 8  # members do differ
    for member in (5,):  # one member: each single run is a build and a compile
        lr = float(values["optimizer.learning_rate"][member])
        decay = float(values["optimizer.options.weight_decay"][member])
        single = loop.build(
            cfg_of(f"optimizer.learning_rate={lr!r}", f"optimizer.options.weight_decay={decay!r}")
        )
        alone, initial = single.state, host(single.state.params)  # the step donates its input
        for step in range(steps):
            alone, _ = single.train_step(alone, loop.train_batch(single, step))
        # float32 tolerance: the injected hyperparameters are float32 arrays where the plain
        # optimizer uses Python floats, and the population's member is computed on one device
        # where the single run reduces its batch over 8; 3 steps of |update| < 1 keep the
        # differences at a few float32 ulps of O(1) weights (1e-6 relative leaves 10x margin).
        got, want = host(population.member(member, state).params), host(alone.params)
        for index, (x, y) in enumerate(zip(got, want, strict=True)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=f"{member}, {index}")
        moved = [np.abs(a - b).max() for a, b in zip(host(alone.params), initial, strict=True)]
        assert max(moved) > 1e-4, "the single run did not move: the comparison would be empty"


# ------------------------------------------------------------------ exploit / explore


def test_plan_exploit_takes_bottom_from_top_and_perturbs_within_bounds():
    space = config.pbt_search_space(
        config.PBTConfig(
            hyperparams={"optimizer.learning_rate": {"log_uniform": [0.1, 1.0], "max": 1.0}}
        )
    )
    losses = np.array([0.5, np.nan, 0.1, 0.9, 0.3, 2.0, 0.2, 0.4])
    lrs = np.array([0.1, 0.2, 0.9, 0.4, 0.5, 0.6, 0.95, 0.8], np.float32)
    rng = np.random.default_rng(3)
    plan = pbt.plan_exploit(losses, {"optimizer.learning_rate": lrs}, space, 0.25, [0.8, 1.25], rng)
    # Worst two: the NaN (member 1) and 2.0 (member 5); best two: 0.1 (2) and 0.2 (6).
    assert plan.replaced == [1, 5]
    new = plan.hyperparams["optimizer.learning_rate"]
    for member in range(8):
        parent = int(plan.source[member])
        if member in (1, 5):
            assert parent in (2, 6)
            candidates = {min(float(lrs[parent]) * f, 1.0) for f in (0.8, 1.25)}
            assert any(np.isclose(new[member], c, rtol=1e-7) for c in candidates)
        else:
            assert parent == member and new[member] == lrs[member]


def test_exploit_copies_params_and_optimizer_state_bitwise():
    cfg = cfg_of("pbt.population=4", "pbt.quantile=0.5")
    population = pbt.build_population(cfg)
    state = population.state
    for step in range(2):  # members' states now differ (different learning rates)
        state, _ = population.train_step(state, population.batch(step))
    before = jax.device_get(state)
    old_lrs = population.hyperparams(state)["optimizer.learning_rate"]
    losses = np.array([0.3, 0.9, 0.1, 0.8])  # bottom half: 1 and 3; top half: 0 and 2
    plan = pbt.plan_exploit(
        losses,
        population.hyperparams(state),
        population.space,
        0.5,
        [0.8, 1.25],
        np.random.default_rng(0),
    )
    after = jax.device_get(pbt.apply_plan(population, state, plan))
    new_lrs = np.asarray(after.opt_state.hyperparams["learning_rate"])

    def without_hyperparams(tree, member):
        member_state = jax.tree.map(lambda x: x[member], tree)
        opt = member_state.opt_state
        return member_state._replace(opt_state=opt._replace(hyperparams={}))

    assert plan.replaced == [1, 3]
    for member in range(4):
        parent = int(plan.source[member])
        assert (parent in (0, 2)) if member in (1, 3) else parent == member
        got, want = without_hyperparams(after, member), without_hyperparams(before, parent)
        for x, y in zip(host(got), host(want), strict=True):
            assert np.array_equal(x, y), f"member {member} is not a bitwise copy of {parent}"
        factor = new_lrs[member] / old_lrs[parent]
        expected = (0.8, 1.25) if member in (1, 3) else (1.0,)
        # The stored value is float32(parent x factor): within one float32 rounding.
        assert any(abs(factor - f) <= 2e-7 * f for f in expected), (member, factor)
    # The copies really differed before (a bitwise check of equal members would prove nothing).
    assert not np.array_equal(host(before.params)[0][1], host(before.params)[0][0])


# ------------------------------------------------------------------ a whole run


@pytest.mark.slow
def test_cli_run_changes_hyperparameters_and_beats_the_fixed_population(tmp_path, capsys):
    search = (
        "optimizer.options={nesterov: false, momentum: 0.0, weight_decay: 0.0}",
        "pbt.population=8",
        "pbt.shard_population=true",
        "pbt.interval=5",
        "run.steps=40",
        "pbt.hyperparams={optimizer.learning_rate: {log_uniform: [1.0e-3, 1.0]}}",
    )
    result = pbt.main(
        ["--config", str(RECIPE), *SMALL, *search, "--workdir", str(tmp_path / "pbt")]
    )
    fixed = pbt.run(cfg_of(*search, "pbt.exploit=false"), save_best=False)
    assert "best final eval loss" in capsys.readouterr().out

    written = json.loads((tmp_path / "pbt" / "pbt.json").read_text())
    assert written["final"] == result["final"]
    assert [r["step"] for r in written["records"]] == list(range(0, 41, 5))
    assert (tmp_path / "pbt" / "pbt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "pbt" / "best" / "40").is_dir()

    lrs = np.array([r["hyperparams"]["optimizer.learning_rate"] for r in written["records"]])
    fixed_lrs = np.array([r["hyperparams"]["optimizer.learning_rate"] for r in fixed["records"]])
    np.testing.assert_array_equal(lrs[0], fixed_lrs[0])  # the same initial draws
    assert (fixed_lrs == fixed_lrs[0]).all()
    changed = (lrs != lrs[0]).any(axis=0)
    assert changed.sum() >= 2, "exploit/explore changed no member's learning rate"
    assert written["events"] and all(e["copied_from"] != e["member"] for e in written["events"])

    pbt_losses = np.array(written["final"]["eval_loss"], float)
    fixed_losses = np.array(
        [np.inf if v is None else v for v in fixed["final"]["eval_loss"]], float
    )
    # No worse than the best fixed member: a member never replaced trains bit for bit as in the
    # fixed run, so the only slack needed is none; 1e-6 absorbs nothing but printing.
    assert pbt_losses.min() <= fixed_losses.min() + 1e-6, (pbt_losses, fixed_losses)
    # Rescue: learning rates near 1e-3 barely move in 40 steps (fixed worst ~ the initial
    # ln 4 = 1.386); their PBT copies end near the best. 0.1 nats is ~2x below the gap seen
    # (1.42 vs 1.17).
    assert pbt_losses.max() < fixed_losses.max() - 0.1, (pbt_losses, fixed_losses)


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pbt.population=1", "pbt.population must be >= 2"),
        ("pbt.quantile=0.6", "pbt.quantile must be in (0, 0.5]"),
        ("pbt.perturb=[]", "pbt.perturb must list"),
        ("pbt.perturb=[0.8, -1]", "pbt.perturb[1] must be > 0"),
        ("pbt.hyperparams={model.d_model: {uniform: [1, 2]}}", "pbt.hyperparams: 'model.d_model'"),
        (
            "pbt.hyperparams={optimizer.learning_rate: {log_uniform: [0, 1]}}",
            "pbt.hyperparams.optimizer.learning_rate.log_uniform: low must be > 0",
        ),
        (
            "pbt.hyperparams={optimizer.learning_rate: {uniform: [1, 2], gaussian: 3}}",
            "pbt.hyperparams.optimizer.learning_rate: expected exactly one of",
        ),
    ],
)
def test_bad_pbt_configs_name_their_key(override, message):
    with pytest.raises(config.ConfigError, match="^" + re.escape(message)):
        config.load(RECIPE, [override])


def test_nested_override_merges_with_the_dotted_yaml_spelling():
    cfg = config.load(
        RECIPE,
        [
            "pbt.hyperparams={optimizer.learning_rate: {log_uniform: [1.0e-3, 1.0]}}",
            "pbt.hyperparams.optimizer.learning_rate.max=2.0",
        ],
    )
    space = config.pbt_search_space(cfg.pbt)
    expected = config.SearchRange("log_uniform", 1e-3, 1.0, -np.inf, 2.0)
    assert space == {"optimizer.learning_rate": expected}


def test_cli_exits_2_on_an_option_the_optimizer_cannot_change(capsys):
    with pytest.raises(SystemExit) as exit_info:
        pbt.main(
            [
                "--config",
                str(RECIPE),
                *SMALL,
                "pbt.hyperparams={optimizer.options.nesterov: {uniform: [0, 1]}}",
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: pbt.hyperparams.optimizer.options.nesterov"), err
    assert err.count("\n") == 1, err
