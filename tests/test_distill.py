"""Self-distillation data: batched replies, attribution kept, resume, refusal of eval data, and the
ONNX Runtime backend against the torch one."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from conftest import make_tiny_base, make_tiny_tokenizer

from spaf_edge.core.config import SpAFConfig
from spaf_edge.core.errors import ConfigError, UnsupportedArchitectureError
from spaf_edge.model import SpAFModel
from spaf_edge.prompts import encode_conversation, encode_prompt
from spaf_edge.training.data import load_examples
from spaf_edge.training.distill import (
    PromptRow,
    base_tokenizer,
    distill,
    generate_batch,
    onnx_backend,
    parse_shard,
    resolve_backend,
    torch_backend,
)
from spaf_edge.training.second_turns import FOLLOW_UPS, follow_up

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_base("llama", eos_token_id=tokenizer.eos_token_id)
    return model, tokenizer


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Question {i}: why{'?' * (i % 3)}", "source": f"src{i % 2}", "license": "MIT"}
            for i in range(7)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(tiny, prompts, out, **kwargs):
    model, tokenizer = tiny
    settings = dict(max_new_tokens=5, batch_size=3, progress=False, model=model, tokenizer=tokenizer)
    settings.update(kwargs)
    return distill(prompts, out, **settings)


def test_distill_writes_chat_rows_with_attribution(tiny, prompts, tmp_path):
    out = tmp_path / "out.jsonl"
    summary = run(tiny, prompts, out)
    rows = read_rows(out)
    assert summary.written == 7 and len(rows) == 7
    assert sorted(row["prompt_index"] for row in rows) == list(range(7))
    for row in rows:
        index = row["prompt_index"]
        assert row["messages"][0] == {"role": "user", "content": f"Question {index}: why{'?' * (index % 3)}"}
        assert row["messages"][1]["role"] == "assistant"
        assert row["source"] == f"src{index % 2}" and row["license"] == "MIT"
        assert row["finish_reason"] in ("eos", "length")
    # The rows are valid training data.
    assert len(load_examples(out, tiny[1])) == 7


def test_batched_replies_match_one_at_a_time_greedy(tiny):
    model, tokenizer = tiny
    prompts = [[2, 10, 11, 12], [2, 13], [2, 14, 15]]
    batched = generate_batch(model, prompts, tokenizer.pad_token_id, [tokenizer.eos_token_id], 6, 0.0, 1.0)
    for ids, reply in zip(prompts, batched):
        alone = generate_batch(model, [ids], tokenizer.pad_token_id, [tokenizer.eos_token_id], 6, 0.0, 1.0)[0]
        assert reply == alone


def test_distill_resumes_without_duplicates(tiny, prompts, tmp_path):
    out = tmp_path / "out.jsonl"
    run(tiny, prompts, out, limit=4)
    first = read_rows(out)
    # Simulate a crash in the middle of writing a line.
    with out.open("a") as handle:
        handle.write('{"messages": [{"role": "user", "con')
    summary = run(tiny, prompts, out)
    rows = read_rows(out)
    assert summary.already_done == 4 and summary.written == 3
    assert rows[:4] == first
    assert sorted(row["prompt_index"] for row in rows) == list(range(7))
    assert run(tiny, prompts, out).written == 0


def test_distill_refuses_mt_bench(tiny, tmp_path):
    path = tmp_path / "mt_bench_question.jsonl"
    path.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(ConfigError, match="MT-Bench"):
        run(tiny, path, tmp_path / "out.jsonl")


def test_distill_rejects_rows_without_prompt(tiny, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "hi"}) + "\n")
    with pytest.raises(ConfigError, match="'prompt'"):
        run(tiny, path, tmp_path / "out.jsonl")


def test_sampled_distill_is_seeded(tiny, prompts, tmp_path):
    first = run(tiny, prompts, tmp_path / "a.jsonl", temperature=1.0, seed=3)
    second = run(tiny, prompts, tmp_path / "b.jsonl", temperature=1.0, seed=3)
    assert first.written == second.written == 7
    assert read_rows(tmp_path / "a.jsonl") == read_rows(tmp_path / "b.jsonl")
    # On a CPU each prompt draws from its own seed: a run stopped after 3 prompts and resumed, with
    # another batch size, writes the same replies.
    run(tiny, prompts, tmp_path / "c.jsonl", temperature=1.0, seed=3, limit=3, batch_size=2)
    run(tiny, prompts, tmp_path / "c.jsonl", temperature=1.0, seed=3, batch_size=5)
    by_prompt = {row["prompt_index"]: row for row in read_rows(tmp_path / "a.jsonl")}
    assert {row["prompt_index"]: row for row in read_rows(tmp_path / "c.jsonl")} == by_prompt


def test_sampled_rows_record_their_rule_and_a_file_keeps_one(tiny, prompts, tmp_path):
    out = tmp_path / "sampled.jsonl"
    run(tiny, prompts, out, temperature=0.7, top_p=0.9, seed=3, limit=2)
    assert [row["sampling"] for row in read_rows(out)] == [{"temperature": 0.7, "top_p": 0.9, "seed": 3}] * 2
    # Continuing under another rule (greedy, another temperature or seed) would mix two corpora in one file.
    for other in (dict(temperature=0.0), dict(temperature=1.0, top_p=0.9, seed=3), dict(temperature=0.7, top_p=0.9)):
        with pytest.raises(ConfigError, match="sampled at temperature 0.7, top-p 0.9, seed 3") as caught:
            run(tiny, prompts, out, **other)
        assert "another --out" in str(caught.value)
    assert len(read_rows(out)) == 2
    assert run(tiny, prompts, out, temperature=0.7, top_p=0.9, seed=3).written == 5
    greedy = tmp_path / "greedy.jsonl"
    run(tiny, prompts, greedy, limit=2)
    assert all("sampling" not in row for row in read_rows(greedy))
    with pytest.raises(ConfigError, match=r"greedy, and this run asks for sampled at temperature 0\.7"):
        run(tiny, prompts, greedy, temperature=0.7)


def test_resume_reads_rows_holding_unicode_line_separators(tiny, prompts, tmp_path):
    # json.dumps(ensure_ascii=False) keeps U+2028 raw; it must not split the row on resume.
    out = tmp_path / "out.jsonl"
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\u2028b\u0085c"}],
           "prompt_index": 0, "finish_reason": "eos"}
    out.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    summary = run(tiny, prompts, out)
    assert summary.already_done == 1 and summary.written == 6
    assert sorted(r["prompt_index"] for r in map(json.loads, out.read_text().split("\n")[:-1])) == list(range(7))


def first_turns(path, finishes=("eos", "eos", "length", "eos")):
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}],
             "prompt_index": 10 + i, "finish_reason": finish, "source": f"src{i}", "license": "MIT"}
            for i, finish in enumerate(finishes)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def test_second_turns_follow_up_complete_first_turns_and_reply_to_the_conversation(tiny, tmp_path):
    model, tokenizer = tiny
    firsts = first_turns(tmp_path / "first.jsonl")
    out = tmp_path / "second.jsonl"
    summary = run(tiny, tmp_path / "first.jsonl", out, second_turns=True, seed=5, max_new_tokens=6)
    rows = sorted(read_rows(out), key=lambda row: row["prompt_index"])
    # The reply cut at the token limit (index 12) gets no follow-up.
    assert summary.written == 3 and [row["prompt_index"] for row in rows] == [10, 11, 13]
    for row in rows:
        first = next(f for f in firsts if f["prompt_index"] == row["prompt_index"])
        messages = row["messages"]
        assert messages[:2] == first["messages"] and [m["role"] for m in messages[2:]] == ["user", "assistant"]
        assert messages[2]["content"] == follow_up(5, row["prompt_index"]) and messages[2]["content"] in FOLLOW_UPS
        assert row["turn"] == 2 and row["source"] == first["source"] and row["license"] == "MIT"
        ids = encode_conversation(tokenizer, messages[:3])
        assert ids[: len(encode_prompt(tokenizer, messages[0]["content"]))] == encode_prompt(
            tokenizer, messages[0]["content"])
        reply, _ = generate_batch(model, [ids], tokenizer.pad_token_id, [tokenizer.eos_token_id], 6, 0.0, 1.0)[0]
        assert messages[3]["content"] == tokenizer.decode(reply, skip_special_tokens=True)
    # Both assistant turns are trained.
    example = load_examples(out, tokenizer)[0]
    spans = sum(1 for i, trained in enumerate(example.trained) if trained and (i == 0 or not example.trained[i - 1]))
    assert spans == 2
    # Resumed, nothing is redone; another seed picks other follow-ups for some rows.
    assert run(tiny, tmp_path / "first.jsonl", out, second_turns=True, seed=5).written == 0
    assert {follow_up(seed, 10) for seed in range(20)} != {follow_up(5, 10)}


def test_second_turns_read_gzipped_first_turns_and_refuse_other_rows(tiny, tmp_path):
    first_turns(tmp_path / "first.jsonl")
    packed = tmp_path / "first.jsonl.gz"
    packed.write_bytes(gzip.compress((tmp_path / "first.jsonl").read_bytes()))
    run(tiny, tmp_path / "first.jsonl", tmp_path / "a.jsonl", second_turns=True)
    run(tiny, packed, tmp_path / "b.jsonl", second_turns=True)
    assert read_rows(tmp_path / "a.jsonl") == read_rows(tmp_path / "b.jsonl")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(ConfigError, match="not a first-turn row"):
        run(tiny, prompts, tmp_path / "c.jsonl", second_turns=True)
    with pytest.raises(ConfigError, match="cannot append to a gzip file"):
        run(tiny, tmp_path / "first.jsonl", tmp_path / "d.jsonl.gz", second_turns=True)


def test_distill_device_errors_name_the_fix(tiny, prompts, tmp_path):
    with pytest.raises(ConfigError, match="not a torch device"):
        run(tiny, prompts, tmp_path / "out.jsonl", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA GPU"):
            run(tiny, prompts, tmp_path / "out.jsonl", device="cuda")


def test_distill_device_cpu_moves_a_passed_model(tiny, prompts, tmp_path):
    summary = run(tiny, prompts, tmp_path / "out.jsonl", device="cpu")
    assert summary.device == "cpu" and summary.written == 7


# ---- the onnx backend: a saved tiny Llama + random components, exported once per module -------------------
@pytest.fixture(scope="module")
def export_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPAF_EDGE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(base folder, components folder): head_dim 16, which ONNX Runtime's attention needs; random
    components, so drafts are both accepted and rejected."""
    tokenizer = make_tiny_tokenizer()
    base = make_tiny_base("llama", hidden_size=64, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    base.generation_config.eos_token_id = tokenizer.eos_token_id
    base.generation_config.pad_token_id = tokenizer.pad_token_id
    folder = tmp_path_factory.mktemp("exportable")
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = SpAFModel.from_pretrained(folder, SpAFConfig(cutoff_layer=1, num_draft_tokens=3,
                                                         serial_parallel_transition=1))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.spaf_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return str(folder), str(model.save_spaf_components(tmp_path_factory.mktemp("components")))


def run_saved(saved, prompts, out, **kwargs):
    settings = dict(base_model=saved[0], components=saved[1], max_new_tokens=12, progress=False, threads=1)
    settings.update(kwargs)
    return distill(prompts, out, **settings)


@pytest.mark.usefixtures("export_cache")
def test_onnx_greedy_replies_are_torch_greedy_token_for_token(saved, prompts, tmp_path):
    tokenizer = base_tokenizer(saved[0])
    batch = [(PromptRow(i, text, {}), encode_prompt(tokenizer, text))
             for i, text in enumerate(["Hi", "Why is the sky blue?", "List three colors.", "Tell me a joke."])]
    sampling = dict(max_new_tokens=24, temperature=0.0, top_p=1.0, seed=0)
    torch_replies = torch_backend(saved[0], None, None, "cpu", 1, **sampling)
    onnx_replies = onnx_backend(saved[0], tokenizer, saved[1], None, 1, 64, **sampling)
    expected = [next(torch_replies.generate([item])) for item in batch]  # one at a time: no padding
    assert list(onnx_replies.generate(batch)) == [(position, *reply) for position, (_, *reply) in enumerate(expected)]
    assert sum(len(tokens) for _, tokens, _ in expected) > 4 * 8  # replies long enough to mean something

    # End to end, from the same prompt file: the same rows but for the label of the backend.
    torch_rows = {row["prompt_index"]: row for row in read_rows(_written(run_saved(
        saved, prompts, tmp_path / "torch.jsonl", backend="torch", batch_size=1)))}
    onnx_rows = {row["prompt_index"]: row for row in read_rows(_written(run_saved(
        saved, prompts, tmp_path / "onnx.jsonl", backend="onnx")))}
    assert len(onnx_rows) == 7
    for index, row in onnx_rows.items():
        assert row.pop("distilled_with")["backend"] == "onnx"
        assert torch_rows[index].pop("distilled_with") == {"backend": "torch", "device": "cpu", "batching": "refill"}
        assert row == torch_rows[index]


def _written(summary):
    assert summary.written == 7 and summary.new_tokens > 0
    return summary.out


@pytest.mark.usefixtures("export_cache")
def test_onnx_distill_resumes_without_duplicates(saved, prompts, tmp_path):
    out = tmp_path / "out.jsonl"
    first = run_saved(saved, prompts, out, backend="onnx", limit=4)
    assert first.backend == "onnx" and first.written == 4
    rows = read_rows(out)
    with out.open("a") as handle:
        handle.write('{"messages": [{"role": "user", "con')
    summary = run_saved(saved, prompts, out, backend="onnx")
    assert summary.already_done == 4 and summary.written == 3
    assert read_rows(out)[:4] == rows
    assert sorted(row["prompt_index"] for row in read_rows(out)) == list(range(7))
    assert len(load_examples(out, base_tokenizer(saved[0]))) == 7
    assert run_saved(saved, prompts, out, backend="onnx").written == 0


def by_index(path):
    return sorted(read_rows(path), key=lambda row: row["prompt_index"])


@pytest.mark.usefixtures("export_cache")
def test_onnx_sampled_replies_are_seeded_per_prompt(saved, prompts, tmp_path):
    sampled = dict(backend="onnx", temperature=1.0, seed=3)
    run_saved(saved, prompts, tmp_path / "a.jsonl", **sampled)
    # Interrupted after 3 prompts and resumed: the same replies as one uninterrupted run.
    run_saved(saved, prompts, tmp_path / "b.jsonl", limit=3, **sampled)
    run_saved(saved, prompts, tmp_path / "b.jsonl", **sampled)
    assert by_index(tmp_path / "a.jsonl") == by_index(tmp_path / "b.jsonl")
    run_saved(saved, prompts, tmp_path / "c.jsonl", **dict(sampled, seed=4))
    assert by_index(tmp_path / "c.jsonl") != by_index(tmp_path / "a.jsonl")
    run_saved(saved, prompts, tmp_path / "greedy.jsonl", backend="onnx")
    assert by_index(tmp_path / "greedy.jsonl") != by_index(tmp_path / "a.jsonl")


@pytest.mark.usefixtures("export_cache")
def test_onnx_shards_split_the_prompts_and_join_to_one_run(saved, prompts, tmp_path):
    """Shards 0/3, 1/3, 2/3 write disjoint prompts whose rows, joined, are one unsharded run's (sampled replies
    are seeded per prompt), whatever --limit selects; a shard resumes like a whole run."""
    sampled = dict(backend="onnx", temperature=1.0, seed=5)
    whole = by_index(run_saved(saved, prompts, tmp_path / "whole.jsonl", **sampled).out)
    parts = []
    for index in range(3):
        out = tmp_path / f"shard{index}.jsonl"
        run_saved(saved, prompts, out, shard=(index, 3), limit=4, **sampled)  # prompts 0..3 first
        summary = run_saved(saved, prompts, out, shard=(index, 3), **sampled)
        rows = read_rows(out)
        assert {row["prompt_index"] % 3 for row in rows} == {index}
        assert summary.already_done == len([i for i in range(4) if i % 3 == index])
        parts += rows
    assert sorted(parts, key=lambda row: row["prompt_index"]) == whole


def test_shard_settings_are_checked():
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) is None
    for bad in ("4/4", "1", "a/2", "1/0", "-1/2", "1/2/3"):
        with pytest.raises(ConfigError, match="expected K/N with 0 <= K < N"):
            parse_shard(bad)


def test_auto_backend_is_onnx_on_a_cpu_and_torch_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend("auto", "auto") == "onnx" and resolve_backend("auto", "cpu") == "onnx"
    assert resolve_backend("auto", "auto", model=object()) == "torch"
    assert resolve_backend("torch", "cpu") == "torch" and resolve_backend("onnx", "auto") == "onnx"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_backend("auto", "auto") == "torch" and resolve_backend("auto", "cuda:0") == "torch"
    assert resolve_backend("auto", "cpu") == "onnx"
    with pytest.raises(ConfigError, match="expected one of auto, onnx, torch"):
        resolve_backend("ort", "auto")


@pytest.mark.usefixtures("export_cache")
def test_onnx_backend_refuses_what_it_cannot_do(tiny, saved, tiny_model_dir, prompts, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="backend='torch'"):
        run(tiny, prompts, tmp_path / "out.jsonl", backend="onnx")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="runs on the CPU"):
        run_saved(saved, prompts, tmp_path / "out.jsonl", backend="onnx", device="cuda:0")
    with pytest.raises(ConfigError, match="--export is an export for the onnx backend"):
        run_saved(saved, prompts, tmp_path / "out.jsonl", backend="torch", export=tmp_path)
    with pytest.raises(ConfigError, match="Pass one of them"):
        run_saved(saved, prompts, tmp_path / "out.jsonl", backend="onnx", export=tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="--backend torch"):  # head_dim 8: not exportable
        run_saved((str(tiny_model_dir), None), prompts, tmp_path / "out.jsonl", backend="onnx")


@pytest.mark.usefixtures("export_cache")
def test_cli_distills_from_a_given_export_of_the_same_base_only(saved, prompts, tmp_path):
    from click.testing import CliRunner

    from spaf_edge.bench.exports import cached_export
    from spaf_edge.cli import main

    export = cached_export(saved[0], saved[1], "fp32", 1024)
    args = ["distill", "--prompts", prompts, "--out", tmp_path / "out.jsonl", "--max-new-tokens", 6, "--threads", 1,
            "--no-progress", "--export", export]
    result = CliRunner().invoke(main, [str(arg) for arg in args + ["--base-model", saved[0]]])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["backend"] == "onnx" and summary["written"] == 7
    other = tmp_path / "other"
    make_tiny_base("llama", seed=5, hidden_size=64).save_pretrained(other)
    make_tiny_tokenizer().save_pretrained(other)
    result = CliRunner().invoke(main, [str(arg) for arg in args + ["--base-model", other]])
    assert result.exit_code != 0 and "made from another base model" in result.output, result.output
