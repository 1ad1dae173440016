"""Describe the machine a benchmark ran on: CPU, cores, memory, OS, library versions, load.

The CPU is named with its family/model and the vector extensions ONNX Runtime's kernels
choose between (AVX2, AVX-512, VNNI, AMX; NEON dot product): a cloud VM calls a Zen 1 and a
Zen 4 alike "AMD EPYC", and their int4 kernels, speeds and best decoding settings differ.
"""

from __future__ import annotations

import functools
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
        "cpu_id": cpu_id(),
        "cpu_features": cpu_features(),
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


def cpu_model(fields: dict[str, str] | None = None) -> str:
    """The CPU's marketing name: x86's ``model name``, else Arm's ``Hardware`` line, else the OS's answer."""
    fields = _cpuinfo_fields() if fields is None else fields
    name = fields.get("model name") or fields.get("hardware")
    if name:
        return name
    if platform.system() == "Darwin":
        try:
            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


# Kernel-relevant extensions, in /proc/cpuinfo's spelling -> how reports print them.
_FEATURES = {
    "avx2": "AVX2", "fma": "FMA", "avx_vnni": "AVX-VNNI", "avx512f": "AVX-512F", "avx512bw": "AVX-512BW",
    "avx512_vnni": "AVX-512 VNNI", "avx512_bf16": "AVX-512 BF16", "amx_tile": "AMX", "amx_int8": "AMX-INT8",
    "asimd": "NEON", "asimddp": "NEON dotprod", "i8mm": "I8MM", "sve": "SVE", "bf16": "BF16",
}


@functools.cache
def _cpuinfo_fields() -> dict[str, str]:
    """:func:`parse_cpuinfo` of /proc/cpuinfo (empty where there is none); read once."""
    cpuinfo = Path("/proc/cpuinfo")
    return parse_cpuinfo(cpuinfo.read_text(errors="replace")) if cpuinfo.is_file() else {}


def parse_cpuinfo(text: str) -> dict[str, str]:
    """``key: value`` lines of a /proc/cpuinfo text, keys lower-cased; the first processor's value wins,
    and lines outside every processor's block (Arm's ``Hardware`` at the end) are kept too."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if colon:
            fields.setdefault(key.strip().lower(), value.strip())
    return fields


def cpu_id(fields: dict[str, str] | None = None) -> str | None:
    """``family 25 model 17`` (x86) or ``implementer 0x41 part 0xd0c`` (Arm); None where unknown."""
    fields = _cpuinfo_fields() if fields is None else fields
    if "cpu family" in fields and "model" in fields:
        return f"family {fields['cpu family']} model {fields['model']}"
    if "cpu implementer" in fields and "cpu part" in fields:
        return f"implementer {fields['cpu implementer']} part {fields['cpu part']}"
    return None


def cpu_features(fields: dict[str, str] | None = None) -> list[str]:
    """The vector extensions among :data:`_FEATURES` that this CPU reports, in that order."""
    fields = _cpuinfo_fields() if fields is None else fields
    present = set((fields.get("flags") or fields.get("features") or "").split())
    return [label for flag, label in _FEATURES.items() if flag in present]


def describe_cpu(logical_cores: bool = False) -> str:
    """One line: model, id and extensions, e.g. ``AMD EPYC (family 23 model 1; AVX2, FMA)``."""
    return cpu_line(cpu_model(), cpu_id(), cpu_features(), (f"{os.cpu_count()} logical cores",) if logical_cores else ())


def cpu_line(model: str | None, identity: str | None, features: list[str] | None, extra: tuple[str, ...] = ()) -> str:
    """``model (identity; features; extra...)``, leaving out what is unknown; just the model if all is."""
    details = [part for part in (identity, ", ".join(features or ()), *extra) if part]
    return f"{model} ({'; '.join(details)})" if details else str(model)


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
