"""What every benchmark shares: the machine it ran on, page-fault counts, tables as text or
Markdown, the result files, and the command line's small argument types."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

try:
    import resource
except ImportError:  # Windows: page faults are not counted
    resource = None

# A table column: its header and how a record gives its cell.
Column = tuple[str, Callable[[dict[str, Any]], str]]


def build_table(columns: Sequence[Column], records: Sequence[dict[str, Any]]) -> dict[str, list]:
    """``{"headers": [...], "rows": [[cell, ...], ...]}`` from column specs and records."""
    return {
        "headers": [header for header, _ in columns],
        "rows": [[cell(record) for _, cell in columns] for record in records],
    }


def render(table: dict[str, list], markdown: bool = False) -> str:
    """A table as aligned text (first column left-aligned, the rest right) or as Markdown."""
    lines = [table["headers"], *table["rows"]]
    if markdown:
        rule = ["---"] + ["---:"] * (len(table["headers"]) - 1)
        return "\n".join("| " + " | ".join(line) + " |" for line in [lines[0], rule, *lines[1:]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]

    def fmt(line: list[str]) -> str:
        cells = [line[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)
        ]
        return "  ".join(cells)

    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths), *map(fmt, lines[1:])])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _minor_page_faults() -> int | None:
    if resource is None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class PageFaults:
    """Counts the minor page faults this process takes inside a ``with`` block: ``count``
    afterwards (None where the OS does not count them).

    On CPU, a buffer XLA allocates afresh in each step (a temporary too large to be reused)
    is mapped anew every call and faults once per 4 KiB page on first touch; buffers that
    are donated and updated in place take none.
    """

    count: int | None = None

    def __enter__(self) -> PageFaults:
        self._start = _minor_page_faults()
        return self

    def __exit__(self, *exc_info: object) -> None:
        end = _minor_page_faults()
        self.count = None if self._start is None or end is None else end - self._start


def faults_per_step(counts: Sequence[int | None]) -> float | None:
    """The median of per-step fault counts; None if any is unknown."""
    return None if None in counts else statistics.median(counts)


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the system has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# Environment variables that change what a benchmark measures: XLA's compiler options, and
# glibc's allocator tunables (on CPU, how XLA's temporary buffers are mapped).
SETTINGS = ("XLA_FLAGS", "GLIBC_TUNABLES")


def environment() -> dict[str, Any]:
    """The date, devices, host CPU and library versions a result was measured with."""
    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device_kind": device.device_kind,
        "platform": device.platform,
        "device_count": jax.device_count(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "settings": {name: os.environ[name] for name in SETTINGS if os.environ.get(name)},
    }


def machine_lines(meta: dict[str, Any]) -> list[str]:
    """The report's first lines: when, by which command, on what (from :func:`environment`
    plus ``command``, ``load_start`` and ``load_end``)."""
    versions = f"jax {meta['jax']}, optax {meta['optax']}"
    if "flax" in meta:
        versions += f", flax {meta['flax']}"
    return [
        f"date: {meta['date']}",
        f"command: {meta['command']}",
        f"device: {meta['device_kind']} ({meta['platform']}, {meta['device_count']} device(s)); "
        f"host CPU: {meta['cpu']}, {meta['cpu_count']} cores; "
        f"load average start {meta['load_start']}, end {meta['load_end']}",
        f"versions: {versions}, python {meta['python']}",
        "settings: "
        + (" ".join(f"{name}={value}" for name, value in meta["settings"].items()) or "(none)"),
    ]


def write_results(
    result: dict[str, Any],
    out: Path,
    name: str,
    format_report: Callable[[dict[str, Any], bool], str],
) -> tuple[Path, Path]:
    """``<out>/<name>_<device kind>_<date>_<time>.{json,md}``: the result, and its report."""
    meta = result["meta"]
    kind = re.sub(r"[^a-z0-9]+", "-", meta["device_kind"].lower()).strip("-") or "device"
    stamp = datetime.datetime.fromisoformat(meta["date"]).strftime("%Y-%m-%d_%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}_{kind}_{stamp}.json", out / f"{name}_{kind}_{stamp}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(format_report(result, True))
    return json_path, md_path


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that produced a result, for its report: ``python -m <module> <args>``."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python -m", module, *map(shlex.quote, args)])


def publish(
    result: dict[str, Any],
    out: Path,
    name: str,
    format_report: Callable[[dict[str, Any], bool], str],
) -> None:
    """Prints the report and writes the result files (:func:`write_results`)."""
    print(format_report(result, False), flush=True)
    for path in write_results(result, out, name, format_report):
        print(f"wrote {path}")


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def names_from(allowed: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """An ``argparse`` type: a comma-separated, non-empty list of names from ``allowed``."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = sorted(set(names) - set(allowed))
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what}(s) {unknown}; choose from {', '.join(allowed)}"
            )
        return names

    return parse
