"""Hostile or careless files and conditions (issue 15): one clear error, nothing silently wrong or left behind.

The manifest and the shared-weights index are parsed, so every field is checked for type and
value, and an edited manifest fails its own digest; a short embedding table is named before
ONNX Runtime sees it; a full disk, a killed export and a read-only export folder neither lose
work nor leave files behind.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Literal

import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_spaf, make_tiny_tokenizer

from spaf_edge.cli import main
from spaf_edge.core import atomic
from spaf_edge.core.atomic import (
    atomic_directory,
    atomic_write_text,
    remove_stale_partials,
)
from spaf_edge.core.errors import ExportFormatError, StorageError
from spaf_edge.core.io_names import EMBEDDINGS, MANIFEST, SHARED_WEIGHTS_INDEX
from spaf_edge.core.manifest import DIGEST_FIELD, Manifest, content_digest
from spaf_edge.core.shared_weights import SharedWeights
from spaf_edge.exporters import export_model
from spaf_edge.runtime.engine import Engine
from spaf_edge.runtime.tuning import Grid, TuneOptions, tune_export, write_tuned

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(export folder, calibration prompt file) of a tiny random Llama with a tokenizer."""
    root = tmp_path_factory.mktemp("hostile")
    model = make_tiny_spaf("llama", hidden_size=64)
    model.tokenizer = make_tiny_tokenizer()
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in ("Hi there", "Count to ten.")))
    return export_model(model, root / "export", progress=False), prompts


@pytest.fixture
def copy(tiny, tmp_path):
    return Path(shutil.copytree(tiny[0], tmp_path / "export"))


def read_json(path: Path):
    return json.loads(path.read_text())


def edit_manifest(folder: Path, change, reseal: bool = True) -> None:
    """Apply ``change`` to the manifest's JSON; ``reseal`` recomputes its digest (as a buggy exporter would)."""
    data = read_json(folder / MANIFEST)
    change(data)
    if reseal and isinstance(data, dict):
        data[DIGEST_FIELD] = content_digest(data)
    (folder / MANIFEST).write_text(json.dumps(data))


def setter(key, value):
    def change(data):
        target = data
        *parents, last = key.split(".")
        for parent in parents:
            target = target[parent]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return change


# ---- manifest.json: schema and values ------------------------------------------------
@pytest.mark.parametrize("key,value,message", [
    ("files", ["lower.onnx"], "files must be dict[str, str], got list"),
    ("cutoff_layer", "2", 'cutoff_layer must be int, got string "2"'),
    ("cutoff_layer", True, "cutoff_layer must be int, got boolean"),
    ("sizes", [4, 64], "sizes must be an object, got list"),
    ("sizes.vocab_size", 96.0, "sizes.vocab_size must be int, got number"),
    ("eos_token_ids", 3, "eos_token_ids must be list[int], got integer"),
    ("bos_token_id", "1", "bos_token_id must be int or null"),
    ("reads_top_state", 1, "reads_top_state must be bool"),
    ("spaf", None, "spaf must be dict[str, Any], got null"),
    ("opset", KeyError, "field opset is missing"),
    ("sizes.head_dim", KeyError, "field sizes.head_dim is missing"),
    ("colour", "blue", "unknown field colour"),
])
def test_wrongly_typed_manifest_fields_are_named(copy, key, value, message):
    """Before: AttributeError / TypeError tracebacks, or a silently accepted value."""
    edit_manifest(copy, setter(key, value))
    with pytest.raises(ExportFormatError, match=rf"manifest.json is malformed: .*{re.escape(message)}.*Re-export"):
        Engine.from_folder(copy, verify=False)


@pytest.mark.parametrize("data,kind", [([], "list"), ("manifest", "string"), (None, "null")])
def test_manifest_that_is_not_an_object(copy, data, kind):
    (copy / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ExportFormatError, match=f"holds a JSON {kind}, not an object of manifest fields"):
        Manifest.load(copy, verify_files=False)


@pytest.mark.parametrize("key,value,message", [
    ("eos_token_ids", [], r"eos_token_ids is empty but there is a chat template \(replies would never end\)"),
    ("eos_token_ids", [3, 96], r"eos_token_ids \[3, 96\] are not all in the vocabulary 0..95"),
    ("eos_token_ids", [-1], "are not all in the vocabulary"),
    ("exits", [2, 9], r"exits \[2, 9\] must be a non-empty list of layers in 1..3"),
    ("sizes.head_dim", 0, "sizes.head_dim 0 must be >= 1"),
    ("bos_token_id", -4, "bos_token_id -4 is negative"),
    ("files", {"../../etc/passwd": "0" * 64}, r"files entry '../../etc/passwd' is not a file name inside"),
    ("files.lower.onnx", "abc", r"files\['lower.onnx'\] 'abc' is not a sha256 hex digest"),
])
def test_manifest_values_out_of_range_are_named(copy, key, value, message):
    """Before: an empty EOS list made the model invent new turns; the others failed later or not at all."""
    if key.startswith("files."):
        change = lambda data: data["files"].update({key.removeprefix("files."): value})  # noqa: E731
    else:
        change = setter(key, value)
    edit_manifest(copy, change)
    with pytest.raises(ExportFormatError, match=rf"manifest.json is inconsistent: .*{message}"):
        Engine.from_folder(copy, verify=False)


def test_edited_manifest_fails_its_digest_but_tune_may_rewrite_tuned(copy):
    manifest = Manifest.load(copy)
    assert manifest.manifest_sha256 == content_digest(read_json(copy / MANIFEST))
    write_tuned(copy, {"num_draft_tokens": 2, "serial_parallel_transition": 1, "draft_stop_threshold": None})
    assert Manifest.load(copy).tuned["num_draft_tokens"] == 2  # `tuned` is outside the digest

    edit_manifest(copy, setter("eos_token_ids", [5]), reseal=False)  # valid, but not what was exported
    with pytest.raises(ExportFormatError, match="manifest.json was modified after export.*manifest_sha256"):
        Engine.from_folder(copy)
    assert Manifest.load(copy, verify_files=False).eos_token_ids == [5]  # verify=False trusts the folder


@pytest.mark.parametrize("change,message", [
    (setter(DIGEST_FIELD, KeyError), "manifest_sha256 must be a sha256 hex digest, got null"),
    (setter(DIGEST_FIELD, "00ff"), 'manifest_sha256 must be a sha256 hex digest, got string "00ff"'),
    (setter("format_version", 4), "unknown manifest format version 4.*Re-export"),  # exports before the digest
])
def test_manifest_without_its_digest_is_refused(copy, change, message):
    edit_manifest(copy, change, reseal=False)
    with pytest.raises(ExportFormatError, match=message):
        Manifest.load(copy, verify_files=False)


def test_new_manifest_fields_are_checked_from_their_annotations(tiny):
    """A field added to the dataclass is type-checked without a check of its own."""

    @dataclasses.dataclass
    class Extended(Manifest):
        lossless: Literal["exact", "near"] = "exact"

    data = read_json(tiny[0] / MANIFEST)
    assert Extended.from_dict({**data, "lossless": "near"}).lossless == "near"
    with pytest.raises(ExportFormatError, match='lossless must be "exact" or "near", got string "close"'):
        Extended.from_dict({**data, "lossless": "close"})


# ---- shared_weights.json ------------------------------------------------------------------
def edit_index(folder: Path, key: str | None, value) -> str:
    """Set ``key`` of the index's first tensor (the whole index when ``key`` is None); return its name."""
    path = folder / SHARED_WEIGHTS_INDEX
    data = read_json(path)
    name = next(iter(data["tensors"]))
    if key is None:
        data = value
    else:
        data["tensors"][name][key] = value
    path.write_text(json.dumps(data))
    return name


@pytest.mark.parametrize("key,value,message", [
    ("offset", -64, "offset -64 must be an integer >= 0"),
    ("offset", "0", "offset '0' must be an integer >= 0"),
    ("offset", 1 << 40, r"bytes 1099511627776\.\.\d+ lie past the end of shared_weights.bin \(\d+ bytes"),
    ("shape", [2, 3], r"nbytes \d+ differs from shape \[2, 3\] x float32 = 24 bytes"),
    ("shape", "2048x32", "shape '2048x32' must be a list of integers >= 0"),
    ("dtype", "object", "dtype 'object' is not a numeric numpy dtype name"),
    ("file", "../manifest.json", "file '../manifest.json' is not a file name inside the export folder"),
    ("file", MANIFEST, r"bytes 0\.\.\d+ lie past the end of manifest.json"),  # inside the folder, but too short
    ("graphs", ["evil.onnx"], "graphs \\['evil.onnx'\\] must be a non-empty list of"),
    (None, [], "unknown index version None"),
    (None, {"format_version": 2, "tensors": []}, "'tensors' must map names to objects"),
])
def test_hostile_shared_weights_index_is_named(copy, key, value, message):
    """Before: a negative offset gave garbage output with exit code 0; wrong types gave tracebacks."""
    name = edit_index(copy, key, value)
    expected = message if key is None else f"{name}: {message}"
    with pytest.raises(ExportFormatError, match=rf"shared_weights.json .*{expected}"):
        Engine.from_folder(copy, verify=False)
    with pytest.raises(ExportFormatError, match=expected):
        SharedWeights(copy)


# ---- embeddings.bin -----------------------------------------------------------------------
def test_short_embedding_table_is_named_before_any_session(tmp_path, monkeypatch):
    """With a tied LM head, upper.onnx reads its head from embeddings.bin: ONNX Runtime's error used to
    come first, cut off mid-word and blaming upper.onnx."""
    model = make_tiny_spaf("llama", tie_word_embeddings=True, hidden_size=64)
    model.set_draft_vocab(torch.arange(0, 96, 2))  # the private LM head: blocks of embeddings.bin in upper.onnx
    folder = export_model(model, tmp_path / "tied", progress=False)
    table = folder / EMBEDDINGS
    os.truncate(table, table.stat().st_size - 4096)

    def no_session(*args, **kwargs):
        raise AssertionError("a session was created before the embedding table was checked")

    monkeypatch.setattr(ort.InferenceSession, "__init__", no_session)
    with pytest.raises(ExportFormatError, match=r"embeddings.bin has 20480 bytes; the manifest's 96 x 64 float32 "
                                                r"table needs 24576\. .*re-run `spaf-edge export`"):
        Engine.from_folder(folder, verify=False)


# ---- disk full, killed exports ------------------------------------------------------------
def test_corrupt_drafter_weights_are_named_at_load(copy):
    """NaN weights behind re-sealed hashes: the draft graphs' logits on a short prompt give them away."""
    data = copy / "drafter.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[:256] = bytes.fromhex("0000c07f") * 64  # float32 NaN
    data.write_bytes(bytes(raw))
    with pytest.raises(ExportFormatError, match="draft graphs .* give NaN or inf logits"):
        Engine.from_folder(copy, verify=False)


def test_draft_vocabulary_that_is_a_pickle_is_named(tmp_path):
    import numpy as np

    model = make_tiny_spaf("llama", hidden_size=64)
    model.set_draft_vocab(torch.arange(0, 96, 2))
    folder = export_model(model, tmp_path / "export", max_length=32, progress=False)
    np.save(folder / "draft_vocab.npy", np.array([{"not": "ids"}], dtype=object), allow_pickle=True)
    with pytest.raises(ExportFormatError, match="draft_vocab.npy is not a saved id array"):
        Engine.from_folder(folder, verify=False)


def test_disk_full_during_export_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    import spaf_edge.exporters.export as export_module

    model = make_tiny_spaf("llama", hidden_size=64)
    written = export_module.write_embeddings

    def fill_disk(folder, plan):
        written(folder, plan)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_module, "write_embeddings", fill_disk)
    parent = tmp_path / "exports"
    with pytest.raises(StorageError, match=rf"Not enough disk space in {parent}: need more than the \d+ MB free "
                                           r"\(24.6 kB were written before the disk filled\)\. Nothing was kept"):
        export_model(model, parent / "out", progress=False)
    assert list(parent.iterdir()) == []  # neither the export nor its hidden partial folder


def test_disk_full_while_replacing_a_file_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "settings.json"
    path.write_text("old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", no_space)
    with pytest.raises(StorageError, match=f"Not enough disk space in {tmp_path}: need about 3 bytes"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["settings.json"]


def test_enough_space_is_checked_before_writing(tmp_path):
    with pytest.raises(StorageError, match=r"need about 1000000000 MB, \d+ MB free"):
        with atomic_directory(tmp_path / "out", expected_bytes=10**15):
            raise AssertionError("nothing may be written")
    assert list(tmp_path.iterdir()) == []


def test_killed_writer_leaves_a_partial_that_the_next_write_removes(tmp_path, caplog):
    """A SIGKILLed export left a hidden .out.*.partial folder that nothing removed."""
    code = ("import os, signal, sys; from spaf_edge.core.atomic import atomic_directory\n"
            "with atomic_directory(sys.argv[1]) as tmp:\n"
            "    (tmp / 'lower.onnx').write_bytes(b'x' * 1000)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out")])
    assert done.wait(timeout=120) == -9
    (stale,) = tmp_path.glob(".out.*.partial")
    mine = Path(tempfile.mkdtemp(dir=tmp_path, prefix=f".mine.{atomic._owner_tag()}.", suffix=".partial"))
    foreign = tmp_path / f".out.p{done.pid}-another-host.abcd1234.partial"  # another machine's, same pid
    unowned = tmp_path / ".out.k2j4h5g6.partial"  # written before partials named their process
    for folder in (foreign, unowned):
        folder.mkdir()

    with caplog.at_level(logging.WARNING, logger="spaf_edge.core.atomic"), atomic_directory(tmp_path / "out") as tmp:
        (tmp / "lower.onnx").write_bytes(b"y")
    assert not stale.exists() and f"Removed {stale}" in caplog.text and f"process {done.pid}" in caplog.text
    assert mine.is_dir() and foreign.is_dir() and unowned.is_dir()  # a live process's, or not provably dead
    assert (tmp_path / "out" / "lower.onnx").read_bytes() == b"y"
    assert remove_stale_partials(tmp_path) == []


# ---- tune on a read-only export ------------------------------------------------------------
def tune_args(folder: Path, prompts: Path, *extra) -> list[str]:
    return ["tune", str(folder), "--prompts", str(prompts), "--max-new-tokens", "4", "--draft-tokens", "2",
            "--transitions", "1", "--thresholds", "none", "--threads", "1", "--no-progress", *extra]


@pytest.fixture
def read_only(copy, monkeypatch):
    """``copy`` behaves as a read-only folder (also for root, whom permissions do not stop)."""
    create = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == copy:
            raise OSError(errno.EROFS, "Read-only file system")
        return create(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    return copy


def test_tune_refuses_a_read_only_export_before_measuring(tiny, read_only, monkeypatch):
    """Before: minutes of measuring, then a PermissionError/OSError traceback."""
    def no_engine(*args, **kwargs):
        raise AssertionError("measuring started")

    monkeypatch.setattr(Engine, "from_folder", no_engine)
    with pytest.raises(StorageError, match="is not writable .*Read-only file system.*--no-store"):
        tune_export(read_only, TuneOptions(prompts=tiny[1], progress=False))
    result = CliRunner().invoke(main, tune_args(read_only, tiny[1]))
    assert result.exit_code == 1 and "is not writable" in result.output and "Traceback" not in result.output


def test_tune_prints_what_it_cannot_store(tiny, read_only):
    result = CliRunner().invoke(main, tune_args(read_only, tiny[1], "--no-store"))
    assert result.exit_code == 0, result.output
    assert "tok/s" in result.output and "Not stored (--no-store)" in result.output

    options = TuneOptions(prompts=tiny[1], max_new_tokens=4, threads=1, progress=False,
                          grid=Grid(num_draft_tokens=(2,), transitions=(1,), thresholds=(None,)))
    with pytest.MonkeyPatch.context() as patch:  # writable when checked, read-only when written
        patch.setattr("spaf_edge.runtime.tuning.check_writable", lambda folder: None)
        outcome = tune_export(read_only, options)
        assert not outcome.stored and "Cannot write" in outcome.store_error and "Read-only" in outcome.store_error
        assert "NOT stored: Cannot write" in outcome.summary()
        result = CliRunner().invoke(main, tune_args(read_only, tiny[1]))
    assert result.exit_code == 1 and "tok/s" in result.output and "Error: Cannot write" in result.output
    assert read_json(read_only / MANIFEST)["tuned"] is None
