"""Benchmarks, each run as one command (``python -m benchmarks.<name>``), never as timed tests.

* :mod:`benchmarks.optimizers`: optim_jax optimizers side by side with their Optax
  counterparts: step time, achieved memory bandwidth against a copy ceiling,
  compile time against leaf count, state bytes per parameter.
"""
