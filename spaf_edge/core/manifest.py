"""The export folder's ``manifest.json``: schema, writing and checked reading.

Torch-free: the runtime reads it. Reading checks the format version, every field's type
(from the dataclass annotations, so a new field is covered by its annotation) and value
(ranges, sizes against each other, the embedding table's size on disk); with
``verify_files`` also the manifest's own digest and every listed file's sha256.

The manifest is not in its own sha256 list: it carries ``manifest_sha256``, the sha256 of its
canonical content (sorted-key compact JSON) without that digest and without ``tuned``, which
``spaf-edge tune`` rewrites in place. An edited manifest is detected; a forged one (digest
recomputed) is not: the digest guards against careless edits and corruption, not an attacker
who can write the folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spaf_edge.core.embedding_layout import QUANTIZATION_BITS, EmbeddingLayout
from spaf_edge.core.errors import ExportFormatError, ModelNotFoundError
from spaf_edge.core.io_names import EMBEDDINGS, GRAPHS, MANIFEST

# 2: draft head in its own graph, top states; 3: upper's num_logits input; 4: embedding rows read by the
# runtime from embeddings.bin, a private prepacked LM head in upper; 5: manifest_sha256, int4/int8 exports
# quantize embeddings.bin and every LM head (MatMulNBits), lossless; 6: the stacks' tree inputs, tree_attention
# (docs/export_format.md)
FORMAT_VERSION = 6
READABLE_VERSIONS = (5, 6)  # a format-5 folder still loads: its stacks verify chains only
TREE_VERSION = 6  # first version whose stacks take tree_positions and tree_bias
DTYPES = ("float32", "float16")
QUANTIZATIONS = (None, *QUANTIZATION_BITS)
LOSSLESS = (None, "exact", "near")
DIGEST_FIELD = "manifest_sha256"
UNSEALED_FIELDS = (DIGEST_FIELD, "tuned")  # left out of the digest: `tuned` is rewritten by `spaf-edge tune`
REEXPORT = "Re-export the model with `spaf-edge export`."
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class ModelSizes:
    num_layers: int  # L
    hidden_size: int  # H
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # V
    draft_vocab_size: int  # V_d (== V without a draft vocabulary)
    max_length: int  # KV buffer length the graphs accept (max context)


@dataclass
class Manifest:
    base_model: str  # human-readable id of the base model
    base_fingerprint: str  # spaf_edge.models.loading.model_fingerprint of the base
    model_type: str  # registry key, e.g. "llama"
    sizes: ModelSizes
    cutoff_layer: int  # k: lower = layers 0..k-1, upper = k..L-1
    exits: list[int]  # exits the SpAF checkpoint trained (this export uses cutoff_layer)
    dtype: str  # "float32" | "float16": KV caches and hidden states
    quantization: str | None  # None | "int8" | "int4" (weight-only)
    opset: int
    files: dict[str, str]  # file name -> sha256 hex, every file of the folder but the manifest
    eos_token_ids: list[int]
    bos_token_id: int | None = None
    chat_template: str | None = None
    spaf: dict[str, Any] = field(default_factory=dict)  # SpAFConfig.to_dict() (decoding defaults)
    tuned: dict[str, Any] | None = None  # written by `spaf-edge tune`
    reads_top_state: bool = False  # the draft head has a prev_top input (its adapter reads the top state)
    # {"num_heads", "head_dim"} of an adapter that attends across positions: the draft head then takes
    # [1, S, H] rows and has a KV cache of its own (io_names.ADAPTER_KV); None for the other kinds
    adapter_attention: dict[str, int] | None = None
    # "exact": verify rows got decode-step bits on the exporting machine's CPU, so SpAF greedy equals
    # plain greedy there; "near": only up to rounding; None: not measured. The engine measures its own
    # device at load (spaf_edge.runtime.rows).
    lossless: str | None = None
    # the stacks take tree_positions and tree_bias (io_names), so a verify pass may be a draft tree (format 6);
    # False in format 5, whose stacks verify chains
    tree_attention: bool = False
    format_version: int = FORMAT_VERSION
    manifest_sha256: str | None = None  # content_digest() as read; to_dict() writes the current one

    # ---- io ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The manifest's JSON content, sealed with its current ``manifest_sha256``."""
        data = json.loads(json.dumps(dataclasses.asdict(self)))  # JSON types, as a reader will see them
        data[DIGEST_FIELD] = content_digest(data)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str = MANIFEST) -> Manifest:
        """Check the format version, every field's type and value; ExportFormatError naming the field."""
        if not isinstance(data, dict):
            raise ExportFormatError(
                f"{source} holds a JSON {_kind(data)}, not an object of manifest fields. {REEXPORT}"
            )
        version = data.get("format_version")
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise ExportFormatError(
                f"{source}: unknown manifest format version {version!r}; this spaf-edge reads "
                f"versions {', '.join(map(str, READABLE_VERSIONS))}. Re-export the model with this version of "
                "spaf-edge."
            )
        problems = _schema_problems(cls, data)
        digest = data.get(DIGEST_FIELD)
        if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            problems.append(f"{DIGEST_FIELD} must be a sha256 hex digest, got {_show(digest)}")
        if problems:
            raise ExportFormatError(f"{source} is malformed: {'; '.join(problems)}. {REEXPORT}")
        manifest = _build(cls, data)
        manifest.check_consistency(source)
        return manifest

    @classmethod
    def load(cls, folder: str | Path, verify_files: bool = True) -> Manifest:
        """Read and check ``folder/manifest.json``; with ``verify_files`` also its digest and every file's sha256.

        The embedding table's size is checked either way: graphs of a tied LM head read their
        weights from it, and ONNX Runtime's error on a short file blames the graph.
        """
        folder = Path(folder)
        path = folder / MANIFEST
        if not folder.is_dir():
            raise ModelNotFoundError(f"Export folder {folder} does not exist. Run `spaf-edge export` first.")
        if not path.is_file():
            raise ExportFormatError(
                f"{folder} has no {MANIFEST}: it is not a complete SpAF export (an interrupted "
                "export leaves no manifest). Re-run `spaf-edge export`."
            )
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise ExportFormatError(f"{path} is corrupt ({exc}). Re-run `spaf-edge export`.") from exc
        manifest = cls.from_dict(data, str(path))
        if verify_files:
            if content_digest(data) != manifest.manifest_sha256:
                raise ExportFormatError(
                    f"{path} was modified after export: its content no longer matches its {DIGEST_FIELD} (only "
                    "its `tuned` entry may change, through `spaf-edge tune`). Re-run `spaf-edge export` "
                    "(or restore the file)."
                )
            manifest.verify_files(folder)
        check_embedding_file(folder / EMBEDDINGS, manifest.embedding_layout)
        return manifest

    @property
    def embedding_layout(self) -> EmbeddingLayout:
        """The byte layout of the export's ``embeddings.bin``."""
        return EmbeddingLayout.for_export(self.sizes.vocab_size, self.sizes.hidden_size, self.dtype, self.quantization)

    # ---- checks ------------------------------------------------------------
    def check_consistency(self, source: str = MANIFEST) -> None:
        """Values against each other (types are from_dict's job); ExportFormatError listing every problem."""
        sizes = self.sizes
        problems = [f"sizes.{f.name} {getattr(sizes, f.name)} must be >= 1"
                    for f in dataclasses.fields(sizes) if getattr(sizes, f.name) < 1]
        layers = f"1..{sizes.num_layers - 1}"
        if not 1 <= self.cutoff_layer <= sizes.num_layers - 1:
            problems.append(f"cutoff_layer {self.cutoff_layer} outside {layers}")
        if not self.exits or any(not 1 <= e <= sizes.num_layers - 1 for e in self.exits):
            problems.append(f"exits {self.exits} must be a non-empty list of layers in {layers}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} not in {DTYPES}")
        if self.quantization not in QUANTIZATIONS:
            problems.append(f"quantization {self.quantization!r} not in {QUANTIZATIONS}")
        if self.lossless not in LOSSLESS:
            problems.append(f"lossless {self.lossless!r} not in {LOSSLESS}")
        if self.opset < 1:
            problems.append(f"opset {self.opset} must be >= 1")
        if self.tree_attention != (self.format_version >= TREE_VERSION):
            problems.append(f"tree_attention {self.tree_attention} does not match format version {self.format_version} "
                            f"(the stacks take tree inputs from version {TREE_VERSION} on)")
        if sizes.num_attention_heads % max(sizes.num_kv_heads, 1):
            problems.append("num_attention_heads is not a multiple of num_kv_heads")
        if self.adapter_attention is not None and (
            set(self.adapter_attention) != {"num_heads", "head_dim"} or min(self.adapter_attention.values()) < 1
        ):
            problems.append(f"adapter_attention {self.adapter_attention!r} is not {{num_heads, head_dim}} >= 1")
        if not 2 <= sizes.draft_vocab_size <= sizes.vocab_size:
            problems.append(f"draft_vocab_size {sizes.draft_vocab_size} outside 2..{sizes.vocab_size}")
        vocab = f"the vocabulary 0..{sizes.vocab_size - 1}"
        # A model without EOS (a plain text model) stops at max_new_tokens; a chat model must end its turn.
        if not self.eos_token_ids and self.chat_template:
            problems.append("eos_token_ids is empty but there is a chat template (replies would never end)")
        elif any(not 0 <= t < sizes.vocab_size for t in self.eos_token_ids):
            problems.append(f"eos_token_ids {self.eos_token_ids} are not all in {vocab}")
        if self.bos_token_id is not None and self.bos_token_id < 0:
            problems.append(f"bos_token_id {self.bos_token_id} is negative")
        problems += _file_problems(self.files)
        if problems:
            raise ExportFormatError(f"{source} is inconsistent: {'; '.join(problems)}. Re-export the model.")

    def verify_files(self, folder: str | Path) -> None:
        folder = Path(folder)
        for name, expected in self.files.items():
            path = folder / name
            if not path.is_file():
                raise ExportFormatError(
                    f"{path} is listed in the manifest but missing. The export is incomplete: re-run "
                    "`spaf-edge export`."
                )
            actual = sha256_file(path)
            if actual != expected:
                raise ExportFormatError(
                    f"{path} is corrupt or was modified: sha256 {actual[:12]}… differs from the "
                    f"manifest's {expected[:12]}…. Re-run `spaf-edge export` (or restore the file)."
                )


def content_digest(data: dict[str, Any]) -> str:
    """sha256 of a manifest's JSON content without :data:`UNSEALED_FIELDS` (sorted keys, compact)."""
    content = {key: value for key, value in data.items() if key not in UNSEALED_FIELDS}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def check_embedding_file(path: Path, layout: EmbeddingLayout) -> None:
    """ExportFormatError unless ``path`` holds exactly the table ``layout`` describes (raw, or quantized
    for an int4/int8 export: :mod:`spaf_edge.core.embedding_layout`)."""
    if not path.is_file():
        raise ExportFormatError(f"{path} is missing. The export is incomplete: re-run `spaf-edge export`.")
    expected = layout.file_size
    size = path.stat().st_size
    if size != expected:
        kind = f"{layout.dtype.name} (int{layout.bits})" if layout.quantized else layout.dtype.name
        raise ExportFormatError(
            f"{path} has {size} bytes; the manifest's {layout.vocab_size} x {layout.hidden_size} {kind} table needs "
            f"{expected}. The file is truncated or from another export: re-run `spaf-edge export`."
        )


def is_plain_file_name(name: Any) -> bool:
    """A file name directly inside the export folder: no separator, not '.', '..' or empty."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
            and Path(name).name == name)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---- schema ----------------------------------------------------------------------------
def _file_problems(files: dict[str, str]) -> list[str]:
    problems = [f"files entry {name!r} is not a file name inside the export folder"
                for name in files if not is_plain_file_name(name) or name == MANIFEST]
    problems += [f"files[{name!r}] {digest!r} is not a sha256 hex digest"
                 for name, digest in files.items() if not _SHA256.fullmatch(digest)]
    missing = [name for name in (*GRAPHS, EMBEDDINGS) if name not in files]
    if missing:
        problems.append(f"files lacks {', '.join(missing)}")
    return problems


def _schema_problems(cls: type, data: dict[str, Any], prefix: str = "") -> list[str]:
    """Missing, unknown and wrongly typed fields of dataclass ``cls`` in ``data``, nested dataclasses included."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems = [f"unknown field {prefix}{key}" for key in data if key not in fields]
    for name, spec in fields.items():
        hint, label = hints[name], prefix + name
        if name not in data:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                problems.append(f"field {label} is missing")
        elif dataclasses.is_dataclass(hint) and isinstance(data[name], dict):
            problems += _schema_problems(hint, data[name], label + ".")
        elif not _matches(data[name], hint):
            problems.append(f"{label} must be {_type_text(hint)}, got {_show(data[name])}")
    return problems


def _build(cls: type, data: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    return cls(**{
        name: _build(hints[name], value) if dataclasses.is_dataclass(hints[name]) else value
        for name, value in data.items()
    })


def _matches(value: Any, hint: Any) -> bool:
    """Whether JSON ``value`` has type ``hint`` (a dataclass annotation)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list or hint is list:
        return isinstance(value, list) and all(_matches(item, args[0]) for item in value if args)
    if origin is dict or hint is dict:
        return isinstance(value, dict) and (
            not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items()))
    if dataclasses.is_dataclass(hint):
        return False  # an object was expected (dicts are checked field by field)
    return isinstance(hint, type) and isinstance(value, hint)


def _type_text(hint: Any) -> str:
    """An annotation as the error message shows it, e.g. ``list[int]``, ``int or null``."""
    if hint is None or hint is type(None):
        return "null"
    if dataclasses.is_dataclass(hint):
        return "an object"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(arg) for arg in args)
    if origin is typing.Literal:
        return " or ".join(json.dumps(arg) for arg in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_text(arg) for arg in args)}]"
    return getattr(hint, "__name__", str(hint))


def _kind(value: Any) -> str:
    names = {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
             dict: "object"}
    return names.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = json.dumps(value)
    return f"{_kind(value)} {text if len(text) <= 40 else text[:37] + '...'}"
