"""Decoding defaults that follow from what a verify row costs on a provider at a precision.

Drafting more tokens pays only while their expected acceptance outweighs the extra verify rows, and
a row's price differs by precision and by CPU. On a CPU one lower + upper call with 5 rows costs
1.1-1.3x a one-row call at fp32, but at int4 1.7-1.95x on an AMD EPYC with AVX-512 VNNI (Zen 4) and
2.6x on one with AVX2 only (Zen 1): MatMulNBits' multi-row path (accuracy level 4, int8 activations)
is slower per row than its one-row path, the more so without an int8 dot-product instruction
(`benchmarks/results/cpu-drafting-policy-v12/stack_rows.txt`, `cpu-avx2-defaults-v14/stack_rows.txt`).
There a SpAF chain should stop at higher confidence, so the draft stop threshold has a floor per
(provider, quantization, CPU kernel class), measured on the shipped components with the same engine
alternating settings prompt by prompt: with AVX-512 VNNI 0.3 against the config's 0.15 is 1.07x
at int4 and 1.04x at int8 (`cpu-stop-threshold-v13`); with AVX2 only 0.5 against 0.3 is 1.06x at
int4 (`cpu-avx2-defaults-v14`). fp32 keeps the config's value on both.

CPUs of other classes (Arm, AVX-VNNI without AVX-512) were not measured; they get the AVX2 floor,
the one that drafts less. These defaults sit between the export's SpAF config and a ``tuned``
entry: `spaf-edge tune` times the device itself and overrides them, and options given to ``run``
override everything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from spaf_edge.core.machine import cpu_features

VNNI = "avx512-vnni"  # int8 dot products in one instruction (MLAS's AVX-512 VNNI kernels)
OTHER = "other"  # AVX2 only, or not measured

STOP_THRESHOLD_FLOORS: dict[tuple[str, str | None, str], float] = {
    ("cpu", "int4", VNNI): 0.3,
    ("cpu", "int8", VNNI): 0.3,
    ("cpu", "int4", OTHER): 0.5,
    ("cpu", "int8", OTHER): 0.5,
}


def cpu_kernels(features: Sequence[str] | None = None) -> str:
    """This CPU's class for :data:`STOP_THRESHOLD_FLOORS`, from :func:`spaf_edge.core.machine.cpu_features`."""
    features = cpu_features() if features is None else features
    return VNNI if "AVX-512 VNNI" in features else OTHER


def precision_defaults(provider: str, quantization: str | None, spaf: Mapping[str, Any],
                       kernels: str | None = None) -> dict[str, Any]:
    """Settings that replace the SpAF config's for ``provider`` at ``quantization`` (often none).

    ``kernels``: the CPU's class (:func:`cpu_kernels`; None: this machine's). A config that already
    stops drafts at a higher threshold keeps it; ``None`` (never stop early) is raised to the floor too.
    """
    if provider == "cpu" and kernels is None:
        kernels = cpu_kernels()
    floor = STOP_THRESHOLD_FLOORS.get((provider, quantization, kernels or OTHER))
    threshold = spaf.get("draft_stop_threshold")
    if floor is None or (threshold is not None and threshold >= floor):
        return {}
    return {"draft_stop_threshold": floor}
