"""End-to-end validation of an export (DESIGN §7): engine == PyTorch SpAF == base greedy.

:func:`validate_export` is what ``spaf-edge validate`` runs: graph parity of each graph
against the PyTorch modules it came from (:mod:`spaf_edge.validation.graph_parity`), then
greedy token equality of the onnxruntime engine, the PyTorch SpAF reference and plain
Hugging Face greedy decoding of the base model, on a few short prompts, in the export's
dtype. Greedy output does not depend on the drafter (SpAF is lossless), so without the
SpAF components the token check is as strict as with them; graph parity then judges the
backbone (upper logits) only, since the drafter weights are unknown.

A quantized export is a different model from the float base: there the engine's SpAF tokens
must equal the engine's own plain greedy tokens on the same export (what lossless means at
that precision), and where the float reference parts from them is reported, not judged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from spaf_edge.core.errors import CheckpointMismatchError

# Short prompts in the spirit of MT-Bench categories (writing, reasoning, coding, STEM,
# extraction, humanities); written for this check, never used for training.
BUILTIN_PROMPTS = (
    "Write a four-line poem about a lighthouse.",
    "If a train leaves at 3 pm and travels 120 km at 60 km/h, when does it arrive?",
    "Write a Python function that returns the largest of three numbers.",
    "Explain in two sentences why the sky is blue.",
    "List the three primary colors, separated by commas.",
    "What was the main cause of the fall of the Western Roman Empire? Answer briefly.",
)


@dataclass
class PromptCheck:
    prompt: str | list[int]
    prompt_tokens: int
    engine: list[int]  # onnxruntime engine, SpAF greedy
    spaf: list[int]  # PyTorch SpAF reference, greedy
    base: list[int]  # Hugging Face generate, greedy
    engine_tau: float
    spaf_tau: float
    plain: list[int] | None = None  # the engine's plain greedy: the reference of a quantized export

    @property
    def judged(self) -> list[list[int]]:
        """The token lists that must be equal: the engine's two modes, or the engine and both references."""
        return [self.engine, self.plain] if self.plain is not None else [self.engine, self.spaf, self.base]

    @property
    def passed(self) -> bool:
        return first_difference(self.judged) is None

    @property
    def first_mismatch(self) -> int | None:
        """First position where the judged token lists differ (None when equal)."""
        return first_difference(self.judged)

    def line(self, index: int) -> str:
        status = "PASS" if self.passed else f"FAIL at new token {self.first_mismatch}"
        text = self.prompt if isinstance(self.prompt, str) else f"{len(self.prompt)} token ids"
        line = (f"  [{index}] {status}: {len(self.engine)} tokens, tau engine {self.engine_tau:.2f} / "
                f"torch {self.spaf_tau:.2f}  {text[:60]!r}")
        if self.plain is not None:
            float_at = first_difference([self.engine, self.base])
            line += "; float base: same tokens" if float_at is None else f"; float base parts at token {float_at}"
        return line


@dataclass
class EndToEndReport:
    checks: list[PromptCheck] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)

    def summary(self) -> str:
        quantized = bool(self.checks) and self.checks[0].plain is not None
        what = "engine SpAF == engine plain greedy (quantized export)" if quantized else \
            "engine == PyTorch SpAF == base"
        head = f"end-to-end greedy tokens, {what} ({self.settings}): {'PASS' if self.passed else 'FAIL'}"
        lines = [head] + [check.line(i) for i, check in enumerate(self.checks)]
        for i, check in enumerate(self.checks):
            if not check.passed:
                at = check.first_mismatch
                others = (f"plain {check.plain[at:at + 5]}" if quantized else
                          f"torch {check.spaf[at:at + 5]}, base {check.base[at:at + 5]}")
                lines.append(f"  [{i}] from token {at}: engine {check.engine[at:at + 5]}, {others}")
        return "\n".join(lines)


@dataclass
class ValidationReport:
    export_dir: str
    end_to_end: EndToEndReport
    parity: Any = None  # spaf_edge.validation.graph_parity.GraphParityReport, None when skipped
    components: bool = True  # whether the SpAF components of the export were given

    @property
    def parity_passed(self) -> bool:
        if self.parity is None:
            return True
        if self.components:
            return self.parity.passed
        from spaf_edge.core.io_names import LOGITS

        return bool(self.parity.errors) and not [e for e in self.parity.failures if e.output == LOGITS]

    @property
    def passed(self) -> bool:
        return self.parity_passed and self.end_to_end.passed

    def summary(self) -> str:
        lines = [f"validate {self.export_dir}"]
        if self.parity is None:
            lines.append("graph parity: skipped")
        else:
            lines.append(self.parity.summary())
            if not self.components:
                lines.append("  (no --components: draft outputs are reported, only the upper logits are judged: "
                             f"{'PASS' if self.parity_passed else 'FAIL'})")
        lines.append(self.end_to_end.summary())
        lines.append(f"RESULT: {'PASS' if self.passed else 'FAIL'}")
        return "\n".join(lines)


def validate_export(
    export_dir: str | os.PathLike,
    base_model: str | os.PathLike = "default",
    components: str | os.PathLike | None = None,
    prompts: Sequence[str | list[int]] | None = None,
    max_new_tokens: int = 32,
    provider: str = "cpu",
    parity: bool = True,
    chat: bool = True,
) -> ValidationReport:
    """Graph parity, then end-to-end greedy token equality; see the module docstring."""
    from spaf_edge.core.config import SpAFConfig
    from spaf_edge.model import SpAFModel
    from spaf_edge.runtime.engine import Engine

    engine = Engine.from_folder(export_dir, provider=provider)
    manifest = engine.manifest
    config = None if components is not None else SpAFConfig.from_dict(manifest.spaf)
    model = SpAFModel.from_pretrained(base_model, config, components=components)
    if model.fingerprint != manifest.base_fingerprint:
        raise CheckpointMismatchError(
            f"{export_dir} was exported from base model {manifest.base_model!r} (fingerprint "
            f"{manifest.base_fingerprint}), but --base-model {base_model} has fingerprint {model.fingerprint}. "
            "Pass the base model the export was made from."
        )
    parity_report = None
    if parity:
        from spaf_edge.validation.graph_parity import check_graphs

        parity_report = check_graphs(model, export_dir)
    if prompts is None:
        prompts = BUILTIN_PROMPTS if engine.tokenizer is not None else default_id_prompts(manifest.sizes.vocab_size)
    report = check_end_to_end(engine, model, prompts, max_new_tokens, chat)
    return ValidationReport(str(export_dir), report, parity_report, components is not None)


def check_end_to_end(
    engine: Any, model: Any, prompts: Sequence[str | list[int]], max_new_tokens: int = 32, chat: bool = True
) -> EndToEndReport:
    """Greedy tokens of the engine, the PyTorch SpAF reference and HF base greedy (and, for a quantized
    export, the engine's plain greedy), per prompt."""
    from spaf_edge.generation.reference import spaf_generate

    settings = engine.settings(temperature=0.0, top_p=1.0, top_k=0)
    drafting = dict(
        num_draft_tokens=settings.num_draft_tokens, serial_parallel_transition=settings.serial_parallel_transition,
        draft_stop_threshold=settings.draft_stop_threshold,
    )
    eos = sorted(engine.eos)
    report = EndToEndReport(settings=dict(drafting, max_new_tokens=max_new_tokens))
    for prompt in prompts:
        ids = engine.encode(prompt, chat)
        budget = max(1, min(max_new_tokens, engine.max_length + 1 - len(ids)))
        ran = engine.generate(ids, max_new_tokens=budget, temperature=0.0, top_p=1.0, top_k=0, **drafting)
        reference = spaf_generate(
            model, ids, max_new_tokens=budget, temperature=0.0, top_p=1.0, top_k=0, eos_token_ids=eos,
            max_context=max(model.max_context, len(ids) + budget), **drafting,
        )
        plain = None
        if engine.manifest.quantization:
            plain = engine.generate(ids, max_new_tokens=budget, temperature=0.0, mode="greedy").tokens
        report.checks.append(PromptCheck(
            prompt, len(ids), ran.tokens, reference.tokens, base_greedy(model.base, ids, budget, eos),
            ran.stats.tau, reference.stats.tau, plain,
        ))
    return report


def first_difference(token_lists: list[list[int]]) -> int | None:
    """First position where the lists differ (a shorter list differs where it ends); None when equal."""
    if all(tokens == token_lists[0] for tokens in token_lists):
        return None
    for index, tokens in enumerate(zip(*token_lists)):
        if len(set(tokens)) > 1:
            return index
    return min(len(tokens) for tokens in token_lists)


@torch.no_grad()
def base_greedy(base: Any, prompt_ids: list[int], max_new_tokens: int, eos: list[int]) -> list[int]:
    """Plain Hugging Face greedy decoding (``generate``), stopping at the same EOS ids."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos or None,
        pad_token_id=eos[0] if eos else 0,
    )
    ids = torch.tensor([prompt_ids], device=next(base.parameters()).device)
    out = base.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return [int(t) for t in out[0, len(prompt_ids):]]


def default_id_prompts(vocab_size: int) -> list[list[int]]:
    """Token-id prompts for exports without a tokenizer (deterministic, spread over the vocabulary)."""
    return [[(7 * i + 3 * j + 1) % vocab_size for j in range(5 + 3 * i)] for i in range(3)]
