"""Adafactor in float64, from Shazeer & Stern 2018 (Algorithms 4 and 5) and HF's documented options.

Paper, for a weight matrix X (n x m), t = 1, 2, ...:
    alpha_t = max(eps2, RMS(X_{t-1})) * rho_t
    R_t = beta2_t R_{t-1} + (1 - beta2_t) (G_t^2 + eps1 1_n 1_m^T) 1_m        (row sums)
    C_t = beta2_t C_{t-1} + (1 - beta2_t) 1_n^T (G_t^2 + eps1 1_n 1_m^T)      (column sums)
    V_hat_t = R_t C_t / (1_n^T R_t)
    U_t = G_t / sqrt(V_hat_t);  U_hat_t = U_t / max(1, RMS(U_t) / d)
    X_t = X_{t-1} - alpha_t U_hat_t
and for a vector, V_hat_t = beta2_t V_hat_{t-1} + (1 - beta2_t)(G_t^2 + eps1) in full.
Proposed: rho_t = min(1e-2, 1/sqrt(t)), beta2_t = 1 - t^-0.8, eps1 = 1e-30, eps2 = 1e-3, d = 1.

HF ``transformers.Adafactor`` options on top: ``rho_t = lr(t-1)`` when the step is
not relative; ``min(1e-6 t, 1/sqrt(t))`` with warmup_init; parameter scaling
off (alpha_t = rho_t); a first moment m_t = b1 m_{t-1} + (1 - b1) alpha_t U_hat_t
that replaces the step; decoupled decay X -= wd * alpha_t * X_{t-1}. Tensors of
rank > 2 are factored per trailing matrix.

The state is stored as row and column *means* (the names ``v_row``, ``v_col``
of the implementation): the paper's sums are R = m * v_row and C = n * v_col,
and the reference converts before applying the paper's V_hat formula.
"""

import numpy as np


def _rms(x):
    return np.sqrt(np.mean(np.square(x)))


def _v_hat_factored(v_row, v_col):
    """The paper's V_hat = R C / (1^T R) for one n x m matrix, from row/column means."""
    n, m = v_row.shape[0], v_col.shape[0]
    R = m * v_row  # row sums, shape (n,)
    C = n * v_col  # column sums, shape (m,)
    return np.outer(R, C) / np.sum(R)


def make(
    lr=None,
    eps1=1e-30,
    eps2=1e-3,
    clip=1.0,
    decay_rate=-0.8,
    b1=None,
    wd=0.0,
    scale_parameter=True,
    warmup_init=False,
    factor=lambda shape: len(shape) >= 2,
    decay_mask=None,
):
    """(init, step) for one configuration; ``lr`` None means the relative step.

    ``lr`` and ``wd`` are functions of the 0-based update index or numbers.
    ``factor(shape)`` says which leaves get row/column statistics.
    """
    as_fn = lambda v: v if callable(v) else (lambda _: v)  # noqa: E731
    lr_fn, wd_fn = (None if lr is None else as_fn(lr)), as_fn(wd)

    def init(params):
        state = {"v_row": {}, "v_col": {}, "v": {}}
        for k, p in params.items():
            if factor(p.shape):
                state["v_row"][k] = np.zeros(p.shape[:-1])
                state["v_col"][k] = np.zeros(p.shape[:-2] + p.shape[-1:])
            else:
                state["v"][k] = np.zeros(p.shape)
        if b1:
            state["m"] = {k: np.zeros(p.shape) for k, p in params.items()}
        return state

    def step(params, grads, state, t):
        beta2 = 1.0 - t**decay_rate
        if lr_fn is None:
            rho = min(1e-6 * t if warmup_init else 1e-2, 1.0 / np.sqrt(t))
        else:
            rho = lr_fn(t - 1)
        new_state = {name: {} for name in state}
        new_params = {}
        for k, x in params.items():
            g = grads[k]
            sq = g**2 + eps1
            if factor(x.shape):
                row = beta2 * state["v_row"][k] + (1 - beta2) * sq.mean(axis=-1)
                col = beta2 * state["v_col"][k] + (1 - beta2) * sq.mean(axis=-2)
                new_state["v_row"][k], new_state["v_col"][k] = row, col
                lead = x.shape[:-2]
                rows = row.reshape((-1, x.shape[-2]))
                cols = col.reshape((-1, x.shape[-1]))
                v_hat = np.stack([_v_hat_factored(r, c) for r, c in zip(rows, cols, strict=True)])
                v_hat = v_hat.reshape(lead + x.shape[-2:])
            else:
                v_hat = beta2 * state["v"][k] + (1 - beta2) * sq
                new_state["v"][k] = v_hat
            u = g / np.sqrt(v_hat)
            if clip is not None:
                u = u / max(1.0, _rms(u) / clip)
            alpha = rho * max(eps2, _rms(x)) if scale_parameter else rho
            s = alpha * u
            if b1:
                s = b1 * state["m"][k] + (1 - b1) * s
                new_state["m"][k] = s
            decay = wd_fn(t - 1) if decay_mask is None or decay_mask[k] else 0.0
            new_params[k] = x - s - decay * alpha * x
        return new_params, new_state

    return init, step
