"""Runs ``train.loop.fit`` and SIGKILLs itself at one exact moment (a subprocess of test_faults).

``python tests/train/fault_runner.py --workdir DIR --kill-in-step N [key=value ...]`` (or
``--kill-during-write N`` / ``--kill-after-commit N``) trains the config given by the overrides
in ``DIR`` and kills its own process with ``SIGKILL`` (no handler, no ``finally``, no flush: what
a machine losing power or the OOM killer does) at the chosen moment:

``--kill-in-step N``
    inside the train-step call that computes step ``N``, after the step has run, with every
    earlier save settled (``Checkpointer.wait()``: committed and checksummed). What is lost is
    training progress held only in memory.
``--kill-during-write N``
    inside ``Checkpointer.save`` for step ``N``, while orbax's asynchronous write is in flight:
    orbax's commit (``commit_success.txt`` plus the rename of ``N.orbax-checkpoint-tmp`` to ``N``)
    is held back for that step, every array has been written into the tmp directory, and the
    kill comes once the background thread has reached the commit. The earlier checkpoints'
    checksums are on disk first.
``--kill-after-commit N``
    right after step ``N``'s checkpoint is committed by orbax and before ``checksums.json`` is
    written for it: the window the Checkpointer docstring says is used unverified.

The runner exits with status 3 if the run ends without reaching its kill point, so a test
expecting ``-SIGKILL`` fails with a reason instead of passing on a finished run (the runs to the
end, uninterrupted or resumed, are ``fit`` in the test's own process). It hooks private
parts of ``train.checkpoint.Checkpointer`` and of orbax on purpose (white-box fault injection);
if they are renamed the hook fails loudly rather than silently not killing.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import sys
import threading

# The same 8 simulated CPU devices as tests/conftest.py: the checkpoints and the arithmetic are
# what the in-process tests of the suite use.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from orbax.checkpoint._src.path import atomicity  # noqa: E402

from train import checkpoint as checkpoint_lib  # noqa: E402
from train import config, loop  # noqa: E402

NOT_KILLED = 3  # exit status of a run that never reached its kill point
COMMIT_REACHED_TIMEOUT_S = 120.0


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in_step(step: int) -> None:
    """Wrap the jitted train step that ``loop.build`` returns; die inside the call for ``step``."""
    checkpointers: list[checkpoint_lib.Checkpointer] = []
    real_init = checkpoint_lib.Checkpointer.__init__

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        checkpointers.append(self)

    checkpoint_lib.Checkpointer.__init__ = recording_init
    real_build = loop.build

    def build(cfg):
        setup = real_build(cfg)
        real_step = setup.train_step

        def train_step(state, batch):
            # state.step counts the steps done: the call computing step N gets N - 1.
            computing = int(state.step) + 1
            new_state, metrics = real_step(state, batch)
            if computing == step:
                jax.block_until_ready(new_state)
                for checkpointer in checkpointers:
                    checkpointer.wait()  # earlier saves settled: only this step's work is lost
                die()
            return new_state, metrics

        setup.train_step = train_step
        return setup

    loop.build = build


def kill_during_write(step: int, directory: pathlib.Path) -> None:
    """Hold back orbax's commit of ``step``; once the writer reaches it, die inside ``save``."""
    commit_reached = threading.Event()
    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize
    step_dir = directory / str(step)

    async def finalize(self):
        if pathlib.Path(str(self._final_path)) == step_dir:
            commit_reached.set()
            threading.Event().wait()  # the write stays in flight until the process dies
        return await real_finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    real_save = checkpoint_lib.Checkpointer.save

    def save(self, at_step, *args, **kwargs):
        started = real_save(self, at_step, *args, **kwargs)
        if started and at_step == step:
            if not commit_reached.wait(COMMIT_REACHED_TIMEOUT_S):
                print(f"fault_runner: orbax never reached the commit of {step_dir}")
                sys.exit(NOT_KILLED)
            # The previous checkpoint's checksum thread was started by this save: let it finish,
            # so that what is on disk is exactly "older checkpoints settled, this one in flight".
            self._join_checksums()
            tmp = directory / f"{step}{checkpoint_lib.TMP_MARKER}"
            if not tmp.is_dir() or step_dir.exists():
                print(f"fault_runner: expected only {tmp} in flight, found {sorted(directory)}")
                sys.exit(NOT_KILLED)
            die()
        return started

    checkpoint_lib.Checkpointer.save = save


def kill_after_commit(step: int) -> None:
    """Die when the Checkpointer learns that ``step`` is committed, before its checksums."""
    real_finish = checkpoint_lib.Checkpointer._finish_pending

    def finish_pending(self):
        if self._pending == step:
            self._manager.wait_until_finished()  # orbax has committed and renamed the step
            die()
        return real_finish(self)

    checkpoint_lib.Checkpointer._finish_pending = finish_pending


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=pathlib.Path, required=True)
    fault = parser.add_mutually_exclusive_group(required=True)
    fault.add_argument("--kill-in-step", type=int, metavar="N")
    fault.add_argument("--kill-during-write", type=int, metavar="N")
    fault.add_argument("--kill-after-commit", type=int, metavar="N")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    if args.kill_in_step is not None:
        kill_in_step(args.kill_in_step)
    elif args.kill_during_write is not None:
        kill_during_write(args.kill_during_write, (args.workdir / "checkpoints").absolute())
    elif args.kill_after_commit is not None:
        kill_after_commit(args.kill_after_commit)

    loop.fit(config.load(None, args.overrides), args.workdir, progress=False)
    print("fault_runner: the run finished without reaching its kill point")
    return NOT_KILLED


if __name__ == "__main__":
    sys.exit(main())
