"""Self-distillation data: batched replies, attribution kept, resume, refusal of eval data."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_base, make_tiny_tokenizer

from spaf_edge.errors import ConfigError
from spaf_edge.training.data import load_examples
from spaf_edge.training.distill import distill, generate_batch

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


def test_resume_reads_rows_holding_unicode_line_separators(tiny, prompts, tmp_path):
    # json.dumps(ensure_ascii=False) keeps U+2028 raw; it must not split the row on resume.
    out = tmp_path / "out.jsonl"
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\u2028b\u0085c"}],
           "prompt_index": 0, "finish_reason": "eos"}
    out.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    summary = run(tiny, prompts, out)
    assert summary.already_done == 1 and summary.written == 6
    assert sorted(r["prompt_index"] for r in map(json.loads, out.read_text().split("\n")[:-1])) == list(range(7))


def test_distill_device_errors_name_the_fix(tiny, prompts, tmp_path):
    with pytest.raises(ConfigError, match="not a torch device"):
        run(tiny, prompts, tmp_path / "out.jsonl", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA GPU"):
            run(tiny, prompts, tmp_path / "out.jsonl", device="cuda")


def test_distill_device_cpu_moves_a_passed_model(tiny, prompts, tmp_path):
    summary = run(tiny, prompts, tmp_path / "out.jsonl", device="cpu")
    assert summary.device == "cpu" and summary.written == 7
