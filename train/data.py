"""The embedded byte-level corpus: the Python standard library's own source files.

Every Python installation carries them, so the default recipe needs no download.
The choice of files is deterministic (sorted paths under the stdlib folder), and
the split is by position: the last ``eval_fraction`` of the bytes is held out.
"""

from __future__ import annotations

import pathlib
import sysconfig

import numpy as np

VOCAB_SIZE = 256  # bytes


def embedded_corpus(max_bytes: int = 2_000_000) -> np.ndarray:
    """The first ``max_bytes`` bytes of the stdlib's top-level ``*.py`` files, as uint8."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise FileNotFoundError(f"no Python source files found under {stdlib}")
    return np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8)


def train_eval_split(tokens: np.ndarray, eval_fraction: float = 0.1) -> tuple[np.ndarray, ...]:
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    cut = int(len(tokens) * (1.0 - eval_fraction))
    return tokens[:cut], tokens[cut:]


def sample_windows(
    tokens: np.ndarray, context: int, batch_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``batch_size`` random windows: inputs ``[B, context]`` and the byte after each."""
    starts = rng.integers(0, len(tokens) - context - 1, size=batch_size)
    idx = starts[:, None] + np.arange(context + 1)[None, :]
    windows = tokens[idx].astype(np.int32)
    return windows[:, :-1], windows[:, -1]
