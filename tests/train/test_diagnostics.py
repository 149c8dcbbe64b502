"""Training diagnostics (train/diagnostics.py): gradient flow and non-finite localisation.

What is proved here:

* a NaN planted in one weight of a middle layer (of three) of the image MLP is diagnosed at
  that layer, not at the layers before (finite) or after (non-finite only downstream);
* a non-finite value born in the backward pass only (sqrt at 0: finite forward, infinite
  derivative) is located at the output whose gradient broke and the module whose backward
  broke it, with the forward reported clean;
* the gradient-flow report finds exactly the parameters cut off from the loss (the hidden
  layers behind a classifier frozen at zero, over two batches), and its gradient norm of
  the classifier bias equals the closed form of softmax cross-entropy at zero logits,
  ``|| 1/C - class frequencies ||``, computed here from the labels in NumPy;
* ``fit`` diagnoses the first non-finite logged step once (the poisoned input: first layer)
  and says where; ``python -m train.diagnostics`` writes its JSON and PNG and turns a bad
  config into ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.train.recipes import IMAGE_MLP
from tests.train.recipes import IMAGE_RECIPE as RECIPE
from train import config, diagnostics, loop
from train.step import CLASSIFICATION

# The image recipe shrunk to seconds (as tests/train/test_loss_spikes.py): an MLP, float32.
SMALL = (
    *IMAGE_MLP,
    "model.hidden=32",
    "model.n_layers=3",
    "run.steps=6",
    "run.log_every=1",
    "run.eval_every=6",
)


def cfg_of(*overrides: str) -> config.Config:
    return config.load(RECIPE, [*SMALL, *overrides])


def test_planted_nan_in_a_middle_layer_is_found_there():
    setup = loop.build(cfg_of())
    params = jax.tree.map(lambda x: x, setup.state.params)
    kernel = params["layers"][1]["kernel"]
    kernel.set_value(kernel.get_value().at[5, 7].set(jnp.nan))
    report = diagnostics.diagnose_step(setup, params, loop.train_batch(setup, 0))
    assert report.forward == "layers/1" and report.first == "layers/1"
    assert report.nonfinite_params == ["layers/1/kernel"]
    assert "non-finite first in layers/1 " in report.message()
    clean = diagnostics.diagnose_step(setup, setup.state.params, loop.train_batch(setup, 0))
    assert clean.first is None and not clean.nonfinite_grads and np.isfinite(clean.loss)


class SqrtAtZero(nnx.Module):
    """Finite forward (sqrt(0) = 0), infinite derivative there: breaks only the backward."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.sqrt(x)


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.first = nnx.Linear(4, 8, kernel_init=nnx.initializers.zeros, rngs=rngs)
        self.root = SqrtAtZero()
        self.last = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.last(self.root(self.first(images)))


def test_backward_only_nonfinite_is_located():
    graphdef, params = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
    batch = {"images": jnp.ones((5, 4)), "labels": jnp.arange(5) % 3}
    report = diagnostics.diagnose_nonfinite(graphdef, params, batch, CLASSIFICATION)
    assert np.isfinite(report.loss) and report.forward is None
    assert report.backward == "first" and report.backward_through == "root"
    assert report.first == "root"
    assert set(report.nonfinite_grads) == {"first/kernel", "first/bias"}


def test_gradient_flow_finds_the_disconnected_layers():
    # A classifier frozen at zero: nothing upstream of it reaches the loss (dL/dh = delta W^T).
    setup = loop.build(cfg_of("optimizer.groups={classifier: null}"))
    params = setup.state.params
    classifier = params["classifier"]["kernel"]
    classifier.set_value(jnp.zeros_like(classifier.get_value()))
    state = setup.state._replace(params=params)
    batches = [loop.train_batch(setup, k) for k in range(2)]
    flow = diagnostics.gradient_flow(setup, state, batches)
    hidden = {f"layers/{i}/{p}" for i in range(3) for p in ("kernel", "bias")}
    assert set(flow["no_gradient"]) == hidden
    by_path = {layer["path"]: layer for layer in flow["layers"]}
    assert [layer["path"] for layer in flow["layers"]][:2] == ["layers/0/bias", "layers/0/kernel"]
    # Zero logits (zero kernel, zero bias, both frozen): dL/db = mean(softmax - onehot) =
    # 1/C - class frequency. float32 gradient of a mean over 32 rows: 1e-6 relative.
    classes = setup.cfg.model.num_classes
    for k, batch in enumerate(batches):
        labels = np.asarray(batch["labels"]).ravel()
        expected = np.linalg.norm(
            1 / classes - np.bincount(labels, minlength=classes) / labels.size
        )
        got = by_path["classifier/bias"]["grad_norm_per_batch"][k]
        assert got == pytest.approx(expected, rel=1e-5)
    assert by_path["classifier/kernel"]["update_ratio"] is None  # zero parameter: no ratio
    assert all(u == 0.0 for u in by_path["classifier/bias"]["update_norm_per_batch"])  # frozen
    assert by_path["layers/0/kernel"]["update_ratio"] > 0  # weight decay still moves it


def test_gradient_flow_reports_each_tensor_of_the_flat_layout():
    """With ``optimizer.flat_layout`` the report still names and measures every tensor: the
    same paths, gradient norms and update norms as the per-leaf run's, to float32 rounding
    of the norms' sums (and of the clip's global norm in the update)."""
    reports = {}
    for flat in (False, True):
        setup = loop.build(cfg_of(f"optimizer.flat_layout={str(flat).lower()}"))
        batches = [loop.train_batch(setup, k) for k in range(2)]
        reports[flat] = diagnostics.gradient_flow(setup, setup.state, batches)
    per_leaf, flat = reports[False], reports[True]
    assert [layer["path"] for layer in flat["layers"]] == [
        layer["path"] for layer in per_leaf["layers"]
    ]
    for a, b in zip(flat["layers"], per_leaf["layers"], strict=True):
        assert a["shape"] == b["shape"]
        for key in ("param_norm", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["path"], key)
        np.testing.assert_allclose(
            a["update_norm_per_batch"], b["update_norm_per_batch"], rtol=1e-4
        )


def poison_first_batches(monkeypatch) -> None:
    clean = loop.train_batch

    def train_batch(setup, index):
        batch = clean(setup, index)
        if index in (2, 4):
            batch = {**batch, "images": batch["images"] * jnp.nan}
        return batch

    monkeypatch.setattr(loop, "train_batch", train_batch)


@pytest.mark.slow  # a whole (tiny) fit: about 15 s on the busy 2-core machine
def test_fit_diagnoses_the_first_nonfinite_step_once(monkeypatch, tmp_path, capsys):
    poison_first_batches(monkeypatch)
    summary = loop.fit(cfg_of("checkpoint.every=0"), tmp_path, progress=False)
    assert summary["skipped_steps"] == 2
    assert summary["nonfinite_first"].startswith("non-finite first in layers/0 ")
    out = capsys.readouterr().out
    assert out.count("non-finite first in") == 1 and "step 3: non-finite first" in out


def test_command_writes_report_and_plot(tmp_path, capsys):
    flow = diagnostics.main(
        ["--config", str(RECIPE), *SMALL, "--workdir", str(tmp_path), "--batches", "1"]
    )
    written = json.loads((tmp_path / "gradient_flow.json").read_text())
    assert written["source"] == "initialisation" and written["no_gradient"] == []
    assert len(written["layers"]) == len(flow["layers"]) == 8  # 3 hidden + classifier, W and b
    assert (tmp_path / "gradient_flow.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as stopped:
        diagnostics.main(["model.init=bogus", "--workdir", str(tmp_path)])
    assert stopped.value.code == 2
    assert "error: model.init must be one of" in capsys.readouterr().err
