"""SpAF drafter modules (DESIGN §2): adapters and AlignmentHeads, each from a registry.

Neither holds a copy of the base's embedding, final norm or LM head: the model passes
those in. A new drafter kind registers a class here; the generation loop is untouched
because every kind maps cutoff states to cutoff-shaped states.

Adapters are called as ``adapter(hidden, prev_top)``. ``prev_top`` [..., H] is the top
state (the base's post-final-norm hidden state, what the LM head reads) of the position
before ``hidden``'s: exact after a verify pass, or the drafter's own estimate
``final_norm(a(...))`` of the previous draft step while drafting chains. Kinds whose
``reads_top_state`` is False ignore it (and their exported graphs have no such input).

Kinds whose ``attends`` is True also mix positions: they take the rotary ``rope`` of
their positions and either a ``context`` (exact keys/values of the whole sequence, in
training) or a KV ``cache`` (while decoding); see :class:`AttentionAdapter`.

Kinds with ``fused_layers`` read, for a verified previous position, ``fuse(f, [h_m ...])``
instead of its top state ``f``: a learned fusion with the states after those layers
(:class:`LayerFusionAdapter`). Callers get it through ``SpAFModel.exact_top``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from spaf_edge.core.config import SpAFConfig
from spaf_edge.core.errors import ConfigError

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
    attends = False

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
    attends = False

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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotary embedding, halves not interleaved (the Llama convention). x: [B, h, S, d]; cos, sin: [B, S, d]."""
    cos, sin = (t.unsqueeze(1).to(x.dtype) for t in rope)
    return x * cos + rotate_half(x) * sin


@register(ADAPTER_KINDS, "attention")
class AttentionAdapter(nn.Module):
    """The fused adapter after one causal attention block over the fused inputs (as in Kangaroo).

    ``x(t) = [norm(h(t)), norm(f(t-1))]``; ``z = h + W_o · attn(RoPE(W_q x), RoPE(W_k x), W_v x)``;
    ``a = z + W_2 · silu(W_1 · [norm(z), norm(f)] + b_1) + b_2``. The attention lets the drafter
    look back at earlier positions (copying, long-range agreement) that a per-position
    MLP cannot see. Heads: the base's ``num_key_value_heads`` (no grouping), the base's
    head size and rotary embedding. ``W_o`` and ``W_2`` start at zero (plain early exit).

    Keys and values of a position come from its fused input. While decoding they live in
    a KV cache: exact for committed positions (the engine recomputes a position once its
    exact state is known), drafted for the positions of the current draft chain. In
    training (``context``) every earlier position's keys are the exact ones and only the
    query's own key comes from its (possibly drafted) input: the chain's few drafted
    entries are approximated by exact ones.
    """

    reads_top_state = True
    attends = True

    def __init__(self, config: SpAFConfig, base_config: Any) -> None:
        super().__init__()
        hidden = base_config.hidden_size
        eps = base_config.rms_norm_eps
        self.num_heads = base_config.num_key_value_heads
        self.head_dim = getattr(base_config, "head_dim", None) or hidden // base_config.num_attention_heads
        inner = max(1, round(config.adapter_dim_ratio * hidden))
        self.state_norm = RMSNorm(hidden, eps)
        self.top_norm = RMSNorm(hidden, eps)
        self.mlp_norm = RMSNorm(hidden, eps)
        self.qkv = nn.Linear(2 * hidden, 3 * self.num_heads * self.head_dim, bias=False)
        self.o = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.inner = nn.Linear(2 * hidden, inner)
        self.out = nn.Linear(inner, hidden)
        nn.init.normal_(self.qkv.weight, std=(2 * hidden) ** -0.5)
        for layer in (self.o, self.out):
            nn.init.zeros_(layer.weight)
        nn.init.zeros_(self.out.bias)

    def project(
        self, hidden: torch.Tensor, prev_top: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, rotated keys and values. hidden, prev_top: [B, S, H] -> 3 x [B, h, S, d]"""
        x = torch.cat([self.state_norm(hidden), self.top_norm(prev_top)], dim=-1)
        batch, length, _ = hidden.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return apply_rope(q, rope), apply_rope(k, rope), v

    def context(
        self, hidden: torch.Tensor, prev_top: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact keys and values of a whole sequence (positions 0 .. S-1), for training. -> 2 x [B, h, S, d]"""
        _, k, v = self.project(hidden, prev_top, rope)
        return k, v

    def forward(
        self,
        hidden: torch.Tensor,
        prev_top: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        context: tuple[torch.Tensor, torch.Tensor] | None = None,
        offset: int = 0,
        cache: Any = None,
    ) -> torch.Tensor:
        """hidden, prev_top: [B, S, H] at positions ``offset .. offset+S-1`` -> [B, S, H].

        With ``context`` (exact keys/values of positions ``0 ..``), query ``i`` reads the
        context's positions before its own and its own key/value. With ``cache`` (a batch-1
        :class:`~spaf_edge.generation.kv_cache.StackKVCache` of one layer, ``length == offset``),
        the new keys/values are written at ``offset ..`` and the queries read the cache causally.
        """
        if prev_top is None:
            prev_top = torch.zeros_like(hidden)
        q, k, v = self.project(hidden, prev_top, rope)
        scale = self.head_dim**-0.5
        queries = torch.arange(offset, offset + hidden.shape[1], device=hidden.device)  # [S]
        if cache is not None:
            keys, values = cache.update(k, v, 0)  # [1, h, offset+S, d]
            cache.advance(hidden.shape[1])
            blocked = torch.arange(keys.shape[2], device=hidden.device)[None, :] > queries[:, None]
            scores = (q @ keys.transpose(-1, -2) * scale).masked_fill(blocked, float("-inf"))
            mixed = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ values
        else:
            keys, values = context if context is not None else (k, v)
            before = torch.arange(keys.shape[2], device=hidden.device)[None, :] < queries[:, None]  # [S, S_ctx]
            scores = (q @ keys.transpose(-1, -2) * scale).masked_fill(~before, float("-inf"))
            own = (q * k).sum(-1, keepdim=True) * scale  # [B, h, S, 1]
            weights = torch.softmax(torch.cat([scores, own], dim=-1).float(), dim=-1).to(v.dtype)
            mixed = weights[..., :-1] @ values + weights[..., -1:] * v
        batch, _, length, _ = mixed.shape
        z = hidden + self.o(mixed.transpose(1, 2).reshape(batch, length, -1))
        x = torch.cat([self.mlp_norm(z), self.top_norm(prev_top)], dim=-1)
        return z + self.out(nn.functional.silu(self.inner(x)))


@register(ADAPTER_KINDS, "layer_fusion")
class LayerFusionAdapter(AttentionAdapter):
    """The attention adapter reading a learned fusion of layer states of the previous position (as in EAGLE-3).

    Where the attention kind reads the previous top state ``f(t-1)``, this kind reads
    ``g(t-1) = f(t-1) + sum_m U_m · D_m · norm_m(h_m(t-1))`` over the states ``h_m`` after the
    layers ``fused_layers`` (between the cutoff and the top: the verify pass computes them
    anyway), with rank-``fusion_rank`` projections. ``U_m`` starts at zero, so an untrained
    fusion is the attention kind and that kind's trained weights load into this one.

    The base gives these states for verified positions only: :meth:`fuse` turns them into the
    ``prev_top`` of the next position. A drafted position has none, so the next chained
    draft reads its drafted top state ``final_norm(a(...))`` as the attention kind does.
    """

    def __init__(self, config: SpAFConfig, base_config: Any) -> None:
        super().__init__(config, base_config)
        hidden = base_config.hidden_size
        self.fused_layers = tuple(config.fused_layers(base_config.num_hidden_layers))
        count = len(self.fused_layers)
        self.fusion_norms = nn.ModuleList(RMSNorm(hidden, base_config.rms_norm_eps) for _ in range(count))
        self.fusion_down = nn.ModuleList(nn.Linear(hidden, config.fusion_rank, bias=False) for _ in range(count))
        self.fusion_up = nn.ModuleList(nn.Linear(config.fusion_rank, hidden, bias=False) for _ in range(count))
        for down, up in zip(self.fusion_down, self.fusion_up):
            nn.init.normal_(down.weight, std=hidden**-0.5)
            nn.init.zeros_(up.weight)

    def fuse(self, top: torch.Tensor, states: list[torch.Tensor]) -> torch.Tensor:
        """``g`` of verified positions: their top states and the states after ``fused_layers``, [..., H] each."""
        for norm, down, up, state in zip(self.fusion_norms, self.fusion_down, self.fusion_up, states, strict=True):
            top = top + up(down(norm(state)))
        return top


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
