"""Crashes at exact moments and damaged checkpoints: the trainer resumes to the same bits.

What is proved here, with ``tests/train/fault_runner.py`` running ``train.loop.fit`` in a
subprocess that SIGKILLs itself (no handler runs, nothing is flushed) at one exact moment, and
``fit`` run again on the same workdir in this process (a fresh start: nothing of the killed run
is in its memory):

* killed inside a train step (earlier saves settled), killed while orbax's asynchronous write
  of a checkpoint is in flight (its arrays written, its commit not yet made), and killed right
  after orbax committed a checkpoint but before its ``checksums.json`` was written: each time
  the disk holds exactly the checkpoints it should (no complete checkpoint of the step in
  flight, the earlier ones complete and matching their checksums), and ``fit`` run again on
  the same workdir resumes from the newest complete one and ends with parameters, optimizer
  state, loss scale and counters bitwise equal to an uninterrupted run, with the same loss at
  every step in the metrics file;
* the newest checkpoints damaged on disk (a data file truncated, a byte flipped, the commit
  marker deleted, a step directory renamed to orbax's tmp name): the next ``fit`` names each
  bad path and why, resumes from the newest good checkpoint, ends bitwise equal to the
  uninterrupted run, and keeps the damaged directories byte for byte as ``<step>.corrupt``
  (a tmp directory is, as train/checkpoint.py documents, an interrupted save that orbax
  replaces when the step is saved again).

The Checkpointer-level versions of the damage cases are in test_checkpoint.py; ``python -m
train`` stopped from outside (SIGTERM, exit 143, resume) is in test_preemption.py. The
uninterrupted reference run is in this process too, and fills the session's persistent XLA
compilation cache (tests/conftest.py) that the killed subprocesses then load their programs
from. The cache holds compiled programs only; what is compared is the arithmetic, which a cached
executable does not change (and every run is built with the session's XLA flags).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.train.recipes import REPO, subprocess_env, tiny_gpt
from train import config, loop, metrics

pytestmark = pytest.mark.slow

RUNNER = pathlib.Path(__file__).with_name("fault_runner.py")
STEPS, EVERY = 8, 2  # checkpoints at 2, 4, 6 and 8; retention keeps 3 (+ the best)
OVERRIDES = [
    *tiny_gpt(STEPS),
    f"checkpoint.every={EVERY}",
    "optimizer.warmup_steps=2",
]
TIMEOUT_S = 300  # per killed run; one takes 9-35 s here, so only a hang reaches it
COMMIT, CHECKSUMS, TMP = "commit_success.txt", "checksums.json", ".orbax-checkpoint-tmp"

# name -> (runner option, checkpoint directory listing right after the kill, steps whose
# checksums.json is there, the step the next run resumes from)
KILLS = {
    "in_step": (["--kill-in-step", "7"], ["2", "4", "6"], [2, 4, 6], 6),
    "during_write": (["--kill-during-write", "6"], ["2", "4", f"6{TMP}"], [2, 4], 4),
    "after_commit": (["--kill-after-commit", "4"], ["2", "4"], [2], 4),
}


def start_killed_run(workdir: pathlib.Path, *args: str) -> subprocess.Popen:
    """fault_runner.py on ``workdir`` with a fault option; its output goes to a log file."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(log_path(workdir), "w")  # noqa: SIM115 - closed with the process
    cmd = [sys.executable, str(RUNNER), "--workdir", str(workdir), *args, *OVERRIDES]
    env = subprocess_env()  # the session's XLA flags and compilation cache (tests/conftest.py)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def run_to_the_end(workdir: pathlib.Path) -> dict[str, np.ndarray]:
    """``fit`` on ``workdir`` in this process, without a fault: every leaf of its final state
    (params, optimizer state, loss scale, counters) by key path."""
    state = loop.fit(config.load(None, OVERRIDES), workdir, progress=False)["state"]
    leaves = jax.tree_util.tree_leaves_with_path(state)
    return {jax.tree_util.keystr(key): np.asarray(leaf) for key, leaf in leaves}


def log_path(workdir: pathlib.Path) -> pathlib.Path:
    return workdir.with_suffix(".log")


def assert_bitwise_state(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    assert any("opt_state" in key for key in want) and any("params" in key for key in want)
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        # Bytes, not values: -0.0 vs 0.0 or another NaN payload would be a difference too.
        assert got[key].tobytes() == want[key].tobytes(), f"{key} differs"


def losses_by_step(workdir: pathlib.Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics.read_metrics(workdir) if "loss" in r}


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(directory: pathlib.Path) -> dict[str, str]:
    """Every file under ``directory`` (relative path) with a hash of its bytes."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return {str(p.relative_to(directory)): sha256(p) for p in files}


def matches_its_checksums(step_dir: pathlib.Path) -> bool:
    """Every file ``checksums.json`` lists has its recorded size and SHA-256 (checked here,
    independently of train/checkpoint.py's own verification)."""
    listed = json.loads((step_dir / CHECKSUMS).read_text())["files"]
    assert any(name.startswith("state/") for name in listed)  # the arrays are covered
    return all(
        (step_dir / name).is_file()
        and (step_dir / name).stat().st_size == size
        and sha256(step_dir / name) == digest
        for name, (size, digest) in listed.items()
    )


def assert_finished_cleanly(checkpoints: pathlib.Path, resumed_from: int) -> None:
    """The end of a run: the final step is there, no tmp directory is left, and every checkpoint
    the resumed run wrote has its checksums and matches them. (A checkpoint resumed from that
    was killed before its checksums stays without them: restore only reads.)"""
    assert (checkpoints / str(STEPS) / COMMIT).is_file()
    assert not [p.name for p in checkpoints.iterdir() if TMP in p.name]
    for step_dir in checkpoints.iterdir():
        if step_dir.name.isdigit() and int(step_dir.name) > resumed_from:
            assert matches_its_checksums(step_dir), step_dir


def largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
    """The biggest array-data file of the ``state`` item (orbax/tensorstore OCDBT layout)."""
    files = [p for p in (step_dir / "state").glob("ocdbt.process_*/d/*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict[str, np.ndarray], dict[int, float]]:
    """ONE uninterrupted run, shared by every case: its final state and its loss per step."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    state = run_to_the_end(workdir)
    losses = losses_by_step(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1]  # it learns: the comparisons are not between constants
    return state, losses


@pytest.fixture(scope="module")
def killed(reference, tmp_path_factory) -> dict[str, tuple[pathlib.Path, int, str]]:
    """The three killed runs, started together once the reference has filled the cache:
    name -> (workdir, exit status, output). Each test resumes in a copy of its workdir."""
    root = tmp_path_factory.mktemp("killed")
    started = {name: start_killed_run(root / name, *KILLS[name][0]) for name in KILLS}
    out = {}
    for name, process in started.items():
        rc = process.wait(timeout=TIMEOUT_S)
        out[name] = (root / name, rc, log_path(root / name).read_text())
    return out


def copy_workdir(source: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize("case", sorted(KILLS))
def test_killed_at_an_exact_moment_then_resumed_is_bitwise_the_uninterrupted_run(
    reference, killed, tmp_path, capsys, case
):
    _, listing, checksummed, resume_step = KILLS[case]
    source, rc, output = killed[case]
    assert rc == -signal.SIGKILL, output  # killed at its fault point, not finished or crashed
    workdir = copy_workdir(source, tmp_path / "run")
    checkpoints = workdir / "checkpoints"

    # On disk: exactly the expected entries. The step in flight has no complete checkpoint.
    assert sorted(p.name for p in checkpoints.iterdir()) == listing
    for name in listing:
        step_dir = checkpoints / name
        complete = (step_dir / COMMIT).is_file()
        assert complete == (TMP not in name), step_dir
        has_checksums = (step_dir / CHECKSUMS).is_file()
        assert has_checksums == (name.isdigit() and int(name) in checksummed), step_dir
        if has_checksums:
            assert matches_its_checksums(step_dir), step_dir
    if case == "during_write":
        # The write really was under way: the arrays are in the tmp directory, uncommitted.
        assert largest_data_file(checkpoints / f"6{TMP}").stat().st_size > 0

    final = run_to_the_end(workdir)
    assert f"resumed from {checkpoints / str(resume_step)}\n" in capsys.readouterr().out
    want_state, want_losses = reference
    assert_bitwise_state(final, want_state)
    # The metrics file of the killed and the resumed session reads as the uninterrupted run's.
    assert losses_by_step(workdir) == want_losses
    assert_finished_cleanly(checkpoints, resume_step)


def _truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: pathlib.Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _damage_files(checkpoints: pathlib.Path) -> dict[str, str]:
    """A truncated data file in step 4, one flipped byte in step 6 (orbax alone would restore
    the flipped one silently to wrong values)."""
    four, six = largest_data_file(checkpoints / "4"), largest_data_file(checkpoints / "6")
    size = four.stat().st_size
    _truncate(four)
    _flip_byte(six)
    return {
        "4": f"file {four} has {size // 2} bytes, {size} were written",
        "6": f"file {six} does not match its SHA-256",
    }


def _make_incomplete(checkpoints: pathlib.Path) -> dict[str, str]:
    """Step 4 without orbax's commit marker, step 6 under orbax's tmp name (a save that never
    committed, as far as anyone can tell)."""
    (checkpoints / "4" / COMMIT).unlink()
    (checkpoints / "6").rename(checkpoints / f"6{TMP}")
    return {
        "4": f"incomplete: {COMMIT} is missing",
        f"6{TMP}": "incomplete: a save was interrupted before orbax finalised it",
    }


# name -> damage done to the checkpoints at 4 and 6 of the run killed in step 7; it returns, for
# each damaged entry, the reason the resumed run must print with its path.
DAMAGE = {"damaged_files": _damage_files, "incomplete": _make_incomplete}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_newest_checkpoints_are_named_kept_and_skipped(
    reference, killed, tmp_path, capsys, caplog, case
):
    source, rc, output = killed["in_step"]
    assert rc == -signal.SIGKILL, output
    workdir = copy_workdir(source, tmp_path / "run")
    checkpoints = workdir / "checkpoints"
    reasons = DAMAGE[case](checkpoints)
    damaged = {name: snapshot(checkpoints / name) for name in reasons}

    final = run_to_the_end(workdir)
    for name, reason in reasons.items():
        line = f"checkpoint {checkpoints / name} is not usable and was skipped: {reason}"
        assert any(message.startswith(line) for message in caplog.messages), line
    assert f"resumed from {checkpoints / '2'}\n" in capsys.readouterr().out  # past both bad ones
    want_state, want_losses = reference
    assert_bitwise_state(final, want_state)
    assert losses_by_step(workdir) == want_losses
    assert_finished_cleanly(checkpoints, 2)

    # Nothing damaged was deleted or changed: moved aside, byte for byte, when its step was
    # saved again. A tmp directory is the exception the checkpoint docstring states: orbax
    # treats it as an interrupted save and replaces it when it saves that step.
    for name, files in damaged.items():
        if TMP in name:
            assert not (checkpoints / name).exists()
            continue
        assert snapshot(checkpoints / f"{name}.corrupt") == files
