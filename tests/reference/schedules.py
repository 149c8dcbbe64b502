"""Schedules in plain Python floats, written from the published recipes (not from our code).

Each function gives the value for the 0-based update ``t``. Where torch has a
scheduler the tests use torch itself; these cover the recipes it lacks and the
steps too far out to reach by stepping a torch scheduler.
"""

import math


def hf_linear_with_warmup_factor(t: int, warmup_steps: int, total_steps: int) -> float:
    """Hugging Face ``get_linear_schedule_with_warmup``'s multiplier, as its docstring states.

    Rises linearly from 0 to 1 over the warm-up, then falls linearly to 0 at
    ``total_steps`` and stays there.
    """
    if t < warmup_steps:
        return t / max(1, warmup_steps)
    return max(0.0, (total_steps - t) / max(1, total_steps - warmup_steps))


def fairseq_inverse_sqrt(t: int, peak: float, warmup_steps: int, warmup_init: float) -> float:
    """fairseq's ``inverse_sqrt``: ``lr = init + t * (peak - init) / W`` during the warm-up,
    then ``lr = peak * sqrt(W) / sqrt(t)`` (the decay factor ``peak * W**0.5``)."""
    if t < warmup_steps:
        return warmup_init + t * (peak - warmup_init) / warmup_steps
    return peak * math.sqrt(warmup_steps) / math.sqrt(t)


def sgdr(t: int, init: float, T_0: int, T_mult: int, eta_min: float) -> float:
    """SGDR (Loshchilov & Hutter, 2017, eq. 5), walking the cycles with Python integers.

    Cycle ``i`` lasts ``T_0 * T_mult**i`` steps; within it
    ``eta = eta_min + (init - eta_min) * (1 + cos(pi * T_cur / T_i)) / 2``.
    """
    start, length = (t - t % T_0, T_0) if T_mult == 1 else (0, T_0)
    while t >= start + length:
        start += length
        length *= T_mult
    return eta_min + 0.5 * (init - eta_min) * (1.0 + math.cos(math.pi * (t - start) / length))
