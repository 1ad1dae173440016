"""Decoding defaults that follow from what a verify row costs on a provider at a precision.

Drafting more tokens pays only while their expected acceptance outweighs the extra verify rows, and
a row's price differs by precision: on a CPU one lower + upper call with 5 rows costs 1.1-1.2x a
one-row call at fp32 but 1.7x at int4, whose multi-row MatMulNBits path is slower per row than its
one-row path (`benchmarks/results/cpu-drafting-policy-v12/stack_rows.txt`). There a SpAF chain
should stop at higher confidence, so the draft stop threshold has a floor per (provider,
quantization), measured on the shipped components (`benchmarks/results/cpu-stop-threshold-v13`:
0.3 against their config's 0.15 is 1.07x at int4 and 1.04x at int8 on MT-Bench, 1.08x on
input-grounded prompts at int4, and neutral at fp32, which keeps the config's value).

These defaults sit between the export's SpAF config and a ``tuned`` entry: `spaf-edge tune` times
the device itself and overrides them, and options given to ``run`` override everything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

STOP_THRESHOLD_FLOORS: dict[tuple[str, str | None], float] = {
    ("cpu", "int4"): 0.3,
    ("cpu", "int8"): 0.3,
}


def precision_defaults(provider: str, quantization: str | None, spaf: Mapping[str, Any]) -> dict[str, Any]:
    """Settings that replace the SpAF config's for ``provider`` at ``quantization`` (often none).

    A config that already stops drafts at a higher threshold keeps it; ``None`` (never stop early)
    is raised to the floor too.
    """
    floor = STOP_THRESHOLD_FLOORS.get((provider, quantization))
    threshold = spaf.get("draft_stop_threshold")
    if floor is None or (threshold is not None and threshold >= floor):
        return {}
    return {"draft_stop_threshold": floor}
