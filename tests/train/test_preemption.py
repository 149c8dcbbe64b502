"""Preemption: a SIGTERM ends training at the next step boundary with a final checkpoint.

What is proved here:

* ``distributed.Preemption`` turns a SIGTERM into a flag (the process goes on) and puts the
  previous handler back on ``close``;
* ``fit`` hit by a SIGTERM in the middle of a run saves the step it was in, stops, says so in
  its summary, and the next ``fit`` ends bitwise where an uninterrupted run ends;
* (slow) ``python -m train`` sent a SIGTERM from outside exits with 143 (128 + SIGTERM, so a
  scheduler requeues it) after writing the checkpoint of the step it was in.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.train.recipes import REPO, subprocess_env, tiny_gpt
from tests.train.test_loop import assert_bitwise, losses_by_step
from tests.train.test_loss_spikes import cfg_of
from train import distributed, loop
from train.checkpoint import Checkpointer, abstract_state


def test_sigterm_becomes_a_flag_and_close_restores_the_handler():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *_: seen.append("old"))
    try:
        preemption = distributed.Preemption()
        assert not preemption.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.reached(2) and not seen
        preemption.close()
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == ["old"]
    finally:
        signal.signal(signal.SIGTERM, previous)


def final_state(workdir, cfg):
    target = abstract_state(loop.build(cfg).state)
    with Checkpointer(workdir / "checkpoints", cfg.checkpoint) as checkpointer:
        return checkpointer.restore(cfg.run.steps, target)[0]


def test_sigterm_in_fit_checkpoints_the_step_and_the_rerun_finishes_bitwise(monkeypatch, tmp_path):
    cfg = cfg_of("checkpoint.every=100")  # the image recipe, shrunk
    whole = loop.fit(cfg, tmp_path / "whole", progress=False)

    clean = loop.train_batch

    def train_batch(setup, index):
        if index == 4:  # the signal lands while step 5 is being prepared
            os.kill(os.getpid(), signal.SIGTERM)
        return clean(setup, index)

    monkeypatch.setattr(loop, "train_batch", train_batch)
    summary = loop.fit(cfg, tmp_path / "cut", progress=False)
    assert summary["preempted"] and "preempted (SIGTERM) after step 5" in summary["stopped"]
    assert summary["steps"] == 5
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["5"]

    monkeypatch.setattr(loop, "train_batch", clean)
    again = loop.fit(cfg, tmp_path / "cut", progress=False)
    assert not again["preempted"] and again["steps"] == cfg.run.steps
    assert losses_by_step(tmp_path / "cut") == losses_by_step(tmp_path / "whole")
    assert_bitwise(whole["state"], again["state"], "final state")


@pytest.mark.slow
def test_cli_exits_143_after_its_final_checkpoint(tmp_path):
    steps = 400  # far more than run before the signal: it must land mid-run
    overrides = [*tiny_gpt(steps), "checkpoint.every=3"]
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "train", *overrides, "--workdir", str(workdir)]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 180
        while len(losses_by_step_or_empty(workdir)) < 8 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=120)[0].decode()
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "preempted (SIGTERM) after step" in output and "Traceback" not in output
    stopped_at = int(output.split("preempted (SIGTERM) after step ")[1].split(";")[0])
    assert 8 <= stopped_at < steps
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == stopped_at  # the final save, off the every-3 cadence if need be
    assert max(losses_by_step(workdir)) == stopped_at


def losses_by_step_or_empty(workdir) -> dict[int, float]:
    try:
        return losses_by_step(workdir)
    except FileNotFoundError:
        return {}
