"""Data for the trainer: token corpora, a procedural image set, and step-indexed batches.

Sources (``data.source``)
-------------------------
``embedded``
    A byte-level corpus built at run time from the Python standard library's
    own source files, which every Python installation carries, so nothing is
    ever downloaded. The files are the top-level ``*.py`` files of the stdlib
    folder in sorted (code point) order, minus the build-specific
    ``_sysconfigdata*`` module, concatenated and cut at ``data.max_bytes``.
    The vocabulary is the 256 byte values. The bytes depend on the Python
    version; :attr:`TokenSource.fingerprint` tells two corpora apart.
``text``
    The bytes of the file ``data.path`` (vocabulary 256), memory-mapped.
``tokens``
    A 1-D integer ``.npy`` array at ``data.path`` (for example GPT-2 token ids
    stored as ``uint16``), memory-mapped; the vocabulary is ``max + 1`` and the
    caller checks it against ``model.vocab_size`` with :func:`check_vocab`.
``shapes``
    A procedurally generated image classification set (:class:`ShapesDataset`):
    16x16 grayscale circles, squares, triangles and crosses (optionally rings
    and diamonds) at random positions, sizes and contrasts with pixel noise,
    from a fixed seed. Load it with :func:`load_images`.

Every token source is split by position: the last ``data.eval_fraction`` of
the tokens is the evaluation split, so no training window overlaps it.

Why a step-indexed loader rather than grain
-------------------------------------------
The batch of step ``s`` is a pure function of ``(seed, s)``: its rows are
drawn from a fresh PCG64 bit generator seeded with ``(seed, stream, s,
micro_batch)`` through a ``SeedSequence``, so no generator state carries over
from one step to the next. Every process computes the same list of global rows and
gathers only its own contiguous slice ``[p*B/P, (p+1)*B/P)``, reading only
those windows from a memory-mapped file, so a host loads only its shard of the
batch. The loader's position is therefore just the step counter that the
checkpoint already holds: a resumed run, on any number of hosts and any mesh,
sees exactly the batches the uninterrupted run would have seen. grain
(``MapDataset ... [process_index::process_count]``) would also be
deterministic, but its iterator state is per process and tied to the process
count (checked with grain 0.2.18, see the project's JAX notes), so a position
saved by 4 hosts does not restore onto 2; and it would be one more
dependency for what is a gather of random windows. Training rows are
sampled with replacement (every start position equally likely, as nanoGPT
does); image rows go through one permutation per epoch, also a pure function
of ``(seed, epoch)``.

The random numbers come only from ``SeedSequence`` and the raw 64-bit output of
the ``PCG64`` bit generator (``random_raw``), both fixed, named algorithms;
``Generator`` methods are avoided because NumPy's compatibility policy lets
their streams change between versions and builds. Integers are raw words
modulo ``n`` (bias below ``n / 2**64``), floats their top 53 bits.

Evaluation batches are a fixed set independent of the seed and of the step
(:class:`EvalBatches`, :class:`ImageEvalBatches`), so eval losses are
comparable across evaluations and across runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pathlib
import sysconfig
from collections.abc import Iterator, Sequence

import numpy as np

from train.config import ConfigError, DataConfig

VOCAB_SIZE = 256  # bytes
SOURCES = ("embedded", "text", "tokens", "shapes")
TOKEN_SOURCES = ("embedded", "text", "tokens")

# Stream ids: keep the random numbers of different uses independent.
_STREAM_TOKENS = 1
_STREAM_IMAGES = 2
_STREAM_SHAPES = 3

_EXCLUDED_PREFIXES = ("_sysconfigdata",)  # generated at build time: differs between machines


class DataFileError(ConfigError, FileNotFoundError):
    """A data file that is missing or unreadable; the message names the key and the path."""


# --------------------------------------------------------------------------------------
# Deterministic random numbers from raw bit-generator output.


def _bits(seed: int, *words: int, size: int) -> np.ndarray:
    """``size`` uint64 words, a pure function of ``(seed, *words)``."""
    entropy = [int(seed) % 2**64, *(int(w) for w in words)]
    if any(w < 0 for w in entropy):
        raise ValueError(f"random stream words must be non-negative, got {words}")
    return np.random.PCG64(np.random.SeedSequence(entropy)).random_raw(size)


def _uniform(seed: int, *words: int, size: int) -> np.ndarray:
    """Floats in ``[0, 1)`` with 53 random bits each."""
    return (_bits(seed, *words, size=size) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _integers(seed: int, *words: int, size: int, high: int) -> np.ndarray:
    """Integers in ``[0, high)`` (modulo of 64 random bits: bias below ``high / 2**64``)."""
    return (_bits(seed, *words, size=size) % np.uint64(high)).astype(np.int64)


def _permutation(seed: int, *words: int, n: int) -> np.ndarray:
    return np.argsort(_bits(seed, *words, size=n), kind="stable")


def fingerprint(array: np.ndarray, full_limit: int = 16 * 2**20) -> str:
    """A short hash of an array: all of it up to ``full_limit`` bytes, else 256 sampled chunks.

    Stored in checkpoint metadata to notice that a resumed run reads different data.
    """
    flat = np.asarray(array).reshape(-1)
    digest = hashlib.sha256(f"{flat.dtype.str}:{flat.size}:".encode())
    if flat.nbytes <= full_limit:
        digest.update(np.ascontiguousarray(flat).tobytes())
    else:
        chunk = max(1, 65536 // flat.itemsize)
        for start in np.linspace(0, flat.size - chunk, 256).astype(np.int64):
            digest.update(np.ascontiguousarray(flat[start : start + chunk]).tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Token sources.


@dataclasses.dataclass(frozen=True, eq=False)
class TokenSource:
    """A token stream split by position into ``train`` and ``eval`` (1-D integer arrays)."""

    train: np.ndarray
    eval: np.ndarray
    vocab_size: int
    origin: str  # for messages, e.g. "the embedded corpus" or "data.path=/data/x.npy"
    fingerprint: str


def _stdlib_files() -> list[pathlib.Path]:
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(stdlib.glob("*.py")) if not p.name.startswith(_EXCLUDED_PREFIXES)]
    if not files:
        raise ConfigError(
            f"data.source='embedded': no Python source files under {stdlib} (a stdlib without "
            "sources, e.g. zipped); set data.source=text and data.path to a text file"
        )
    return files


def embedded_corpus(max_bytes: int = 2_000_000) -> np.ndarray:
    """The first ``max_bytes`` bytes of the stdlib's top-level ``*.py`` files, as uint8."""
    if max_bytes < 1:
        raise ConfigError(f"data.max_bytes must be >= 1, got {max_bytes}")
    chunks, total = [], 0
    for path in _stdlib_files():
        chunks.append(path.read_bytes())
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    return np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8)


def train_eval_split(tokens: np.ndarray, eval_fraction: float = 0.1) -> tuple[np.ndarray, ...]:
    """``(train, eval)``: the last ``eval_fraction`` of ``tokens`` is held out (views, no copy)."""
    if not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction must be in (0, 1), got {eval_fraction}")
    cut = int(len(tokens) * (1.0 - eval_fraction))
    return tokens[:cut], tokens[cut:]


def _data_file(cfg: DataConfig) -> pathlib.Path:
    if cfg.path is None:
        raise ConfigError(f"data.path must be set when data.source={cfg.source!r}")
    path = pathlib.Path(os.path.expanduser(cfg.path))
    if not path.exists():
        raise DataFileError(
            f"data.path: file not found: {cfg.path} (resolved to {path.resolve()}); "
            f"data.source={cfg.source!r} needs an existing file"
        )
    if not path.is_file():
        raise DataFileError(f"data.path: {cfg.path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise DataFileError(f"data.path: {cfg.path} is not readable (permission denied)")
    if path.stat().st_size == 0:
        raise ConfigError(f"data.path: {cfg.path} is empty")
    return path


def _load_npy_tokens(path: pathlib.Path, shown: str) -> tuple[np.ndarray, int]:
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ConfigError(f"data.path: {shown} is not a readable .npy array ({err})") from None
    if not isinstance(tokens, np.ndarray):
        raise ConfigError(f"data.path: {shown} holds an archive, not one .npy array")
    if tokens.ndim != 1:
        raise ConfigError(f"data.path: {shown} has shape {tokens.shape}; expected 1-D token ids")
    if tokens.dtype == np.bool_ or not np.issubdtype(tokens.dtype, np.integer):
        raise ConfigError(
            f"data.path: {shown} has dtype {tokens.dtype}; token ids must be integers"
        )
    if tokens.size == 0:
        raise ConfigError(f"data.path: {shown} holds no tokens")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0:
        first = int(np.argmax(np.asarray(tokens) < 0))
        raise ConfigError(
            f"data.path: {shown} has negative token id {low} (first at index {first}); "
            "token ids must be >= 0"
        )
    if high >= 2**31:
        raise ConfigError(f"data.path: {shown} has token id {high}, beyond int32")
    return tokens, high + 1


def load_tokens(cfg: DataConfig, seq_len: int | None = None) -> TokenSource:
    """The token stream of ``cfg`` split into train/eval (see the module docstring).

    With ``seq_len``, both splits are checked to hold at least one window of
    ``seq_len + 1`` tokens (:class:`Batches` checks it again in any case).
    """
    if cfg.source not in TOKEN_SOURCES:
        hint = " (an image dataset: use load_images)" if cfg.source == "shapes" else ""
        raise ConfigError(
            f"data.source={cfg.source!r} is not a token source{hint}; "
            f"known sources: {', '.join(SOURCES)}"
        )
    if cfg.source == "embedded":
        if cfg.path is not None:
            raise ConfigError(
                f"data.path={cfg.path!r} is set but data.source='embedded' does not read it; "
                "set data.source=text or data.source=tokens to use the file"
            )
        tokens, vocab, origin = embedded_corpus(cfg.max_bytes), VOCAB_SIZE, "the embedded corpus"
    else:
        path = _data_file(cfg)
        origin = f"data.path={cfg.path}"
        if cfg.source == "text":
            tokens, vocab = np.memmap(path, dtype=np.uint8, mode="r"), VOCAB_SIZE
        else:
            tokens, vocab = _load_npy_tokens(path, cfg.path)
    train, eval_ = train_eval_split(tokens, cfg.eval_fraction)
    source = TokenSource(train, eval_, vocab, origin, fingerprint(tokens))
    if seq_len is not None:
        _check_windows(train, seq_len, f"the train split of {origin}")
        _check_windows(eval_, seq_len, f"the eval split of {origin}")
    return source


def check_vocab(source: TokenSource, model_vocab_size: int) -> None:
    """A model vocabulary too small for the data's largest token id -> ConfigError."""
    if source.vocab_size > model_vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_vocab_size} is smaller than the vocabulary of "
            f"{source.origin} ({source.vocab_size}: largest token id {source.vocab_size - 1})"
        )


def check_batch(global_batch: int, data_parallel_size: int) -> None:
    """``data.batch_size`` must be a positive multiple of the data-parallel size."""
    if global_batch < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {global_batch}")
    if global_batch % data_parallel_size:
        lower = global_batch // data_parallel_size * data_parallel_size
        options = [n for n in (lower, lower + data_parallel_size) if n > 0]
        raise ConfigError(
            f"data.batch_size={global_batch} is not divisible by the data-parallel size "
            f"{data_parallel_size} (mesh data x fsdp); use a multiple of it, e.g. "
            + " or ".join(map(str, options))
        )


def _check_windows(tokens: np.ndarray, seq_len: int, where: str) -> None:
    if seq_len < 1:
        raise ConfigError(f"model.seq_len must be >= 1, got {seq_len}")
    if len(tokens) < seq_len + 1:
        raise ConfigError(
            f"{where} has {len(tokens)} tokens, fewer than model.seq_len + 1 = {seq_len + 1} "
            "needed for one window; use more data, a smaller model.seq_len or a different "
            "data.eval_fraction"
        )


def sample_windows(
    tokens: np.ndarray, context: int, batch_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``batch_size`` random windows: inputs ``[B, context]`` and the byte after each.

    Used by the first single-device example; the trainer uses :class:`Batches`.
    """
    starts = rng.integers(0, len(tokens) - context - 1, size=batch_size)
    idx = starts[:, None] + np.arange(context + 1)[None, :]
    windows = tokens[idx].astype(np.int32)
    return windows[:, :-1], windows[:, -1]


# --------------------------------------------------------------------------------------
# Step-indexed loaders.


def rows_of_process(indices: Sequence[tuple[slice, ...]], global_batch: int) -> tuple[int, int]:
    """The contiguous batch rows ``[start, stop)`` covered by a process's device shards.

    ``indices`` is ``sharding.addressable_devices_indices_map(shape).values()``
    (see :func:`sharding_rows`); several devices may hold the same rows (tensor
    parallelism replicates the batch). Raises when the rows are not contiguous.
    """
    covered = set()
    for index in indices:
        rows = index[0] if index else slice(None)
        covered.update(range(*rows.indices(global_batch)))
    if not covered:
        raise ValueError("this process holds no rows of the batch")
    start, stop = min(covered), max(covered) + 1
    if len(covered) != stop - start:
        raise ValueError(
            f"this process's batch rows are not contiguous ({sorted(covered)[:8]}...); "
            "order the mesh's devices by process"
        )
    return start, stop


def sharding_rows(sharding, global_batch: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of a ``[global_batch, ...]`` array this process must supply.

    Pass them as ``rows=`` to a loader, then build the global array with
    ``jax.make_array_from_process_local_data(sharding, local, global_shape)``.
    """
    index_map = sharding.addressable_devices_indices_map((global_batch,))
    return rows_of_process(list(index_map.values()), global_batch)


class _StepIndexed:
    """Common part: the global batch, this process's rows and micro-batching."""

    def __init__(
        self,
        global_batch: int,
        *,
        process_index: int,
        process_count: int,
        micro_batches: int,
        rows: tuple[int, int] | None,
    ):
        if global_batch < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {global_batch}")
        if micro_batches < 1:
            raise ConfigError(f"optimizer.accumulation_steps must be >= 1, got {micro_batches}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(
                f"process_index={process_index} is not in [0, process_count={process_count})"
            )
        if rows is None:
            if global_batch % process_count:
                raise ConfigError(
                    f"data.batch_size={global_batch} is not divisible by the number of "
                    f"processes {process_count}"
                )
            per = global_batch // process_count
            rows = (process_index * per, (process_index + 1) * per)
        start, stop = rows
        if not 0 <= start < stop <= global_batch:
            raise ValueError(f"rows={rows} is not a non-empty range of [0, {global_batch})")
        self.global_batch = global_batch
        self.micro_batches = micro_batches
        self.rows = (int(start), int(stop))

    @property
    def local_batch_size(self) -> int:
        return self.rows[1] - self.rows[0]

    def _indices(self, step: int, micro: int) -> np.ndarray:
        """Global example indices of one micro-batch (all ``global_batch`` rows)."""
        raise NotImplementedError

    def _fetch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def global_indices(self, step: int) -> np.ndarray:
        """The example indices of every row of step ``step``: ``[micro_batches, global_batch]``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return np.stack([self._indices(step, m) for m in range(self.micro_batches)])

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of step ``step``; a leading ``[micro_batches]`` axis if > 1."""
        start, stop = self.rows
        parts = [self._fetch(idx[start:stop]) for idx in self.global_indices(step)]
        if self.micro_batches == 1:
            return parts[0]
        return {key: np.stack([p[key] for p in parts]) for key in parts[0]}


class _Windows:
    """Gathers ``[n, seq_len + 1]`` windows of a token array into inputs/targets."""

    def __init__(self, tokens: np.ndarray, seq_len: int, origin: str):
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        _check_windows(tokens, seq_len, origin)
        self.tokens = tokens
        self.seq_len = seq_len
        self.num_starts = len(tokens) - seq_len  # windows of seq_len + 1 tokens

    def _fetch(self, starts: np.ndarray) -> dict[str, np.ndarray]:
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        windows = np.asarray(self.tokens[idx]).astype(np.int32)
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


class Batches(_Windows, _StepIndexed):
    """Training batches of token windows; the batch of step ``s`` depends on ``(seed, s)`` only.

    ``local_batch(s)`` returns this process's rows ``{'inputs', 'targets'}``,
    int32 ``[B_local, seq_len]`` (``[micro_batches, B_local, seq_len]`` when
    ``micro_batches > 1``), targets being the inputs shifted by one token.
    Rows are window starts drawn uniformly with replacement. This process's
    rows are ``[p*B/P, (p+1)*B/P)``, or ``rows`` when given (see :func:`sharding_rows`).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        global_batch: int,
        seed: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
        micro_batches: int = 1,
        rows: tuple[int, int] | None = None,
        origin: str = "the training tokens",
    ):
        _Windows.__init__(self, tokens, seq_len, origin)
        _StepIndexed.__init__(
            self,
            global_batch,
            process_index=process_index,
            process_count=process_count,
            micro_batches=micro_batches,
            rows=rows,
        )
        self.seed = int(seed)

    def _indices(self, step: int, micro: int) -> np.ndarray:
        return _integers(
            self.seed, _STREAM_TOKENS, step, micro, size=self.global_batch, high=self.num_starts
        )

    def spec(self) -> dict:
        """What defines the batch sequence (JSON); store it with a checkpoint's step."""
        return {
            "loader": "tokens/step-indexed/v1",
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "micro_batches": self.micro_batches,
            "num_tokens": int(len(self.tokens)),
            "fingerprint": fingerprint(self.tokens),
        }


class _FixedBatches(_StepIndexed):
    """A fixed, seed-free list of batches: a sequence of local batches."""

    num_batches: int

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -self.num_batches <= i < self.num_batches:
            raise IndexError(f"batch {i} of {self.num_batches}")
        return self.local_batch(i % self.num_batches)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (self.local_batch(i) for i in range(self.num_batches))


class EvalBatches(_Windows, _FixedBatches):
    """``num_batches`` evaluation batches whose windows start evenly spaced over the split.

    The same windows at every evaluation and for every seed, spread over the
    whole held-out split rather than its first few thousand tokens.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        global_batch: int,
        num_batches: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
        rows: tuple[int, int] | None = None,
        origin: str = "the evaluation tokens",
    ):
        if num_batches < 1:
            raise ConfigError(f"run.eval_batches must be >= 1, got {num_batches}")
        _Windows.__init__(self, tokens, seq_len, origin)
        _StepIndexed.__init__(
            self,
            global_batch,
            process_index=process_index,
            process_count=process_count,
            micro_batches=1,
            rows=rows,
        )
        self.num_batches = num_batches
        total = num_batches * global_batch
        self._starts = (np.arange(total, dtype=np.int64) * (self.num_starts - 1)) // max(
            total - 1, 1
        )

    def _indices(self, step: int, micro: int) -> np.ndarray:
        return self._starts[step * self.global_batch : (step + 1) * self.global_batch]


# --------------------------------------------------------------------------------------
# Images: the procedural "shapes" dataset.

SHAPE_NAMES = ("circle", "square", "triangle", "cross", "ring", "diamond")
# Drawing 12,000 images of S x S pixels holds several float64 [n, S, S] arrays at once:
# about 2-3 GB at S = 64; at S = 1000 the first one alone is 80 GB (a MemoryError).
MAX_IMAGE_SIZE = 64


@dataclasses.dataclass(frozen=True)
class ShapesDataset:
    """Procedurally generated grayscale shapes: a small, download-free classification task.

    Image ``[image_size, image_size, 1]`` float32 in ``[0, 1]``: a filled shape of
    class ``SHAPE_NAMES[label]`` (the first ``num_classes`` of circle, square,
    triangle, cross, ring, diamond) with radius uniform in ``[0.18, 0.42] x
    image_size``, centre uniform where the shape fits, background level in
    ``[0, 0.3)``, shape level in ``[0.6, 1)``, plus Gaussian pixel noise of std
    ``noise``, clipped. Labels are balanced: each class appears
    ``n // num_classes`` or one more times. Deterministic given ``seed`` and the split.
    """

    image_size: int = 16
    num_classes: int = 4
    seed: int = 0
    noise: float = 0.1

    def __post_init__(self):
        if self.image_size < 8:
            raise ConfigError(f"shapes image_size must be >= 8, got {self.image_size}")
        if not 2 <= self.num_classes <= len(SHAPE_NAMES):
            raise ConfigError(
                f"shapes num_classes must be in [2, {len(SHAPE_NAMES)}], got {self.num_classes}"
            )
        if self.noise < 0:
            raise ConfigError(f"shapes noise must be >= 0, got {self.noise}")

    @property
    def class_names(self) -> tuple[str, ...]:
        return SHAPE_NAMES[: self.num_classes]

    def generate(self, num_examples: int, split: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(images [n, H, W, 1] float32, labels [n] int32)``; ``split`` 0 is train, 1 eval."""
        if num_examples < 1:
            raise ConfigError(f"shapes num_examples must be >= 1, got {num_examples}")
        n, size, words = num_examples, self.image_size, (_STREAM_SHAPES, split)
        labels = (np.arange(n) % self.num_classes)[_permutation(self.seed, *words, 0, n=n)]
        u = _uniform(self.seed, *words, 1, size=5 * n).reshape(5, n)
        radius = size * (0.18 + 0.24 * u[0])
        cy = radius + (size - 2 * radius) * u[1]
        cx = radius + (size - 2 * radius) * u[2]
        background, foreground = 0.3 * u[3], 0.6 + 0.4 * u[4]
        centres = np.arange(size) + 0.5
        dy = centres[None, :, None] - cy[:, None, None]
        dx = centres[None, None, :] - cx[:, None, None]
        r = radius[:, None, None]
        masks = {
            "circle": dx**2 + dy**2 <= r**2,
            "square": np.maximum(abs(dx), abs(dy)) <= 0.85 * r,
            "triangle": (abs(dy) <= r) & (abs(dx) <= (dy + r) / 2),
            "cross": ((abs(dx) <= np.maximum(1.0, 0.3 * r)) & (abs(dy) <= r))
            | ((abs(dy) <= np.maximum(1.0, 0.3 * r)) & (abs(dx) <= r)),
            "ring": (dx**2 + dy**2 <= r**2) & (dx**2 + dy**2 >= (0.55 * r) ** 2),
            "diamond": abs(dx) + abs(dy) <= r,
        }
        shape = np.zeros((n, size, size), dtype=bool)
        for label, name in enumerate(self.class_names):
            chosen = labels == label
            shape[chosen] = masks[name][chosen]
        levels = np.where(shape, foreground[:, None, None], background[:, None, None])
        # Box-Muller on raw uniforms: standard normals, stable across NumPy versions.
        u1, u2 = _uniform(self.seed, *words, 2, size=2 * n * size * size).reshape(2, -1)
        normal = np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2 * np.pi * u2)
        images = np.clip(levels + self.noise * normal.reshape(n, size, size), 0.0, 1.0)
        return images[..., None].astype(np.float32), labels.astype(np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSource:
    train_images: np.ndarray  # [n, H, W, C] float32
    train_labels: np.ndarray  # [n] int32
    eval_images: np.ndarray
    eval_labels: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    origin: str
    fingerprint: str


def load_images(
    cfg: DataConfig,
    *,
    num_examples: int = 12_000,
    image_size: int = 16,
    num_classes: int = 4,
    dataset_seed: int = 0,
) -> ImageSource:
    """The ``shapes`` dataset: ``num_examples`` images, the last ``data.eval_fraction`` held out.

    The dataset is fixed by ``dataset_seed`` (not the run's seed), so every run
    trains and evaluates on the same images; the run's seed orders the batches.
    """
    if cfg.source != "shapes":
        raise ConfigError(
            f"data.source={cfg.source!r} is not an image source; the image recipe needs "
            f"data.source='shapes' (known sources: {', '.join(SOURCES)})"
        )
    if cfg.path is not None:
        raise ConfigError(
            f"data.path={cfg.path!r} is set but data.source='shapes' is generated, not read"
        )
    if not 0.0 < cfg.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction must be in (0, 1), got {cfg.eval_fraction}")
    if image_size > MAX_IMAGE_SIZE:
        raise ConfigError(
            f"model.image_size={image_size}: the shapes dataset is generated in memory "
            f"({num_examples} images, float64 while drawn) and allows at most {MAX_IMAGE_SIZE}"
        )
    num_eval = max(1, round(num_examples * cfg.eval_fraction))
    if num_eval >= num_examples:
        raise ConfigError(
            f"shapes num_examples={num_examples} leaves no training images with "
            f"data.eval_fraction={cfg.eval_fraction}"
        )
    dataset = ShapesDataset(image_size=image_size, num_classes=num_classes, seed=dataset_seed)
    train_images, train_labels = dataset.generate(num_examples - num_eval, split=0)
    eval_images, eval_labels = dataset.generate(num_eval, split=1)
    origin = f"the shapes dataset ({num_classes} classes, {image_size}x{image_size})"
    digest = fingerprint(np.concatenate([train_images.reshape(-1), eval_images.reshape(-1)]))
    return ImageSource(
        train_images,
        train_labels,
        eval_images,
        eval_labels,
        num_classes,
        dataset.class_names,
        origin,
        digest,
    )


class _Images:
    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(
                f"{len(images)} images and {len(labels)} labels: need the same, non-zero count"
            )
        self.images, self.labels = images, labels
        self.num_examples = len(images)

    def _fetch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "images": np.asarray(self.images[indices], dtype=np.float32),
            "labels": np.asarray(self.labels[indices], dtype=np.int32),
        }


class ImageBatches(_Images, _StepIndexed):
    """Training batches of images: epochs of a permutation, a pure function of ``(seed, step)``.

    Row ``r`` of micro-batch ``m`` of step ``s`` is position ``k = (s*M + m)*B + r``
    of the stream formed by concatenating one permutation per epoch
    ``k // num_examples``, so every image is seen once per epoch.
    ``local_batch(s)`` -> ``{'images': [B_local, H, W, C] float32, 'labels': [B_local] int32}``.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        global_batch: int,
        seed: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
        micro_batches: int = 1,
        rows: tuple[int, int] | None = None,
    ):
        _Images.__init__(self, images, labels)
        _StepIndexed.__init__(
            self,
            global_batch,
            process_index=process_index,
            process_count=process_count,
            micro_batches=micro_batches,
            rows=rows,
        )
        self.seed = int(seed)
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 4:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = _permutation(self.seed, _STREAM_IMAGES, epoch, n=self.num_examples)
        return self._perms[epoch]

    def _indices(self, step: int, micro: int) -> np.ndarray:
        positions = (step * self.micro_batches + micro) * self.global_batch + np.arange(
            self.global_batch, dtype=np.int64
        )
        epochs, offsets = np.divmod(positions, self.num_examples)
        out = np.empty(self.global_batch, dtype=np.int64)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            out[chosen] = self._permutation(int(epoch))[offsets[chosen]]
        return out

    def epoch(self, step: int) -> float:
        """Epochs completed before step ``step`` (for logging)."""
        return step * self.micro_batches * self.global_batch / self.num_examples

    def spec(self) -> dict:
        return {
            "loader": "images/step-indexed/v1",
            "seed": self.seed,
            "global_batch": self.global_batch,
            "micro_batches": self.micro_batches,
            "num_examples": self.num_examples,
            "fingerprint": fingerprint(self.images),
        }


class ImageEvalBatches(_Images, _FixedBatches):
    """The evaluation images in order, ``global_batch`` at a time.

    ``num_batches`` defaults to ``ceil(n / global_batch)``: every image at least
    once, the last batch wrapping round to the first images to stay full size.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        global_batch: int,
        num_batches: int | None = None,
        *,
        process_index: int = 0,
        process_count: int = 1,
        rows: tuple[int, int] | None = None,
    ):
        _Images.__init__(self, images, labels)
        _StepIndexed.__init__(
            self,
            global_batch,
            process_index=process_index,
            process_count=process_count,
            micro_batches=1,
            rows=rows,
        )
        if num_batches is None:
            num_batches = math.ceil(self.num_examples / global_batch)
        if num_batches < 1:
            raise ConfigError(f"run.eval_batches must be >= 1, got {num_batches}")
        self.num_batches = num_batches

    def _indices(self, step: int, micro: int) -> np.ndarray:
        start = step * self.global_batch
        return np.arange(start, start + self.global_batch, dtype=np.int64) % self.num_examples


def spec_changes(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between a checkpoint's loader spec and the current one.

    Empty when a resumed run will see exactly the batches the saved run would have.
    """
    keys = sorted(set(saved) | set(current))
    return [
        f"data {key}: checkpoint has {saved.get(key)!r}, this run has {current.get(key)!r}"
        for key in keys
        if saved.get(key) != current.get(key)
    ]
