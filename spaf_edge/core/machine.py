"""Describe the machine a benchmark ran on: CPU, cores, memory, OS, library versions, load."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = (
    "spaf-edge", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "torch", "transformers",
    "optimum", "optimum-onnx", "numpy", "tokenizers",
)


def describe_machine(provider: str, threads: int | None) -> dict[str, Any]:
    """Everything a reader needs to judge the numbers; absent packages are left out."""
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "ram_gb": _round_gb(total_ram_bytes()),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "provider": provider,
        "threads": threads,
        "load_average": load_average(),
    }


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    if platform.system() == "Darwin":
        try:
            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def total_ram_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: a busy machine makes timings noisy."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except ImportError:
        return None


def _round_gb(value: int | None) -> float | None:
    return round(value / 2**30, 1) if value else None
