"""Sophia in float64, from Liu et al. 2023 ("Sophia: A Scalable Stochastic Second-order
Optimizer for Language Model Pre-training"), Algorithm 3, and the official code's form.

Paper, with ``t`` from 1 and ``k`` the Hessian interval::

    m_t = b1 m_{t-1} + (1 - b1) g_t
    if t mod k == 1:  h_t = b2 h_{t-k} + (1 - b2) hhat_t      else  h_t = h_{t-1}
    theta <- theta - lr_t * wd * theta
    theta <- theta - lr_t * clip(m_t / max(gamma h_t, eps), 1)

(``t mod 1 == 1`` is never true in integer arithmetic; the paper's intent, and
ours, for ``k = 1`` is a refresh on every step, so the test below is ``(t - 1) % k == 0``.)

The official SophiaG code (github.com/Liuhong99/Sophia, ``sophia.py``) keeps
``h`` as an EMA of the squared sampled-label gradient and steps
``sign(m) * min(|m| / (rho * bs * h + 1e-15), 1)`` after ``p *= 1 - lr * wd``.

In :func:`make_step`, ``lr``, ``b1``, ``b2`` and ``gamma`` are functions of the 0-based
update index; ``estimate(t, grads)``
returns the Hessian-diagonal estimate offered at update ``t`` (a dict like the
params); the reference uses it only on refresh steps.
"""

import numpy as np


def init(params):
    return {
        "mu": {k: np.zeros_like(v) for k, v in params.items()},
        "hessian": {k: np.zeros_like(v) for k, v in params.items()},
    }


def make_step(lr, b1, b2, gamma, eps, weight_decay, interval, estimate):
    def step(params, grads, state, t):
        refresh = (t - 1) % interval == 0
        hhat = estimate(t, grads) if refresh else None
        new_params, mu, hessian = {}, {}, {}
        for k, p in params.items():
            beta1, beta2 = b1(t - 1), b2(t - 1)
            mu[k] = beta1 * state["mu"][k] + (1 - beta1) * grads[k]
            if refresh:
                hessian[k] = beta2 * state["hessian"][k] + (1 - beta2) * hhat[k]
            else:
                hessian[k] = state["hessian"][k]
            ratio = mu[k] / np.maximum(gamma(t - 1) * hessian[k], eps)
            decayed = p - lr(t - 1) * weight_decay * p
            new_params[k] = decayed - lr(t - 1) * np.clip(ratio, -1.0, 1.0)
        return new_params, {"mu": mu, "hessian": hessian}

    return step


def official_step(lr, b1, b2, rho, bs, weight_decay, interval, squared_grad):
    """The official update; ``h`` takes ``squared_grad(t, grads)`` (ghat**2) on refresh steps."""

    def step(params, grads, state, t):
        refresh = (t - 1) % interval == 0
        g2 = squared_grad(t, grads) if refresh else None
        new_params, mu, hessian = {}, {}, {}
        for k, p in params.items():
            p = p * (1 - lr * weight_decay)
            mu[k] = b1 * state["mu"][k] + (1 - b1) * grads[k]
            hessian[k] = state["hessian"][k]
            if refresh:
                hessian[k] = b2 * hessian[k] + (1 - b2) * g2[k]
            ratio = np.minimum(np.abs(mu[k]) / (rho * bs * hessian[k] + 1e-15), 1.0)
            new_params[k] = p - lr * np.sign(mu[k]) * ratio
        return new_params, {"mu": mu, "hessian": hessian}

    return step
