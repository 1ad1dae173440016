"""``export_model``: a SpAFModel -> a self-contained ONNX export folder (docs/export_format.md)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spaf_edge.core import io_names
from spaf_edge.core.atomic import atomic_directory
from spaf_edge.core.embedding_layout import QUANTIZATION_BITS
from spaf_edge.core.errors import (
    ConfigError,
    NonFiniteWeightsError,
    UnsupportedArchitectureError,
)
from spaf_edge.core.manifest import DTYPES, Manifest, ModelSizes, sha256_file
from spaf_edge.core.progress import progress_bar
from spaf_edge.exporters.graph_builder import OPSET
from spaf_edge.exporters.graphs import (
    GraphPlan,
    build_draft_head,
    build_drafter,
    build_lower,
    build_upper,
)
from spaf_edge.exporters.quantize import quantize_graph
from spaf_edge.exporters.writer import write_graphs
from spaf_edge.model import SpAFModel

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "float32": "float32", "float16": "float16"}


def export_model(
    model: SpAFModel,
    out_dir: str | os.PathLike,
    dtype: str = "float32",
    quantization: str | None = None,
    max_length: int | None = None,
    exit_layer: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as lower/upper/drafter/draft-head graphs + manifest to ``out_dir`` atomically.

    ``dtype``: float32 | float16 (KV caches, hidden states, weights; logits stay float32).
    ``quantization``: None | int8 | int4, weight-only (decoder MatMuls). ``max_length``:
    KV buffer rows, default ``min(model.max_context, 2048)``. ``exit_layer``: the trained
    exit to export, default the config's cutoff. An existing ``out_dir`` is replaced only
    with ``overwrite`` and only when it is empty or an earlier export.
    """
    dtype = check_dtype(dtype)
    quantization = check_quantization(quantization)
    exit_layer = check_exit_layer(model, exit_layer)
    max_length = check_max_length(model, max_length)
    check_architecture(model)
    out_dir = Path(out_dir)
    replace = check_out_dir(out_dir, overwrite)
    start = time.perf_counter()
    plan = GraphPlan(model, exit_layer, np.dtype(dtype), max_length, quantization)
    builders = build_graphs(plan, progress)
    check_finite_weights(plan, builders)
    transform = partial(quantize_graph, quantization=quantization) if quantization else None
    with atomic_directory(out_dir, overwrite=replace) as tmp:
        _chmod_like_mkdir(tmp)
        files = write_embeddings(tmp, plan)
        placed = {name: (io_names.EMBEDDINGS, offset) for name, offset in plan.placements.items()}
        files += write_graphs(tmp, builders, transform, placed)
        files += write_draft_vocab(tmp, model)
        chat_template, tokenizer_files = write_tokenizer(tmp, model.tokenizer)
        files += tokenizer_files
        manifest = build_manifest(plan, quantization, chat_template, {name: sha256_file(tmp / name) for name in files})
        (tmp / io_names.MANIFEST).write_text(manifest.to_json())  # last: its presence marks a complete export
        manifest.lossless = measure_lossless(tmp)
        (tmp / io_names.MANIFEST).write_text(manifest.to_json())
    log.info("Exported %s (%s%s) in %.1f s", out_dir, dtype, f", {quantization}" if quantization else "",
             time.perf_counter() - start)
    return out_dir


@dataclass
class ExportResult:
    path: Path
    seconds: float
    size_bytes: int  # total size of the folder
    parity: Any = None  # GraphParityReport when checked

    def summary(self) -> str:
        lines = [f"exported {self.path} ({self.size_bytes / 1e6:.1f} MB) in {self.seconds:.1f} s"]
        if self.parity is not None:
            lines.append(self.parity.summary())
        return "\n".join(lines)


def export_pretrained(
    out_dir: str | os.PathLike,
    base_model: str | os.PathLike | None = "default",
    components: str | os.PathLike | None = None,
    cutoff_layer: int | None = None,
    dtype: str = "float32",
    quantization: str | None = None,
    max_length: int | None = None,
    exit_layer: int | None = None,
    overwrite: bool = False,
    check: bool = False,
    progress: bool = True,
) -> ExportResult:
    """Load a base model (+ trained components) and export it; what ``spaf-edge export`` runs.

    ``cutoff_layer`` places untrained components (no ``components``); ``exit_layer`` picks
    one of the trained exits. ``check`` runs graph parity on the result.
    """
    from spaf_edge.core.config import SpAFConfig

    if components is not None and cutoff_layer is not None:
        raise ConfigError(
            "--cutoff-layer only places untrained components; trained components fix their exits. "
            "Use --exit-layer to pick one of them."
        )
    check_out_dir(Path(out_dir), overwrite)  # fail before the model loads
    model = SpAFModel.from_pretrained(
        base_model, None if components else SpAFConfig(cutoff_layer=cutoff_layer), components=components
    )
    start = time.perf_counter()
    path = export_model(model, out_dir, dtype, quantization, max_length, exit_layer, progress, overwrite)
    result = ExportResult(path, time.perf_counter() - start, sum(f.stat().st_size for f in path.iterdir()))
    if check:
        from spaf_edge.validation.graph_parity import check_graphs

        result.parity = check_graphs(model, path)
    return result


def build_graphs(plan: GraphPlan, progress: bool = True) -> dict[str, Any]:
    """Build the four graphs in memory; one progress step per decoder layer."""
    with torch.no_grad(), progress_bar(total=plan.config.num_hidden_layers, desc="export layers", unit="layer",
                                      disable=not progress) as bar:
        return {
            io_names.LOWER_GRAPH: build_lower(plan, bar.update),
            io_names.UPPER_GRAPH: build_upper(plan, bar.update),
            io_names.DRAFTER_GRAPH: build_drafter(plan),
            io_names.DRAFT_HEAD_GRAPH: build_draft_head(plan),
        }


def build_manifest(
    plan: GraphPlan, quantization: str | None, chat_template: str | None, files: dict[str, str]
) -> Manifest:
    from spaf_edge.generation.reference import default_eos_ids

    model, config = plan.model, plan.config
    tokenizer = model.tokenizer
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    sizes = ModelSizes(
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
        head_dim=plan.shape.head_dim, vocab_size=config.vocab_size, draft_vocab_size=plan.draft_vocab_size,
        max_length=plan.max_length,
    )
    spaf = model.config.replace(cutoff_layer=plan.exit_layer).to_dict()
    manifest = Manifest(
        base_model=str(getattr(config, "name_or_path", "") or config.model_type),
        base_fingerprint=model.fingerprint, model_type=config.model_type, sizes=sizes,
        cutoff_layer=plan.exit_layer, exits=list(model.config.adapter_layers), dtype=plan.dtype.name,
        quantization=quantization, opset=OPSET, files=files, eos_token_ids=default_eos_ids(model),
        bos_token_id=bos if bos is not None else getattr(config, "bos_token_id", None),
        chat_template=chat_template, spaf=spaf, reads_top_state=plan.reads_top_state,
        adapter_attention=plan.adapter_attention, tree_attention=plan.shape.tree,
    )
    manifest.check_consistency()
    return manifest


def measure_lossless(folder: Path) -> str:
    """``exact`` | ``near`` on this machine's CPU: whether verify rows get decode-step bits (engine row check)."""
    from spaf_edge.runtime.engine import Engine

    with Engine.from_folder(folder, verify=False) as engine:
        return engine.lossless


def write_embeddings(folder: Path, plan: GraphPlan) -> list[str]:
    """The [V, H] embedding rows (raw, or quantized: spaf_edge.core.embedding_layout); the runtime reads token rows."""
    with open(folder / io_names.EMBEDDINGS, "wb") as handle:
        for piece in plan.embedding_bytes():
            piece.tofile(handle)
    return [io_names.EMBEDDINGS]


def write_draft_vocab(folder: Path, model: SpAFModel) -> list[str]:
    if model.draft_vocab.numel() == 0:
        return []
    np.save(folder / io_names.DRAFT_VOCAB, model.draft_vocab.cpu().numpy().astype(np.int64))
    return [io_names.DRAFT_VOCAB]


def write_tokenizer(folder: Path, tokenizer: Any) -> tuple[str | None, list[str]]:
    """Copy tokenizer.json + tokenizer_config.json; return (chat template, files written)."""
    if tokenizer is None:
        log.warning("The model has no tokenizer: the export works on token ids only.")
        return None, []
    names = [io_names.TOKENIZER, io_names.TOKENIZER_CONFIG]
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        missing = [name for name in names if not (Path(scratch) / name).is_file()]
        if missing:
            raise ConfigError(
                f"The tokenizer did not write {', '.join(missing)}: the runtime needs a fast tokenizer "
                "(tokenizer.json, the `tokenizers` library). Load the base model with a fast tokenizer."
            )
        for name in names:
            shutil.copyfile(Path(scratch) / name, folder / name)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template, names


# ---- option checks -------------------------------------------------------------
def check_finite_weights(plan: GraphPlan, builders: dict[str, Any]) -> None:
    """Refuse NaN or inf in any float weight about to be written (in the export dtype).

    Checked here, on the arrays the graphs are written from, rather than when the engine
    loads: the engine cannot read initializers back out of ONNX Runtime, and it checks every
    file's sha256 against the manifest, so the weights it runs are the ones checked here.
    (SpAF checkpoints are also checked on load; and should a drafter still yield NaN, the
    sampler stops drafting and stays exact.)
    """
    arrays = [(io_names.EMBEDDINGS, "embedding table", plan.embedding_table())]
    arrays += [(file_name, name, array) for file_name, builder in builders.items()
               for name, array in {**builder.weights, **builder.constants}.items()]
    seen: set[int] = set()
    for file_name, name, array in arrays:
        if id(array) in seen or not np.issubdtype(array.dtype, np.floating):
            continue
        seen.add(id(array))
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            cast = (" (in float16, values beyond +-65504 become inf too: export with --dtype fp32)"
                    if array.dtype == np.float16 else "")
            raise NonFiniteWeightsError(
                f"Cannot export: weight {name!r} of {file_name} holds {bad} NaN/inf value(s){cast}. The model's "
                "weights are broken, e.g. by a diverged training run: export components from an earlier checkpoint, "
                "or retrain them (a lower --lr, --grad-clip)."
            )


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPE_ALIASES:
        raise ConfigError(f"Invalid dtype={dtype!r}: expected one of {DTYPES} (or fp32 / fp16).")
    return DTYPE_ALIASES[dtype]


def check_quantization(quantization: str | None) -> str | None:
    if quantization in (None, "none"):
        return None
    if quantization not in QUANTIZATION_BITS:
        raise ConfigError(
            f"Invalid quantization={quantization!r}: expected none, {' or '.join(QUANTIZATION_BITS)} (weight-only)."
        )
    return quantization


def check_exit_layer(model: SpAFModel, exit_layer: int | None) -> int:
    trained = list(model.config.adapter_layers)
    if exit_layer is None:
        return model.cutoff
    if exit_layer not in trained:
        upper = model.num_layers - 1
        where = f"it is outside 1..{upper}" if not 1 <= exit_layer <= upper else "it has no trained adapter"
        raise ConfigError(
            f"Invalid exit_layer={exit_layer}: {where}. The components have exits {trained}; pick one of them "
            "(or train components with that exit in adapter_layers)."
        )
    return exit_layer


def check_architecture(model: SpAFModel) -> None:
    """Shapes the ONNX Runtime kernels the graphs use cannot run."""
    head_dim = model.arch.head_dim(model.base.config)
    if head_dim % 16:
        raise UnsupportedArchitectureError(
            f"head_dim {head_dim} is not a multiple of 16, which ONNX Runtime's GroupQueryAttention "
            "requires. Models with such heads cannot be exported."
        )


def check_max_length(model: SpAFModel, max_length: int | None) -> int:
    limit = model.max_context
    if max_length is None:
        return min(limit, DEFAULT_MAX_LENGTH)
    if not isinstance(max_length, int) or not 2 <= max_length <= limit:
        raise ConfigError(
            f"Invalid max_length={max_length!r}: expected an integer in 2..{limit} (the base model's context)."
        )
    return max_length


def check_out_dir(out_dir: Path, overwrite: bool) -> bool:
    """Whether an existing ``out_dir`` may be replaced; raise when it must not be touched."""
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise ConfigError(f"{out_dir} exists and is not a folder. Choose another --out path.")
    if not any(out_dir.iterdir()):
        return True
    if not overwrite:
        raise ConfigError(f"{out_dir} already exists. Pass --overwrite (overwrite=True) or choose another --out.")
    if not (out_dir / io_names.MANIFEST).is_file():
        raise ConfigError(
            f"{out_dir} exists and is not a SpAF export (no {io_names.MANIFEST}); refusing to replace it even "
            "with --overwrite. Choose an empty or new --out folder."
        )
    return True


def _chmod_like_mkdir(folder: Path) -> None:
    """The temporary folder is private (0700); give the export the permissions of a plain mkdir."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
