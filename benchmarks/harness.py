"""Timing, peak memory and the result table shared by every row."""

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class Row:
    """One line of the table: a ratio measured side by side, its goal and whether it holds (None: no verdict)."""

    name: str
    measured: str
    ratio: float | None = None
    goal: str = ""
    holds: bool | None = None
    details: dict = field(default_factory=dict)


def checked_row(name: str, measured: str, ratio: float, goal: str, details: dict | None = None) -> Row:
    """A row whose goal is `<= x` or `>= x`."""
    operator, bound = goal.split()
    holds = ratio <= float(bound) if operator == "<=" else ratio >= float(bound)
    return Row(name, measured, ratio, goal, holds, details or {})


def interleaved_medians(
    candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds of each candidate, run in turn `repeats` times after `warmup` untimed rounds."""
    for _ in range(warmup):
        for run in candidates.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def rss_status() -> dict[str, int]:
    """
    Current (`VmRSS`) and peak (`VmHWM`) resident memory of this process, in bytes (Linux); `RssAnon` and `RssFile`
    split the current one into memory the process allocated and pages of files it maps (such as safetensors).
    """
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def reset_peak_rss() -> int:
    """Restart the peak-RSS counter from the current RSS (Linux `clear_refs` 5) and return that RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss_status()["VmRSS"]


def run_child(*args: str, module: str = "benchmarks.child") -> dict:
    """Run `python -m MODULE ARGS` in a fresh process (its own peak memory) and return its JSON line."""
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def machine_description() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return (
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
        f"threads (torch {torch.__version__})"
    )


def markdown_table(rows: list[Row]) -> str:
    lines = ["| row | measured | ratio | goal | holds |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        ratio = "" if row.ratio is None else f"{row.ratio:.3f}"
        holds = {True: "yes", False: "**no**", None: ""}[row.holds]
        lines.append(f"| {row.name} | {row.measured} | {ratio} | {row.goal} | {holds} |")
    return "\n".join(lines)


def write_json(rows: list[Row], path: str | Path, settings: dict) -> None:
    payload = {"machine": machine_description(), "settings": settings, "rows": [asdict(row) for row in rows]}
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
