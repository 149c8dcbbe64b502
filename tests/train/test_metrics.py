"""Tests for train/metrics.py: JSONL + TensorBoard writer, plot, FLOPs/MFU, peaks, spikes."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.crc32c import crc32c
from tensorboardX.proto import event_pb2

from tests.train.recipes import subprocess_env
from train import metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(directory) -> list[event_pb2.Event]:
    """Parses every TFRecord-framed event file under ``directory``, checking the checksums."""
    files = sorted(directory.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {directory}"
    events = []
    for path in files:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            header = data[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            (length_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
            assert length_crc == _masked_crc(header)
            payload = data[pos + 12 : pos + 12 + length]
            (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
            assert payload_crc == _masked_crc(payload)
            events.append(event_pb2.Event.FromString(payload))
            pos += 16 + length
    return events


def scalars(directory) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for event in read_events(directory):
        for value in event.summary.value:
            out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def raw_lines(workdir) -> list[dict]:
    text = (workdir / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# --------------------------------------------------------------------------------------------
# MetricsWriter


def test_jsonl_lines_parse_and_hold_values(tmp_path):
    with metrics.MetricsWriter(tmp_path, enabled=True) as writer:
        writer.write(10, {"loss": 2.5, "grad_norm": np.float32(0.75), "lr": jnp.asarray(1e-3)})
        writer.write(20, {"loss": 2.0, "skipped_steps": 3, "finite": True})
        # Visible before close: flushed per write.
        assert len(raw_lines(tmp_path)) == 2
    lines = raw_lines(tmp_path)
    assert [line["step"] for line in lines] == [10, 20]
    assert lines[0]["loss"] == 2.5
    assert lines[0]["grad_norm"] == 0.75
    assert lines[0]["lr"] == pytest.approx(1e-3, rel=1e-6)
    assert isinstance(lines[0]["lr"], float)
    assert lines[1]["skipped_steps"] == 3 and isinstance(lines[1]["skipped_steps"], int)
    assert lines[1]["finite"] == 1
    assert all(isinstance(line["time"], float) for line in lines)


def test_non_finite_values_are_valid_json_and_read_back(tmp_path):
    with metrics.MetricsWriter(tmp_path, enabled=True) as writer:
        writer.write(1, {"loss": float("nan"), "grad_norm": float("inf"), "x": -np.inf})
    text = (tmp_path / "metrics.jsonl").read_text()
    # Strict JSON: the Python extensions NaN / Infinity must not appear.
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    line = raw_lines(tmp_path)[0]
    assert line["loss"] == "nan" and line["grad_norm"] == "inf" and line["x"] == "-inf"
    (record,) = metrics.read_metrics(tmp_path)
    assert math.isnan(record["loss"])
    assert record["grad_norm"] == math.inf and record["x"] == -math.inf


def test_reopen_appends_instead_of_truncating(tmp_path):
    with metrics.MetricsWriter(tmp_path, enabled=True) as writer:
        writer.write(1, {"loss": 3.0})
        writer.write(2, {"loss": 2.9})
    with metrics.MetricsWriter(tmp_path, enabled=True) as writer:
        writer.write(3, {"loss": 2.8})
    assert [line["step"] for line in raw_lines(tmp_path)] == [1, 2, 3]
    assert [r["loss"] for r in metrics.read_metrics(tmp_path)] == [3.0, 2.9, 2.8]


def test_resume_marker_voids_the_abandoned_attempt(tmp_path):
    # First attempt logs steps 10..50 and dies; the newest checkpoint is at step 30.
    with metrics.MetricsWriter(tmp_path, start_step=0, enabled=True) as writer:
        for step in (10, 20, 30, 40, 50):
            writer.write(step, {"loss": 100.0 + step})
    # Resumed attempt restarts after step 30 and stops at step 40: step 50 is stale.
    with metrics.MetricsWriter(tmp_path, start_step=30, enabled=True) as writer:
        writer.write(40, {"loss": 1.0})
    lines = raw_lines(tmp_path)
    assert lines[0] == {"restart_after_step": 0, "time": lines[0]["time"]}
    assert sum("restart_after_step" in line for line in lines) == 2
    records = metrics.read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in records] == [
        (10, 110.0),
        (20, 120.0),
        (30, 130.0),
        (40, 1.0),
    ]


def test_same_step_entries_merge_later_wins(tmp_path):
    with metrics.MetricsWriter(tmp_path, enabled=True) as writer:
        writer.write(5, {"loss": 2.0, "lr": 0.1})
        writer.write(5, {"eval_loss": 2.2, "loss": 1.9})
    (record,) = metrics.read_metrics(tmp_path)
    assert record["loss"] == 1.9 and record["lr"] == 0.1 and record["eval_loss"] == 2.2


def test_truncated_last_line_is_isolated(tmp_path):
    with metrics.MetricsWriter(tmp_path, enabled=True) as writer:
        writer.write(1, {"loss": 3.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # a crash mid-write
    with metrics.MetricsWriter(tmp_path, enabled=True) as writer:
        writer.write(3, {"loss": 2.0})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[1] == '{"step": 2, "lo'
    assert json.loads(lines[2])["step"] == 3
    assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1, 3]


def test_disabled_writer_writes_nothing(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    # A non-primary process: the default `enabled` follows jax.process_index().
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    writer = metrics.MetricsWriter(workdir, start_step=0)
    assert not writer.enabled
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert not workdir.exists()
    explicit = metrics.MetricsWriter(tmp_path / "other", enabled=False)
    explicit.write(1, {"loss": 1.0})
    explicit.close()
    assert list(tmp_path.iterdir()) == []


def test_default_enabled_on_process_zero(tmp_path):
    assert jax.process_index() == 0
    with metrics.MetricsWriter(tmp_path) as writer:
        assert writer.enabled


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    with metrics.MetricsWriter(tmp_path, enabled=True) as writer:
        writer.write(1, {"loss": 2.5, "grad_norm": 0.5})
        writer.write(2, {"loss": 2.25})
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    got = scalars(tmp_path / "tensorboard")
    assert got["loss"] == [(1, 2.5), (2, 2.25)]
    assert got["grad_norm"] == [(1, 0.5)]


def test_the_event_writer_loads_without_torch_and_torch_imports_after(tmp_path):
    """A fresh process (this one has torch and tensorboardX loaded by the test modules)."""
    pytest.importorskip("torch")
    script = f"""
import sys
from train import metrics
with metrics.MetricsWriter({str(tmp_path)!r}, enabled=True) as writer:
    writer.write(1, {{"loss": 2.5}})
assert "tensorboardX" in sys.modules and "torch" not in sys.modules, "torch was imported"
import torch
assert torch.ones(2).sum().item() == 2.0
"""
    done = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert scalars(tmp_path / "tensorboard")["loss"] == [(1, 2.5)]


def test_bad_writes_name_the_problem(tmp_path):
    with metrics.MetricsWriter(tmp_path, enabled=True) as writer:
        with pytest.raises(ValueError, match="step"):
            writer.write(-1, {"loss": 1.0})
        with pytest.raises(ValueError, match="'loss'"):
            writer.write(1, {"loss": "high"})
        with pytest.raises(ValueError, match="'time'.*reserved"):
            writer.write(1, {"time": 1.0})
    with pytest.raises(ValueError, match="closed"):
        writer.write(2, {"loss": 1.0})
    with pytest.raises(ValueError, match="start_step"):
        metrics.MetricsWriter(tmp_path, start_step=-3, enabled=True)


def test_read_metrics_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        metrics.read_metrics(tmp_path)


# --------------------------------------------------------------------------------------------
# Plot


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width >= 400 and height >= 300
    assert len(data) > 5_000


def test_plot_writes_a_png(tmp_path):
    with metrics.MetricsWriter(tmp_path, enabled=True) as writer:
        for step in range(1, 51):
            logged = {
                "loss": 3.0 / step**0.3,
                "learning_rate": 1e-3 * min(1.0, step / 10),
                "grad_norm": 1.0 + 0.1 * np.sin(step),
                "tokens_per_second": 1000.0 + step,
            }
            if step % 10 == 0:
                logged["eval_loss"] = 3.1 / step**0.3
            writer.write(step, logged)
    path = metrics.plot(tmp_path)
    assert path == tmp_path / "metrics.png"
    _assert_png(path)


def test_plot_handles_missing_keys_and_non_finite(tmp_path):
    with metrics.MetricsWriter(tmp_path, enabled=True) as writer:
        writer.write(1, {"loss": 2.0, "grad_norm": float("nan")})
        writer.write(2, {"loss": float("inf"), "grad_norm": 0.0})
        writer.write(3, {"loss": 1.5})
    _assert_png(metrics.plot(tmp_path))


def test_plot_without_metrics_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        metrics.plot(tmp_path)


# --------------------------------------------------------------------------------------------
# FLOPs, MFU, peaks


def test_model_flops_per_token_gpt2_small_by_hand():
    # GPT-2 small: N = 124M matmul parameters, L = 12, d = 768, T = 1024.
    # 6N = 744e6; 12 L d T = 12 * 12 * 768 * 1024 = 113,246,208.
    got = metrics.model_flops_per_token(124_000_000, 12, 768, 1024)
    assert got == 744_000_000 + 113_246_208
    half = metrics.model_flops_per_token(124_000_000, 12, 768, 1024, causal_half=True)
    assert half == 744_000_000 + 56_623_104


def test_mfu_by_hand():
    flops_per_token = 857_246_208.0
    # 100k tokens/s on one H100 in bf16: 8.57246208e13 / 9.89e14 = 0.0866781...
    got = metrics.mfu(100_000.0, flops_per_token, 989e12)
    assert got == pytest.approx(0.08667808, rel=1e-6)
    assert metrics.mfu(100_000.0, flops_per_token, None) is None
    with pytest.raises(ValueError, match="peak_flops"):
        metrics.mfu(1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="d_model"):
        metrics.model_flops_per_token(10, 2, -1, 8)


@pytest.mark.parametrize(
    ("kind", "dtype", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
        ("NVIDIA H100 80GB HBM3", jnp.float32, 494.5e12),
        ("NVIDIA H100 PCIe", jnp.bfloat16, 756e12),
        ("NVIDIA H100 NVL", "bfloat16", 835.5e12),
        ("NVIDIA H200", "bfloat16", 989e12),
        ("NVIDIA GH200 480GB", "float16", 989e12),
        ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
        ("NVIDIA A100-SXM4-40GB", np.float32, 156e12),
        ("NVIDIA B200", "bfloat16", 2250e12),
        ("Tesla V100-SXM2-16GB", "float16", 125e12),
        ("Tesla V100-SXM2-16GB", "bfloat16", None),
        ("TPU v4", "bfloat16", 275e12),
        ("TPU v4 lite", "bfloat16", None),
        ("TPU v5 lite", "bfloat16", 197e12),
        ("TPU v5e", "bfloat16", 197e12),
        ("TPU v5", "bfloat16", 459e12),
        ("TPU v5p", jnp.bfloat16, 459e12),
        ("TPU v6 lite", "bfloat16", 918e12),
        ("TPU v5 lite", "float16", None),
        ("cpu", "bfloat16", None),
        ("Some Future Accelerator", "bfloat16", None),
    ],
)
def test_device_peak_flops_table(kind, dtype, expected):
    assert metrics.device_peak_flops(kind, dtype) == expected


def test_device_peak_flops_on_real_cpu_devices():
    devices = jax.devices()
    assert metrics.device_peak_flops(devices[0], jnp.bfloat16) is None
    assert metrics.total_peak_flops(devices, jnp.bfloat16) is None


def test_total_peak_flops_sums_devices():
    assert metrics.total_peak_flops(["TPU v4"] * 8, "bfloat16") == 8 * 275e12
    assert metrics.total_peak_flops(["TPU v4", "cpu"], "bfloat16") is None
    with pytest.raises(ValueError, match="dtype"):
        metrics.device_peak_flops("TPU v4", "not-a-dtype")


# --------------------------------------------------------------------------------------------
# Gradient-norm spikes


def test_spike_monitor_warns_on_10x_spike_not_on_noise():
    rng = np.random.default_rng(0)
    monitor = metrics.GradNormMonitor(factor=5.0, window=100)
    warnings = [monitor.check(step, 1.0 + 0.3 * rng.standard_normal()) for step in range(200)]
    assert warnings == [None] * 200
    message = monitor.check(200, 10.0)
    assert message is not None and "step 200" in message and "10" in message
    assert monitor.check(201, 1.1) is None


def test_spike_monitor_ignores_early_steps_and_non_finite():
    monitor = metrics.GradNormMonitor(factor=5.0, window=100, min_samples=10)
    for step in range(9):
        assert monitor.check(step, 1.0) is None
    assert monitor.check(9, 100.0) is None  # only 9 samples so far
    for step, bad in enumerate([float("nan"), float("inf"), np.float32("nan")], start=10):
        assert monitor.check(step, bad) is None
    # 10 finite samples now: [1]*9 + [100], median 1.
    assert monitor.check(20, 6.0) is not None
    assert monitor.check(21, 4.0) is None


def test_spike_monitor_window_forgets_old_norms():
    monitor = metrics.GradNormMonitor(factor=5.0, window=10, min_samples=10)
    for step in range(10):
        monitor.check(step, 1.0)
    assert monitor.check(10, 6.0) is not None
    for step in range(11, 21):  # the scale moves up to 20 and fills the window
        monitor.check(step, 20.0)
    assert monitor.check(21, 30.0) is None


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"factor": 1.0}, "factor"),
        ({"window": 0}, "window"),
        ({"min_samples": 0}, "min_samples"),
        ({"window": 5, "min_samples": 10}, "min_samples"),
    ],
)
def test_spike_monitor_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        metrics.GradNormMonitor(**kwargs)


# --------------------------------------------------------------------------------------------
# Throughput


def test_throughput_from_a_fake_clock():
    now = [100.0]
    tput = metrics.Throughput(clock=lambda: now[0])
    for _ in range(4):
        now[0] += 0.5
        tput.tick(1024)
    assert tput.measure() == {"tokens_per_second": 2048.0, "step_time": 0.5}
    now[0] += 3.0
    tput.tick(3000, steps=2)
    assert tput.measure() == {"tokens_per_second": 1000.0, "step_time": 1.5}
    with pytest.raises(ValueError, match="tick"):
        tput.measure()
    tput.reset()
    with pytest.raises(ValueError, match="tokens"):
        tput.tick(-1)
