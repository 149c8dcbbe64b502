"""Training metrics: a JSONL log, TensorBoard scalars, a PNG plot, throughput and MFU.

Only process 0 writes files (``MetricsWriter(enabled=jax.process_index() == 0)`` by default);
every other process gets a writer whose methods do nothing, so the loop calls it unconditionally.

The JSONL file (``<workdir>/metrics.jsonl``)
--------------------------------------------
One JSON object per logged step, flushed as it is written::

    {"step": 100, "time": 1718000000.5, "loss": 2.31, "grad_norm": 0.8, "learning_rate": 3e-4}

``time`` is the Unix wall-clock time of the write. Finite numbers are JSON numbers (Python ints
stay ints, every other number becomes a float); NaN and infinities, which strict JSON cannot hold,
are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"`` so a diverged run still says *how*
it diverged (``float(s)`` turns them back into floats, and ``read_metrics`` does so).

Several writers may append to one file over a run's life (a crash and a resume, or a rerun in
the same workdir): the file is opened in append mode and never truncated. A writer opened with
``start_step=s`` first appends a marker line ``{"restart_after_step": s, "time": ...}``: the run
continues from the state after step ``s``, so lines logged earlier for steps ``> s`` belong to
an abandoned attempt. ``read_metrics`` applies these rules and returns the surviving history:

1. a ``restart_after_step`` marker voids every earlier entry whose step is greater than ``s``;
2. entries for the same step are merged, later values winning (so training metrics and an
   evaluation written separately for one step end up in one record, and a re-logged step keeps
   its newest values);
3. records come back sorted by step.

A reader of its own that ignores the markers and keeps the last value per step and key gets the
same answer except for abandoned steps that the resumed run never reached again.

A line cut short by a crash is left where it is; the next writer starts on a fresh line and
``read_metrics`` skips lines that do not parse.

MFU
---
Model FLOPs utilisation = achieved model FLOP/s / peak FLOP/s, with model FLOPs from
``model_flops_per_token`` (the PaLM appendix B / nanoGPT convention) and the peak from a table
of dense (no 2:4 sparsity) tensor-core rates per accelerator (``device_peak_flops``). The peak
passed to ``mfu`` must cover the same devices as the tokens/s: for a global tokens/s use
``total_peak_flops(jax.devices(), dtype)``.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLOT_NAME = "metrics.png"
RESTART_KEY = "restart_after_step"
_RESERVED = ("step", "time", RESTART_KEY)

# Keys the plot looks for, in order of preference.
LOSS_KEYS = ("loss", "train_loss")
EVAL_LOSS_KEYS = ("eval_loss",)
LR_KEYS = ("learning_rate", "lr")
GRAD_NORM_KEYS = ("grad_norm",)
THROUGHPUT_KEYS = ("tokens_per_second", "examples_per_second")


# ---------------------------------------------------------------------------------------------
# JSONL + TensorBoard


def _encode(name: str, value: Any) -> int | float | str:
    """A metric value as JSON: ints stay ints, other numbers become floats, non-finite strings."""
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, int | np.integer):
        return int(value)
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"metric {name!r} must be a number (or a scalar array), got {value!r}"
        ) from err
    if math.isfinite(number):
        return number
    return "nan" if math.isnan(number) else ("inf" if number > 0 else "-inf")


def _decode(value: Any) -> Any:
    """Inverse of ``_encode`` for the non-finite strings; other values pass through."""
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return value


def _summary_writer_class() -> type:
    """tensorboardX's ``SummaryWriter``, imported without loading PyTorch.

    Where torch is installed, tensorboardX's import also imports torch (2-3 s of every trainer
    process's start-up) for nothing but the annotations of methods taking torch tensors, which
    this module never passes. While tensorboardX loads, a ``None`` entry in ``sys.modules``
    makes its ``import torch`` fail as if torch were absent; the entry is removed afterwards,
    so a later ``import torch`` works as usual. A process that has imported torch already
    keeps it.
    """
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None
        try:
            import tensorboardX  # noqa: F401
        finally:
            if "torch" in sys.modules and sys.modules["torch"] is None:
                del sys.modules["torch"]
    from tensorboardX import SummaryWriter

    return SummaryWriter


class MetricsWriter:
    """Appends one JSON line per ``write`` to ``<workdir>/metrics.jsonl`` and the same scalars to
    TensorBoard event files under ``<workdir>/tensorboard/`` (tensorboardX).

    Args:
      workdir: the run directory (created if missing).
      start_step: when given, the step the run continues after (0 for a fresh start); a
        ``restart_after_step`` marker is appended so ``read_metrics`` can void lines of an
        abandoned attempt (see the module docstring). ``None`` writes no marker.
      enabled: whether this process writes anything; defaults to ``jax.process_index() == 0``.
        A disabled writer creates no directory or file and ignores ``write``/``close``.
    """

    def __init__(
        self,
        workdir: str | pathlib.Path,
        *,
        start_step: int | None = None,
        enabled: bool | None = None,
    ):
        if enabled is None:
            enabled = jax.process_index() == 0
        if start_step is not None and (
            isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0
        ):
            raise ValueError(f"start_step must be a non-negative int or None, got {start_step!r}")
        self.enabled = bool(enabled)
        self.workdir = pathlib.Path(workdir)
        self.path = self.workdir / JSONL_NAME
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        needs_newline = (
            self.path.exists() and self.path.stat().st_size > 0 and _ends_unterminated(self.path)
        )
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if needs_newline:  # a line cut short by a crash: keep it, but on its own line
            self._file.write("\n")
        if start_step is not None:
            self.restart(start_step)
        # Imported here so non-primary processes never pay for it.
        self._tb = _summary_writer_class()(logdir=str(self.workdir / TENSORBOARD_DIR))

    def restart(self, step: int) -> None:
        """Marks that the run continues from the state after ``step`` (a resume, or a
        rollback to a checkpoint): entries logged so far for later steps are voided."""
        if self.enabled:
            self._append({RESTART_KEY: int(step), "time": time.time()})

    def _append(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Logs ``metrics`` (name -> number or scalar array) for ``step``."""
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        for name, value in metrics.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"metric names must be non-empty strings, got {name!r}")
            if name in _RESERVED:
                raise ValueError(f"metric name {name!r} is reserved by the metrics file")
            record[name] = _encode(name, value)
        if not self.enabled:
            return
        if self._file is None:
            raise ValueError(f"MetricsWriter for {self.path} is closed")
        self._append(record)
        for name, value in record.items():
            if name not in ("step", "time"):
                self._tb.add_scalar(name, float(value), global_step=int(step))
        self._tb.flush()

    def close(self) -> None:
        """Flushes and closes both outputs; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _ends_unterminated(path: pathlib.Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) != b"\n"


def read_metrics(workdir_or_file: str | pathlib.Path) -> list[dict[str, Any]]:
    """The surviving per-step history of a metrics file, sorted by step (rules: module docstring).

    Accepts the workdir or the JSONL path itself; non-finite strings come back as floats.
    Raises FileNotFoundError naming the path when there is no metrics file.
    """
    path = pathlib.Path(workdir_or_file)
    if path.is_dir():
        path = path / JSONL_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    by_step: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if not isinstance(record, dict):
                continue
            if RESTART_KEY in record:
                restart = record[RESTART_KEY]
                by_step = {s: r for s, r in by_step.items() if s <= restart}
                continue
            step = record.get("step")
            if not isinstance(step, int):
                continue
            merged = by_step.setdefault(step, {})
            merged.update({k: _decode(v) for k, v in record.items()})
    return [by_step[s] for s in sorted(by_step)]


# ---------------------------------------------------------------------------------------------
# Plot


def _series(records: list[dict[str, Any]], keys: tuple[str, ...]) -> tuple[str, list, list]:
    """(key used, steps, values) for the first of ``keys`` present; finite values only."""
    for key in keys:
        pairs = [
            (r["step"], float(r[key]))
            for r in records
            if isinstance(r.get(key), int | float) and math.isfinite(r[key])
        ]
        if pairs:
            steps, values = zip(*pairs, strict=True)
            return key, list(steps), list(values)
    return keys[0], [], []


def save_figure(fig: Any, path: str | pathlib.Path) -> pathlib.Path:
    """Lays out, writes (PNG) and closes a matplotlib figure; its path."""
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(workdir: str | pathlib.Path) -> pathlib.Path:
    """Draws ``<workdir>/metrics.png`` from ``metrics.jsonl`` and returns its path.

    Four panels against step: train and eval loss; learning rate; gradient norm (log scale);
    tokens/s (or examples/s). A panel whose metric never appears (or is never finite) says
    "no ... logged" instead of a curve.
    Raises FileNotFoundError when the workdir has no metrics file.
    """
    workdir = pathlib.Path(workdir)
    records = read_metrics(workdir)

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    (loss_ax, lr_ax), (gn_ax, tput_ax) = axes

    def no_data(ax, what: str) -> None:
        ax.text(0.5, 0.5, f"no {what} logged", ha="center", va="center", transform=ax.transAxes)

    _, steps, values = _series(records, LOSS_KEYS)
    _, eval_steps, eval_values = _series(records, EVAL_LOSS_KEYS)
    if steps:
        loss_ax.plot(steps, values, label="train loss", color="tab:blue")
    if eval_steps:
        loss_ax.plot(eval_steps, eval_values, "o-", label="eval loss", color="tab:orange", ms=3)
    if steps or eval_steps:
        loss_ax.legend()
    else:
        no_data(loss_ax, "loss")
    loss_ax.set_ylabel("loss")

    _, steps, values = _series(records, LR_KEYS)
    if steps:
        lr_ax.plot(steps, values, color="tab:green")
    else:
        no_data(lr_ax, "learning rate")
    lr_ax.set_ylabel("learning rate")

    _, steps, values = _series(records, GRAD_NORM_KEYS)
    positive = [(s, v) for s, v in zip(steps, values, strict=True) if v > 0]
    if positive:
        gn_ax.plot(*zip(*positive, strict=True), color="tab:red")
        gn_ax.set_yscale("log")
    else:
        no_data(gn_ax, "gradient norm")
    gn_ax.set_ylabel("gradient norm")

    tput_key, steps, values = _series(records, THROUGHPUT_KEYS)
    if steps:
        tput_ax.plot(steps, values, color="tab:purple")
    else:
        no_data(tput_ax, "throughput")
    tput_ax.set_ylabel(tput_key.replace("_per_second", " / s"))

    for ax in axes[1]:
        ax.set_xlabel("step")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    fig.suptitle(str(workdir.name or workdir))
    return save_figure(fig, workdir / PLOT_NAME)


# ---------------------------------------------------------------------------------------------
# FLOPs, peaks, MFU


def model_flops_per_token(
    n_params: int, n_layers: int, d_model: int, seq_len: int, *, causal_half: bool = False
) -> float:
    """Training FLOPs (forward + backward) per token of a decoder: ``6 N + 12 L d T``.

    Convention (PaLM, Chowdhery et al. 2022, appendix B; nanoGPT's ``estimate_mfu``):

    * ``6 N``: a weight used in one multiply-add per token costs 2 FLOPs forward and 4 backward.
      ``N`` is the number of parameters that take part in matrix multiplies: leave out the
      position embeddings and an input token embedding that is a lookup (a gather does no
      FLOPs); keep the output projection (counted whether or not it is tied to the input
      embedding). Biases and norm scales are included by convention (they are negligible).
    * ``12 L d T``: attention scores ``Q K^T`` and the weighted sum ``A V`` are each
      ``2 T d`` FLOPs per token per layer forward, times 3 for forward + backward.
      ``d = n_heads * head_dim = d_model``; ``T`` the sequence length.

    Causal attention is counted in full by default (PaLM/nanoGPT; it is also what a dense
    masked kernel executes). ``causal_half=True`` counts half of the attention term (the
    unmasked triangle), the MaxText/Megatron "useful FLOPs" choice. Rematerialisation is never
    counted: these are *model* FLOPs, not hardware FLOPs.
    """
    for name, value in (
        ("n_params", n_params),
        ("n_layers", n_layers),
        ("d_model", d_model),
        ("seq_len", seq_len),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    attention = 12.0 * n_layers * d_model * seq_len
    if causal_half:
        attention /= 2
    return 6.0 * n_params + attention


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """``tokens_per_second * flops_per_token / peak_flops``, or None when the peak is unknown.

    ``peak_flops`` must be the peak of all devices that produced ``tokens_per_second``.
    """
    if peak_flops is None:
        return None
    if not peak_flops > 0:
        raise ValueError(f"peak_flops must be > 0 or None, got {peak_flops!r}")
    return float(tokens_per_second) * float(flops_per_token) / float(peak_flops)


# Dense (no 2:4 sparsity) peak FLOP/s per JAX device, by compute dtype. ``float32`` is the rate
# float32 matmuls get at JAX's default precision: TF32 tensor cores on NVIDIA Ampere and later,
# one bfloat16 pass on TPU (https://docs.jax.dev/en/latest/201/precision.html). Sources: NVIDIA
# data sheets (A100, H100 SXM/PCIe/NVL, H200, L4, L40S, V100, HGX B200 at 1000 W) and Google
# Cloud TPU system-architecture pages (per chip; v4, v5e, v5p, v6e expose one JAX device per
# chip). A missing dtype means no fast path (V100 has no bfloat16 units; TPUs no float16).
# Patterns are tried in order against ``device_kind.lower()``; the first match wins.
_NVIDIA_HOPPER_SXM = {"bfloat16": 989e12, "float16": 989e12, "float32": 494.5e12}
_NVIDIA_HOPPER_NVL = {"bfloat16": 835.5e12, "float16": 835.5e12, "float32": 417.5e12}
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    # NVIDIA device_kind examples: "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe",
    # "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA GH200 480GB", "NVIDIA A100-SXM4-80GB".
    (r"h100.*pcie", {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12}),
    (r"h[12]00.*nvl", _NVIDIA_HOPPER_NVL),
    (r"h100|h200|h800", _NVIDIA_HOPPER_SXM),
    (r"a100|a800", {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}),
    (r"(?<!g)b200", {"bfloat16": 2250e12, "float16": 2250e12, "float32": 1100e12}),
    (r"l40s", {"bfloat16": 362e12, "float16": 362e12, "float32": 183e12}),
    (r"\bl4\b", {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12}),
    (r"v100.*pcie", {"float16": 112e12, "float32": 14e12}),
    (r"v100", {"float16": 125e12, "float32": 15.7e12}),
    # TPU device_kind: "TPU v4", "TPU v5 lite" (v5e), "TPU v5" / "TPU v5p", "TPU v6 lite" (v6e).
    (r"^tpu v4$", {"bfloat16": 275e12, "float32": 275e12}),
    (r"^tpu v5 ?(lite|e)$", {"bfloat16": 197e12, "float32": 197e12}),
    (r"^tpu v5p?$", {"bfloat16": 459e12, "float32": 459e12}),
    (r"^tpu v6 ?(lite|e)$", {"bfloat16": 918e12, "float32": 918e12}),
)


def _dtype_name(dtype: Any) -> str:
    try:
        return np.dtype(dtype).name
    except TypeError as err:
        raise ValueError(f"dtype must be a NumPy/JAX dtype or its name, got {dtype!r}") from err


def device_peak_flops(device: jax.Device | str, dtype: Any) -> float | None:
    """Dense peak FLOP/s of one device for matmuls in ``dtype``; None when unknown (CPUs,
    accelerators not in ``PEAK_FLOPS``, dtypes without a fast path).

    ``device`` is a ``jax.Device`` (matched on ``device.device_kind``) or a device_kind string.
    """
    kind = device if isinstance(device, str) else getattr(device, "device_kind", None)
    if not isinstance(kind, str):
        raise ValueError(f"device must be a jax.Device or a device_kind string, got {device!r}")
    if getattr(device, "platform", None) == "cpu":
        return None
    name = _dtype_name(dtype)
    kind = kind.strip().lower()
    for pattern, peaks in PEAK_FLOPS:
        if re.search(pattern, kind):
            return peaks.get(name)
    return None


def total_peak_flops(devices: Iterable[jax.Device | str], dtype: Any) -> float | None:
    """Sum of ``device_peak_flops`` over ``devices``; None if any device's peak is unknown."""
    total = 0.0
    count = 0
    for device in devices:
        peak = device_peak_flops(device, dtype)
        if peak is None:
            return None
        total += peak
        count += 1
    return total if count else None


# ---------------------------------------------------------------------------------------------
# Gradient-norm spikes


class GradNormMonitor:
    """Warns when a gradient norm exceeds ``factor`` x the running median of recent norms.

    The median is over the last ``window`` finite norms seen *before* the current one (the
    current norm joins the window after the check, so a lasting change of scale stops warning
    once it dominates the window). No warnings until ``min_samples`` finite norms have been
    seen: early training norms move too much for a median to mean anything. Non-finite norms
    (the step will be skipped and counted elsewhere) are ignored: no warning, not recorded.
    """

    def __init__(self, factor: float = 5.0, window: int = 100, min_samples: int = 10):
        if not (isinstance(factor, int | float) and not isinstance(factor, bool) and factor > 1):
            raise ValueError(f"factor must be a number > 1, got {factor!r}")
        for name, value in (("window", window), ("min_samples", min_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if min_samples > window:
            raise ValueError(f"min_samples ({min_samples}) must be <= window ({window})")
        self.factor = float(factor)
        self.window = window
        self.min_samples = min_samples
        self._norms: deque[float] = deque(maxlen=window)

    def check(self, step: int, grad_norm: float) -> str | None:
        """Records ``grad_norm`` and returns a warning message if it is a spike, else None."""
        norm = float(grad_norm)
        if not math.isfinite(norm):
            return None
        message = None
        if len(self._norms) >= self.min_samples:
            median = statistics.median(self._norms)
            if norm > self.factor * median:
                message = (
                    f"step {step}: gradient norm {norm:.4g} is {norm / median:.1f}x the running "
                    f"median {median:.4g} of the last {len(self._norms)} logged norms "
                    f"(warning threshold {self.factor:g}x)"
                )
        self._norms.append(norm)
        return message


# ---------------------------------------------------------------------------------------------
# Throughput


class Throughput:
    """Tokens/s and seconds/step from wall-clock time between measurements.

    Call ``tick(tokens)`` after each step and ``measure()`` when logging: it returns the averages
    over the steps since the previous ``measure``/``reset`` (or construction) and starts a new
    window. JAX dispatches asynchronously, so time a window that ends with a host transfer (the
    logged metrics' ``device_get``); call ``reset()`` after the first step to leave compilation
    out. ``clock`` is injectable for tests.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self.reset()

    def reset(self) -> None:
        self._start = self._clock()
        self._tokens = 0
        self._steps = 0

    def tick(self, tokens: int, steps: int = 1) -> None:
        if tokens < 0 or steps < 0:
            raise ValueError(f"tokens and steps must be >= 0, got tokens={tokens}, steps={steps}")
        self._tokens += tokens
        self._steps += steps

    def measure(self) -> dict[str, float]:
        """``{"tokens_per_second", "step_time"}`` over the window; raises if it has no steps."""
        now = self._clock()
        elapsed = now - self._start
        if self._steps == 0:
            raise ValueError("Throughput.measure() called with no tick() since the last window")
        result = {
            "tokens_per_second": self._tokens / elapsed if elapsed > 0 else math.inf,
            "step_time": elapsed / self._steps,
        }
        self._start, self._tokens, self._steps = now, 0, 0
        return result
