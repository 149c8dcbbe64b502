"""Adagrad, RMSprop, Adam and AdamW in float64, from the papers' update equations.

Adagrad: Duchi, Hazan & Singer 2011 (diagonal form); RMSprop: Hinton's lecture 6e,
with the centred variant of Graves 2013; Adam: Kingma & Ba 2015, Algorithm 1 with
eps added to sqrt(v_hat); AdamW: Loshchilov & Hutter 2019, Algorithm 2 with the
schedule multiplier equal to the learning rate (the torch/Optax convention).
``lr`` is a function of the 0-based update index.
"""

import numpy as np


def _like(params, value=0.0):
    return {k: np.full_like(v, value) for k, v in params.items()}


def adagrad_init(initial_accumulator_value):
    return lambda params: {"sum": _like(params, initial_accumulator_value)}


def adagrad_step(lr, eps):
    def step(params, grads, state, t):
        s = {k: state["sum"][k] + grads[k] ** 2 for k in params}
        p = {k: params[k] - lr(t - 1) * grads[k] / (np.sqrt(s[k]) + eps) for k in params}
        return p, {"sum": s}

    return step


def rmsprop_init(centered, momentum):
    def init(params):
        state = {"square_avg": _like(params)}
        if centered:
            state["grad_avg"] = _like(params)
        if momentum:
            state["momentum"] = _like(params)
        return state

    return init


def rmsprop_step(lr, alpha, eps, momentum, centered):
    def step(params, grads, state, t):
        new_state = {name: {} for name in state}
        new_params = {}
        for k, p in params.items():
            g = grads[k]
            v = alpha * state["square_avg"][k] + (1 - alpha) * g**2
            new_state["square_avg"][k] = v
            if centered:
                gbar = alpha * state["grad_avg"][k] + (1 - alpha) * g
                new_state["grad_avg"][k] = gbar
                denom = np.sqrt(v - gbar**2) + eps
            else:
                denom = np.sqrt(v) + eps
            d = g / denom
            if momentum:
                d = momentum * state["momentum"][k] + d
                new_state["momentum"][k] = d
            new_params[k] = p - lr(t - 1) * d
        return new_params, new_state

    return step


def adam_init(params):
    return {"m": _like(params), "v": _like(params)}


def adam_step(lr, b1, b2, eps, weight_decay=0.0):
    """Adam; with ``weight_decay`` > 0 the decoupled decay of AdamW."""

    def step(params, grads, state, t):
        m = {k: b1 * state["m"][k] + (1 - b1) * grads[k] for k in params}
        v = {k: b2 * state["v"][k] + (1 - b2) * grads[k] ** 2 for k in params}
        p = {}
        for k in params:
            m_hat = m[k] / (1 - b1**t)
            v_hat = v[k] / (1 - b2**t)
            p[k] = params[k] - lr(t - 1) * (
                m_hat / (np.sqrt(v_hat) + eps) + weight_decay * params[k]
            )
        return p, {"m": m, "v": v}

    return step


def with_l2(step, weight_decay):
    """torch's L2 term in front of a reference step: ``g <- g + weight_decay * p``."""

    def l2_step(params, grads, state, t):
        decayed = {k: grads[k] + weight_decay * params[k] for k in grads}
        return step(params, decayed, state, t)

    return l2_step


def amsgrad_init(params):
    return {"m": _like(params), "v": _like(params), "v_max": _like(params)}


def amsgrad_step(lr, b1, b2, eps, weight_decay=0.0):
    """Adam with AMSGrad as torch.optim.Adam/AdamW compute it: the running maximum of the
    raw ``v`` in the denominator, divided by the current ``1 - b2**t``; with
    ``weight_decay`` > 0 the decoupled decay of AdamW."""

    def step(params, grads, state, t):
        m = {k: b1 * state["m"][k] + (1 - b1) * grads[k] for k in params}
        v = {k: b2 * state["v"][k] + (1 - b2) * grads[k] ** 2 for k in params}
        v_max = {k: np.maximum(state["v_max"][k], v[k]) for k in params}
        p = {}
        for k in params:
            m_hat = m[k] / (1 - b1**t)
            denominator = np.sqrt(v_max[k]) / np.sqrt(1 - b2**t) + eps
            p[k] = params[k] - lr(t - 1) * (m_hat / denominator + weight_decay * params[k])
        return p, {"m": m, "v": v, "v_max": v_max}

    return step
