"""Per-run generation statistics shared by the PyTorch reference and the engine."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    verify_steps: int = 0  # one per target (full-model) pass after the prefill
    drafted: list[int] = field(default_factory=list)  # drafted[j]: drafts proposed at position j+1
    accepted: list[int] = field(default_factory=list)  # accepted[j]: of those, accepted
    candidates: int = 0  # tree nodes verified besides the pending tokens (a chain's: its drafts)
    prefill_seconds: float = 0.0
    wall_seconds: float = 0.0
    first_token_seconds: float = 0.0

    def record(self, num_drafts: int, num_accepted: int, candidates: int | None = None) -> None:
        """Count one verify step that proposed drafts down to depth ``num_drafts`` (``candidates``
        nodes in all; a chain's ``num_drafts``) and accepted ``num_accepted``."""
        self.candidates += num_drafts if candidates is None else candidates
        need = max(num_drafts - len(self.drafted), 0)
        self.drafted.extend([0] * need)
        self.accepted.extend([0] * need)
        for j in range(num_drafts):
            self.drafted[j] += 1
            self.accepted[j] += int(j < num_accepted)
        self.verify_steps += 1

    @property
    def tau(self) -> float:
        """Mean tokens committed per verify step."""
        return self.new_tokens / self.verify_steps if self.verify_steps else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted)]

    @property
    def acceptance_rate(self) -> float:
        drafted = sum(self.drafted)
        return sum(self.accepted) / drafted if drafted else 0.0

    @property
    def decode_seconds(self) -> float:
        return max(self.wall_seconds - self.prefill_seconds, 1e-9)

    @property
    def tokens_per_second(self) -> float:
        """New tokens per second of wall time, prefill included."""
        return self.new_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            tau=self.tau,
            acceptance_by_position=self.acceptance_by_position,
            acceptance_rate=self.acceptance_rate,
            tokens_per_second=self.tokens_per_second,
        )
        return data

    def summary(self) -> str:
        accept = " ".join(f"{a:.2f}" for a in self.acceptance_by_position)
        return (
            f"{self.new_tokens} tokens in {self.wall_seconds:.2f}s ({self.tokens_per_second:.1f} tok/s), "
            f"{self.verify_steps} verify steps, tau={self.tau:.2f}, acceptance by position [{accept}]"
        )
