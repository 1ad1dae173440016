"""Architecture registry: one thin class per supported decoder family.

Each entry says where the base model keeps its parts and what differs in its
attention. Code elsewhere asks the registry; it never branches on model types.
"""

from __future__ import annotations

from typing import Any, ClassVar

from spaf_edge.core.errors import UnsupportedArchitectureError

_REGISTRY: dict[str, type[Architecture]] = {}


def register_architecture(cls: type[Architecture]) -> type[Architecture]:
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_architecture(config: Any) -> type[Architecture]:
    """Return the registry entry for an HF config (or a model_type string)."""
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    try:
        arch = _REGISTRY[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"Architecture {model_type!r} is not supported. Supported model types: "
            f"{', '.join(supported_model_types())}. A new decoder family needs a thin "
            "entry in spaf_edge/models/registry.py."
        ) from None
    if not isinstance(config, str):
        arch.check_config(config)
    return arch


class Architecture:
    """A Llama-shaped decoder: embed -> layers -> final norm -> LM head.

    The accessors take the HF ``*ForCausalLM`` model. Subclasses override only what
    differs.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    qkv_bias: ClassVar[bool] = False  # q/k/v projections carry a bias

    @staticmethod
    def decoder(model: Any) -> Any:
        return model.model

    @classmethod
    def layers(cls, model: Any) -> Any:
        return cls.decoder(model).layers

    @classmethod
    def embed_tokens(cls, model: Any) -> Any:
        return cls.decoder(model).embed_tokens

    @classmethod
    def final_norm(cls, model: Any) -> Any:
        return cls.decoder(model).norm

    @classmethod
    def rotary(cls, model: Any) -> Any:
        return cls.decoder(model).rotary_emb

    @staticmethod
    def lm_head(model: Any) -> Any:
        return model.lm_head

    @staticmethod
    def head_dim(config: Any) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    @staticmethod
    def rope_theta(config: Any) -> float:
        params = getattr(config, "rope_parameters", None) or {}
        return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Reject configurations of this family that the SpAF kernels do not implement."""
        params = getattr(config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type != "default":
            raise UnsupportedArchitectureError(
                f"RoPE scaling {rope_type!r} is not supported yet; only default RoPE is. "
                "Use a base model without rope scaling."
            )
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedArchitectureError(
                f"Activation {config.hidden_act!r} is not supported; Llama-family models use 'silu'."
            )


@register_architecture
class Llama(Architecture):
    model_types = ("llama",)


@register_architecture
class Qwen2(Architecture):
    model_types = ("qwen2",)
    qkv_bias = True

    @classmethod
    def check_config(cls, config: Any) -> None:
        super().check_config(config)
        _check_no_sliding_window(config, getattr(config, "use_sliding_window", False))


@register_architecture
class Mistral(Architecture):
    model_types = ("mistral",)

    @classmethod
    def check_config(cls, config: Any) -> None:
        super().check_config(config)
        _check_no_sliding_window(config, True)


def _check_no_sliding_window(config: Any, enabled: bool) -> None:
    window = getattr(config, "sliding_window", None)
    if enabled and window is not None and window < config.max_position_embeddings:
        raise UnsupportedArchitectureError(
            f"Sliding-window attention (window {window} < context "
            f"{config.max_position_embeddings}) is not supported. Set sliding_window to null "
            "or to at least max_position_embeddings in the model's config.json."
        )
