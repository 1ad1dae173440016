"""The SpAF drafter's calls on the PyTorch model (:class:`spaf_edge.decoding.spaf.DraftCalls`).

A state handle is a ``[1, 1, H]`` tensor; queued rows of an attending adapter are a list
of tensor pairs, computed by one ``draft_step`` call on the adapter's cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from spaf_edge.generation.reference import TorchBackend


class TorchDraftCalls:
    """Draft-step calls of one reference generation: the model's AlignmentHead, adapter and draft head."""

    def __init__(self, backend: TorchBackend) -> None:
        self.backend = backend
        self.model = backend.model
        self.adapter = self.model.new_adapter_cache(backend.max_length)  # None unless the adapter attends
        self.attends = self.adapter is not None
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # queued (h(t), f(t-1)), [1, 1, H] each
        draft_vocab = self.model.draft_vocab
        self.draft_vocab = draft_vocab.cpu().numpy() if draft_vocab.numel() else None
        self.vocab_size = self.model.base.config.vocab_size

    @property
    def position(self) -> int:
        return self.backend.position

    @property
    def pending(self) -> int:
        return self.backend.tokens[-1]

    def exact_hidden(self) -> torch.Tensor | None:
        return self.backend.hidden  # None only at T = 0, where the first draft is serial

    def exact_top(self) -> torch.Tensor:
        return self._or_zeros(self.backend.top)

    def exact_top2(self) -> torch.Tensor:
        return self._or_zeros(self.backend.top2)

    def row_states(self, row: int, before: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        backend = self.backend
        previous = self.exact_top() if before is None else backend.call_top[:, before:before + 1]
        return backend.call_hidden[:, row:row + 1], previous

    def serial(self, token: int, j: int) -> torch.Tensor:
        model = self.model
        hidden = model.run_layers(model.embed(self._ids(token)), self.backend.lower)  # exact h(T+j-1)
        self.backend.serial_hidden.append(hidden)
        return hidden

    def align(self, token: int, hidden: torch.Tensor, j: int) -> torch.Tensor:
        return self.model.align(self._ids(token), hidden)

    def head(self, hidden: torch.Tensor, previous: torch.Tensor, slot: int) -> tuple[np.ndarray, torch.Tensor]:
        return self._draft_step(hidden, previous)  # an attending adapter's drafted entry joins its cache

    # ---- an attending adapter's cache ------------------------------------
    @property
    def adapter_length(self) -> int:
        return self.adapter.length

    @property
    def queued(self) -> int:
        return len(self.rows)

    def rewind_adapter(self, length: int) -> None:
        self.adapter.rewind_to(length)

    def drop_queue(self) -> None:
        self.rows = []

    def queue(self, hidden: torch.Tensor, previous: torch.Tensor) -> None:
        self.rows.append((hidden, previous))

    def run_queue(self, slot: int) -> tuple[np.ndarray, torch.Tensor]:
        rows, self.rows = self.rows, []
        hidden = torch.cat([h for h, _ in rows], dim=1)  # [1, S, H]
        previous = torch.cat([f for _, f in rows], dim=1)  # [1, S, H]
        return self._draft_step(hidden, previous)

    def _draft_step(self, hidden: torch.Tensor, previous: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """The draft head on rows [1, S, H] (at the adapter cache's next positions when it attends):
        the last row's draft-vocabulary logits [V_d] and drafted top state [1, 1, H]."""
        offset, cache = (self.adapter.length, self.adapter) if self.attends else (0, None)
        logits, tops = self.model.draft_step(hidden, prev_top=previous, offset=offset, cache=cache)
        return logits[0, -1].float().cpu().numpy(), tops[:, -1:]

    def _ids(self, token: int) -> torch.Tensor:
        return torch.tensor([[token]], device=self.model.base_device)  # [1, 1]

    def _or_zeros(self, state: torch.Tensor | None) -> torch.Tensor:
        if state is not None:
            return state
        param = next(self.model.base.parameters())
        return torch.zeros(1, 1, self.model.base.config.hidden_size, dtype=param.dtype, device=param.device)
