"""SpAF drafter modules (DESIGN §2): adapters and AlignmentHeads, each from a registry.

Neither holds a copy of the base's embedding, final norm or LM head: the model passes
those in. A new drafter kind registers a class here; the generation loop is untouched
because every kind maps cutoff states to cutoff-shaped states.

Adapters are called as ``adapter(hidden, prev_top)``. ``prev_top`` [..., H] is the top
state (the base's post-final-norm hidden state, what the LM head reads) of the position
before ``hidden``'s: exact after a verify pass, or the drafter's own estimate
``final_norm(a(...))`` of the previous draft step while drafting chains. Kinds whose
``reads_top_state`` is False ignore it (and their exported graphs have no such input).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from spaf_edge.config import SpAFConfig
from spaf_edge.errors import ConfigError

ADAPTER_KINDS: dict[str, type[nn.Module]] = {}
ALIGNMENT_HEAD_KINDS: dict[str, type[nn.Module]] = {}


def register(registry: dict[str, type[nn.Module]], name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        registry[name] = cls
        cls.kind = name
        return cls

    return decorator


def build_adapter(config: SpAFConfig, base_config: Any) -> nn.Module:
    return _lookup(ADAPTER_KINDS, config.adapter_kind, "adapter_kind")(config, base_config)


def build_alignment_head(config: SpAFConfig, base_config: Any) -> nn.Module:
    return _lookup(ALIGNMENT_HEAD_KINDS, config.alignment_head.kind, "alignment_head.kind")(config, base_config)


def _lookup(registry: dict[str, type[nn.Module]], kind: str, setting: str) -> type[nn.Module]:
    if kind not in registry:
        raise ConfigError(f"Unknown {setting}={kind!r}; registered kinds: {', '.join(sorted(registry))}.")
    return registry[kind]


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (the Llama norm)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


@register(ADAPTER_KINDS, "bottleneck")
class BottleneckAdapter(nn.Module):
    """``a(h) = h + W_up · silu(W_down · norm(h))``; ``W_up`` starts at zero (plain early exit)."""

    def __init__(self, config: SpAFConfig, base_config: Any) -> None:
        super().__init__()
        hidden = base_config.hidden_size
        inner = max(1, round(config.adapter_dim_ratio * hidden))
        self.norm = RMSNorm(hidden, base_config.rms_norm_eps)
        self.down = nn.Linear(hidden, inner, bias=False)
        self.up = nn.Linear(inner, hidden, bias=False)
        nn.init.normal_(self.down.weight, std=hidden**-0.5)
        nn.init.zeros_(self.up.weight)

    reads_top_state = False

    def forward(self, hidden: torch.Tensor, prev_top: torch.Tensor | None = None) -> torch.Tensor:
        # hidden: [..., H] -> [..., H]; prev_top is not used by this kind
        return hidden + self.up(nn.functional.silu(self.down(self.norm(hidden))))


@register(ADAPTER_KINDS, "fused")
class FusedAdapter(nn.Module):
    """``a(h, f) = h + W_2 · silu(W_1 · [norm(h), norm(f)] + b_1) + b_2`` with ``f`` the previous top state.

    The top state of the previous position carries what the whole base knows about the
    context, which a mid-depth state alone does not; the cutoff state adds the newest
    token. Inner width ``adapter_dim_ratio · H``; ``W_2`` starts at zero (plain early exit).
    """

    reads_top_state = True

    def __init__(self, config: SpAFConfig, base_config: Any) -> None:
        super().__init__()
        hidden = base_config.hidden_size
        inner = max(1, round(config.adapter_dim_ratio * hidden))
        self.state_norm = RMSNorm(hidden, base_config.rms_norm_eps)
        self.top_norm = RMSNorm(hidden, base_config.rms_norm_eps)
        self.inner = nn.Linear(2 * hidden, inner)
        self.out = nn.Linear(inner, hidden)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, hidden: torch.Tensor, prev_top: torch.Tensor | None = None) -> torch.Tensor:
        # hidden, prev_top: [..., H] -> [..., H]; a missing prev_top (position 0) reads as zeros
        if prev_top is None:
            prev_top = torch.zeros_like(hidden)
        x = torch.cat([self.state_norm(hidden), self.top_norm(prev_top)], dim=-1)
        return hidden + self.out(nn.functional.silu(self.inner(x)))


@register(ALIGNMENT_HEAD_KINDS, "mlp")
class MLPAlignmentHead(nn.Module):
    """``ĥ(t+1) = e(x_{t+1}) + MLP([norm(e(x_{t+1})), norm(h̄(t))])``.

    The residual starts from the token embedding because a mid-depth hidden state is
    dominated by its own token; the last layer starts at zero, so an untrained head
    predicts the embedding itself.
    """

    def __init__(self, config: SpAFConfig, base_config: Any) -> None:
        super().__init__()
        hidden = base_config.hidden_size
        inner = max(1, round(config.alignment_head.hidden_dim_ratio * hidden))
        eps = base_config.rms_norm_eps
        self.token_norm = RMSNorm(hidden, eps)
        self.state_norm = RMSNorm(hidden, eps)
        widths = [2 * hidden] + [inner] * (config.alignment_head.num_layers - 1) + [hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, token_embeds: torch.Tensor, prev_hidden: torch.Tensor) -> torch.Tensor:
        # token_embeds: [..., H] (e(x_{t+1})), prev_hidden: [..., H] (h̄(t)) -> [..., H]
        x = torch.cat([self.token_norm(token_embeds), self.state_norm(prev_hidden)], dim=-1)
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = nn.functional.silu(x)
        return token_embeds + x
