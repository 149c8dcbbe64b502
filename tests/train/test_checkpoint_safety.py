"""Restoring a checkpoint never runs code from it and never reaches outside its directory.

What is proved here, with ``train.checkpoint.Checkpointer`` on a small sharded state:

* no pickle: a pickle whose ``__reduce__`` would write a marker file, put in place of every file
  of a checkpoint (with and without ``checksums.json``) and planted next to them under
  pickle-ish names, is either refused with a ``CheckpointError`` naming the checkpoint or
  ignored (the restored state is bitwise the saved one); the marker never appears, and a
  Python audit hook sees no ``pickle.find_class``, no ``exec`` of code that is not an
  installed module, no process spawned, and no file opened, created, renamed or removed
  outside the checkpoint directory and the Python installation (nothing written at all);
* symbolic links: a checkpoint whose step directory, item directory or data file is a link
  leading out of its step directory is refused (``CorruptCheckpointError`` naming the link;
  ``resume`` reports it and falls back to the previous checkpoint), nothing outside is read,
  and the link target survives the step being saved again. A link that stays inside the step
  directory, and a checkpoint root that is itself a link (storage mounted elsewhere), work.

The audit hook sees Python-level file access only: tensorstore reads array data in C++. That
is why the link refusal has to happen in Python before tensorstore is called (and why the
test checks it by the refusal and by a link target that would restore to different values).
"""

from __future__ import annotations

import os
import pathlib
import pickle
import shutil
import sys
import sysconfig
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from train import checkpoint as ck
from train.config import CheckpointConfig

MESH8 = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))

# -------------------------------------------------------------------------------- audit hook


class _Audit:
    """Records risky events while ``active``. Audit hooks cannot be removed, so the one hook
    this module installs stays for the whole session and does nothing while inactive."""

    SPAWN = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen")
    CHANGE = ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.symlink")
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def __init__(self) -> None:
        self.active = False
        self.events: list[tuple] = []
        self.installed = False

    def __call__(self, event: str, args: tuple) -> None:
        if not self.active:
            return
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):  # an already open descriptor: its open was audited
                return
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & self.WRITE_FLAGS
            )
            self.events.append(("open", os.fsdecode(path), bool(writes)))
        elif event == "pickle.find_class" or event.startswith((*self.SPAWN, *self.CHANGE)):
            self.events.append((event, *map(str, args)))
        elif event == "exec":
            code = args[0]
            if isinstance(code, types.CodeType):
                self.events.append(("exec", code.co_filename))

    def install(self) -> None:
        if not self.installed:
            sys.addaudithook(self)
            self.installed = True

    def record(self):
        self.events = []
        auditor = self

        class _Recording:
            def __enter__(self):
                auditor.active = True
                return auditor.events

            def __exit__(self, *exc):
                auditor.active = False

        return _Recording()


AUDIT = _Audit()

# What a restore may legitimately open besides the checkpoint itself: Python's own files (the
# standard library, site-packages: modules imported lazily by orbax/jax on first use, read
# through io.open_code). Nothing else: no home directory, no /tmp, no /etc.
PYTHON_ROOTS = sorted(
    {
        os.path.realpath(p)
        for p in (
            sys.prefix,
            sys.base_prefix,
            sys.exec_prefix,
            *sysconfig.get_paths().values(),
        )
    }
)


def _inside(path: str, root: pathlib.Path | str) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(root)
    return real == root or real.startswith(root + os.sep)


def violations(
    events: list[tuple], checkpoint_root: pathlib.Path, allowed: frozenset[str] = frozenset()
) -> list[tuple]:
    """Every recorded event a read-only restore of ``checkpoint_root`` must not cause.

    ``allowed``: paths (as opened, not resolved) a test accepts being read wherever they lead.
    """
    bad = []
    for event in events:
        kind = event[0]
        if kind == "open":
            _, path, writes = event
            if writes:
                bad.append(event)  # restore reads only, inside or outside the checkpoint
            elif path in allowed:
                continue
            elif not (
                _inside(path, checkpoint_root) or any(_inside(path, r) for r in PYTHON_ROOTS)
            ):
                bad.append(event)
        elif kind == "exec":
            # Importing an installed module execs its code (filename: its .py file); code
            # compiled from a string (a pickle's payload) has a pseudo-filename like <string>.
            if not any(_inside(event[1], r) for r in PYTHON_ROOTS):
                bad.append(event)
        else:  # find_class, spawning, creating / renaming / removing files
            bad.append(event)
    return bad


@pytest.fixture(scope="module", autouse=True)
def audit_hook():
    AUDIT.install()
    yield AUDIT
    AUDIT.active = False


# ------------------------------------------------------------------------------ checkpoints


class _Planted:
    """Unpickling this writes ``marker``: proof that a checkpoint file was unpickled."""

    def __init__(self, marker: pathlib.Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('unpickled')",))


def _state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w": jax.device_put(
            rng.standard_normal((16, 8), dtype=np.float32), NamedSharding(MESH8, P("x"))
        ),
        "b": jax.device_put(rng.standard_normal(8).astype(np.float32), NamedSharding(MESH8, P())),
        "step": jnp.asarray(seed, jnp.int32),
    }


def _cfg() -> CheckpointConfig:
    return CheckpointConfig(every=1, keep=5, keep_best=False)


def _bits(tree) -> list[tuple]:
    return [(x.dtype, x.shape, np.asarray(x).tobytes()) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> pathlib.Path:
    """A pristine checkpoint directory with steps 1 and 2 (each with its checksums)."""
    root = tmp_path_factory.mktemp("pristine") / "checkpoints"
    with ck.Checkpointer(root, _cfg()) as ckpt:
        assert ckpt.save(1, _state(1), {"n": 1}, force=True)
        assert ckpt.save(2, _state(2), {"n": 2}, force=True)
    assert (root / "2" / ck.CHECKSUMS).is_file()
    return root


def _files(step_dir: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file())


def _restore(root: pathlib.Path, step: int | None, allowed: frozenset[str] = frozenset()):
    """(restored state or the CheckpointError raised, audit violations), hook on throughout:
    opening the Checkpointer is part of a restore (fit opens one, then resumes)."""
    target = ck.abstract_state(_state(0))
    with AUDIT.record() as events:
        ckpt = ck.Checkpointer(root, _cfg())
        try:
            outcome = ckpt.restore(step, target)[0]
        except ck.CheckpointError as err:
            outcome = err
        ckpt.close()
    return outcome, violations(events, root, allowed)


def test_the_audit_hook_and_the_planted_pickle_would_catch_an_unpickling(tmp_path):
    """Control: the payload acts when unpickled, and the hook reports that and a stray open."""
    marker = tmp_path / "marker"
    payload = pickle.dumps(_Planted(marker))
    with AUDIT.record() as events:
        pickle.loads(payload)
        (tmp_path / "outside.txt").write_text("x")
    assert marker.read_text() == "unpickled"
    kinds = {event[0] for event in violations(events, tmp_path / "checkpoints")}
    assert {"pickle.find_class", "exec", "open"} <= kinds


# orbax's aborted read can leave a tensorstore callback that fails on its closed event loop
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_checkpoint_file_is_ever_unpickled(saved, tmp_path):
    marker = tmp_path / "marker"
    payload = pickle.dumps(_Planted(marker))
    # Baseline: an untouched copy restores, and the hook did see the restore read its files.
    pristine = shutil.copytree(saved, tmp_path / "pristine")
    with AUDIT.record() as events:
        ckpt = ck.Checkpointer(pristine, _cfg())
        assert _bits(ckpt.restore(2, ck.abstract_state(_state(0)))[0]) == _bits(_state(2))
        ckpt.close()
    assert violations(events, pristine) == []
    assert any(e[0] == "open" and _inside(e[1], pristine / "2") for e in events)
    names = _files(saved / "2")
    assert any(n.startswith("state/") for n in names) and "meta/metadata" in names
    variants = [(name, keep) for name in names for keep in (True, False)]
    variants += [("<planted beside every file>", True), ("<planted beside every file>", False)]
    outcomes = {}
    for i, (name, keep_checksums) in enumerate(variants):
        root = shutil.copytree(saved, tmp_path / f"case{i}")
        step_dir = root / "2"
        if name.startswith("<"):
            # Pickle-ish names next to every file, where a pickle-based loader might look.
            for directory in {step_dir, *(p for p in step_dir.rglob("*") if p.is_dir())}:
                for planted in ("checkpoint", "checkpoint.pkl", "state.pickle", "metadata.pkl"):
                    (directory / planted).write_bytes(payload)
        else:
            (step_dir / name).write_bytes(payload)
        if not keep_checksums and (step_dir / ck.CHECKSUMS).exists():
            (step_dir / ck.CHECKSUMS).unlink()  # as a kill before the checksums leaves it
        outcome, bad = _restore(root, 2)
        label = f"{name} (checksums {'kept' if keep_checksums else 'removed'})"
        assert not marker.exists(), f"{label}: a checkpoint file was unpickled"
        assert bad == [], f"{label}: {bad}"
        if isinstance(outcome, ck.CheckpointError):
            assert str(step_dir) in str(outcome), label
            outcomes[label] = "refused"
        else:
            # Ignored: then the values must be the saved ones, not something decoded from it.
            assert _bits(outcome) == _bits(_state(2)), label
            outcomes[label] = "ignored"
    # The checksums refuse every replaced file they list; the decoders refuse the data files.
    assert outcomes["meta/metadata (checksums removed)"] == "refused"
    assert all(
        outcomes[f"{n} (checksums kept)"] == "refused"
        for n in names
        if n not in (ck.CHECKSUMS, "_CHECKPOINT_METADATA", ck.COMMIT_FILE)
    )


# -------------------------------------------------------------------------------- symlinks


def _outside_copy(saved: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    """Step 1's checkpoint copied outside, as the link target: same layout, other values than
    step 2, so following a link to it would restore step 1's numbers as step 2's."""
    return shutil.copytree(saved / "1", tmp_path / "elsewhere" / "1")


LINKS = {
    # name -> (entry of step 2 replaced by a link, what inside the outside copy it points to)
    "step_directory": ("", ""),
    "item_directory": ("state", "state"),
    "data_file": (None, None),  # the largest array-data file, resolved per checkpoint
}


def _data_file(step_dir: pathlib.Path) -> str:
    files = [p for p in (step_dir / "state").glob("ocdbt.process_*/d/*") if p.is_file()]
    return str(max(files, key=lambda p: p.stat().st_size).relative_to(step_dir))


@pytest.mark.parametrize("case", sorted(LINKS))
def test_a_link_leaving_the_checkpoint_is_refused_and_not_followed(saved, tmp_path, case, caplog):
    root = shutil.copytree(saved, tmp_path / "checkpoints")
    outside = _outside_copy(saved, tmp_path)
    (root / "2" / ck.CHECKSUMS).unlink()  # the checksums must not be what catches the link
    entry, target = LINKS[case]
    if entry is None:  # orbax gives data files unique names: link to the outside one's
        entry, target = _data_file(root / "2"), _data_file(outside)
    link = root / "2" / entry if entry else root / "2"
    if link.is_dir():
        shutil.rmtree(link)
    else:
        link.unlink()
    link.symlink_to(outside / target if target else outside)
    outside_before = {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()}

    # The one read through a link that is not ours to stop: orbax's CheckpointManager, when
    # it lists the steps (in its constructor), reads each step's commit timestamp from
    # <step>/_CHECKPOINT_METADATA, a small JSON file (parsed as JSON, never executed). With the
    # step directory itself linked out, that read follows the link. Nothing else may.
    allowed = frozenset({str(root / "2" / "_CHECKPOINT_METADATA")})
    outcome, bad = _restore(root, 2, allowed)
    assert isinstance(outcome, ck.CorruptCheckpointError), outcome
    assert str(link) in str(outcome) and "symbolic link" in str(outcome)
    assert bad == []
    # resume: reported by path, falls back to step 1, which is intact.
    ckpt = ck.Checkpointer(root, _cfg())
    step, restored, meta = ckpt.resume(ck.abstract_state(_state(0)))
    assert step == 1 and meta == {"n": 1} and _bits(restored) == _bits(_state(1))
    assert any(path == str(root / "2") and "symbolic link" in why for path, why in ckpt.problems)
    # Saving step 2 again sets the link aside; the target outside is not touched.
    assert ckpt.save(2, _state(2), {"n": 2}, force=True)
    ckpt.close()
    assert {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()} == outside_before
    assert os.path.lexists(root / "2.corrupt")
    assert _bits(ck.Checkpointer(root, _cfg()).restore(2, ck.abstract_state(_state(0)))[0]) == (
        _bits(_state(2))
    )


def test_links_that_stay_inside_are_followed(saved, tmp_path):
    """Not every link is refused: one inside the step, and a checkpoint root that is a link."""
    real = shutil.copytree(saved, tmp_path / "storage" / "checkpoints")
    meta = real / "2" / "meta"
    (meta / "metadata").rename(meta / "metadata.real")
    (meta / "metadata").symlink_to("metadata.real")  # relative, inside the step
    root = tmp_path / "checkpoints"
    root.symlink_to(real)
    outcome, bad = _restore(root, 2)
    assert not isinstance(outcome, Exception), outcome
    assert _bits(outcome) == _bits(_state(2))
    assert bad == []
