"""int4/int8 exports (quantized LM heads and embedding rows) and row-invariant verification.

Tiny random models test the mechanics: the quantized layout of ``embeddings.bin`` as ONNX
Runtime's MatMulNBits reads it, the padded one-row calls of the decoder, and the row check
at engine load. The real default model tests what matters: SpAF's greedy tokens equal the
same int4/int8 export's plain greedy tokens over long answers, where near-ties flip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import make_tiny_spaf
from onnx import TensorProto, helper

from spaf_edge.core.config import SpAFConfig
from spaf_edge.core.embedding_layout import EmbeddingLayout
from spaf_edge.core.io_names import DRAFT_HEAD_GRAPH, EMBEDDINGS, UPPER_GRAPH
from spaf_edge.exporters import export_model
from spaf_edge.runtime import embeddings as embeddings_module
from spaf_edge.runtime.embeddings import EmbeddingTable
from spaf_edge.runtime.engine import Engine
from spaf_edge.runtime.rows import RowCheck, check_rows

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ([1, 7, 19, 42, 5], [3, 90, 11])


def tiny_export(folder: Path, quantization: str | None, dtype: str = "float32", draft_vocab: bool = True,
                max_length: int = 64, tied: bool = False) -> Path:
    model = make_tiny_spaf("llama", spaf_config=SpAFConfig(cutoff_layer=2), hidden_size=64, tie_word_embeddings=tied)
    if draft_vocab:
        model.set_draft_vocab(torch.arange(0, 96, 2))
    return export_model(model, folder, dtype=dtype, quantization=quantization, max_length=max_length,
                        progress=False)


def head_node(folder: Path, graph: str) -> onnx.NodeProto:
    model = onnx.load(folder / graph, load_external_data=False)
    (node,) = [n for n in model.graph.node if n.name.endswith("/MatMulNBits") and "layers" not in n.name]
    return node


def dequantized_by_ort(layout: EmbeddingLayout, data: bytes) -> np.ndarray:
    """The [V, H] rows MatMulNBits computes with, from embeddings.bin's bytes: the head on an identity input."""
    packed = np.frombuffer(data, np.uint8, layout.vocab_size * layout.row_bytes)
    packed = packed.reshape(layout.vocab_size, layout.blocks, -1)
    scales = np.frombuffer(data, layout.dtype, layout.vocab_size * layout.blocks, layout.scales_offset)
    node = helper.make_node("MatMulNBits", ["a", "b", "s"], ["y"], domain="com.microsoft", K=layout.hidden_size,
                            N=layout.vocab_size, bits=layout.bits, block_size=layout.block_size, accuracy_level=0)
    graph = helper.make_graph(
        [node], "head", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["M", layout.hidden_size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", layout.vocab_size])],
        [onnx.numpy_helper.from_array(packed.copy(), "b"), onnx.numpy_helper.from_array(scales.copy(), "s")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"a": np.eye(layout.hidden_size, dtype=np.float32)})[0].T


@pytest.mark.parametrize("quantization, tied", [("int4", True), ("int8", True), ("int4", False)])
def test_embedding_rows_are_the_quantized_head_rows_stored_once(quantization, tied, tmp_path):
    folder = tiny_export(tmp_path / "export", quantization, tied=tied)
    engine = Engine.from_folder(folder)
    layout = engine.decoder.embeddings.layout
    assert layout.quantized and layout.bits == {"int4": 4, "int8": 8}[quantization]
    data = (folder / EMBEDDINGS).read_bytes()
    assert len(data) == layout.file_size < 96 * 64 * 4  # smaller than the float table
    rows = engine.decoder.embeddings.rows(list(range(96)))
    np.testing.assert_array_equal(rows, dequantized_by_ort(layout, data))
    # a tied head is a MatMulNBits node whose weights are embeddings.bin's bytes, not a copy
    upper = onnx.load(folder / UPPER_GRAPH, load_external_data=False)
    node = head_node(folder, UPPER_GRAPH)
    weights = [init for init in upper.graph.initializer if init.name in node.input]
    assert [init.data_type for init in weights] == [TensorProto.UINT8, TensorProto.FLOAT]
    locations = {entry.value for init in weights for entry in init.external_data if entry.key == "location"}
    assert (locations == {EMBEDDINGS}) == tied and len(weights) == 2
    assert not [n for n in upper.graph.node if n.op_type == "Gemm"]
    # the draft-vocabulary rows are quantized too (a private head of their own)
    assert head_node(folder, DRAFT_HEAD_GRAPH).attribute


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_cached_rows_are_the_rows_read_and_the_cache_stays_bounded(quantization, tmp_path, monkeypatch):
    """Rows served from the dequantized-row cache equal fresh reads, in any mix of cached and new
    tokens and repeats; a cache at its budget starts over, and a lookup larger than it keeps nothing."""
    monkeypatch.setattr(embeddings_module, "ROW_CACHE_BYTES", 8 * 64 * 4)  # 8 rows of this table
    folder = tiny_export(tmp_path / "export", quantization)
    fresh = EmbeddingTable(folder / EMBEDDINGS, 96, 64, np.float32, quantization).rows(list(range(96)))
    table = EmbeddingTable(folder / EMBEDDINGS, 96, 64, np.float32, quantization)
    for ids in ([5], [5, 7, 5], [7, 9, 11, 5, 13, 2], [2, 2, 40, 41, 42], [95, 0, 5]):
        np.testing.assert_array_equal(table.rows(ids), fresh[ids])
        assert len(table._cache) <= 8
    assert sorted(table._cache) == [0, 5, 40, 41, 42, 95]  # 6 rows + 3 new overflowed: restarted with the 3
    table.rows(list(range(20, 40)))
    assert 20 not in table._cache  # 20 rows: more than the budget, not kept
    row = table.rows([95])
    row[:] = 0  # the caller's copy: the cached row is untouched
    np.testing.assert_array_equal(table.rows([95]), fresh[[95]])


def test_quantized_export_without_a_draft_vocabulary_runs_losslessly(tmp_path):
    """The full head then serves the draft head too: both graphs read the same quantized bytes."""
    engine = Engine.from_folder(tiny_export(tmp_path / "export", "int4", draft_vocab=False))
    for prompt in PROMPTS:
        plain = engine.generate(prompt, max_new_tokens=16, mode="greedy").tokens
        assert engine.generate(prompt, max_new_tokens=16, num_draft_tokens=3).tokens == plain


@pytest.mark.parametrize("quantization, dtype", [(None, "float32"), ("int4", "float32"), ("int8", "float16")])
def test_row_check_finds_an_exact_mode_and_padded_calls_stay_lossless(quantization, dtype, tmp_path):
    folder = tiny_export(tmp_path / "export", quantization, dtype)
    engine = Engine.from_folder(folder)
    assert engine.lossless == "exact", engine.rows
    assert engine.decoder.tokens == [] and engine.decoder.lower.kv.length == engine.decoder.upper.kv.length == 0
    padded = Engine.from_folder(folder, row_calls="padded")
    # the attention's padding row and the padded call's second row need two cache rows past the context
    assert padded.decoder.pad and padded.max_length == 64 - 2
    for prompt in PROMPTS:
        plain = padded.generate(prompt, max_new_tokens=20, mode="greedy").tokens
        for n, s in ((1, 1), (3, 1), (4, 0), (2, 2)):
            result = padded.generate(prompt, max_new_tokens=20, num_draft_tokens=n, serial_parallel_transition=s)
            assert result.tokens == plain, (prompt, n, s)
            assert padded.decoder.lower.kv.length == padded.decoder.upper.kv.length == padded.decoder.position


def test_padded_engine_verifies_a_first_draft_in_the_padding_rows_place(tmp_path):
    """Where one-row calls run as two, a step keeps its first SpAF draft below the threshold:
    the second row then checks it instead of computing padding."""
    folder = tiny_export(tmp_path / "export", "int4")
    assert Engine.from_folder(folder, row_calls="native").settings().min_drafts == 0
    padded = Engine.from_folder(folder, row_calls="padded")
    assert padded.settings().min_drafts == 1 and padded.settings(min_drafts=0).min_drafts == 0
    assert "keeps 1 below eta" in padded.settings(draft_stop_threshold=0.5).describe()
    for prompt in PROMPTS:
        plain = padded.generate(prompt, max_new_tokens=20, mode="greedy").tokens
        result = padded.generate(prompt, max_new_tokens=20, draft_stop_threshold=0.999, proposers="spaf")
        assert result.tokens == plain
        drafted = result.stats.drafted  # one draft per step, none past it (the last step may have no room)
        assert len(drafted) == 1 and drafted[0] >= result.stats.verify_steps - 1, drafted


def test_padded_engine_generates_to_the_end_of_its_context(tmp_path):
    engine = Engine.from_folder(tiny_export(tmp_path / "export", "int4", max_length=24), row_calls="padded")
    plain = engine.generate(PROMPTS[0], max_new_tokens=40, mode="greedy")
    spaf = engine.generate(PROMPTS[0], max_new_tokens=40, num_draft_tokens=4)
    assert plain.stop_reason in ("context", "eos") and spaf.tokens == plain.tokens
    if plain.stop_reason == "context":
        assert len(PROMPTS[0]) + len(plain.tokens) == engine.max_length + 1 == 24 - 1


def test_row_check_reports_near_when_the_chosen_mode_is_not_invariant():
    assert RowCheck(native=False, padded=True, pad=True, rows=9).lossless == "exact"
    assert RowCheck(native=False, padded=True, pad=False, rows=9).lossless == "near"
    assert RowCheck(native=True, padded=True, pad=False, rows=9).lossless == "exact"
    assert RowCheck(native=False, padded=False, pad=True, rows=9).lossless == "near"
    assert "lossless: near" in RowCheck(native=False, padded=False, pad=False, rows=9).describe()


def test_row_check_detects_a_graph_that_rounds_one_row_differently(tmp_path):
    """A decoder whose one-row upper calls differ in the last bit is found, and padding is chosen."""
    engine = Engine.from_folder(tiny_export(tmp_path / "export", None))
    decoder = engine.decoder
    run_upper = type(decoder).run_upper

    def one_row_rounds_up(self, new, num_logits):
        logits = run_upper(self, new, num_logits)
        if self._call_rows(new) == 1:  # a kernel path of its own for one row
            logits[0, 0] = np.nextafter(logits[0, 0], np.inf)
        return logits

    decoder.run_upper = one_row_rounds_up.__get__(decoder)
    check = check_rows(decoder)
    assert (check.native, check.padded, check.pad, check.lossless) == (False, True, True, "exact")
    assert check_rows(decoder, "native").lossless == "near"


# ---- the real default model -----------------------------------------------------
# MT-Bench first turns (evaluation only) where the int4 export's SpAF answer left plain greedy
# within the first tokens before verify calls were made row-invariant.
REAL_PROMPTS = (
    "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences "
    "and must-see attractions.",
    "Develop a Python program that reads all the text files under a directory and returns top-5 words with "
    "the most number of occurrences.",
    "In the field of quantum physics, what is superposition, and how does it relate to the phenomenon of "
    "quantum entanglement?",
    "Write a descriptive paragraph about a bustling marketplace, immersing the reader in the experience.",
)


@pytest.fixture(scope="module")
def shipped_model(default_base):
    from spaf_edge.model import CONFIG_FILE, SpAFModel
    from spaf_edge.models.loading import resolve_components

    base, tokenizer = default_base
    components = Path(resolve_components("default", None))
    model = SpAFModel(base, SpAFConfig.load(components / CONFIG_FILE), tokenizer)
    model.load_spaf_components(components)
    return model


@pytest.mark.real_model
@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_default_model_spaf_equals_plain_greedy_on_quantized_exports(shipped_model, quantization, tmp_path):
    folder = export_model(shipped_model, tmp_path / quantization, quantization=quantization, max_length=512,
                          progress=False)
    engine = Engine.from_folder(folder, threads=2)
    assert engine.lossless == "exact", engine.rows.describe()
    accepted = 0
    for prompt in REAL_PROMPTS:
        plain = engine.generate(prompt, max_new_tokens=96, mode="greedy")
        spaf = engine.generate(prompt, max_new_tokens=96)
        assert spaf.tokens == plain.tokens, (prompt, engine.rows.describe())
        accepted += sum(spaf.stats.accepted)
    assert accepted > 0  # drafts were accepted, so verify passes had several rows
