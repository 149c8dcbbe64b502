"""Checkpoints with orbax-checkpoint: asynchronous saves, retention, checked resume, resharding.

One checkpoint is one directory ``<directory>/<step>/`` written by an orbax
``CheckpointManager`` with two items:

``state/``
    the training state, any pytree of arrays (parameters, optimizer state, loss
    scale, step counter, RNG key data, ...), written by orbax's PyTree handler
    (on one process without replica-parallel slicing: ``_state_save_handler``);
``meta/``
    a small JSON record ``{"format", "step", "eval_loss", "meta"}`` where
    ``meta`` is the caller's dict (data position, config, metrics).

Random keys are stored as their raw data: ``rng_to_data(key)`` (that is
``jax.random.key_data``, a ``uint32`` array) goes into the state and
``rng_from_data(data)`` (``jax.random.wrap_key_data``) turns it back into a
key after a restore. Typed key arrays are refused at save time with a message
saying so.

Completeness and integrity
--------------------------
orbax 0.12.8 writes a save into ``<step>.orbax-checkpoint-tmp`` and, once every
item is on disk, writes ``commit_success.txt`` into it and renames it to
``<step>``; the rename is atomic, so a kill during an asynchronous write leaves
only the tmp directory and the previous checkpoints are untouched. orbax itself
treats any directory named by a number as complete and does not check array
data: a flipped byte in a data file restores silently to wrong values. So this
module adds its own checks. A step is *complete* when its directory has
``commit_success.txt`` and readable ``state`` metadata and ``meta`` record. After
a save finishes, the primary process writes ``checksums.json`` into the step
directory (size and SHA-256 of every file, written to a temporary name and
renamed); a checkpoint with that file is verified against it before it is
used. One that lacks it (a kill between the commit and the checksums) is used
unverified, still guarded by orbax's own decoding errors. A step directory that
reaches outside itself through a symbolic link (the step directory, an item
directory or a file linking elsewhere) is unusable too: it is refused before
anything in it is read, since the reads would follow the link and the checksums
would vouch for what it points to. The checkpoint root may itself be a link.

When the newest checkpoint is incomplete, fails verification or cannot be
decoded, it is reported (a ``logging`` warning naming its path, also kept in
``Checkpointer.problems``) and the previous one is used. Nothing is deleted
because of it. If a later save needs the step number of a checkpoint found
corrupt in this session, the corrupt directory is renamed to
``<step>.corrupt`` (``.corrupt-1``, ... if taken) rather than removed. A tmp
directory of an interrupted save is not a checkpoint: orbax replaces it when
the same step is saved again.

A checkpoint whose tree, shapes or dtypes differ from the restore target
(another model width, another optimizer) is *incompatible*: that is a
configuration problem, so it raises ``IncompatibleCheckpointError`` naming the
path and the first differences instead of falling back to older steps. Restore
reads only; it never writes, moves or deletes anything.

Retention: after each save finishes, the newest ``keep`` complete checkpoints
are kept, plus (``keep_best``) the one with the lowest finite ``eval_loss``;
older complete ones are deleted through orbax (``CheckpointManager.delete``,
which coordinates the processes). Steps found incomplete or corrupt are never
deleted.

Resharding: the restore target is a pytree of ``jax.ShapeDtypeStruct`` (or
arrays) that each carry a sharding, for any mesh; orbax reads every shard for
its new place, so a checkpoint saved on one mesh restores onto another mesh
shape or a single device. A target leaf without a sharding is an error, since
orbax would fall back to the sharding recorded at save time.

The flat layout (``optimizer.flat_layout``, :mod:`optim_jax.flat`): a state holding
``FlatParams`` is saved in its per-leaf form (``optim_jax.flat.unflatten``) and
packed again after a restore onto a target that holds ``FlatParams``, so a
checkpoint does not depend on the layout: runs with and without it, and on other
meshes (whose layouts differ), restore each other's checkpoints. The price is one
device copy of the parameters and optimizer state per save (the unpacked form
orbax writes from) and per restore.

Call these methods on every process (orbax synchronises them) and outside a
global ``jax.set_mesh`` (orbax has known problems under one).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import logging
import math
import os
import pathlib
import re
import sys
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

import optim_jax
from train.config import CheckpointConfig, ConfigError

log = logging.getLogger(__name__)

FORMAT = "optim_jax.train.checkpoint/1"
CHECKSUMS = "checksums.json"
COMMIT_FILE = "commit_success.txt"  # written by orbax just before the final rename
TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax's suffix for a save in progress
STATE, META = "state", "meta"
# Not checksummed: orbax's step metadata file is informational (restore does not need
# it) and orbax may rewrite it.
_UNCHECKED = {CHECKSUMS, "_CHECKPOINT_METADATA"}
_STEP_NAME = re.compile(r"\d+")
RESUME_MODES = ("auto", "never", "require")


class CheckpointError(ValueError):
    """A checkpoint cannot be used or written; the message names its path."""


class IncompatibleCheckpointError(CheckpointError):
    """The stored state does not match the restore target (structure, shape or dtype)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint is incomplete, fails its checksums, or cannot be decoded."""


class NoCheckpointError(CheckpointError, FileNotFoundError):
    """No usable checkpoint where one was required."""


def rng_to_data(key: jax.Array) -> jax.Array:
    """The ``uint32`` data of a JAX random key (typed or raw), the form checkpoints store."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    if key.dtype != np.uint32:
        raise ValueError(f"expected a JAX random key or its uint32 data, got dtype {key.dtype}")
    return key


def rng_from_data(data: jax.Array, impl: str | None = None) -> jax.Array:
    """A typed random key from ``rng_to_data`` output (``impl`` as in ``jax.random.key``)."""
    return jax.random.wrap_key_data(data, impl=impl)


def abstract_state(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` (with sharding) for every array leaf: a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _flat(tree: Any) -> dict[str, Any]:
    """``{"a/b/0": leaf}``: key paths normalised so that a saved tree and a live one agree.

    orbax stores a NamedTuple's fields as dict keys and tuples as lists; joining the
    names of dict keys, attributes and indices makes both spellings identical.
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path) or "<root>": leaf for path, leaf in leaves}


def _describe(shape: Any, dtype: Any) -> str:
    return f"{np.dtype(dtype).name}{list(shape)}"


def _file_digest(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _checksums(step_dir: pathlib.Path) -> dict[str, list]:
    files = {}
    for root, dirs, names in os.walk(step_dir):
        dirs.sort()
        for name in sorted(names):
            path = pathlib.Path(root, name)
            rel = path.relative_to(step_dir).as_posix()
            if rel in _UNCHECKED or name.startswith(f".{CHECKSUMS}"):
                continue
            files[rel] = [path.stat().st_size, _file_digest(path)]
    return files


class Checkpointer:
    """Asynchronous orbax checkpoints of a training state in ``directory``.

    ``save`` returns once the arrays are copied off the devices (the caller may
    then donate or overwrite them) and writes in the background; the next
    ``save``, ``wait`` or ``close`` waits for it. ``cfg.every`` sets the cadence
    (``save`` without ``force`` is a no-op off it), ``cfg.keep`` / ``cfg.keep_best``
    the retention, ``cfg.resume`` what ``resume`` does. ``is_primary`` (default:
    process 0) is the process that writes checksum files and renames corrupt
    checkpoints aside.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        cfg: CheckpointConfig,
        *,
        is_primary: bool | None = None,
    ):
        if not (isinstance(cfg.every, int) and cfg.every >= 0):
            raise ConfigError(f"checkpoint.every must be an integer >= 0, got {cfg.every!r}")
        if not (isinstance(cfg.keep, int) and cfg.keep >= 1):
            raise ConfigError(f"checkpoint.keep must be an integer >= 1, got {cfg.keep!r}")
        if cfg.resume not in RESUME_MODES:
            raise ConfigError(
                f"checkpoint.resume must be one of {', '.join(RESUME_MODES)}, got {cfg.resume!r}"
            )
        self.cfg = cfg
        self.directory = pathlib.Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {self.directory} is not a directory")
        self.is_primary = jax.process_index() == 0 if is_primary is None else bool(is_primary)
        self.problems: list[tuple[str, str]] = []  # (path, reason), each reported once
        self._bad: set[int] = set()  # steps found unusable in this session: never deleted
        self._verified: set[int] = set()
        self._records: dict[int, dict] = {}  # meta record of complete steps
        self._saved: set[int] = set()  # steps written by this session
        self._pending: int | None = None  # saved, not yet known to be finished
        self._checksum_thread: threading.Thread | None = None
        self._barriers = 0
        handlers = {STATE: _state_save_handler(), META: ocp.JsonCheckpointHandler()}
        # Reads go through handlers of their own: the manager's restore ends in a barrier
        # across processes, and a process that fails a read must not leave the others in it.
        self._state_handler = ocp.StandardCheckpointHandler()
        self._json_handler = ocp.JsonCheckpointHandler()
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=True,
            create=True,
            max_to_keep=None,  # retention is ours (see _prune): orbax keeps everything
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_handlers=handlers, options=options
        )

    # ----------------------------------------------------------------- queries

    def step_path(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def should_save(self, step: int) -> bool:
        """Whether ``step`` is on the ``every`` cadence (step 0 never is)."""
        return self.cfg.every > 0 and step > 0 and step % self.cfg.every == 0

    def _report(self, path: pathlib.Path | str, reason: str) -> None:
        item = (str(path), reason)
        if item not in self.problems:
            self.problems.append(item)
            log.warning("checkpoint %s is not usable and was skipped: %s", path, reason)

    def _listing(self) -> tuple[list[int], list[pathlib.Path]]:
        """(step directories, leftover tmp directories of interrupted saves)."""
        if not self.directory.is_dir():
            return [], []
        steps, tmps = [], []
        for entry in self.directory.iterdir():
            if TMP_MARKER in entry.name:
                tmps.append(entry)
            elif _STEP_NAME.fullmatch(entry.name) and entry.is_dir():
                steps.append(int(entry.name))
        return sorted(steps), sorted(tmps)

    def _report_tmp_dirs(self, tmps: list[pathlib.Path]) -> None:
        for tmp in tmps:
            if self._pending is not None and tmp.name.startswith(f"{self._pending}."):
                continue  # the save in flight
            self._report(tmp, "incomplete: a save was interrupted before orbax finalised it")

    def _check_readable(self, step: int) -> str | None:
        """Why ``step``'s metadata and record cannot be read (None if they can); caches them."""
        if step in self._records:
            return None
        path = self.step_path(step)
        try:
            self._stored_tree(step)
        except Exception as err:  # noqa: BLE001 - any failure means unreadable
            return f"unreadable state metadata in {path / STATE}: {_short(err)}"
        try:
            record = self._json_handler.restore(path / META)
        except Exception as err:  # noqa: BLE001
            return f"unreadable meta record in {path / META}: {_short(err)}"
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            return f"{path / META} is not a {FORMAT} record"
        self._records[step] = record
        return None

    def _stored_tree(self, step: int) -> Any:
        return self._state_handler.metadata(self.step_path(step) / STATE).tree

    def _agree(self, reason: str | None) -> str | None:
        """A read failure on any process is a failure on all (so all fall back together)."""
        if jax.process_count() == 1:
            return reason
        from jax.experimental import multihost_utils

        failed = multihost_utils.process_allgather(np.asarray(reason is not None))
        if reason is None and np.any(failed):
            return "could not be read on another process (see its log)"
        return reason

    def _check_checksums(self, step: int) -> str | None:
        """Why ``step``'s files do not match its ``checksums.json`` (None if they do)."""
        if step in self._verified:
            return None
        path = self.step_path(step)
        manifest = path / CHECKSUMS
        if not manifest.exists():
            return None  # finalised but killed before the checksums were written
        try:
            expected = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            return f"unreadable {manifest}: {_short(err)}"
        for rel, (size, digest) in sorted(expected.items()):
            file = path / rel
            if not file.is_file():
                return f"file {file} is missing"
            if file.stat().st_size != size:
                return f"file {file} has {file.stat().st_size} bytes, {size} were written"
            if _file_digest(file) != digest:
                return f"file {file} does not match its SHA-256 in {CHECKSUMS}"
        self._verified.add(step)
        return None

    def _usable(self, step: int, verify: bool = True) -> str | None:
        """Why ``step`` is not usable (reported once), or None.

        Complete: orbax's commit file is there; intact (``verify``): the files match
        ``checksums.json``; readable: the state metadata and the meta record parse.
        """
        if step in self._bad:
            return "found unusable earlier in this run"
        reason = None
        if step not in self._records:  # checked before anything in it is read, once a session
            reason = _link_leaving(self.directory, self.step_path(step))
        if reason is None and not (self.step_path(step) / COMMIT_FILE).is_file():
            reason = f"incomplete: {COMMIT_FILE} is missing"
        if reason is None and verify:
            reason = self._check_checksums(step)
        if reason is None:
            reason = self._check_readable(step)
        if reason is not None:
            self._bad.add(step)
            self._report(self.step_path(step), reason)
        return reason

    def all_steps(self) -> list[int]:
        """Complete checkpoints on disk, oldest first (files are not checksummed here)."""
        steps, tmps = self._listing()
        self._report_tmp_dirs(tmps)
        return [s for s in steps if self._usable(s, verify=False) is None]

    def latest_step(self) -> int | None:
        """The newest complete checkpoint that passes its checksums; others are reported."""
        steps, tmps = self._listing()
        self._report_tmp_dirs(tmps)
        for step in reversed(steps):
            if self._usable(step) is None:
                return step
        return None

    def read_meta(self, step: int) -> dict:
        """The caller's ``meta`` dict of a complete checkpoint."""
        reason = self._usable(step, verify=False)
        if reason is not None:
            raise CorruptCheckpointError(f"checkpoint {self.step_path(step)}: {reason}")
        return copy.deepcopy(self._records[step]["meta"])

    def eval_loss(self, step: int) -> float | None:
        self.read_meta(step)
        return self._records[step].get("eval_loss")

    def best_step(self) -> int | None:
        """The complete checkpoint with the lowest finite eval loss (the newest on ties)."""
        scored = [(loss, -s) for s in self.all_steps() if (loss := self.eval_loss(s)) is not None]
        return -min(scored)[1] if scored else None

    # ------------------------------------------------------------------ saving

    def save(
        self,
        step: int,
        state: Any,
        meta: dict | None = None,
        *,
        eval_loss: float | None = None,
        force: bool = False,
    ) -> bool:
        """Start an asynchronous save of ``state`` and ``meta`` as ``step``; True if started.

        ``state``: a pytree of arrays (``jax.Array`` / NumPy; random keys as
        ``rng_to_data(key)``); ``meta``: a JSON-serialisable dict; ``eval_loss`` ranks
        the checkpoint for ``keep_best``. Skipped (False) off the ``every`` cadence
        unless ``force``, when this run already saved ``step``, or when a complete
        checkpoint of that step exists (never overwritten; a warning says so). An
        existing *unusable* directory of that step is renamed to ``<step>.corrupt``.
        Raises ``CheckpointError`` (naming the path) if the previous background save
        failed.
        """
        if not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"checkpoint step must be a non-negative integer, got {step!r}")
        step = int(step)
        if not (force or self.should_save(step)) or step in self._saved:
            return False
        meta = {} if meta is None else meta
        record = {"format": FORMAT, "step": step, "eval_loss": _finite_or_none(eval_loss)}
        record["meta"] = meta
        try:
            json.dumps(record)
        except (TypeError, ValueError) as err:
            raise ValueError(f"checkpoint meta for step {step} is not plain JSON: {err}") from None
        state = optim_jax.flat.unflatten(state)
        _check_state(state)
        self._finish_pending()
        path = self.step_path(step)
        if path.exists():
            if self._usable(step) is not None:  # incomplete or corrupt: keep it, elsewhere
                self._set_aside(step)
            else:
                log.warning(
                    "checkpoint %s already exists; not overwriting it (step %d not saved)",
                    path,
                    step,
                )
                return False
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{STATE: ocp.args.PyTreeSave(state), META: ocp.args.JsonSave(record)}
                ),
                force=True,
            )
        except Exception as err:
            raise CheckpointError(f"could not save checkpoint {path}: {_short(err)}") from err
        self._pending = step
        self._saved.add(step)
        return True

    def _set_aside(self, step: int) -> None:
        """Rename a corrupt checkpoint out of the way of a new save of the same step."""
        path = self.step_path(step)
        self._barrier(f"set_aside_{step}")  # every process has looked at it before it moves
        if self.is_primary:
            n, target = 0, self.directory / f"{step}.corrupt"
            while target.exists():
                n += 1
                target = self.directory / f"{step}.corrupt-{n}"
            path.rename(target)
            log.warning("moved corrupt checkpoint %s to %s to save step %d", path, target, step)
        self._barrier(f"set_aside_{step}_done")
        self._bad.discard(step)
        self._verified.discard(step)
        self._records.pop(step, None)
        self._manager.reload()

    def _barrier(self, name: str) -> None:
        if jax.process_count() > 1:
            self._barriers += 1
            ocp.multihost.sync_global_processes(f"optim_jax_checkpoint_{name}_{self._barriers}")

    def _finish_pending(self) -> None:
        """Wait for the save in flight, start its checksums, apply retention."""
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            step, self._pending = self._pending, None
            where = self.step_path(step) if step is not None else self.directory
            raise CheckpointError(f"saving checkpoint {where} failed: {_short(err)}") from err
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        self._join_checksums()
        if self.is_primary:
            self._checksum_thread = threading.Thread(
                target=self._write_checksums, args=(step,), name=f"checksums-{step}", daemon=True
            )
            self._checksum_thread.start()
        self._prune()

    def _write_checksums(self, step: int) -> None:
        path = self.step_path(step)
        try:
            body = json.dumps({"format": FORMAT, "step": step, "files": _checksums(path)})
            tmp = path / f".{CHECKSUMS}.tmp"
            with open(tmp, "w") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path / CHECKSUMS)
        except OSError as err:
            log.warning("could not write %s for checkpoint %s: %s", CHECKSUMS, path, err)

    def _join_checksums(self) -> None:
        if self._checksum_thread is not None:
            self._checksum_thread.join()
            self._checksum_thread = None

    def _prune(self) -> None:
        """Delete complete checkpoints that are neither among the newest ``keep`` nor the best."""
        self._manager.reload()
        steps = self.all_steps()
        keep = set(steps[-self.cfg.keep :])
        if self.cfg.keep_best and (best := self.best_step()) is not None:
            keep.add(best)
        known = set(self._manager.all_steps())
        doomed = [step for step in steps if step not in keep and step in known]
        self._barrier("prune")  # every process has listed the directory before any deletion
        for step in doomed:
            self._manager.delete(step)
            self._records.pop(step, None)
            self._verified.discard(step)

    def wait(self) -> None:
        """Block until the save in flight and its checksums are on disk (retention applied)."""
        self._finish_pending()
        self._join_checksums()

    def close(self) -> None:
        self.wait()
        self._manager.close()
        self._state_handler.close()
        self._json_handler.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --------------------------------------------------------------- restoring

    def restore(self, step: int | None, target: Any) -> tuple[Any, dict]:
        """``(state, meta)`` of checkpoint ``step``, placed as ``target`` says.

        ``target``: the state's pytree of ``jax.ShapeDtypeStruct`` (or arrays), each
        with the sharding to restore onto (any mesh). ``step=None``: the newest usable
        checkpoint, falling back past corrupt ones (each reported). Raises
        ``IncompatibleCheckpointError`` when the stored tree, shapes or dtypes differ
        from ``target``, ``CorruptCheckpointError`` when an explicit ``step`` is unusable,
        ``NoCheckpointError`` when there is none. Waits for a save in flight first;
        reads only.
        """
        if step is None:
            return self.restore_newest(target)[1:]
        layout_target, target = target, _check_target(optim_jax.flat.unflatten(target))
        self._finish_pending()
        state, meta = self._restore_step(int(step), target)
        return optim_jax.flat.flatten_like(layout_target, state), meta

    def restore_newest(self, target: Any) -> tuple[int, Any, dict]:
        """``(step, state, meta)`` of the newest usable checkpoint, falling back past corrupt
        ones (each reported); ``NoCheckpointError`` when there is none. Waits for a save in
        flight first; reads only."""
        layout_target, target = target, _check_target(optim_jax.flat.unflatten(target))
        self._finish_pending()
        steps, tmps = self._listing()
        self._report_tmp_dirs(tmps)
        for candidate in reversed(steps):
            if candidate in self._bad:
                continue
            try:
                state, meta = self._restore_step(candidate, target)
            except CorruptCheckpointError:
                continue  # reported; try the previous one
            return candidate, optim_jax.flat.flatten_like(layout_target, state), meta
        raise self._none_usable()

    def _none_usable(self) -> NoCheckpointError:
        if self.problems:
            listed = "; ".join(f"{path}: {reason}" for path, reason in self.problems)
            return NoCheckpointError(f"no usable checkpoint in {self.directory} ({listed})")
        return NoCheckpointError(f"no checkpoint in {self.directory}")

    def _restore_step(self, step: int, target: Any) -> tuple[Any, dict]:
        path = self.step_path(step)
        if not path.is_dir():
            raise NoCheckpointError(f"checkpoint {path} does not exist")
        reason = self._usable(step)
        if reason is not None:
            raise CorruptCheckpointError(f"checkpoint {path}: {reason}")
        _compare(self._stored_tree(step), target, path)
        reason = None
        try:
            restored = self._state_handler.restore(
                path / STATE, args=ocp.args.StandardRestore(target)
            )
        except Exception as err:  # noqa: BLE001 - orbax/tensorstore decoding errors vary
            reason = f"could not be read: {_short(err)}"
        reason = self._agree(reason)
        if reason is not None:
            # The failed read leaves orbax's other read coroutines behind; once the traceback
            # is gone, collect them quietly instead of letting each print an ignored error.
            _collect_quietly()
            self._bad.add(step)
            self._report(path, reason)
            raise CorruptCheckpointError(f"checkpoint {path} {reason}")
        # orbax may hand back an equivalent sharding object of another kind; make it exact.
        restored = jax.tree.map(
            lambda x, t: x if x.sharding == t.sharding else jax.device_put(x, t.sharding),
            restored,
            target,
        )
        return restored, copy.deepcopy(self._records[step]["meta"])

    def resume(self, target: Any) -> tuple[int, Any, dict] | None:
        """Apply ``cfg.resume``: ``(step, state, meta)`` to continue from, or None to start fresh.

        ``auto``: the newest usable checkpoint if the directory has any checkpoint
        (error if it has some but none is usable), else None. ``require``: the same
        but no checkpoint is an error. ``never``: None, and an error if the directory
        already holds checkpoints (a fresh run would mix with and prune them).
        """
        steps, tmps = self._listing()
        if self.cfg.resume == "never":
            if steps:
                raise CheckpointError(
                    f"checkpoint.resume is 'never' but {self.directory} already holds "
                    f"checkpoints (steps {steps}); use another directory"
                )
            return None
        if not steps and self.cfg.resume == "auto":
            self._report_tmp_dirs(tmps)
            return None
        return self.restore_newest(target)


def _short(err: BaseException) -> str:
    """One line of an exception, without tensorstore's long spec dump."""
    lines = str(err).strip().splitlines()
    text = lines[0].split(" [tensorstore_spec=")[0] if lines else ""
    return f"{type(err).__name__}: {text}"[:500]


def _collect_quietly() -> None:
    hook = sys.unraisablehook
    sys.unraisablehook = lambda _: None
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook


def _link_leaving(directory: pathlib.Path, step_dir: pathlib.Path) -> str | None:
    """Why ``step_dir`` reaches outside itself through a symbolic link (None if it does not).

    A checkpoint is read from its own step directory only: a link out of it (the step
    directory itself, an item directory, a data file) would make orbax and tensorstore read
    whatever it points to as this step's state, and the checksums would vouch for it. The
    checkpoint root may itself be a link (storage mounted elsewhere); links that stay inside
    the step directory are followed as usual.
    """
    root = directory.resolve()
    real = step_dir.resolve()
    if step_dir.is_symlink() and real.parent != root:
        return f"{step_dir} is a symbolic link leaving {root} (to {real})"
    for parent, dirs, files in os.walk(step_dir):  # followlinks=False: links are not entered
        for name in sorted(dirs) + sorted(files):
            path = pathlib.Path(parent, name)
            if path.is_symlink() and not path.resolve().is_relative_to(real):
                return f"{path} is a symbolic link leaving the checkpoint (to {path.resolve()})"
    return None


def _finite_or_none(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _state_save_handler() -> ocp.PyTreeCheckpointHandler:
    """The writer of ``state/``: orbax's standard one, without replica-parallel saves on one host.

    orbax (0.12.8, off GPU) splits each replicated array into a slice per replica, so that
    the hosts holding the replicas each write a part. With one process every replica is ours
    and the split only adds a compiled ``lax.slice`` per array shape and replica (a one-layer
    GPT on 8 CPU devices: 512 slice calls, 3.5 s of a 3.8 s save). So one process writes each
    array whole; several keep orbax's handler. The array data and tree metadata read back
    the same (reads go through ``StandardCheckpointHandler``); what one process no longer
    writes is orbax's ``array_metadatas/`` record of each array's write shape, which a
    restore does not need. Only ``jax.Array`` and NumPy leaves are registered: ``_check_state``
    admits nothing else.
    """
    if jax.process_count() > 1:
        arrays = ocp.type_handlers.get_type_handler(jax.Array)
    else:
        arrays = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.number, ocp.type_handlers.get_type_handler(np.number)),
        (np.ndarray, ocp.type_handlers.get_type_handler(np.ndarray)),
        (jax.Array, arrays),
    )
    # StandardCheckpointHandler's settings, so the rest of what is written matches.
    return ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=96, restore_concurrent_gb=96, type_handler_registry=registry
    )


def _check_state(state: Any) -> None:
    for name, leaf in _flat(state).items():
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not hasattr(leaf, "shape"):
            raise ValueError(
                f"checkpoint state leaf {name} is a {type(leaf).__name__}, not an array"
            )
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            raise ValueError(
                f"checkpoint state leaf {name} is a typed random key; store "
                "train.checkpoint.rng_to_data(key) (its uint32 data) instead"
            )


def _check_target(target: Any) -> Any:
    def leaf(name: str, x: Any) -> jax.ShapeDtypeStruct:
        sharding = getattr(x, "sharding", None)
        if sharding is None or not hasattr(x, "shape"):
            raise ValueError(
                f"restore target leaf {name} has no sharding: give every leaf a "
                "jax.ShapeDtypeStruct(shape, dtype, sharding=...) for the mesh to restore onto"
            )
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    paths = iter(_flat(target))
    return jax.tree.map(lambda x: leaf(next(paths), x), target)


def _compare(stored: Any, target: Any, path: pathlib.Path) -> None:
    have, want = _flat(stored), _flat(target)
    problems = [f"{k}: missing from the checkpoint" for k in sorted(set(want) - set(have))]
    problems += [
        f"{k}: in the checkpoint but not in this run" for k in sorted(set(have) - set(want))
    ]
    for key in sorted(set(have) & set(want)):
        s, t = have[key], want[key]
        s_shape, s_dtype = getattr(s, "shape", None), getattr(s, "dtype", None)
        if s_shape is None or s_dtype is None:
            problems.append(f"{key}: stored as {type(s).__name__}, not an array")
        elif tuple(s_shape) != tuple(t.shape) or np.dtype(s_dtype) != np.dtype(t.dtype):
            problems.append(
                f"{key}: checkpoint has {_describe(s_shape, s_dtype)}, "
                f"this run expects {_describe(t.shape, t.dtype)}"
            )
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise IncompatibleCheckpointError(
            f"checkpoint {path} does not match this run's state: "
            + "; ".join(problems[:8])
            + more
            + ". It was left untouched: use another --workdir or the configuration that wrote it."
        )
