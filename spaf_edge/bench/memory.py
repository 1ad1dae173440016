"""Resident memory of a process: current and peak RSS, and a per-runner measurement in a fresh process.

A runner's memory figure is the peak RSS of a fresh Python process that loads only that
runner and generates once (``python -m spaf_edge.bench.worker``), so runners measured in
the same benchmark process do not inflate each other's numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

WORKER_MODULE = "spaf_edge.bench.worker"


def current_rss_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    statm = Path("/proc/self/statm")
    if statm.is_file():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return None


def peak_rss_bytes() -> int | None:
    """Peak RSS of this process since it started (this program's, not its parent's).

    On Linux this is ``VmHWM``: ``getrusage``'s ``ru_maxrss`` survives ``exec`` and would
    report the forking parent's peak when that was larger.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    try:
        import resource
    except ImportError:  # Windows
        try:
            import psutil

            return int(psutil.Process().memory_info().peak_wset)
        except (ImportError, AttributeError):
            return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS: bytes, Linux: KiB


def worker_env() -> dict[str, str]:
    """The environment of a worker: this spaf_edge importable even from another interpreter."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def measure_memory(
    runner: str,
    context: dict[str, Any],
    prompt_ids: list[int],
    max_new_tokens: int,
    python: str | None = None,
    timeout: float = 900,
) -> dict[str, Any]:
    """Load ``runner`` in a fresh process, generate once, and return its RSS figures (MiB)."""
    request = {
        "mode": "memory", "runner": runner, "context": context,
        "prompt_ids": list(prompt_ids), "max_new_tokens": max_new_tokens, "seed": 0,
    }
    with tempfile.TemporaryFile(mode="w+") as errors:
        try:
            done = subprocess.run(
                [python or sys.executable, "-m", WORKER_MODULE], input=json.dumps(request), text=True,
                stdout=subprocess.PIPE, stderr=errors, env=worker_env(), timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return {"error": f"the memory worker ran past {timeout:.0f} s"}
        errors.seek(0)
        tail = errors.read()[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        return {"error": f"memory worker failed (exit {done.returncode}): {tail.strip()}"}
    reply = json.loads(lines[-1])
    mib = 2**20
    return {
        "peak_rss_mb": round(reply["peak_rss_bytes"] / mib, 1),
        "start_rss_mb": round(reply["start_rss_bytes"] / mib, 1),
        "delta_mb": round((reply["peak_rss_bytes"] - reply["start_rss_bytes"]) / mib, 1),
        "new_tokens": reply["new_tokens"],
    }
