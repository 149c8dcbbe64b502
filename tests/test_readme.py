"""The README's "use it in your Flax project" example runs as written."""

import pathlib
import re

import jax.numpy as jnp

README = pathlib.Path(__file__).parent.parent / "README.md"


def test_flax_example_trains():
    block = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    namespace: dict = {}
    exec(block, namespace)  # noqa: S102 - our own README
    x, y = jnp.ones((8, 784)), jnp.zeros((8,), jnp.int32)
    params, opt_state = namespace["params"], namespace["opt_state"]
    losses = []
    for _ in range(5):
        params, opt_state, loss, grad_norm = namespace["train_step"](params, opt_state, x, y)
        losses.append(float(loss))
    assert losses[-1] < losses[0] and float(grad_norm) > 0
