"""Bad batches: non-finite gradients and loss spikes, injected at chosen steps.

What is proved here:

* ``watch_loss`` flags exactly the losses a plain float64 reading of the rule flags (a finite
  loss above factor x the median of the last ``window`` accepted losses, a spike entering
  the window clipped to the threshold), and follows a lasting change of level within
  ``window / 2`` steps;
* on the image recipe, a step whose batch gives non-finite gradients leaves parameters and
  optimizer state bit for bit as they were, is counted, and training goes on;
* the three spike policies: ``warn`` counts and keeps the update, ``skip`` discards it (state
  unchanged, counted), ``rollback`` returns to the newest checkpoint and trains on past the
  offending batches, ending bitwise where a run that never saw those batches ends; without a
  checkpoint or with its rollbacks used up, it skips instead.
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.recipes import image_config
from train import config, loop, loss_spikes, metrics
from train.checkpoint import Checkpointer, abstract_state

# The image recipe shrunk to seconds, detection armed after 4 losses.
SMALL = (
    "model.hidden=32",
    "model.n_layers=2",
    "run.steps=14",
    "run.log_every=1",
    "run.eval_every=14",
    "run.spike_window=4",
)


def cfg_of(*overrides: str) -> config.Config:
    return image_config(*SMALL, *overrides)


def host(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def same(a, b) -> bool:
    return all(np.array_equal(x, y, equal_nan=True) for x, y in zip(host(a), host(b), strict=True))


# ------------------------------------------------------------------------- the rule, alone


def reference_spikes(losses, factor: float, window: int) -> list[bool]:
    """The rule read plainly, in float64: a deque of accepted losses and its median."""
    recent: list[float] = []
    flags = []
    for loss in losses:
        if not np.isfinite(loss):
            flags.append(False)
            continue
        full = len(recent) >= window
        threshold = factor * statistics.median(recent[-window:]) if full else np.inf
        flags.append(bool(full and loss > threshold))
        recent.append(min(loss, threshold))
    return flags


def run_rule(losses, rule: loss_spikes.SpikeRule) -> list[bool]:
    watch = loss_spikes.init_loss_watch(rule)
    step = jax.jit(lambda w, x: loss_spikes.watch_loss(rule, w, x))
    flags = []
    for loss in losses:
        spike, watch = step(watch, jnp.float32(loss))
        flags.append(bool(spike))
    assert int(watch.spikes) == sum(flags)
    return flags


@pytest.mark.parametrize("window", [1, 4, 7])
def test_watch_loss_flags_what_the_rule_says(window):
    rng = np.random.default_rng(window)
    losses = 2.0 + 0.1 * rng.standard_normal(80)
    losses[[10, 11, 30, 55]] *= [3.0, 4.0, 3.0, 10.0]  # spikes, two in a row
    losses[[20, 40]] = [np.nan, np.inf]  # non-finite: never a spike, never in the window
    # Losses stay far from the threshold (noise 0.1 around 2: |noise| < 0.35 at this size,
    # so a spike >= 3 x 1.65 and a plain loss <= 2.35 < 2 x 1.65), so float32 against
    # float64 rounding cannot move a loss across it.
    rule = loss_spikes.SpikeRule(factor=2.0, window=window, discard=True)
    expected = reference_spikes(losses, 2.0, window)
    assert run_rule(losses, rule) == expected
    assert [i for i, flag in enumerate(expected) if flag] == [10, 11, 30, 55]


def test_a_lasting_change_of_level_is_followed():
    """Loss 1 for 20 steps, then 3 for good (factor 2): the first steps at the new level are
    spikes, then the median has moved up and none are; at most window/2 + 1 flagged."""
    window = 8
    rule = loss_spikes.SpikeRule(factor=2.0, window=window, discard=True)
    flags = run_rule([1.0] * 20 + [3.0] * 30, rule)
    flagged = [i for i, flag in enumerate(flags) if flag]
    assert flagged and flagged[0] == 20
    assert flagged == list(range(20, 20 + len(flagged))) and len(flagged) <= window // 2 + 1


# ------------------------------------------------------------------ bad batches in the trainer


def poisoned_batches(monkeypatch, how: dict[int, str]) -> None:
    """Makes ``loop.train_batch`` spoil the batches at the given batch indices: "nan" images
    give non-finite gradients, "loud" images (x 1e4) a huge but finite loss (a spike)."""
    clean = loop.train_batch

    def train_batch(setup, index):
        batch = clean(setup, index)
        if index in how:
            factor = jnp.nan if how[index] == "nan" else 1e4
            batch = {**batch, "images": batch["images"] * factor}
        return batch

    monkeypatch.setattr(loop, "train_batch", train_batch)


def test_non_finite_steps_leave_the_state_untouched_and_training_goes_on(monkeypatch):
    bad = {5: "nan", 9: "nan"}
    poisoned_batches(monkeypatch, bad)
    setup = loop.build(cfg_of())
    state = setup.state
    for step in range(12):
        before = host((state.params, state.opt_state))  # copies: the step donates ``state``
        state, stats = setup.train_step(state, loop.train_batch(setup, step))
        assert bool(stats["finite"]) == (step not in bad)
        unchanged = same(before, (state.params, state.opt_state))
        assert unchanged == (step in bad), step
    assert int(state.skipped) == 2 and int(state.step) == 12
    assert int(state.loss_watch.spikes) == 0  # a non-finite loss is not a spike


@pytest.mark.parametrize("policy", ["warn", "skip"])
def test_spike_policy_warn_keeps_and_skip_discards_the_update(monkeypatch, policy):
    poisoned_batches(monkeypatch, {7: "loud"})
    setup = loop.build(cfg_of(f"run.spike_policy={policy}"))
    state = setup.state
    # Up to the spike only: under "warn" its huge update wrecks the next steps too.
    for step in range(8):
        before = host((state.params, state.opt_state))
        state, stats = setup.train_step(state, loop.train_batch(setup, step))
        assert bool(stats["spike"]) == (step == 7), step
        assert bool(stats["finite"])
        if step == 7:
            assert same(before, (state.params, state.opt_state)) == (policy == "skip")
    assert int(state.loss_watch.spikes) == 1
    assert int(state.skipped) == (1 if policy == "skip" else 0)


def test_fit_reports_spikes_and_logs_them(monkeypatch, tmp_path, capsys):
    poisoned_batches(monkeypatch, {7: "loud", 10: "nan"})
    summary = loop.fit(cfg_of("run.spike_policy=skip"), tmp_path, progress=False)
    assert summary["loss_spikes"] == 1 and summary["skipped_steps"] == 2
    assert summary["rollbacks"] == 0 and summary["steps"] == 14
    assert "1 loss spike(s) up to step 8" in capsys.readouterr().out
    logged = {r["step"]: r for r in metrics.read_metrics(tmp_path)}
    assert [logged[s]["loss_spikes"] for s in (7, 8, 14)] == [0, 1, 1]
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]


def final_params(workdir, cfg) -> list[np.ndarray]:
    target = abstract_state(loop.build(cfg).state)
    with Checkpointer(workdir / "checkpoints", cfg.checkpoint) as checkpointer:
        state, meta = checkpointer.restore(cfg.run.steps, target)
    return host((state.params, state.opt_state)), meta


def test_rollback_returns_to_the_checkpoint_and_passes_the_offending_batches(
    monkeypatch, tmp_path, capsys
):
    """Checkpoints every 4 steps; batch 9 spikes in step 10, so the run returns to the state
    after step 8 and goes on with batch 10: it must end bitwise where a run ends that trains
    on batches 0-7 then 10, 11, ... with no spike at all."""
    cfg = cfg_of("run.spike_policy=rollback", "checkpoint.every=4")
    poisoned_batches(monkeypatch, {9: "loud"})
    summary = loop.fit(cfg, tmp_path / "rolled", progress=False)
    out = capsys.readouterr().out
    assert "rolled back to" in out and "skipping batches 8..9" in out
    assert summary["rollbacks"] == 1 and summary["steps"] == 14
    # The spike was in the abandoned branch: the state the run ends with never saw it.
    assert summary["loss_spikes"] == 0 and summary["skipped_steps"] == 0
    rolled, meta = final_params(tmp_path / "rolled", cfg)
    assert meta["data_offset"] == 2 and meta["rollbacks"] == 1
    logged = [r["step"] for r in metrics.read_metrics(tmp_path / "rolled")]
    assert logged == list(range(1, 15))

    clean = loop.train_batch
    monkeypatch.setattr(loop, "train_batch", lambda setup, i: clean(setup, i if i < 8 else i + 2))
    loop.fit(cfg, tmp_path / "reference", progress=False)
    reference, _ = final_params(tmp_path / "reference", cfg)
    for a, b in zip(rolled, reference, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("checkpoint.every=100",), "no checkpoint to roll back to yet"),
        (("checkpoint.every=4", "run.max_rollbacks=0"), "run.max_rollbacks=0 reached"),
    ],
)
def test_rollback_without_a_checkpoint_or_budget_skips(
    monkeypatch, tmp_path, capsys, overrides, message
):
    poisoned_batches(monkeypatch, {9: "loud"})
    summary = loop.fit(cfg_of("run.spike_policy=rollback", *overrides), tmp_path, progress=False)
    assert message in capsys.readouterr().out
    assert summary["rollbacks"] == 0
    assert summary["loss_spikes"] == 1 and summary["skipped_steps"] == 1
