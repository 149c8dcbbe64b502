"""SAM, Lookahead and reduce-on-plateau in the trainer (optimizer.sam_*, lookahead_*, plateau_*).

What is proved here, on a tiny image MLP (float32, 8 simulated devices, data-parallel):

* SAM's first train step, with two accumulated micro-batches, equals a hand computation:
  the mean gradient g over both micro-batches (plain ``jax.grad`` of the loss, unsharded),
  ``e = rho g / ||g||`` in float64 NumPy, the mean gradient at ``params + e``, one SGD step;
* Lookahead's first ``k`` train steps are the plain run's first ``k - 1`` steps, then
  ``init + alpha (fast_k - init)``, where ``fast_k`` are the plain run's parameters;
* a run with all three wrappers trains (eval loss falls), the reduce-on-plateau scale
  logged as ``lr_scale`` (and in ``learning_rate``) follows torch's rule through the eval
  losses it saw, and the checkpoint holds the reduced scale.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import optim_jax
from tests import harness
from train import config, loop, metrics
from train.checkpoint import Checkpointer, abstract_state
from train.step import loss_fn

LR = 0.1
TINY = (
    "model.kind=mlp",
    "model.hidden=32",
    "model.n_layers=2",
    "data.source=shapes",
    "data.batch_size=32",
    "run.eval_batches=1",
    "precision.compute=float32",
    "optimizer.name=sgd",
    f"optimizer.learning_rate={LR}",
    "optimizer.schedule=constant",
    "optimizer.clip_norm=null",
    "run.plot=false",
)


def host(tree):
    """Per-leaf float64 NumPy copies (of parameters kept flat too: optimizer.flat_layout)."""
    per_leaf = jax.device_get(optim_jax.flat.unflatten(tree))
    return jax.tree.map(lambda x: np.asarray(x, np.float64), per_leaf)


def largest_gap(a, b) -> float:
    return max(np.max(np.abs(x - y)) for x, y in zip(*map(jax.tree.leaves, (a, b)), strict=True))


def mean_gradient(setup: loop.Setup, params, batch) -> dict:
    """The mean over micro-batches of ``jax.grad`` of the loss: no sharding, no step code."""
    grad = jax.jit(jax.grad(lambda p, b: loss_fn(setup.graphdef, p, b, setup.task)))
    micro = [{k: np.asarray(v)[i] for k, v in batch.items()} for i in range(2)]
    params32 = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    return jax.tree.map(lambda a, b: (a + b) / 2, *[host(grad(params32, m)) for m in micro])


# The wrappers also run on parameters kept in the flat multi-tensor layout.
FLAT_LAYOUT = pytest.mark.parametrize("flat", ["false", "true"], ids=["per_leaf", "flat"])


@FLAT_LAYOUT
def test_sam_first_step_equals_hand_computation(flat):
    rho = 0.5
    overrides = ["optimizer.accumulation_steps=2", f"optimizer.sam_rho={rho}", "run.steps=1"]
    cfg = config.load(None, [*TINY, *overrides, f"optimizer.flat_layout={flat}"])
    setup = loop.build(cfg)
    params0 = host(setup.state.params)
    batch = loop.train_batch(setup, 0)
    batch_host = jax.tree.map(np.asarray, batch)
    state, step_metrics = setup.train_step(setup.state, batch)
    assert bool(step_metrics["finite"])

    g = mean_gradient(setup, params0, batch_host)
    norm = np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(g)))
    perturbed = jax.tree.map(lambda w, gi: w + rho * gi / norm, params0, g)
    g_sam = mean_gradient(setup, perturbed, batch_host)
    want = jax.tree.map(lambda w, gi: w - LR * gi, params0, g_sam)
    # float32 gradients from two differently compiled (sharded vs not) programs differ by
    # ~1e-7 relative (measured); 1e-5 of each leaf's size before the step leaves room for
    # other reduction orders and is far below SAM's effect, checked next:
    harness.assert_close(host(state.params), want, 1e-5, "[sam step] ", params0)
    plain = jax.tree.map(lambda w, gi: w - LR * gi, params0, g)
    scale = max(np.max(np.abs(x)) for x in jax.tree.leaves(params0))
    assert largest_gap(want, plain) > 1e-2 * scale, (
        "SAM's step should differ clearly from plain SGD's"
    )


def run_steps(cfg: config.Config, steps: int) -> tuple[object, list]:
    setup = loop.build(cfg)
    state, trajectory = setup.state, []
    initial = host(state.params)
    for step in range(steps):
        state, _ = setup.train_step(state, loop.train_batch(setup, step))
        trajectory.append(host(state.params))
    return initial, trajectory


@FLAT_LAYOUT
def test_lookahead_pulls_back_after_k_steps(flat):
    k, alpha = 3, 0.5
    base = [*TINY, "optimizer.options.momentum=0.9", f"run.steps={k}"]
    initial, plain = run_steps(config.load(None, base), k)
    base.append(f"optimizer.flat_layout={flat}")
    overrides = [f"optimizer.lookahead_steps={k}", f"optimizer.lookahead_alpha={alpha}"]
    _, ours = run_steps(config.load(None, [*base, *overrides]), k)
    # float32, same equations in two compiled programs: ~4e-8 relative measured; 1e-5 bar.
    for step in range(k - 1):
        harness.assert_close(ours[step], plain[step], 1e-5, f"[fast step {step + 1}] ")
    want = jax.tree.map(lambda p0, pk: p0 + alpha * (pk - p0), initial, plain[k - 1])
    harness.assert_close(ours[k - 1], want, 1e-5, "[sync] ", initial)
    assert largest_gap(want, plain[-1]) > 1e-3, (
        "the synchronisation should move the parameters visibly"
    )


def torch_rule_scales(eval_losses, factor, patience, threshold, min_scale) -> list[float]:
    """torch ReduceLROnPlateau (mode min, rel, cooldown 0) on lr = 1: the lr after each loss."""
    best, bad, scale, out = np.inf, 0, 1.0, []
    for loss in eval_losses:
        if loss < best * (1 - threshold):
            best, bad = loss, 0
        else:
            bad += 1
        if bad > patience:
            scale = max(scale * factor, min_scale) if scale * factor < scale else scale
            bad = 0
        out.append(scale)
    return out


def test_run_with_all_three_trains_and_logs_the_plateau_scale(tmp_path):
    factor, patience, threshold, floor, every = 0.5, 0, 0.5, 0.125, 2
    cfg = config.load(
        None,
        [
            *TINY,
            "optimizer.options.momentum=0.9",
            "run.steps=14",
            "run.log_every=1",
            f"run.eval_every={every}",
            "optimizer.sam_rho=0.05",
            "optimizer.lookahead_steps=3",
            f"optimizer.plateau_factor={factor}",
            f"optimizer.plateau_patience={patience}",
            f"optimizer.plateau_threshold={threshold}",
            f"optimizer.plateau_min_scale={floor}",
        ],
    )
    summary = loop.fit(cfg, tmp_path, progress=False)
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]
    records = {r["step"]: r for r in metrics.read_metrics(tmp_path)}
    evals = [(s, records[s]["eval_loss"]) for s in sorted(records) if "eval_loss" in records[s]]
    assert [s for s, _ in evals] == list(range(every, 15, every))
    # The scale observed after the eval at step s applies from step s + 1 on.
    scales = torch_rule_scales([v for _, v in evals], factor, patience, threshold, floor)
    for step in range(1, 15):
        seen = [scale for (s, _), scale in zip(evals, scales, strict=True) if s < step]
        want = seen[-1] if seen else 1.0
        assert records[step]["lr_scale"] == want, step
        # learning_rate is logged in float32: 1e-6 relative.
        assert abs(records[step]["learning_rate"] - LR * want) <= 1e-6 * LR, step
    assert min(scales) < 1.0, "the plateau rule should have fired in this run"
    # The checkpoint carries the reduced scale (a resumed run goes on from it).
    with Checkpointer(tmp_path / "checkpoints", cfg.checkpoint) as checkpointer:
        _, restored, _ = checkpointer.restore_newest(abstract_state(summary["state"]))
    assert float(optim_jax.plateau_scale(restored.opt_state)) == scales[-1]
