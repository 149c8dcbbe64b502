"""Small configs and subprocess set-up shared by the trainer's tests.

Each test file adds what it measures to these; the sizes are chosen so a run takes seconds on
a 2-core CPU while every code path (sharding, checkpoints, evaluation) still runs.
"""

from __future__ import annotations

import os
import pathlib

from train import config

REPO = pathlib.Path(__file__).resolve().parents[2]
IMAGE_RECIPE = REPO / "configs" / "image_sgd_onecycle.yaml"

# A one-layer GPT that trains a step in milliseconds (subprocess tests of the CLI).
TINY_GPT = (
    "model.n_layers=1",
    "model.d_model=32",
    "model.n_heads=2",
    "model.seq_len=16",
    "data.batch_size=16",
    "data.max_bytes=200000",
    "run.eval_batches=1",
    "run.log_every=1",
    "run.plot=false",  # metrics.png: a second of matplotlib per run (test_main.py draws one)
)

# The image recipe as an MLP on 16x16 shapes in float32 ("bitwise" is then about our logic, not
# bf16 rounding); files add the width, depth and run length they need.
IMAGE_MLP = (
    "model.kind=mlp",
    "data.batch_size=32",
    "run.eval_batches=1",
    "precision.compute=float32",
    "run.plot=false",
)


def tiny_gpt(steps: int) -> list[str]:
    """:data:`TINY_GPT` for ``steps`` steps, evaluated at the end only."""
    return [*TINY_GPT, f"run.steps={steps}", f"run.eval_every={steps}"]


def image_config(*overrides: str) -> config.Config:
    """The image recipe with :data:`IMAGE_MLP` and ``overrides``."""
    return config.load(IMAGE_RECIPE, [*IMAGE_MLP, *overrides])


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment with the repository on ``PYTHONPATH``, for ``python -m train...``."""
    pythonpath = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": pythonpath, **extra}
