"""Sharpness logged during training, and the loss-landscape tool (``python -m train.landscape``).

What is proved here:

* filter normalisation gives every filter of a random direction exactly the norm of the
  same filter of the parameters (dense columns, convolution output channels, the
  attention projections' ``(head, feature)`` outputs), keeps each filter's orientation,
  leaves a zero filter zero, and zeroes biases and norm scales;
* with ``run.sharpness_every``, the metrics hold ``sharpness`` and ``hessian_trace`` at
  exactly those steps, and they agree with the dense Hessian of that step's batch at that
  step's parameters (restored from the checkpoint, diagonalised by NumPy in float64);
* the 1-D line gives, at ``a = 0`` and ``a = 1``, the evaluation losses that training
  recorded for the two checkpoints (and for ``init``, the run's initial evaluation loss);
* the 2-D surface's centre is the checkpoint's evaluation loss, and the CLI writes JSON
  and PNG for both modes; bad arguments end in one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from tests.train.recipes import IMAGE_MLP
from tests.train.recipes import IMAGE_RECIPE as RECIPE
from train import config, landscape, loop, metrics
from train import mesh as mesh_lib
from train.checkpoint import Checkpointer, abstract_state
from train.models.gpt import GPT
from train.step import loss_fn

# A 556-parameter MLP on 8x8 shapes (64*8 + 8 + 8*4 + 4), so that its dense Hessian is cheap;
# float32 so that the comparisons are about our code and not bf16 rounding.
TINY = (
    *IMAGE_MLP,
    "model.hidden=8",
    "model.n_layers=1",
    "model.image_size=8",
    "run.steps=8",
    "run.log_every=2",
    "run.eval_every=4",
    "checkpoint.every=4",
)
SHARPNESS = ("run.sharpness_every=4", "run.sharpness_iters=30")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[pathlib.Path, dict]:
    """8 steps with checkpoints (and evaluations) at steps 4 and 8, sharpness at 4 and 8."""
    workdir = tmp_path_factory.mktemp("landscape")
    summary = loop.fit(config.load(RECIPE, [*TINY, *SHARPNESS]), workdir, progress=False)
    return workdir, summary


def recorded_eval_loss(workdir: pathlib.Path, step: int) -> float:
    """The evaluation loss training stored with checkpoint ``step`` (independent of the tool)."""
    with Checkpointer(workdir / "checkpoints", config.CheckpointConfig()) as checkpointer:
        return checkpointer.eval_loss(step)


def run_cli(workdir: pathlib.Path, *args: str) -> dict:
    return landscape.main(["--config", str(RECIPE), *TINY, "--workdir", str(workdir), *args])


# ---------------------------------------------------------------------------- directions


def filter_norms(x: np.ndarray, output_axes: int) -> np.ndarray:
    """Norm of each filter: over the leading (input) axes, one per output index."""
    x = np.asarray(x, np.float64)
    return np.sqrt(np.sum(x**2, axis=tuple(range(x.ndim - output_axes))))


def test_filter_normalized_direction_has_each_filters_norm():
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(5, 3))
    dense[:, 1] = 0.0  # a dead unit: its direction must stay zero, not NaN
    params = {
        "dense": {"kernel": dense, "bias": rng.normal(size=3)},
        "conv": {"kernel": rng.normal(size=(3, 3, 2, 4)), "bias": rng.normal(size=4)},
        "attention": {"kernel": rng.normal(size=(6, 2, 3))},  # [embed, heads, head_dim]
        "norm": {"scale": rng.normal(size=4)},
    }
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    counts = jax.tree.map(lambda _: 1, params)
    counts["attention"]["kernel"] = 2
    gaussian = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), params)
    direction = landscape.filter_normalize(gaussian, params, counts)

    # float32 norms of at most 18 terms: agreement to a few ulps, 1e-5 relative is ample.
    for name, axes in (("dense", 1), ("conv", 1), ("attention", 2)):
        got, theta = direction[name]["kernel"], params[name]["kernel"]
        np.testing.assert_allclose(filter_norms(got, axes), filter_norms(theta, axes), rtol=1e-5)
        # Only a rescaling per filter: the direction within each filter is the Gaussian's.
        ratio = np.asarray(got) / np.asarray(gaussian[name]["kernel"])
        per_filter = ratio.reshape(-1, *ratio.shape[ratio.ndim - axes :])
        np.testing.assert_allclose(
            per_filter, np.broadcast_to(per_filter[0], per_filter.shape), rtol=1e-5
        )
    assert np.all(np.asarray(direction["dense"]["kernel"])[:, 1] == 0)
    for leaf in (direction["dense"]["bias"], direction["conv"]["bias"], direction["norm"]["scale"]):
        assert np.all(np.asarray(leaf) == 0)


def test_gpt_attention_projections_have_two_output_axes():
    """In the GPT, a filter of the query/key/value kernels [embed, heads, head_dim] is one
    (head, feature) output; the output projection [heads, head_dim, embed] and every other
    kernel have one output axis."""
    cfg = config.load(None, ["model.n_layers=1", "model.d_model=32", "model.seq_len=16"])
    rules = mesh_lib.rules_tuple(cfg.mesh.rules)
    with jax.set_mesh(mesh_lib.build_mesh(cfg.mesh)), nnx.logical_axis_rules(rules):
        abstract = nnx.eval_shape(lambda: GPT(cfg.model, jnp.float32, nnx.Rngs(0)))
    graphdef, shapes = nnx.split(abstract, nnx.Param)
    counts = landscape.output_axis_counts(graphdef, shapes)
    attention = counts["blocks"][0]["attn"]
    got = [attention[name]["kernel"].get_value() for name in ("query", "key", "value", "out")]
    assert got == [2, 2, 2, 1]
    assert counts["head"]["kernel"].get_value() == 1
    assert counts["blocks"][0]["mlp"]["up"]["kernel"].get_value() == 1
    assert counts["token_embed"]["embedding"].get_value() == 1


# ------------------------------------------------------------------------ sharpness logging


def test_sharpness_is_logged_at_its_steps_and_matches_the_dense_hessian(trained):
    workdir, _ = trained
    records = metrics.read_metrics(workdir)
    with_sharpness = [r["step"] for r in records if "sharpness" in r]
    assert with_sharpness == [4, 8]
    assert all(
        "hessian_trace" in r and "hessian_trace_stderr" in r for r in records if "sharpness" in r
    )
    logged = next(r for r in records if r["step"] == 8)
    assert "loss" in logged  # merged with the step's training record

    # The dense Hessian of step 8's loss: the parameters after step 8, the batch step 8
    # trained on (batch index 7: no rollbacks), the first (only) micro-batch.
    cfg = config.load(RECIPE, [*TINY, *SHARPNESS])
    setup = loop.build(cfg)
    with Checkpointer(workdir / "checkpoints", cfg.checkpoint) as checkpointer:
        state, _ = checkpointer.restore(8, abstract_state(setup.state))
    params = jax.device_get(state.params)
    batch = {k: jnp.asarray(v) for k, v in setup.batches.local_batch(7).items()}
    flat, unravel = ravel_pytree(params)
    matrix = jax.jit(jax.hessian(lambda f: loss_fn(setup.graphdef, unravel(f), batch, setup.task)))(
        flat
    )
    matrix = np.asarray(matrix, np.float64)
    eigenvalues = np.linalg.eigvalsh((matrix + matrix.T) / 2)
    # 30 Lanczos steps in float32 on 556 parameters: the top eigenvalue converges first; 1%
    # covers float32 HVPs (~1e-6) and the Kaniel-Paige-Saad error for this spectrum.
    np.testing.assert_allclose(logged["sharpness"], eigenvalues[-1], rtol=1e-2)
    # Hutchinson with 30 probes: within 4 of its own standard errors, plus float32 rounding.
    tolerance = 4 * logged["hessian_trace_stderr"] + 1e-4 * abs(np.trace(matrix))
    assert abs(logged["hessian_trace"] - np.trace(matrix)) <= tolerance


# ----------------------------------------------------------------------------- the tool


def test_line_hits_the_checkpoints_losses_at_0_and_1(trained):
    workdir, summary = trained
    result = run_cli(workdir, "--mode", "line", "--other-checkpoint", "4", "--points", "3")
    alphas = result["alphas"]
    assert alphas == sorted(alphas) and 0.0 in alphas and 1.0 in alphas
    assert alphas[0] == -0.5 and alphas[-1] == 1.5
    at = dict(zip(alphas, result["eval_loss"], strict=True))
    # Same parameters bit for bit ((1 - 0) x + 0 y = x) through the same evaluation: 1e-6
    # relative only allows for a recompiled reduction order.
    assert at[0.0] == pytest.approx(recorded_eval_loss(workdir, 8), rel=1e-6)
    assert at[1.0] == pytest.approx(recorded_eval_loss(workdir, 4), rel=1e-6)
    saved = json.loads((workdir / "landscape_line.json").read_text())
    assert saved["eval_loss"] == result["eval_loss"] and len(saved["train_loss"]) == len(alphas)
    assert saved["theta0"].endswith("checkpoints/8") and saved["theta1"].endswith("checkpoints/4")
    assert (workdir / "landscape_line.png").stat().st_size > 1000

    # theta1 = the initialisation: rebuilt from the seed, it is what training started from.
    from_init = run_cli(workdir, "--mode", "line", "--other-checkpoint", "init", "--points", "2")
    at = dict(zip(from_init["alphas"], from_init["eval_loss"], strict=True))
    assert at[1.0] == pytest.approx(summary["initial_eval_loss"], rel=1e-6)


def test_surface_centre_is_the_checkpoints_loss(trained):
    workdir, _ = trained
    result = run_cli(workdir, "--mode", "surface", "--points", "3", "--range", "-0.5", "0.5")
    assert result["alphas"] == result["betas"] == [-0.5, 0.0, 0.5]
    evaluation = np.asarray(result["eval_loss"])
    assert evaluation.shape == (3, 3) and np.all(np.isfinite(evaluation))
    assert evaluation[1, 1] == pytest.approx(recorded_eval_loss(workdir, 8), rel=1e-6)
    # The directions move the parameters: no other grid point has the centre's loss.
    assert np.sum(evaluation == evaluation[1, 1]) == 1
    saved = json.loads((workdir / "landscape_surface.json").read_text())
    assert saved["train_loss"] == result["train_loss"]
    assert (workdir / "landscape_surface.png").stat().st_size > 1000


def test_bad_arguments_are_one_error_line(tmp_path, capsys):
    missing = tmp_path / "no-run"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(missing, "--mode", "surface")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and err.count("\n") == 1
    assert not missing.exists()  # reading only: nothing created
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tmp_path, "--mode", "line")
    assert exit_info.value.code == 2 and "--other-checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("run.sharpness_iters=1", "run.sharpness_iters"),
        ("run.sharpness_every=-1", "run.sharpness_every"),
    ],
)
def test_sharpness_settings_are_range_checked(override, key):
    with pytest.raises(config.ConfigError, match=key):
        config.load(None, [override])
