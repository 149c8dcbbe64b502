"""SGD with momentum in float64, from Sutskever et al. 2013 as torch.optim.SGD documents it.

g <- g + wd * p;  b <- mu * b + g;  d <- g + mu * b (Nesterov) or b;  p <- p - lr * d
(without momentum, d = g and no buffer is kept).
"""

import numpy as np


def make(lr, momentum=0.0, nesterov=False, weight_decay=0.0):
    """(init, step) for the float64 reference; ``lr`` is a function of the 0-based update."""

    def init(params):
        return {"momentum": {k: np.zeros_like(v) for k, v in params.items()}} if momentum else {}

    def step(params, grads, state, t):
        new_p, new_b = {}, {}
        for k, p in params.items():
            g = grads[k] + weight_decay * p
            d = g
            if momentum:
                new_b[k] = momentum * state["momentum"][k] + g
                d = g + momentum * new_b[k] if nesterov else new_b[k]
            new_p[k] = p - lr(t - 1) * d
        return new_p, ({"momentum": new_b} if momentum else {})

    return init, step
