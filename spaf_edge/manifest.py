"""The export folder's ``manifest.json``: schema, writing and checked reading.

Torch-free: the runtime reads it. Reading verifies the format version, that every
listed file exists with its recorded sha256, and that the sizes are consistent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spaf_edge.errors import ExportFormatError, ModelNotFoundError
from spaf_edge.io_names import MANIFEST

# 2: draft head in its own graph, top states; 3: upper's num_logits input; 4: embedding rows read by the
# runtime from embeddings.bin, a private prepacked LM head in upper (docs/export_format.md)
FORMAT_VERSION = 4
DTYPES = ("float32", "float16")
QUANTIZATIONS = (None, "int8", "int4")


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
    format_version: int = FORMAT_VERSION

    # ---- io ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = MANIFEST) -> Manifest:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ExportFormatError(
                f"{source}: unknown manifest format version {version!r}; this spaf-edge reads "
                f"version {FORMAT_VERSION}. Re-export the model with this version of spaf-edge."
            )
        try:
            values = dict(data)
            values["sizes"] = ModelSizes(**values["sizes"])
            manifest = cls(**values)
        except (KeyError, TypeError) as exc:
            raise ExportFormatError(f"{source}: malformed manifest ({exc}). Re-export the model.") from exc
        manifest.check_consistency(source)
        return manifest

    @classmethod
    def load(cls, folder: str | Path, verify_files: bool = True) -> Manifest:
        """Read ``folder/manifest.json``; with ``verify_files`` check every file's sha256."""
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
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ExportFormatError(f"{path} is corrupt ({exc}). Re-run `spaf-edge export`.") from exc
        manifest = cls.from_dict(data, str(path))
        if verify_files:
            manifest.verify_files(folder)
        return manifest

    # ---- checks ------------------------------------------------------------
    def check_consistency(self, source: str = MANIFEST) -> None:
        sizes = self.sizes
        problems = []
        if not 1 <= self.cutoff_layer <= sizes.num_layers - 1:
            problems.append(f"cutoff_layer {self.cutoff_layer} outside 1..{sizes.num_layers - 1}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} not in {DTYPES}")
        if self.quantization not in QUANTIZATIONS:
            problems.append(f"quantization {self.quantization!r} not in {QUANTIZATIONS}")
        if sizes.num_attention_heads % max(sizes.num_kv_heads, 1):
            problems.append("num_attention_heads is not a multiple of num_kv_heads")
        if self.adapter_attention is not None and (
            set(self.adapter_attention) != {"num_heads", "head_dim"} or min(self.adapter_attention.values()) < 1
        ):
            problems.append(f"adapter_attention {self.adapter_attention!r} is not {{num_heads, head_dim}} >= 1")
        if not 2 <= sizes.draft_vocab_size <= sizes.vocab_size:
            problems.append(f"draft_vocab_size {sizes.draft_vocab_size} outside 2..{sizes.vocab_size}")
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


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
