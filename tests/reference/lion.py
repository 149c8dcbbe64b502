"""Lion in float64, from Chen et al. 2023, "Symbolic Discovery of Optimization
Algorithms", Algorithm 2 (the paper's Program 1 computes the same):

    c = b1 m + (1 - b1) g;  x <- x - lr * (sign(c) + wd * x);  m <- b2 m + (1 - b2) g

``sign(0) = 0`` (NumPy's). ``lion_pytorch`` writes the same step in the order
lucidrains' lion-pytorch applies it: ``x *= 1 - lr * wd`` first, then
``x -= lr * sign(c)``, then the momentum update. ``lr`` is a function of the
0-based update index.
"""

import numpy as np


def _init(params):
    return {"m": {k: np.zeros_like(p) for k, p in params.items()}}


def _decay(weight_decay, decay_mask, k):
    return weight_decay if decay_mask is None or decay_mask[k] else 0.0


def paper(lr, b1, b2, weight_decay=0.0, decay_mask=None):
    """(init, step) from Algorithm 2; ``decay_mask[k]`` False exempts leaf ``k`` from decay.

    ``b1`` and ``b2`` may be functions of the 0-based update index.
    """

    def step(params, grads, state, t):
        new_params, new_m = {}, {}
        beta1 = b1(t - 1) if callable(b1) else b1
        beta2 = b2(t - 1) if callable(b2) else b2
        for k, x in params.items():
            g, m = grads[k], state["m"][k]
            c = beta1 * m + (1 - beta1) * g
            wd = _decay(weight_decay, decay_mask, k)
            new_params[k] = x - lr(t - 1) * (np.sign(c) + wd * x)
            new_m[k] = beta2 * m + (1 - beta2) * g
        return new_params, {"m": new_m}

    return _init, step


def lion_pytorch(lr, b1, b2, weight_decay=0.0, decay_mask=None):
    """(init, step) in lion-pytorch's order: multiplicative decay, sign step, momentum."""

    def step(params, grads, state, t):
        new_params, new_m = {}, {}
        for k, x in params.items():
            g, m = grads[k], state["m"][k]
            x = x * (1 - lr(t - 1) * _decay(weight_decay, decay_mask, k))
            update = m * b1 + g * (1 - b1)
            new_params[k] = x - lr(t - 1) * np.sign(update)
            new_m[k] = m * b2 + g * (1 - b2)
        return new_params, {"m": new_m}

    return _init, step
