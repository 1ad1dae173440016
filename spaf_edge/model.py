"""SpAFModel: a frozen base causal LM plus adapters and AlignmentHeads (DESIGN §2).

The base's embedding, final norm and LM head are shared with the SpAF modules, never
copied. Checkpoints hold only SpAF parameters (safetensors), the SpAF config and the
base model's fingerprint, which is checked on load.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spaf_edge.core.atomic import atomic_directory
from spaf_edge.core.config import CONFIG_FILE, SpAFConfig
from spaf_edge.core.errors import (
    CheckpointMismatchError,
    ConfigError,
    ModelNotFoundError,
    NonFiniteWeightsError,
)
from spaf_edge.generation.kv_cache import StackKVCache
from spaf_edge.models.loading import load_base_model, model_fingerprint
from spaf_edge.models.registry import get_architecture
from spaf_edge.modules.drafters import build_adapter, build_alignment_head

WEIGHTS_FILE = "spaf_components.safetensors"
META_FILE = "spaf_meta.json"
FORMAT_VERSION = 1


class SpAFModel(nn.Module):
    def __init__(self, base: nn.Module, config: SpAFConfig, tokenizer: Any = None) -> None:
        super().__init__()
        self.arch = get_architecture(base.config)
        self.base = base
        self.tokenizer = tokenizer
        base.eval()
        base.requires_grad_(False)
        # Draft vocabulary: token ids whose LM-head rows the drafts use (all when empty).
        self.register_buffer("draft_vocab", torch.zeros(0, dtype=torch.long), persistent=False)
        self.fingerprint = model_fingerprint(base)
        self._cache_kwarg = cache_kwarg_name(self.arch.layers(base)[0])
        self.build_spaf_modules(config)

    def build_spaf_modules(self, config: SpAFConfig) -> None:
        """(Re)create fresh adapters and AlignmentHeads for ``config`` on the base's device."""
        self.config = config.resolved(self.base.config.num_hidden_layers)
        layers = [str(layer) for layer in self.config.adapter_layers]
        self.adapters = nn.ModuleDict({k: build_adapter(self.config, self.base.config) for k in layers})
        self.alignment_heads = nn.ModuleDict({k: build_alignment_head(self.config, self.base.config) for k in layers})
        self.adapters.to(self.base_device)
        self.alignment_heads.to(self.base_device)

    # ---- construction and checkpoints -----------------------------------
    @classmethod
    def from_pretrained(
        cls,
        base_model_path: str | os.PathLike | None = None,
        spaf_config: SpAFConfig | None = None,
        components: str | os.PathLike | None = None,
        dtype: torch.dtype | None = None,
    ) -> SpAFModel:
        """Load the base (``None``/``'default'`` = embedded SmolLM2) and attach SpAF modules.

        With ``components``, the config and weights come from that checkpoint folder.
        """
        base, tokenizer = load_base_model(base_model_path, dtype=dtype)
        if components is not None:
            spaf_config = SpAFConfig.load(Path(components) / CONFIG_FILE)
        model = cls(base, spaf_config or SpAFConfig(), tokenizer)
        if components is not None:
            model.load_spaf_components(components)
        return model

    def spaf_state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"adapters.{k}": v for k, v in self.adapters.state_dict().items()}
        state.update({f"alignment_heads.{k}": v for k, v in self.alignment_heads.state_dict().items()})
        if self.draft_vocab.numel():
            state["draft_vocab"] = self.draft_vocab
        return {k: v.detach().contiguous().cpu() for k, v in state.items()}

    def save_spaf_components(
        self, path: str | os.PathLike, extra_meta: dict[str, Any] | None = None,
        state: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write SpAF weights + config + base fingerprint to ``path`` atomically.

        ``state`` replaces :meth:`spaf_state_dict` (e.g. fp32 master weights held by an optimizer).
        """
        from safetensors.torch import save_file

        path = Path(path)
        with atomic_directory(path) as tmp:
            save_file(self.spaf_state_dict() if state is None else state, str(tmp / WEIGHTS_FILE))
            self.config.save(tmp / CONFIG_FILE)
            meta = {
                "format_version": FORMAT_VERSION,
                "base_fingerprint": self.fingerprint,
                "base_model": getattr(self.base.config, "name_or_path", ""),
                "model_type": self.base.config.model_type,
                "num_layers": self.num_layers,
                "hidden_size": self.hidden_size,
                "vocab_size": self.base.config.vocab_size,
                "trainable_parameters": self.num_trainable_parameters(),
                **(extra_meta or {}),
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return path

    def load_spaf_components(self, path: str | os.PathLike, check_fingerprint: bool = True) -> dict[str, Any]:
        """Load weights saved by :meth:`save_spaf_components`; refuse another base model's."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        meta = read_component_meta(path)
        if check_fingerprint and meta.get("base_fingerprint") != self.fingerprint:
            raise CheckpointMismatchError(
                f"SpAF components in {path} were trained for base model "
                f"{meta.get('base_model')!r} (fingerprint {meta.get('base_fingerprint')}), but the "
                f"loaded base has fingerprint {self.fingerprint}. Load the base model they were "
                "trained on, or train components for this one."
            )
        saved = SpAFConfig.load(path / CONFIG_FILE).resolved(self.num_layers)
        if saved.to_dict() != self.config.to_dict():
            self.build_spaf_modules(saved)
        try:
            state = load_file(str(path / WEIGHTS_FILE))
        except (SafetensorError, OSError) as exc:
            raise ModelNotFoundError(
                f"Cannot read {path / WEIGHTS_FILE} ({exc}); the checkpoint is missing or corrupt. "
                "Re-save or re-train the components."
            ) from exc
        check_finite(state, path / WEIGHTS_FILE)
        device = self.base_device
        self.set_draft_vocab(state.pop("draft_vocab", None))
        try:
            missing, unexpected = self.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
        except RuntimeError as exc:  # tensor shapes differ from the config's
            raise CheckpointMismatchError(
                f"Checkpoint {path} does not match its SpAF config ({exc}). The config and weights were "
                "saved by different runs; re-save the components."
            ) from exc
        missing = [k for k in missing if not k.startswith("base.")]
        if missing or unexpected:
            raise CheckpointMismatchError(
                f"Checkpoint {path} does not match the SpAF config: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}. The config and weights were saved by different runs."
            )
        return meta

    def set_draft_vocab(self, token_ids: torch.Tensor | None) -> None:
        """Restrict draft logits to ``token_ids`` (sorted unique); ``None`` restores all."""
        if token_ids is None:
            self.draft_vocab = torch.zeros(0, dtype=torch.long, device=self.base_device)
            return
        ids = torch.unique(torch.as_tensor(token_ids, dtype=torch.long)).to(self.base_device)
        vocab_size = self.base.config.vocab_size
        if ids.numel() < 1 or int(ids[0]) < 0 or int(ids[-1]) >= vocab_size:
            found = f"ids {int(ids[0])}..{int(ids[-1])}" if ids.numel() else "no ids"
            raise ConfigError(
                f"Invalid draft vocabulary: expected token ids in 0..{vocab_size - 1}, got {found}. "
                "Build it from this base model's tokenizer, or pass None for the full vocabulary."
            )
        self.draft_vocab = ids

    # ---- sizes ------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.base.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.base.config.hidden_size

    @property
    def cutoff(self) -> int:
        return self.config.cutoff_layer

    @property
    def base_device(self) -> torch.device:
        return next(self.base.parameters()).device

    @property
    def max_context(self) -> int:
        return int(getattr(self.base.config, "max_position_embeddings", 2048))

    def spaf_parameters(self) -> list[nn.Parameter]:
        return list(self.adapters.parameters()) + list(self.alignment_heads.parameters())

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.spaf_parameters())

    def num_base_parameters(self) -> int:
        return sum(p.numel() for p in self.base.parameters())

    def trainable_fraction(self) -> float:
        """SpAF parameters as a fraction of the base model's."""
        return self.num_trainable_parameters() / self.num_base_parameters()

    # ---- shared pieces of the base ---------------------------------------
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        # token_ids: [B, S] -> [B, S, H]
        return self.arch.embed_tokens(self.base)(token_ids)

    def head(self, hidden: torch.Tensor, vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Base final norm + LM head; with ``vocab_ids`` only those rows. [..., H] -> [..., V]"""
        return self.lm_head_rows(self.top_state(hidden), vocab_ids)

    def top_state(self, hidden: torch.Tensor) -> torch.Tensor:
        """The base's final norm: a last-layer (or adapted) state -> the top state the LM head reads. [..., H]"""
        return self.arch.final_norm(self.base)(hidden)

    def adapt(
        self,
        hidden: torch.Tensor,
        exit_layer: int | None = None,
        prev_top: torch.Tensor | None = None,
        offset: int = 0,
        context: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: StackKVCache | None = None,
    ) -> torch.Tensor:
        """``a(h, f)``: the adapter on cutoff states [B, S, H] at positions ``offset ..``. -> [B, S, H]

        ``prev_top``: see spaf_edge.modules.drafters. ``context`` (from :meth:`adapter_context`)
        and ``cache`` only matter to kinds that attend across positions.
        """
        adapter = self.adapter(exit_layer)
        if not self.attends(exit_layer):
            return adapter(hidden, prev_top)
        return adapter(hidden, prev_top, self.rope(hidden, offset), context, offset, cache)

    def adapter_context(
        self, hidden: torch.Tensor, prev_top: torch.Tensor, exit_layer: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Exact keys/values of positions ``0 .. S-1`` for an attending adapter (None for others).

        hidden, prev_top: [B, S, H] (exact cutoff states and previous top states).
        """
        if not self.attends(exit_layer):
            return None
        return self.adapter(exit_layer).context(hidden, prev_top, self.rope(hidden, 0))

    def rope(self, hidden: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The base's rotary cos/sin for positions ``offset .. offset+S-1``. hidden: [B, S, H] -> 2 x [B, S, d]"""
        batch, length = hidden.shape[:2]
        positions = torch.arange(offset, offset + length, device=hidden.device).unsqueeze(0).expand(batch, -1)
        return self.arch.rotary(self.base)(hidden, positions)

    def adapter(self, exit_layer: int | None = None) -> nn.Module:
        """The adapter of an exit (default: the cutoff)."""
        return self.adapters[str(exit_layer or self.cutoff)]

    def reads_top_state(self, exit_layer: int | None = None) -> bool:
        """Whether the exit's adapter reads the previous top state (its export then has a ``prev_top`` input)."""
        return bool(getattr(self.adapter(exit_layer), "reads_top_state", False))

    def fused_layers(self, exit_layer: int | None = None) -> tuple[int, ...]:
        """The layers (states after them, HF ``hidden_states`` indices) whose states the exit's adapter
        fuses into the previous top state; empty for kinds that read the top state alone."""
        return tuple(getattr(self.adapter(exit_layer), "fused_layers", ()))

    def exact_top(self, top: torch.Tensor, states: dict[int, torch.Tensor], exit_layer: int | None = None
                  ) -> torch.Tensor:
        """What the exit's adapter reads as a verified position's top state: ``top`` itself, or its fusion
        with ``states`` (state after layer m -> [..., H], at least :meth:`fused_layers`). top: [..., H] -> [..., H]"""
        layers = self.fused_layers(exit_layer)
        if not layers:
            return top
        return self.adapter(exit_layer).fuse(top, [states[m] for m in layers])

    def attends(self, exit_layer: int | None = None) -> bool:
        """Whether the exit's adapter attends across positions (it then keeps a KV cache of its own)."""
        return bool(getattr(self.adapter(exit_layer), "attends", False))

    def new_adapter_cache(self, max_length: int, exit_layer: int | None = None) -> StackKVCache | None:
        """The KV cache of an attending adapter (None for other kinds)."""
        if not self.attends(exit_layer):
            return None
        adapter = self.adapter(exit_layer)
        param = next(self.base.parameters())
        return StackKVCache(range(1), adapter.num_heads, adapter.head_dim, max_length, param.dtype, param.device)

    def draft_logits(
        self, hidden: torch.Tensor, exit_layer: int | None = None, prev_top: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``head(a(h, f))`` over the draft vocabulary. [..., H] -> [..., V_d]"""
        return self.draft_step(hidden, exit_layer, prev_top)[0]

    def draft_step(
        self,
        hidden: torch.Tensor,
        exit_layer: int | None = None,
        prev_top: torch.Tensor | None = None,
        offset: int = 0,
        cache: StackKVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft logits [..., V_d] and the drafted top state ``final_norm(a(h, f))`` [..., H].

        The top state feeds the next chained draft step as its ``prev_top``.
        """
        top = self.top_state(self.adapt(hidden, exit_layer, prev_top, offset, cache=cache))
        return self.lm_head_rows(top, self.draft_vocab), top

    def lm_head_rows(self, normed: torch.Tensor, vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The LM head alone (input already final-normed); with ``vocab_ids`` only those rows."""
        lm_head = self.arch.lm_head(self.base)
        if vocab_ids is None or vocab_ids.numel() == 0:
            return lm_head(normed)
        bias = lm_head.bias[vocab_ids] if lm_head.bias is not None else None
        return nn.functional.linear(normed, lm_head.weight[vocab_ids], bias)

    def align(self, token_ids: torch.Tensor, prev_hidden: torch.Tensor, exit_layer: int | None = None) -> torch.Tensor:
        """Pseudo cutoff state of the next position. token_ids: [B, S], prev_hidden: [B, S, H]."""
        return self.alignment_heads[str(exit_layer or self.cutoff)](self.embed(token_ids), prev_hidden)

    # ---- backbone with a KV cache ----------------------------------------
    def new_cache(self, layer_ids: range, max_length: int) -> StackKVCache:
        config = self.base.config
        param = next(self.base.parameters())
        return StackKVCache(
            layer_ids, config.num_key_value_heads, self.arch.head_dim(config), max_length,
            dtype=param.dtype, device=param.device,
        )

    def run_layers(
        self, hidden: torch.Tensor, cache: StackKVCache, tree: tuple[torch.Tensor, torch.Tensor] | None = None,
        taps: dict[int, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Run the layers ``cache.layer_ids`` on new positions ``cache.length ..``.

        hidden: [1, S, H] -> [1, S, H]; the cache advances by S. ``tree``: the rows are nodes of
        a draft tree (DESIGN §4b): their rotary positions (int64 [S]) and which of the call's
        cache rows each may see besides the committed ones (bool [S, S_tree], the last S columns
        the call's own rows; the others, rows of the same tree written by an earlier call).
        ``taps``: its keys name layer counts m; each gets the state after m layers, [1, S, H].
        """
        assert hidden.shape[0] == 1, "the KV-cached path is batch-1"
        start, length = cache.length, hidden.shape[1]
        if tree is None:
            positions = torch.arange(start, start + length, device=hidden.device).unsqueeze(0)  # [1, S]
            mask = causal_mask(start, length, hidden.dtype, hidden.device)  # [1, 1, S, start+S]
        else:
            positions, visible = tree[0].to(hidden.device).unsqueeze(0), tree[1].to(hidden.device)
            mask = tree_mask(start + length - visible.shape[1], visible, hidden.dtype)  # [1, 1, S, start+S]
        rope = self.arch.rotary(self.base)(hidden, positions)
        layers = self.arch.layers(self.base)
        for index in cache.layer_ids:
            hidden = layers[index](
                hidden, attention_mask=mask, position_ids=positions, position_embeddings=rope,
                use_cache=True, **{self._cache_kwarg: cache},
            )
            if taps is not None and index + 1 in taps:
                taps[index + 1] = hidden
        cache.advance(length)
        return hidden

    def run_upper(
        self, hidden: torch.Tensor, cache: StackKVCache, tree: tuple[torch.Tensor, torch.Tensor] | None = None,
        exit_layer: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The upper stack (``cache.layer_ids``) and final norm on cutoff states [1, S, H] (``tree``: see
        :meth:`run_layers`). Returns the top states (the LM head's input) and what the exit's adapter
        reads as those positions' top states (:meth:`exact_top`), [1, S, H] each."""
        taps = dict.fromkeys(self.fused_layers(exit_layer))
        top = self.top_state(self.run_layers(hidden, cache, tree, taps))
        return top, self.exact_top(top, taps, exit_layer)

    def lower_layer_ids(self, exit_layer: int | None = None) -> range:
        return range(0, exit_layer or self.cutoff)

    def upper_layer_ids(self, exit_layer: int | None = None) -> range:
        return range(exit_layer or self.cutoff, self.num_layers)

    def base_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple:
        """One no-grad base forward for training: (hidden_states per layer, final hidden).

        ``hidden_states[i]`` is the state after layer ``i-1`` (HF convention); the final
        entry is after the final norm (lm_head of it gives the logits). [B, S] -> tuple of [B, S, H]
        """
        with torch.no_grad():
            out = self.arch.decoder(self.base)(
                input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
            )
        return out.hidden_states


def causal_mask(start: int, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask for queries at ``start .. start+length`` over keys ``0 .. start+length``."""
    query = torch.arange(start, start + length, device=device).unsqueeze(1)
    key = torch.arange(start + length, device=device).unsqueeze(0)
    blocked = key > query  # [S, start+S]
    mask = torch.zeros(blocked.shape, dtype=dtype, device=device)
    mask.masked_fill_(blocked, torch.finfo(dtype).min)
    return mask[None, None]


def tree_mask(committed: int, visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [1, 1, S, committed+R]: every committed key is seen, tree rows where ``visible`` [S, R]."""
    mask = torch.zeros(visible.shape[0], committed + visible.shape[1], dtype=dtype, device=visible.device)
    mask[:, committed:].masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]


def check_finite(state: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse SpAF weights holding NaN or inf: they would only make garbage drafts."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = tensor.numel() - int(torch.isfinite(tensor).sum())
            raise NonFiniteWeightsError(
                f"{source}: weight {name!r} holds {bad} NaN/inf value(s); the components are broken, e.g. by a "
                "diverged training run. Use an earlier checkpoint's components, or retrain them (a lower --lr, "
                "--grad-clip)."
            )


def read_component_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint's metadata, with a clear error for a missing or corrupt folder."""
    path = Path(path)
    for name in (META_FILE, CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise ModelNotFoundError(
                f"{path} is not a SpAF checkpoint: {name} is missing. Pass a folder written by "
                "`spaf-edge train` (or SpAFModel.save_spaf_components)."
            )
    try:
        meta = json.loads((path / META_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise ModelNotFoundError(f"{path / META_FILE} is corrupt ({exc}); re-save the components.") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"{path} has checkpoint format {meta.get('format_version')}, this version reads "
            f"{FORMAT_VERSION}. Re-train or convert with a matching spaf-edge version."
        )
    return meta


def cache_kwarg_name(module: nn.Module) -> str:
    # transformers 5.x renamed the ``past_key_values`` argument (of decoder layers and models) to ``cache``.
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
