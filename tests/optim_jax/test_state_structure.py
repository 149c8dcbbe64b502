"""Optimizer states keep their structure from release to release.

Orbax restores a checkpoint into the structure of a freshly built state and refuses when the
two differ, so a field added to a state class (even one that is None) makes every checkpoint
written before it unreadable: a run cannot be resumed after upgrading optim_jax. (Found
2026-12-08: AMSGrad's maximum first went into ``AdamState`` as a field defaulting to None,
and the trainer could not resume a checkpoint of the commit before.) ``state_structures.json``
holds each optimizer's state structure at its defaults on a small tree, as the code of
commit 26f4c8b built it. A change here must be deliberate: regenerate the file with
``python -m tests.optim_jax.test_state_structure`` and say in the README which checkpoints
no longer restore.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import pytest

import optim_jax
from train.config import OPTIMIZER_NAMES

GOLDEN = pathlib.Path(__file__).with_name("state_structures.json")
NAMES = OPTIMIZER_NAMES  # every optimizer the trainer can checkpoint


def structures() -> dict[str, str]:
    params = {
        "dense": {"kernel": jnp.zeros((8, 4)), "bias": jnp.zeros((4,))},
        "scale": jnp.zeros(()),
    }
    return {
        name: str(jax.tree.structure(jax.eval_shape(getattr(optim_jax, name)(1e-3).init, params)))
        for name in NAMES
    }


@pytest.mark.parametrize("name", NAMES)
def test_the_state_has_the_structure_older_checkpoints_hold(name):
    assert structures()[name] == json.loads(GOLDEN.read_text())[name], (
        f"{name}'s state changed structure: checkpoints written before will not restore "
        "(see this module's docstring)"
    )


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(structures(), indent=1, sort_keys=True) + "\n")
