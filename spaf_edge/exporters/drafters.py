"""Graph builders for the SpAF drafter kinds, keyed like :mod:`spaf_edge.modules.drafters`.

A new adapter or AlignmentHead kind registers its builder here; a kind without one
cannot be exported and says so.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from spaf_edge.errors import ConfigError
from spaf_edge.exporters.graph_builder import GraphBuilder, node_path
from spaf_edge.exporters.layers import make_module_linear, make_rms_norm, make_silu

# builder(b, hidden, module, name) -> output  |  builder(b, token_embeds, prev_hidden, module, name) -> output
ADAPTER_BUILDERS: dict[str, Callable[..., str]] = {}
ALIGNMENT_HEAD_BUILDERS: dict[str, Callable[..., str]] = {}


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
def make_bottleneck_adapter(b: GraphBuilder, hidden: str, module: nn.Module, name: str) -> str:
    """``h + up(silu(down(norm(h))))``; hidden: [1, S, H] -> [1, S, H]."""
    normed = make_rms_norm(b, hidden, f"{name}.norm", module.norm.weight, module.norm.eps)
    down = make_module_linear(b, normed, f"{name}.down", module.down)
    up = make_module_linear(b, make_silu(b, down, node_path(name) + "/act"), f"{name}.up", module.up)
    (out,) = b.make_node("Add", [hidden, up], node_path(name) + "/residual")
    return out


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
