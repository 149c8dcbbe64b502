"""The trainer on JAX's real distributed runtime: two processes, one global mesh, one workdir.

Each process is ``python -m train`` with 4 simulated CPU devices and the ``JAX_*``
environment of a loopback coordinator, so the 8 global devices form the same
``data=2 x fsdp=4`` mesh as the one-process, 8-device reference run in this
test process. What is proved, with a tiny float32 GPT:

* two processes, each feeding only its rows of the global batch, follow the
  one-process loss curve step for step (float32 tolerance below);
* checkpoints cross the process count both ways: a 2-process checkpoint resumes in
  one process, and a 1-process checkpoint resumes in two, each continuing the
  uninterrupted curve from the first step after the restore;
* a SIGTERM to one of the two processes stops both at the same step (JAX's
  preemption sync), with exit code 143 and one final checkpoint at that step, and
  resuming from it ends on the uninterrupted run's losses.

Two process launches serve every test (module-scoped fixtures); each is bounded by
a timeout and killed in a ``finally`` if it outlives it.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests.train.recipes import REPO, subprocess_env, tiny_gpt
from train import config, loop, metrics

pytestmark = pytest.mark.slow

STEPS = 24  # every run's run.steps: the schedule (warmup-cosine) is the same in all of them
SAVE_EVERY = 20  # the reference run's cadence: its step-20 checkpoint seeds the 2-process resume
SIGNAL_AFTER = 2  # logged steps of the preempted run before its SIGTERM
LAUNCH_TIMEOUT_S = 300  # a 2-process run takes 20-50 s on a busy 2-core machine

# The default recipe shrunk to a GPT that trains a step in milliseconds, in float32 so that the
# comparison is tight; mesh data=2 x fsdp=4 puts each process's 4 devices on one `data` slice.
OVERRIDES = (
    *tiny_gpt(STEPS),
    "optimizer.warmup_steps=2",
    "precision.compute=float32",
    "mesh.data=2",
    "mesh.fsdp=4",
)

# Loss tolerance, relative. Two processes compute the same float32 numbers as one process over
# the same mesh, but the cross-device reductions (gradient all-reduce over data x fsdp, the loss
# mean) run through Gloo between processes instead of XLA's in-process all-reduce, so they sum in
# another order and differ in the last bits; AdamW carries those differences on through the steps.
# Measured here over 24 steps: max relative difference 1.2e-7 (4.8e-7 absolute, 1-2 float32 ulps
# at a loss of ~5), so the bar is ~80x above it. A real fault is far bigger: with both processes
# feeding rows 0-7 (a row-assignment bug, tried by patching data.sharding_rows) the losses moved
# by up to 1.1e-3 relative.
LOSS_RTOL = 1e-5


def free_port() -> int:
    """A TCP port nobody listens on now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def losses_by_step(workdir: pathlib.Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics.read_metrics(workdir) if "loss" in r}


def eval_losses(workdir: pathlib.Path) -> list[float]:
    return [r["eval_loss"] for r in metrics.read_metrics(workdir) if "eval_loss" in r]


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


@dataclasses.dataclass
class Launch:
    """A finished 2-process ``python -m train``: exit codes and each process's output."""

    workdir: pathlib.Path
    returncodes: list[int]
    logs: list[str]

    def describe(self) -> str:
        return "\n".join(
            f"--- process {i} (exit {code}):\n{log[-3000:]}"
            for i, (code, log) in enumerate(zip(self.returncodes, self.logs, strict=True))
        )


def four_device_flags() -> str:
    """4 devices per process, 8 in the job (this test process itself has 8); the session's
    compile flags otherwise (conftest.py: compiling is most of a launch)."""
    count = "--xla_force_host_platform_device_count="
    others = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(count)]
    return " ".join([f"{count}4", *others])


def start_two_processes(
    workdir: pathlib.Path, cache: pathlib.Path, *extra: str
) -> list[subprocess.Popen]:
    """``python -m train`` twice, as process 0 and 1 of one job, on a loopback coordinator.

    ``cache``: a persistent compilation cache shared by the launches of this module, so that
    the second launch loads the programs the first compiled (compiling is most of a launch).
    """
    port = free_port()
    procs = []
    for process_id in range(2):
        env = {
            **subprocess_env(),
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": four_device_flags(),
            "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(process_id),
            "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        }
        # Quoted: unquoted, YAML 1.1 reads `on` as the boolean true and the config rejects it.
        cmd = [sys.executable, "-m", "train", *OVERRIDES, "run.distributed='on'", *extra]
        cmd += ["--workdir", str(workdir)]
        log = open(workdir.with_name(f"{workdir.name}.{process_id}.log"), "w")  # noqa: SIM115
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()  # the child holds its own descriptor
    return procs


def finish(workdir: pathlib.Path, procs: list[subprocess.Popen]) -> Launch:
    """Waits (bounded) for both processes; any still running at the deadline is killed."""
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    logs = [workdir.with_name(f"{workdir.name}.{i}.log").read_text() for i in range(2)]
    return Launch(workdir, codes, logs)


def run_two_processes(workdir: pathlib.Path, cache: pathlib.Path, *extra: str) -> Launch:
    return finish(workdir, start_two_processes(workdir, cache, *extra))


def assert_curve_matches(losses: dict[int, float], reference: dict[int, float], what: str):
    steps = sorted(losses)
    assert steps, f"{what}: no losses logged"
    got = np.array([losses[s] for s in steps])
    want = np.array([reference[s] for s in steps])
    np.testing.assert_allclose(got, want, rtol=LOSS_RTOL, atol=0, err_msg=f"{what}, steps {steps}")


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("compilation_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pathlib.Path:
    """The uninterrupted 1-process, 8-device run, in this process; checkpoints at 20 and 24."""
    workdir = tmp_path_factory.mktemp("multiprocess") / "reference"
    cfg = config.load(None, [*OVERRIDES, f"checkpoint.every={SAVE_EVERY}"])
    summary = loop.fit(cfg, workdir, progress=False)
    assert summary["steps"] == STEPS
    assert checkpoint_steps(workdir) == [SAVE_EVERY, STEPS]
    return workdir


class PreemptedLaunch:
    """2 processes from scratch, and a thread that SIGTERMs process 1 once steps are logged.

    Started before anything else in this module, so that its start-up (imports, compiling)
    overlaps the in-process reference run.
    """

    def __init__(self, workdir: pathlib.Path, cache: pathlib.Path):
        self.workdir = workdir
        # No periodic checkpoint: the only one must be the preemption's.
        self.procs = start_two_processes(workdir, cache, f"checkpoint.every={10 * STEPS}")
        self.signalled_at: int | None = None  # logged steps when the signal was sent
        self.watcher = threading.Thread(target=self._signal_mid_run, daemon=True)
        self.watcher.start()

    def _signal_mid_run(self) -> None:
        jsonl = self.workdir / metrics.JSONL_NAME
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while time.monotonic() < deadline and all(p.poll() is None for p in self.procs):
            if jsonl.is_file() and len(losses_by_step(self.workdir)) >= SIGNAL_AFTER:
                self.signalled_at = len(losses_by_step(self.workdir))
                self.procs[1].send_signal(signal.SIGTERM)
                return
            time.sleep(0.05)

    def finish(self) -> Launch:
        try:
            self.watcher.join(timeout=LAUNCH_TIMEOUT_S)
        finally:
            launch = finish(self.workdir, self.procs)
        return launch

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


@pytest.fixture(scope="module", autouse=True)
def preempted_launch(tmp_path_factory, compilation_cache):
    workdir = tmp_path_factory.mktemp("multiprocess") / "preempted"
    launch = PreemptedLaunch(workdir, compilation_cache)
    try:
        yield launch
    finally:
        launch.kill()  # only if a test stopped the module before `preempted` waited for it


@dataclasses.dataclass
class Preempted:
    launch: Launch
    signalled_at: int | None  # steps logged when process 1 got its SIGTERM
    losses: dict[int, float]  # logged by the two processes before they stopped
    checkpoints: list[int]  # in the workdir when they had stopped
    resumed: dict  # summary of the 1-process resume to STEPS


@pytest.fixture(scope="module")
def preempted(preempted_launch) -> Preempted:
    """The preempted 2-process run once both processes ended, then resumed in one process."""
    launch = preempted_launch.finish()
    workdir = launch.workdir
    losses, checkpoints = losses_by_step(workdir), checkpoint_steps(workdir)
    # The requeued job, here on one process with 8 devices: resumes the 2-process checkpoint.
    cfg = config.load(None, list(OVERRIDES))
    resumed = loop.fit(cfg, workdir, progress=False)
    return Preempted(launch, preempted_launch.signalled_at, losses, checkpoints, resumed)


@pytest.fixture(scope="module")
def two_from_one(reference, tmp_path_factory, compilation_cache) -> Launch:
    """The reference run's step-20 checkpoint, resumed by 2 processes to step 24."""
    workdir = tmp_path_factory.mktemp("multiprocess") / "two_from_one"
    source = reference / "checkpoints" / str(SAVE_EVERY)
    shutil.copytree(source, workdir / "checkpoints" / str(SAVE_EVERY))
    cadence = f"checkpoint.every={SAVE_EVERY}"
    return run_two_processes(workdir, compilation_cache, cadence, "--resume")


# --------------------------------------------------------------------------------------- tests


def test_two_processes_follow_the_one_process_loss_curve(reference, preempted, two_from_one):
    ref = losses_by_step(reference)
    assert sorted(ref) == list(range(1, STEPS + 1))
    # From scratch until the preemption (at least SIGNAL_AFTER steps) ...
    assert len(preempted.losses) >= SIGNAL_AFTER, preempted.launch.describe()
    assert min(preempted.losses) == 1
    assert_curve_matches(preempted.losses, ref, "2 processes from step 0")
    # ... and from a restored state to the end, evaluation included.
    assert two_from_one.returncodes == [0, 0], two_from_one.describe()
    resumed = losses_by_step(two_from_one.workdir)
    assert sorted(resumed) == list(range(SAVE_EVERY + 1, STEPS + 1))
    assert_curve_matches(resumed, ref, "2 processes resumed")
    np.testing.assert_allclose(
        eval_losses(two_from_one.workdir), eval_losses(reference), rtol=LOSS_RTOL, atol=0
    )


def test_a_two_process_checkpoint_resumes_in_one_process(reference, preempted):
    ref = losses_by_step(reference)
    stop = max(preempted.losses)
    assert preempted.checkpoints == [stop]
    whole = losses_by_step(preempted.launch.workdir)
    assert sorted(whole) == list(range(1, STEPS + 1))
    # The first step after the restore continues the curve, and so does every later one.
    after = {s: loss for s, loss in whole.items() if s > stop}
    assert preempted.resumed["first_train_loss"] == after[stop + 1]
    assert_curve_matches(after, ref, f"1 process resumed from the 2-process step {stop}")
    assert preempted.resumed["steps"] == STEPS


def test_a_one_process_checkpoint_resumes_in_two_processes(reference, two_from_one):
    assert two_from_one.returncodes == [0, 0], two_from_one.describe()
    for log in two_from_one.logs:
        assert f"resumed from {two_from_one.workdir / 'checkpoints' / str(SAVE_EVERY)}" in log
    losses = losses_by_step(two_from_one.workdir)
    first = SAVE_EVERY + 1
    np.testing.assert_allclose(
        losses[first], losses_by_step(reference)[first], rtol=LOSS_RTOL, atol=0
    )
    assert checkpoint_steps(two_from_one.workdir) == [SAVE_EVERY, STEPS]


def test_sigterm_to_one_process_stops_both_at_the_same_step(reference, preempted):
    launch = preempted.launch
    # Both exit as SIGTERM would have ended them (128 + 15), not killed by the signal itself.
    assert launch.returncodes == [128 + signal.SIGTERM] * 2, launch.describe()
    # Each process's summary line gives the step its own state reached.
    stops = [re.findall(r" after (\d+) steps; ", log) for log in launch.logs]
    assert all(len(found) == 1 for found in stops), launch.describe()
    stop = int(stops[0][0])
    assert int(stops[1][0]) == stop  # the preemption sync: one step for all processes
    assert all("preempted (SIGTERM)" in log for log in launch.logs), launch.describe()
    # The signal went out mid-run, and the stop came at or after it (not before the notice).
    assert preempted.signalled_at is not None, launch.describe()
    assert preempted.signalled_at <= stop < STEPS
    # The log (process 0's) ends at that step, and the only checkpoint is the final one there.
    assert max(preempted.losses) == stop
    assert sorted(preempted.losses) == list(range(1, stop + 1))
    assert preempted.checkpoints == [stop]
    assert (launch.workdir / "checkpoints" / str(stop) / "commit_success.txt").is_file()
    # Resumed to the end, the run ends on the uninterrupted run's losses.
    ref = losses_by_step(reference)
    whole = losses_by_step(launch.workdir)
    assert_curve_matches({s: whole[s] for s in range(STEPS - 2, STEPS + 1)}, ref, "final steps")
    np.testing.assert_allclose(
        preempted.resumed["final_eval_loss"],
        eval_losses(reference)[-1],
        rtol=LOSS_RTOL,
        atol=0,
    )
