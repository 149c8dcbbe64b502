"""Test-session set-up: 8 simulated CPU devices, so sharded code paths run on a laptop.

Compiling is most of what the suite spends (about half of its CPU time, 4,500 programs; a
one-layer GPT's training step: seconds to compile, milliseconds to run), so the session buys
compile time back two ways:

- XLA:CPU's LLVM back end at optimisation level 0, which halves the compile of the training
  step, and its older loop emitters (``--xla_cpu_use_fusion_emitters=false``), which take 40%
  off the rest (a one-layer GPT's step: 3.3 s -> 1.3 s; the MLIR fusion emitters pay a fixed
  cost per fusion). The HLO every test compiles (partitioning, fusion, collectives) is the one
  users get; only the code generated for each fusion differs, so results agree with a default
  build to float32 rounding, not bit for bit (at level 0: three AdamW steps on 77,100 weights:
  4,133 differ, by at most 4.8e-7).
  (With these emitters, ``train.loop.fit`` dispatching steps without bound deadlocked the image
  recipe's 8-device step in an all-reduce in 3 runs of 5 of ``tests/train/test_vision.py``; fit
  now keeps at most two steps in flight (``train.loop.StepsInFlight``), and 12 runs of 12
  passed, with ``test_pbt.py`` in 6 of them, 2026-12-07.) An XLA flag that a jaxlib does not
  know aborts every process, and these emitters may leave XLA one day, so the session tries
  the flag once in a subprocess and leaves it out where it is unknown.
- A persistent compilation cache in a temporary directory of this session, shared with the
  pytest-xdist workers and the subprocesses the tests start, and removed at the end: a program
  compiled again (the same step in another test, another trial, another ``python -m train``)
  is loaded. It holds compiled programs only; a cached executable computes what a fresh one
  does.

Every bitwise comparison in the suite is between programs built with the same flags (the
subprocesses inherit them).
"""

import os
import shutil
import subprocess
import sys
import tempfile

BASE_XLA_FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
LOOP_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def session_xla_flags() -> str:
    """The base flags, and the loop emitters' flag where the installed jaxlib knows it."""
    with_emitters = f"{BASE_XLA_FLAGS} {LOOP_EMITTERS}"
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices()"],
        env={**os.environ, "XLA_FLAGS": with_emitters, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
    )
    return with_emitters if probe.returncode == 0 else BASE_XLA_FLAGS


# Set once by the first process of the session (the xdist controller); workers inherit it.
if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = session_xla_flags()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The first process of the session (the xdist controller) makes the cache; workers inherit it.
OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="optim_jax_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)
# JAX decides once per process, at its first compile, whether the cache is in use; the
# benchmarks turn it off before theirs (their compile times must be cold), which would leave a
# worker that starts with a benchmark test without the cache for the rest of the session.
jax.jit(lambda x: x + 1)(0).block_until_ready()


def pytest_sessionfinish(session, exitstatus):
    if OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
