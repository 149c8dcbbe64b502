"""Complex parameters: refused where a rule is written for real numbers, taken as pairs of
real ones by ``complex_as_real`` (against torch.optim, which does the same), and handled as
they are by the rules that are linear in the gradient or scale it by a norm."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim_jax

REFUSED = {
    "adagrad": lambda: optim_jax.adagrad(0.1),
    "rmsprop": lambda: optim_jax.rmsprop(0.01),
    "adam": lambda: optim_jax.adam(0.01),
    "adamw": lambda: optim_jax.adamw(0.01),
    "lamb": lambda: optim_jax.lamb(0.01),
    "lars": lambda: optim_jax.lars(0.1),
    "lion": lambda: optim_jax.lion(1e-3),
    "adafactor": lambda: optim_jax.adafactor(0.01),
    "sophia": lambda: optim_jax.sophia(0.01),
}


def _complex_tree(seed: int, dtype=jnp.complex64) -> dict:
    rng = np.random.default_rng(seed)
    shapes = {"kernel": (4, 3), "bias": (3,)}
    return {
        name: jnp.asarray(rng.standard_normal(s) + 1j * rng.standard_normal(s), dtype)
        for name, s in shapes.items()
    }


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_rules_for_real_numbers_refuse_a_complex_leaf_naming_it(name):
    params = {"real": jnp.ones(3), "z": _complex_tree(0)["kernel"]}
    with pytest.raises(TypeError, match=r"parameter \['z'\] is complex64.*complex_as_real"):
        REFUSED[name]().init(params)
    with pytest.raises(TypeError, match=r"clip_by_value: parameter \['z'\]"):
        optim_jax.clip_by_value(1.0).update(params, None)


TORCH = {
    "adam": (lambda: optim_jax.adam(0.01), lambda torch, p: torch.optim.Adam(p, lr=0.01)),
    "adamw": (
        lambda: optim_jax.adamw(0.01, weight_decay=0.1),
        lambda torch, p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    ),
    "rmsprop": (
        lambda: optim_jax.rmsprop(0.01, decay=0.99, momentum=0.9, centered=True),
        lambda torch, p: torch.optim.RMSprop(p, lr=0.01, alpha=0.99, momentum=0.9, centered=True),
    ),
    "adagrad": (lambda: optim_jax.adagrad(0.1), lambda torch, p: torch.optim.Adagrad(p, lr=0.1)),
}


@pytest.mark.parametrize("name", sorted(TORCH))
def test_complex_as_real_follows_torch_on_complex_parameters(name):
    """torch.optim updates a complex parameter as its real view; so does the wrapper
    (complex128 against torch's complex128, 8 steps: to 1e-12 relative)."""
    import torch

    ours, theirs = TORCH[name]
    with jax.enable_x64(True):
        params = _complex_tree(1, jnp.complex128)
        grads = [_complex_tree(10 + t, jnp.complex128) for t in range(8)]
        tx = optim_jax.complex_as_real(ours())
        state = tx.init(params)
        step = jax.jit(tx.update)
        p = params
        for g in grads:
            updates, state = step(g, state, p)
            p = optax.apply_updates(p, updates)
        assert all(x.dtype == jnp.complex128 for x in jax.tree.leaves(p))

        tensors = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in params.items()}
        optimizer = theirs(torch, list(tensors.values()))
        for g in grads:
            for k, tensor in tensors.items():
                tensor.grad = torch.tensor(np.asarray(g[k]))
            optimizer.step()
        for k, tensor in tensors.items():
            np.testing.assert_allclose(np.asarray(p[k]), tensor.detach().numpy(), rtol=1e-12)
        assert not np.allclose(np.asarray(p["kernel"]), np.asarray(params["kernel"]))


def test_complex_as_real_leaves_real_leaves_as_they_were():
    """Beside a complex leaf, a real one takes bit for bit the unwrapped optimizer's steps."""
    params = {"real": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "z": _complex_tree(2)["bias"]}
    grads = {"real": jnp.full((2, 3), 0.25), "z": _complex_tree(3)["bias"]}
    wrapped = optim_jax.complex_as_real(optim_jax.adamw(0.01))
    plain = optim_jax.adamw(0.01)
    got, _ = wrapped.update(grads, wrapped.init(params), params)
    real_only = {"real": params["real"]}
    want, _ = plain.update({"real": grads["real"]}, plain.init(real_only), real_only)
    np.testing.assert_array_equal(got["real"], want["real"])
    assert got["z"].dtype == jnp.complex64 and got["z"].shape == (3,)


def test_rules_linear_in_the_gradient_take_complex_leaves_as_optax_does():
    """SGD with momentum is linear in the gradient: the same steps as Optax's. Norm-based
    clipping measures a complex leaf by its magnitudes, |3 + 4i| = 5, as Optax does."""
    params = _complex_tree(4)
    grads = _complex_tree(5)
    for ours, theirs in (
        (optim_jax.sgd(0.1, momentum=0.9), optax.sgd(0.1, momentum=0.9)),
        (optim_jax.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)),
    ):
        got, _ = ours.update(grads, ours.init(params), params)
        want, _ = theirs.update(grads, theirs.init(params), params)
        for k in params:
            np.testing.assert_allclose(got[k], want[k], rtol=2e-6)
    clip = optim_jax.clip_by_global_norm(1.0)
    clipped, state = clip.update({"z": jnp.array([3 + 4j], jnp.complex64)}, clip.init(params))
    assert state.pre_clip_norm == 5.0
    np.testing.assert_allclose(clipped["z"], [0.6 + 0.8j], rtol=1e-6)
    agc = optim_jax.adaptive_grad_clip(0.1)
    z = {"z": jnp.array([[3 + 4j, 0j]], jnp.complex64)}
    clipped, _ = agc.update(z, agc.init(z), {"z": jnp.array([[10.0 + 0j, 10.0 + 0j]])})
    # Unit 0: |g| = 5 against 0.1 * |w| = 1: scaled by 1/5, keeping its phase.
    np.testing.assert_allclose(clipped["z"], [[0.6 + 0.8j, 0j]], rtol=1e-6)
