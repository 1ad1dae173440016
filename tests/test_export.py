"""ONNX export: graph parity per architecture, precision and adapter kind, manifest, atomicity, shared weights,
errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_spaf

from spaf_edge.core import io_names
from spaf_edge.core.config import SpAFConfig
from spaf_edge.core.errors import (
    ConfigError,
    ExportFormatError,
    NonFiniteWeightsError,
    UnsupportedArchitectureError,
)
from spaf_edge.core.manifest import Manifest
from spaf_edge.core.shared_weights import SharedWeights, read_index
from spaf_edge.exporters import export_model
from spaf_edge.runtime.session import open_shared_session
from spaf_edge.validation.graph_parity import check_graphs

# GroupQueryAttention needs head_dim % 16 == 0: tiny models get hidden 64 / 4 heads.
EXPORTABLE = dict(hidden_size=64)
MAX_LENGTH = 64
GRAPH_NAMES = {"lower", "upper", "drafter", "draft_head"}
STEPS = {"prefill", "decode", "verify", "rollback"}


def graph_io(folder, graph: str) -> tuple[list[str], list[str]]:
    """Input names (without the shared weights) and output names of one exported graph."""
    model = onnx.load(str(folder / graph), load_external_data=False).graph
    initializers = {tensor.name for tensor in model.initializer}
    return [i.name for i in model.input if i.name not in initializers], [o.name for o in model.output]


def tiny_tokenizer(vocab_size: int = 96):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tokenizer


@pytest.fixture(scope="module")
def tiny_llama():
    return make_tiny_spaf("llama", **EXPORTABLE)


@pytest.fixture(scope="module")
def llama_export(tiny_llama, tmp_path_factory):
    tiny_llama.tokenizer = tiny_tokenizer()
    return export_model(tiny_llama, tmp_path_factory.mktemp("export") / "llama", max_length=MAX_LENGTH,
                        progress=False)


# ---- parity ---------------------------------------------------------------------
def test_fp32_graph_parity_per_architecture(model_type, tmp_path):
    model = make_tiny_spaf(model_type, **EXPORTABLE)
    folder = export_model(model, tmp_path / "out", max_length=MAX_LENGTH, progress=False)
    report = check_graphs(model, folder)
    assert report.passed, report.summary()
    assert {e.graph for e in report.errors} == GRAPH_NAMES
    assert {e.step for e in report.errors} == STEPS | {f"{step}/chained" for step in STEPS}
    assert report.worst(output=io_names.LOGITS)["max_rel"] <= 1e-4
    assert report.worst("upper", io_names.TOP_HIDDEN)["max_rel"] <= 1e-4
    assert report.worst("draft_head", io_names.DRAFTED_TOP)["max_rel"] <= 1e-4


def test_fused_adapter_graph_parity(tmp_path):
    """The fused adapter reads the previous top state: its draft head has a prev_top input."""
    model = make_tiny_spaf("llama", spaf_config=SpAFConfig(cutoff_layer=2, adapter_kind="fused"), **EXPORTABLE)
    folder = export_model(model, tmp_path / "out", max_length=MAX_LENGTH, progress=False)
    assert Manifest.load(folder).reads_top_state
    inputs, outputs = graph_io(folder, io_names.DRAFT_HEAD_GRAPH)
    assert inputs == [io_names.DRAFT_HIDDEN, io_names.PREV_TOP]
    assert outputs == [io_names.DRAFT_LOGITS, io_names.DRAFTED_TOP]
    report = check_graphs(model, folder)
    assert report.passed, report.summary()
    assert report.worst("draft_head", io_names.DRAFT_LOGITS)["max_rel"] <= 1e-4
    assert report.worst("draft_head", io_names.DRAFTED_TOP)["max_rel"] <= 1e-4
    # the check has power on the top-state path: a wrong top norm fails it
    with torch.no_grad():
        model.adapters["2"].top_norm.weight.mul_(1.5)
    assert {e.graph for e in check_graphs(model, folder).failures} == {"draft_head"}


def test_attention_adapter_graph_parity(tmp_path):
    """The attention adapter's draft head takes rows with its own KV cache; parity over cached chunks."""
    config = SpAFConfig(cutoff_layer=2, adapter_kind="attention", adapter_dim_ratio=1.0)
    model = make_tiny_spaf("llama", spaf_config=config, **EXPORTABLE)
    folder = export_model(model, tmp_path / "out", max_length=MAX_LENGTH, progress=False)
    manifest = Manifest.load(folder)
    assert manifest.reads_top_state and manifest.adapter_attention == {"num_heads": 2, "head_dim": 16}
    inputs, outputs = graph_io(folder, io_names.DRAFT_HEAD_GRAPH)
    (past_k, past_v, present_k, present_v), = io_names.kv_names([io_names.ADAPTER_KV])
    assert inputs == [io_names.DRAFT_HIDDEN, io_names.PREV_TOP, io_names.SEQLENS_K, io_names.TOTAL_SEQUENCE_LENGTH,
                      past_k, past_v]
    assert outputs == [io_names.DRAFT_LOGITS, io_names.DRAFTED_TOP, present_k, present_v]
    report = check_graphs(model, folder)
    assert report.passed, report.summary()
    assert report.worst("draft_head", io_names.DRAFT_LOGITS)["max_rel"] <= 1e-4
    # the check has power on the attention path: wrong keys fail it
    with torch.no_grad():
        model.adapters["2"].qkv.weight.mul_(1.5)
    assert {e.graph for e in check_graphs(model, folder).failures} == {"draft_head"}


def test_graph_io(llama_export):
    """v4 layout: lower and drafter take embedding rows (no graph gathers from the table); no draft head in
    lower; upper emits top states and logits of its last num_logits positions; the drafter is the
    AlignmentHead alone."""
    assert not Manifest.load(llama_export).reads_top_state
    lower_in, lower_out = graph_io(llama_export, io_names.LOWER_GRAPH)
    assert lower_in[0] == io_names.INPUTS_EMBEDS and lower_out[0] == io_names.CUTOFF_HIDDEN
    assert all(name.startswith("present.") for name in lower_out[1:])
    lower_ops = {node.op_type for node in onnx.load(str(llama_export / io_names.LOWER_GRAPH),
                                                    load_external_data=False).graph.node}
    assert "Gemm" not in lower_ops  # no LM head
    upper_in, upper_out = graph_io(llama_export, io_names.UPPER_GRAPH)
    assert upper_in[:2] == [io_names.CUTOFF_HIDDEN, io_names.NUM_LOGITS]
    assert upper_out[:2] == [io_names.LOGITS, io_names.TOP_HIDDEN]
    assert graph_io(llama_export, io_names.DRAFTER_GRAPH) == (
        [io_names.TOKEN_EMBEDS, io_names.PREV_HIDDEN], [io_names.PSEUDO_HIDDEN])
    assert graph_io(llama_export, io_names.DRAFT_HEAD_GRAPH) == (
        [io_names.DRAFT_HIDDEN], [io_names.DRAFT_LOGITS, io_names.DRAFTED_TOP])
    for graph in io_names.GRAPHS:
        model = onnx.load(str(llama_export / graph), load_external_data=False).graph
        weights = {tensor.name for tensor in model.initializer}
        gathered = {node.input[0] for node in model.node if node.op_type == "Gather"}
        assert not gathered & weights, graph  # rows of activations only (the padding row), never of a table


def test_upper_computes_logits_of_the_last_num_logits_positions(llama_export):
    """num_logits=n gives the last n rows of the full logits (0: none, prefill); top states are unchanged."""
    from spaf_edge.validation.graph_parity import GraphSessions

    graphs = GraphSessions(llama_export, Manifest.load(llama_export), "cpu")
    hidden = np.random.default_rng(0).standard_normal((1, 5, 64)).astype(np.float32)
    full = graphs.run_upper(hidden)
    assert full[io_names.LOGITS].shape == (1, 5, 96)
    for n in (0, 1, 3, 5):
        part = graphs.run_upper(hidden, num_logits=n)  # same past (length 0): same positions
        assert part[io_names.LOGITS].shape == (1, n, 96)
        np.testing.assert_allclose(part[io_names.LOGITS], full[io_names.LOGITS][:, 5 - n:], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(part[io_names.TOP_HIDDEN], full[io_names.TOP_HIDDEN])


def test_parity_check_catches_a_wrong_graph(tiny_llama, llama_export):
    weight = tiny_llama.base.model.layers[3].mlp.down_proj.weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(1.05)  # the PyTorch model now differs from the export
        try:
            report = check_graphs(tiny_llama, llama_export)
        finally:
            weight.copy_(original)
    assert not report.passed
    assert {e.graph for e in report.failures} == {"upper"}


def test_parity_check_catches_a_wrong_draft_head(tiny_llama, llama_export):
    weight = tiny_llama.adapters["2"].up.weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(1.5)
        try:
            report = check_graphs(tiny_llama, llama_export)
        finally:
            weight.copy_(original)
    assert {e.graph for e in report.failures} == {"draft_head"}


def test_fp16_graph_parity(tmp_path):
    import onnxruntime as ort

    model = make_tiny_spaf("qwen2", **EXPORTABLE)
    folder = export_model(model, tmp_path / "out", dtype="float16", max_length=MAX_LENGTH, progress=False)
    report = check_graphs(model, folder)
    assert report.passed, report.summary()
    assert report.worst(output=io_names.LOGITS)["max_rel"] <= 1e-2
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(folder / io_names.UPPER_GRAPH), options, providers=["CPUExecutionProvider"])
    types = {arg.name: arg.type for arg in session.get_inputs() + session.get_outputs()}
    assert types[io_names.CUTOFF_HIDDEN] == "tensor(float16)"
    assert types[io_names.past_key(2)] == "tensor(float16)"
    assert types[io_names.LOGITS] == "tensor(float)"


@pytest.mark.parametrize("quantization, bound", [("int8", 0.05), ("int4", 0.25)])
def test_quantized_export_runs_close_to_float(quantization, bound, tmp_path):
    model = make_tiny_spaf("llama", **EXPORTABLE)
    folder = export_model(model, tmp_path / "out", quantization=quantization, max_length=MAX_LENGTH, progress=False)
    graph = onnx.load(str(folder / io_names.UPPER_GRAPH), load_external_data=False).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("MatMulNBits") == 2 * 4 + 1  # qkv/o/gate_up/down of layers 2 and 3, and the LM head
    assert "MatMul" not in ops and "Gemm" not in ops
    report = check_graphs(model, folder, threshold=bound)
    assert report.passed, report.summary()
    # quantization really changed the numbers (the check compares with the float model)
    assert report.worst("upper", io_names.LOGITS)["max_abs"] > 1e-5


def test_export_refuses_nan_or_inf_weights(tmp_path):
    model = make_tiny_spaf("llama", **EXPORTABLE)
    with torch.no_grad():
        model.alignment_heads["2"].layers[0].weight[3, 1] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"'spaf.alignment_heads.2.layers.0.weight' of drafter.onnx holds 1"):
        export_model(model, tmp_path / "nan", max_length=MAX_LENGTH, progress=False)
    assert not (tmp_path / "nan").exists()
    model = make_tiny_spaf("llama", **EXPORTABLE)
    with torch.no_grad():
        model.adapters["2"].up.weight[0, 0] = 1e5  # finite in float32, inf in float16
    export_model(model, tmp_path / "fp32", max_length=MAX_LENGTH, progress=False)
    with pytest.raises(NonFiniteWeightsError, match="adapters.2.up.weight.*--dtype fp32"):
        export_model(model, tmp_path / "fp16", dtype="float16", max_length=MAX_LENGTH, progress=False)


def test_draft_vocabulary_export(tmp_path):
    model = make_tiny_spaf("llama", **EXPORTABLE)
    model.set_draft_vocab(torch.arange(3, 96, 3))
    folder = export_model(model, tmp_path / "out", max_length=MAX_LENGTH, progress=False)
    manifest = Manifest.load(folder)
    assert manifest.sizes.draft_vocab_size == 31
    assert np.array_equal(np.load(folder / io_names.DRAFT_VOCAB), np.arange(3, 96, 3))
    report = check_graphs(model, folder)
    assert report.passed, report.summary()
    assert report.worst("draft_head", io_names.DRAFT_LOGITS)["max_rel"] <= 1e-4
    # the draft-vocabulary rows serve the draft head only: a private (prepackable) initializer
    assert "spaf.draft_head.weight" not in {t.name for t in read_index(folder)}
    graph = onnx.load(str(folder / io_names.DRAFT_HEAD_GRAPH), load_external_data=False).graph
    assert "spaf.draft_head.weight" in {t.name for t in graph.initializer}
    assert "spaf.draft_head.weight" not in {i.name for i in graph.input}


# ---- folder, manifest, shared weights -------------------------------------------
def test_manifest_describes_the_folder(tiny_llama, llama_export):
    manifest = Manifest.load(llama_export)  # verifies every sha256
    on_disk = {p.name for p in llama_export.iterdir()} - {io_names.MANIFEST}
    assert set(manifest.files) == on_disk
    assert {*io_names.GRAPHS, io_names.EMBEDDINGS, io_names.SHARED_WEIGHTS, io_names.TOKENIZER,
            io_names.TOKENIZER_CONFIG} <= on_disk
    assert manifest.format_version == 6 and manifest.tree_attention
    assert manifest.base_fingerprint == tiny_llama.fingerprint
    assert (manifest.cutoff_layer, manifest.exits, manifest.dtype, manifest.quantization) == (2, [2], "float32", None)
    assert manifest.sizes.max_length == MAX_LENGTH and manifest.sizes.head_dim == 16
    assert manifest.eos_token_ids and manifest.bos_token_id == 1
    assert "messages" in manifest.chat_template
    assert json.loads((llama_export / io_names.TOKENIZER_CONFIG).read_text())
    with open(llama_export / f"{io_names.UPPER_GRAPH}.data", "r+b") as handle:
        byte = handle.read(1)
        handle.seek(0)
        handle.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ExportFormatError, match="sha256"):
        Manifest.load(llama_export)
    with open(llama_export / f"{io_names.UPPER_GRAPH}.data", "r+b") as handle:
        handle.write(byte)


def test_export_is_deterministic(tiny_llama, llama_export, tmp_path):
    again = export_model(tiny_llama, tmp_path / "again", max_length=MAX_LENGTH, progress=False)
    assert Manifest.load(again).files == Manifest.load(llama_export).files


def files_holding(folder, tensor: torch.Tensor) -> list[str]:
    data = tensor.detach().numpy().tobytes()
    return sorted(p.name for p in folder.iterdir() if data in p.read_bytes())


@pytest.mark.parametrize("tied", [True, False])
def test_shared_weights_are_stored_once(tied, tmp_path):
    """Without a draft vocabulary the draft head reads the full LM head: upper and draft head share it."""
    model = make_tiny_spaf("llama", tie_word_embeddings=tied, **EXPORTABLE)
    folder = export_model(model, tmp_path / "out", max_length=MAX_LENGTH, progress=False)
    assert files_holding(folder, model.base.model.embed_tokens.weight) == [io_names.EMBEDDINGS]
    shared = {t.name: t for t in read_index(folder)}
    heads = (io_names.UPPER_GRAPH, io_names.DRAFT_HEAD_GRAPH)  # the final norm + LM head users
    assert shared["model.norm.weight"].graphs == heads
    if tied:  # the LM head is the embedding: one tensor, read in place from embeddings.bin
        embed = shared["model.embed_tokens.weight"]
        assert (embed.graphs, embed.file, embed.offset) == (heads, io_names.EMBEDDINGS, 0)
        assert "lm_head.weight" not in shared
    else:  # the embedding serves no graph (the runtime reads its rows); the head is shared
        assert "model.embed_tokens.weight" not in shared
        assert (shared["lm_head.weight"].graphs, shared["lm_head.weight"].file) == (heads, io_names.SHARED_WEIGHTS)
        assert files_holding(folder, model.base.lm_head.weight) == [io_names.SHARED_WEIGHTS]
    assert not any(name.startswith(("model.layers.", "spaf.")) for name in shared)


@pytest.mark.parametrize("tied", [True, False])
def test_private_lm_head_in_blocks_is_prepackable(tied, tmp_path, monkeypatch):
    """With a draft vocabulary only upper uses the full head: private row blocks (ONNX Runtime prepacks them),
    a tied head's blocks referencing embeddings.bin (no second copy on disk)."""
    import spaf_edge.exporters.graphs as graphs

    monkeypatch.setattr(graphs, "HEAD_BLOCK_BYTES", 40 * 64 * 4)  # 40 rows -> 32-row page-aligned blocks
    model = make_tiny_spaf("llama", tie_word_embeddings=tied, **EXPORTABLE)
    model.set_draft_vocab(torch.arange(3, 96, 3))
    folder = export_model(model, tmp_path / "out", max_length=MAX_LENGTH, progress=False)
    report = check_graphs(model, folder)
    assert report.passed, report.summary()
    assert report.worst("upper", io_names.LOGITS)["max_rel"] <= 1e-4
    upper = onnx.load(str(folder / io_names.UPPER_GRAPH), load_external_data=False).graph
    name = "model.embed_tokens.weight" if tied else "lm_head.weight"
    blocks = [t for t in upper.initializer if t.name.startswith(name)]
    assert [(t.name, list(t.dims)) for t in blocks] == [
        (f"{name}.rows_0_32", [32, 64]), (f"{name}.rows_32_64", [32, 64]), (f"{name}.rows_64_96", [32, 64])]
    assert not {t.name for t in blocks} & {i.name for i in upper.input}  # constant initializers: prepacked
    assert [n.op_type for n in upper.node].count("Gemm") == 3 and "Concat" in {n.op_type for n in upper.node}
    locations = {entry.value for t in blocks for entry in t.external_data if entry.key == "location"}
    assert locations == {io_names.EMBEDDINGS if tied else f"{io_names.UPPER_GRAPH}.data"}
    assert not {t.name for t in read_index(folder)} & {"model.embed_tokens.weight", "lm_head.weight"}
    assert files_holding(folder, model.base.model.embed_tokens.weight) == [io_names.EMBEDDINGS]


def test_shared_weights_feed_every_session_the_same_buffer(llama_export):
    import onnxruntime as ort

    shared = SharedWeights(llama_export)
    for graph in io_names.GRAPHS:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        shared.add_to(options, graph)
        session = ort.InferenceSession(str(llama_export / graph), options, providers=["CPUExecutionProvider"])
        overridable = {arg.name for arg in session.get_overridable_initializers()}
        assert set(shared.names_for(graph)) == overridable
    table = shared.arrays["lm_head.weight"]  # the tiny model's head is untied, shared by upper and draft head
    assert table.shape == (96, 64) and not table.flags.owndata  # a view of the one mapped file


def test_open_session_keeps_the_shared_buffers_alive(llama_export):
    import gc

    session = open_shared_session(SharedWeights(llama_export), io_names.DRAFT_HEAD_GRAPH)
    gc.collect()  # only the session refers to the SharedWeights now
    feeds = {io_names.DRAFT_HIDDEN: np.ones((1, 1, 64), np.float32)}
    first = session.run([io_names.DRAFT_LOGITS], feeds)[0]
    assert np.isfinite(first).all()
    assert np.array_equal(session.run([io_names.DRAFT_LOGITS], feeds)[0], first)


def test_failed_export_leaves_no_folder(tiny_llama, tmp_path, monkeypatch):
    import spaf_edge.exporters.export as export

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_tokenizer", broken)  # after the graphs are written
    with pytest.raises(OSError, match="disk full"):
        export_model(tiny_llama, tmp_path / "out", max_length=MAX_LENGTH, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_export(tiny_llama, llama_export, tmp_path, monkeypatch):
    import shutil

    import spaf_edge.exporters.export as export

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    folder = tmp_path / "out"
    shutil.copytree(llama_export, folder)
    monkeypatch.setattr(export, "build_manifest", broken)  # the last step before the manifest
    with pytest.raises(RuntimeError, match="boom"):
        export_model(tiny_llama, folder, max_length=32, progress=False, overwrite=True)
    assert Manifest.load(folder).sizes.max_length == MAX_LENGTH
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ---- errors ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(exit_layer=3), "no trained adapter"),
    (dict(exit_layer=4), "outside 1..3"),
    (dict(dtype="bfloat16"), "dtype"),
    (dict(quantization="int3"), "quantization"),
    (dict(max_length=129), "max_length"),
])
def test_bad_options_are_config_errors(tiny_llama, tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        export_model(tiny_llama, tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_out_dir_rules(tiny_llama, llama_export, tmp_path):
    with pytest.raises(ConfigError, match="--overwrite"):
        export_model(tiny_llama, llama_export, progress=False)
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a SpAF export"):
        export_model(tiny_llama, tmp_path, progress=False, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert Manifest.load(export_model(tiny_llama, empty, max_length=MAX_LENGTH, progress=False))


def test_unexportable_head_dim(tmp_path):
    model = make_tiny_spaf("llama")  # hidden 32 / 4 heads: head_dim 8
    with pytest.raises(UnsupportedArchitectureError, match="multiple of 16"):
        export_model(model, tmp_path / "out", progress=False)


def test_cli_export(tmp_path):
    from spaf_edge.cli import main

    model = make_tiny_spaf("mistral", **EXPORTABLE)
    base = tmp_path / "base"
    model.base.save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    runner = CliRunner()
    result = runner.invoke(main, ["export", "--base-model", str(base), "--out", str(tmp_path / "out"),
                                  "--cutoff-layer", "1", "--max-length", "32", "--check"])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    manifest = Manifest.load(tmp_path / "out")
    assert (manifest.cutoff_layer, manifest.model_type) == (1, "mistral")
    result = runner.invoke(main, ["export", "--base-model", str(base), "--out", str(tmp_path / "other"),
                                  "--cutoff-layer", "4"])
    assert result.exit_code != 0 and "cutoff_layer=4" in result.output
    assert not (tmp_path / "other").exists()


# ---- the real default model --------------------------------------------------------
@pytest.mark.real_model
def test_default_model_fp32_export_parity(default_base, tmp_path):
    from spaf_edge.core.config import SpAFConfig
    from spaf_edge.model import SpAFModel

    base, tokenizer = default_base
    model = SpAFModel(base, SpAFConfig(), tokenizer)
    folder = export_model(model, tmp_path / "smol", max_length=128, progress=False)
    report = check_graphs(model, folder)
    assert report.passed, report.summary()
    param_bytes = 4 * (model.num_base_parameters() + model.num_trainable_parameters())
    folder_bytes = sum(p.stat().st_size for p in folder.iterdir())
    assert folder_bytes < 1.05 * param_bytes + 8e6  # + tokenizer; a second embedding copy would add 113 MB
    shared = {t.name: t for t in read_index(folder)}
    embed = shared["model.embed_tokens.weight"]  # tied: embedding = LM head = draft head (no draft vocabulary)
    assert (embed.file, len(embed.graphs)) == (io_names.EMBEDDINGS, 2)
    manifest = Manifest.load(folder, verify_files=False)
    assert manifest.chat_template and manifest.eos_token_ids
