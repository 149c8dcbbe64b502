"""LAMB and LARS in float64, from the papers' algorithms.

LAMB: You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT
in 76 minutes", Algorithm 2, with the scaling function phi the identity:

    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    r = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps);  u = r + wd * x
    x <- x - lr * (||x|| / ||u||) * u        (per tensor; ratio 1 if a norm is 0)

LARS: You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional
Networks", Algorithm 1:

    local_lr = eta * ||w|| / (||g|| + beta * ||w|| + eps)   (1 if ||w|| or ||g|| is 0)
    v <- m v + lr_t * local_lr * (g + beta * w);  w <- w - v

Two variants of LARS are kept for comparisons, each named by where it comes
from: ``denominator="optax"`` divides by ``||g + beta * w|| + eps`` (Optax and
SimCLR's TF LARS) and ``lr_placement="outside"`` keeps the learning rate out of
the buffer, ``v <- m v + local_lr * (g + beta * w); w <- w - lr_t * v`` (timm).
``lr`` and a scheduled ``weight_decay`` are functions of the 0-based update index.
"""

import numpy as np


def _norm(x):
    return float(np.sqrt(np.sum(np.square(x))))


def _ratio(numerator, denominator, ok):
    return numerator / denominator if ok else 1.0


def lamb(lr, b1, b2, eps, weight_decay=0.0, decay_mask=None):
    """(init, step); ``decay_mask[k]`` False exempts leaf ``k`` from the decay only."""

    def init(params):
        return {
            "m": {k: np.zeros_like(p) for k, p in params.items()},
            "v": {k: np.zeros_like(p) for k, p in params.items()},
        }

    def step(params, grads, state, t):
        new_params, new_m, new_v = {}, {}, {}
        for k, x in params.items():
            g = grads[k]
            new_m[k] = m = b1 * state["m"][k] + (1 - b1) * g
            new_v[k] = v = b2 * state["v"][k] + (1 - b2) * g**2
            r = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
            wd = weight_decay if decay_mask is None or decay_mask[k] else 0.0
            u = r + wd * x
            x_norm, u_norm = _norm(x), _norm(u)
            trust = _ratio(x_norm, u_norm, x_norm > 0 and u_norm > 0)
            new_params[k] = x - lr(t - 1) * trust * u
        return new_params, {"m": new_m, "v": new_v}

    return init, step


def lars(
    lr,
    momentum,
    weight_decay,
    trust_coefficient,
    eps=0.0,
    mask=None,
    denominator="paper",
    lr_placement="inside",
):
    """(init, step); leaves with ``mask[k]`` False take plain momentum-SGD steps.

    The state is ``{"v": ...}``, the paper's velocity, or empty when ``momentum`` is 0.
    """
    assert denominator in ("paper", "optax") and lr_placement in ("inside", "outside")

    def init(params):
        return {"v": {k: np.zeros_like(p) for k, p in params.items()}} if momentum else {}

    def step(params, grads, state, t):
        wd = weight_decay(t - 1) if callable(weight_decay) else weight_decay
        new_params, new_v = {}, {}
        for k, w in params.items():
            g = grads[k]
            if mask is None or mask[k]:
                d = g + wd * w
                w_norm, g_norm = _norm(w), _norm(g)
                if denominator == "paper":
                    ok = w_norm > 0 and g_norm > 0
                    local_lr = _ratio(trust_coefficient * w_norm, g_norm + wd * w_norm + eps, ok)
                else:
                    d_norm = _norm(d)
                    ok = w_norm > 0 and d_norm > 0
                    local_lr = _ratio(trust_coefficient * w_norm, d_norm + eps, ok)
            else:
                d, local_lr = g, 1.0
            inside = lr(t - 1) if lr_placement == "inside" else 1.0
            v = inside * local_lr * d
            if momentum:
                v = momentum * state["v"][k] + v
                new_v[k] = v
            outside = lr(t - 1) if lr_placement == "outside" else 1.0
            new_params[k] = w - outside * v
        return new_params, ({"v": new_v} if momentum else {})

    return init, step
