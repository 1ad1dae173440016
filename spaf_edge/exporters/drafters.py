"""Graph builders for the SpAF drafter kinds, keyed like :mod:`spaf_edge.modules.drafters`.

A new adapter or AlignmentHead kind registers its builder here; a kind without one
cannot be exported and says so. Adapter builders get ``prev_top`` (the graph's top-state
input) only for kinds whose ``reads_top_state`` is True, else None; builders of attending
kinds also get ``rotary`` (the cos/sin caches) and ``kv`` (their past/present names).
Kinds with ``fused_layers`` also register a fusion builder, which the upper graph runs on
its top state and the tapped layer states.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from spaf_edge.core.errors import ConfigError
from spaf_edge.exporters.graph_builder import GraphBuilder, node_path
from spaf_edge.exporters.layers import (
    make_group_query_attention,
    make_linear,
    make_module_linear,
    make_rms_norm,
    make_silu,
)

# adapter: builder(b, hidden, prev_top, module, name) -> output
# AlignmentHead: builder(b, token_embeds, prev_hidden, module, name) -> output
# layer fusion (upper graph, kinds with fused_layers): builder(b, top, states, module, name) -> output
ADAPTER_BUILDERS: dict[str, Callable[..., str]] = {}
ALIGNMENT_HEAD_BUILDERS: dict[str, Callable[..., str]] = {}
FUSION_BUILDERS: dict[str, Callable[..., str]] = {}


def _register(registry: dict[str, Callable[..., str]], kind: str) -> Callable[[Callable[..., str]], Callable[..., str]]:
    def decorator(builder: Callable[..., str]) -> Callable[..., str]:
        registry[kind] = builder
        return builder

    return decorator


def builder_for(registry: dict[str, Callable[..., str]], module: nn.Module, what: str) -> Callable[..., str]:
    kind = getattr(module, "kind", None)
    if kind not in registry:
        raise ConfigError(
            f"The {what} kind {kind!r} has no ONNX builder (exportable kinds: {', '.join(sorted(registry))}). "
            "Register one in spaf_edge/exporters/drafters.py or train with an exportable kind."
        )
    return registry[kind]


@_register(ADAPTER_BUILDERS, "bottleneck")
def make_bottleneck_adapter(b: GraphBuilder, hidden: str, prev_top: str | None, module: nn.Module, name: str) -> str:
    """``h + up(silu(down(norm(h))))``; hidden: [1, S, H] -> [1, S, H]. No top state."""
    normed = make_rms_norm(b, hidden, f"{name}.norm", module.norm.weight, module.norm.eps)
    down = make_module_linear(b, normed, f"{name}.down", module.down)
    up = make_module_linear(b, make_silu(b, down, node_path(name) + "/act"), f"{name}.up", module.up)
    (out,) = b.make_node("Add", [hidden, up], node_path(name) + "/residual")
    return out


@_register(ADAPTER_BUILDERS, "fused")
def make_fused_adapter(b: GraphBuilder, hidden: str, prev_top: str | None, module: nn.Module, name: str) -> str:
    """``h + out(silu(inner([norm(h), norm(f)])))``; hidden, prev_top: [1, S, H] -> [1, S, H]."""
    assert prev_top is not None, "the fused adapter reads the previous top state"
    path = node_path(name)
    parts = [
        make_rms_norm(b, hidden, f"{name}.state_norm", module.state_norm.weight, module.state_norm.eps),
        make_rms_norm(b, prev_top, f"{name}.top_norm", module.top_norm.weight, module.top_norm.eps),
    ]
    (x,) = b.make_node("Concat", parts, f"{path}/Concat", axis=-1)  # [1, S, 2H]
    inner = make_silu(b, make_module_linear(b, x, f"{name}.inner", module.inner), f"{path}/act")
    out = make_module_linear(b, inner, f"{name}.out", module.out)
    (y,) = b.make_node("Add", [hidden, out], f"{path}/residual")
    return y


@_register(ADAPTER_BUILDERS, "layer_fusion")  # its draft head is the attention kind's
@_register(ADAPTER_BUILDERS, "attention")
def make_attention_adapter(
    b: GraphBuilder, hidden: str, prev_top: str | None, module: nn.Module, name: str,
    rotary: tuple[str, str], kv: tuple[str, str, str, str],
) -> str:
    """Causal attention over the fused inputs, then the fused MLP; hidden, prev_top: [1, S, H] -> [1, S, H].

    One GroupQueryAttention (packed QKV, rotary inside, no head grouping) on the adapter's
    own KV buffer, which it shares in place between past and present like the stacks.
    """
    assert prev_top is not None, "the attention adapter reads the previous top state"
    path = node_path(name)
    top = make_rms_norm(b, prev_top, f"{name}.top_norm", module.top_norm.weight, module.top_norm.eps)
    state = make_rms_norm(b, hidden, f"{name}.state_norm", module.state_norm.weight, module.state_norm.eps)
    (x,) = b.make_node("Concat", [state, top], f"{path}/Concat", axis=-1)  # [1, S, 2H]
    qkv = make_module_linear(b, x, f"{name}.qkv", module.qkv)  # [1, S, 3 * heads * head_dim]
    context = make_group_query_attention(b, qkv, kv, module.num_heads, module.num_heads,
                                         float(module.head_dim**-0.5), rotary, f"{path}/attn/GroupQueryAttention")
    (z,) = b.make_node("Add", [hidden, make_linear(b, context, f"{name}.o", module.o.weight)], f"{path}/attn_residual")
    mlp_in = make_rms_norm(b, z, f"{name}.mlp_norm", module.mlp_norm.weight, module.mlp_norm.eps)
    (x,) = b.make_node("Concat", [mlp_in, top], f"{path}/mlp_Concat", axis=-1)
    inner = make_silu(b, make_module_linear(b, x, f"{name}.inner", module.inner), f"{path}/act")
    (y,) = b.make_node("Add", [z, make_module_linear(b, inner, f"{name}.out", module.out)], f"{path}/residual")
    return y


@_register(FUSION_BUILDERS, "layer_fusion")
def make_layer_fusion(b: GraphBuilder, top: str, states: list[str], module: nn.Module, name: str) -> str:
    """``f + sum_m up_m(down_m(norm_m(h_m)))``; top and each state [1, S, H] -> [1, S, H]."""
    fused = top
    for index, state in enumerate(states):
        norm = module.fusion_norms[index]
        normed = make_rms_norm(b, state, f"{name}.fusion_norms.{index}", norm.weight, norm.eps)
        down = make_module_linear(b, normed, f"{name}.fusion_down.{index}", module.fusion_down[index])
        up = make_module_linear(b, down, f"{name}.fusion_up.{index}", module.fusion_up[index])
        (fused,) = b.make_node("Add", [fused, up], f"{node_path(name)}/fusion_{index}/Add")
    return fused


@_register(ALIGNMENT_HEAD_BUILDERS, "mlp")
def make_mlp_alignment_head(b: GraphBuilder, token_embeds: str, prev_hidden: str, module: nn.Module, name: str) -> str:
    """``e + MLP([norm(e), norm(h̄)])``; both inputs [1, 1, H] -> [1, 1, H]."""
    path = node_path(name)
    parts = [
        make_rms_norm(b, token_embeds, f"{name}.token_norm", module.token_norm.weight, module.token_norm.eps),
        make_rms_norm(b, prev_hidden, f"{name}.state_norm", module.state_norm.weight, module.state_norm.eps),
    ]
    (x,) = b.make_node("Concat", parts, f"{path}/Concat", axis=-1)
    for index, layer in enumerate(module.layers):
        x = make_module_linear(b, x, f"{name}.layers.{index}", layer)
        if index < len(module.layers) - 1:
            x = make_silu(b, x, f"{path}/layers.{index}/act")
    (out,) = b.make_node("Add", [token_embeds, x], f"{path}/residual")
    return out
