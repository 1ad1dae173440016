"""The packaged input-grounded prompt set: its shape, its selection as a benchmark set, and its
exclusion from every training path (prompt files for distillation, training rows)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
from conftest import make_tiny_tokenizer

from spaf_edge.core.errors import ConfigError
from spaf_edge.core.jsonl import read_jsonl
from spaf_edge.core.prompt_sets import (
    PROMPT_SETS,
    grounded_passages,
    grounded_prompts_path,
    load_prompts,
    mt_bench_path,
    resolve_prompts_path,
)
from spaf_edge.training.data import (
    holds_evaluation_text,
    is_evaluation_row,
    load_examples,
)
from spaf_edge.training.distill import read_prompts
from spaf_edge.training.second_turns import FOLLOW_UPS

CATEGORIES = ("summarization", "extraction", "passage_qa", "code_editing")
TRAIN_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "train_prompts.jsonl"  # ../shared
COMPONENTS = Path(__file__).resolve().parents[1] / "models" / "smollm2-135m-instruct"
DISTILLED = COMPONENTS / "distilled_replies.jsonl.gz"
SECOND_TURNS = COMPONENTS / "distilled_second_turns.jsonl.gz"
SAMPLED = COMPONENTS / "distilled_sampled_replies.jsonl.gz"
# How each committed first-turn file was drawn (docs/training.md "The committed corpus"); None is greedy.
FIRST_TURN_FILES = {DISTILLED: None, SAMPLED: {"temperature": 0.7, "top_p": 1.0, "seed": 0}}
CODE_CATEGORIES = {"code_editing"}


@pytest.fixture(scope="module")
def rows():
    return [json.loads(line) for line in grounded_prompts_path().read_text(encoding="utf-8").splitlines()]


def test_thirty_two_prompts_eight_per_category_each_quoting_its_passage(rows):
    assert len(rows) == 32
    assert Counter(row["category"] for row in rows) == {category: 8 for category in CATEGORIES}
    assert len({row["id"] for row in rows}) == 32 and len({row["prompt"] for row in rows}) == 32
    for row in rows:
        assert row["passage"] in row["prompt"], row["id"]
        # Long enough that an answer has something to copy (code counts fewer whitespace-separated words).
        assert len(row["passage"].split()) >= (50 if row["category"] in CODE_CATEGORIES else 70), row["id"]
        assert row["source"] and row["license"] and isinstance(row["train_index"], int)
        # A prompt worded for this project says so (the others are their source row's text, checked below).
        assert "note" not in row or "written for spaf-edge" in row["note"]


def test_the_set_is_selected_by_name_and_per_category(rows):
    prompts = load_prompts("grounded")
    assert [p.text for p in prompts] == [row["prompt"] for row in rows]
    assert [p.id for p in prompts] == [row["id"] for row in rows]
    two_each = load_prompts("grounded", per_category=2)
    assert Counter(p.category for p in two_each) == {category: 2 for category in CATEGORIES}
    assert [p.id for p in load_prompts("grounded", per_category=2, limit=3)] == [p.id for p in two_each[:3]]


def test_bench_cli_passes_the_name_through():
    from spaf_edge.cli.bench import command

    context = command.make_context("bench", ["--prompts", "grounded", "--export-dir", "unused"])
    assert resolve_prompts_path(context.params["prompts_file"]) == grounded_prompts_path()


def test_names_resolve_to_packaged_files_and_other_values_are_paths(tmp_path):
    assert resolve_prompts_path(None) == mt_bench_path() == PROMPT_SETS["mt-bench"]
    assert resolve_prompts_path("grounded") == grounded_prompts_path()
    assert resolve_prompts_path("mt-bench") == mt_bench_path()
    assert resolve_prompts_path(tmp_path / "mine.jsonl") == tmp_path / "mine.jsonl"
    assert [p.text for p in load_prompts("mt-bench", limit=2)] == [p.text for p in load_prompts(limit=2)]
    with pytest.raises(ConfigError, match="packaged set: mt-bench, grounded"):
        load_prompts("groundedd")


def test_no_grounded_prompt_is_an_mt_bench_turn(rows):
    mt_bench = {p.text for p in load_prompts(mt_bench_path())}
    assert not mt_bench & {row["prompt"] for row in rows}


@pytest.mark.skipif(not TRAIN_PROMPTS.is_file(), reason="the shared training prompts are not on this machine")
def test_rows_come_from_the_training_prompts_and_are_all_excluded_from_them(rows):
    train = [json.loads(line) for line in TRAIN_PROMPTS.read_text(encoding="utf-8").splitlines()]
    for row in rows:
        source = train[row["train_index"]]
        assert row["passage"] in source["prompt"] and (row["source"], row["license"]) == (
            source["source"], source["license"])
        if "note" not in row:
            assert row["prompt"] == source["prompt"]
    kept = read_prompts(TRAIN_PROMPTS)
    kept_text = {p.prompt for p in kept}
    assert not kept_text & {row["prompt"] for row in rows}
    assert not any(row["passage"] in text for row in rows for text in kept_text)
    # Only evaluation rows went (the 31 prompts themselves, plus other questions on their passages),
    # and the others keep their place in the file.
    assert 31 <= len(train) - len(kept) <= 100
    assert all(train[p.index]["prompt"] == p.prompt for p in kept)


@pytest.mark.parametrize("path", FIRST_TURN_FILES, ids=lambda path: path.name)
def test_the_committed_distilled_replies_hold_no_evaluation_prompt(path):
    if not path.is_file():
        pytest.skip(f"{path.name} is not in this checkout")
    rows = [row for _, row in read_jsonl(path)]
    assert rows and not any(is_evaluation_row(row) for row in rows)
    # One sampling rule per file, the one the docs give for it.
    assert all(row.get("sampling") == FIRST_TURN_FILES[path] for row in rows)
    # Every row names its prompt's source and license, and no prompt was distilled twice.
    assert all(isinstance(row.get("source"), str) and isinstance(row.get("license"), str) for row in rows)
    assert len({row["prompt_index"] for row in rows}) == len(rows)
    if TRAIN_PROMPTS.is_file():  # each row answers the training prompt it names, with that prompt's attribution
        train = [json.loads(line) for line in TRAIN_PROMPTS.read_text(encoding="utf-8").splitlines()]
        for row in rows:
            prompt = train[row["prompt_index"]]
            assert row["messages"][0]["content"] == prompt["prompt"]
            assert (row["source"], row["license"]) == (prompt["source"], prompt["license"])


@pytest.mark.skipif(not SECOND_TURNS.is_file(), reason="the committed second turns are not in this checkout")
def test_the_committed_second_turns_follow_committed_first_turns():
    firsts = {row["prompt_index"]: row for _, row in read_jsonl(DISTILLED)}
    rows = [row for _, row in read_jsonl(SECOND_TURNS)]
    assert rows and not any(is_evaluation_row(row) for row in rows)
    assert len({row["prompt_index"] for row in rows}) == len(rows)
    for row in rows:
        first = firsts[row["prompt_index"]]
        assert first["finish_reason"] == "eos" and row["turn"] == 2
        assert row["messages"][:2] == first["messages"] and row["messages"][2]["content"] in FOLLOW_UPS
        assert (row["source"], row["license"]) == (first["source"], first["license"])


def test_distillation_prompts_skip_evaluation_ones_and_keep_file_indices(rows, tmp_path, caplog):
    passage = rows[20]["passage"]
    lines = [
        {"prompt": "Tell me a joke.", "source": "a", "license": "MIT"},
        {"prompt": rows[0]["prompt"], "source": "b", "license": "MIT"},  # an evaluation prompt, verbatim
        # Another question on an evaluation passage, its lines re-wrapped.
        {"prompt": "Who is the villain?\n\n" + passage.replace(". ", ".\n"), "source": "c", "license": "MIT"},
        {"prompt": "Summarize: " + " ".join(passage.split()[:30]), "source": "d", "license": "MIT"},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with caplog.at_level(logging.INFO, logger="spaf_edge.training.distill"):
        kept = read_prompts(path)
    # A part of a passage is not the passage: row 3 stays.
    assert [(p.index, p.extra["source"]) for p in kept] == [(0, "a"), (3, "d")]
    assert "Skipped 2 prompts" in caplog.text


def test_only_evaluation_prompts_is_an_error(rows, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": rows[5]["prompt"]}) + "\n")
    with pytest.raises(ConfigError, match="no prompts besides 1 evaluation"):
        read_prompts(path)


def test_training_rows_quoting_evaluation_prompts_are_skipped(rows, tmp_path):
    tokenizer = make_tiny_tokenizer()
    data = [
        {"text": "plain text one"},
        {"messages": [{"role": "user", "content": rows[9]["prompt"]}, {"role": "assistant", "content": "ok"}]},
        {"text": "Notes.\n" + rows[30]["passage"] + "\nEnd."},
        {"prompt": rows[17]["prompt"]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
        {"text": "plain text two"},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in data))
    examples = load_examples(path, tokenizer)
    decoded = [tokenizer.decode(e.input_ids) for e in examples]
    assert len(examples) == 3
    assert decoded[0].startswith("plain text one") and "hello there" in decoded[1]
    assert decoded[2].startswith("plain text two")
    # The limit counts kept rows only.
    assert len(load_examples(path, tokenizer, limit=2)) == 2


def test_every_passage_is_recognised_and_ordinary_text_is_not(rows):
    assert len(grounded_passages()) == 32
    for row in rows:
        assert holds_evaluation_text("Intro\n" + "  ".join(row["passage"].split()) + "\nOutro")
    assert not holds_evaluation_text("Summarize: neural networks are trained with gradient descent.")


def test_the_grounded_file_itself_is_refused_as_training_data(tmp_path):
    tokenizer = make_tiny_tokenizer()
    with pytest.raises(ConfigError, match="evaluation data"):
        load_examples(grounded_prompts_path(), tokenizer)
    copy = tmp_path / "grounded_prompts.jsonl"
    copy.write_text(json.dumps({"prompt": "hello"}) + "\n")
    with pytest.raises(ConfigError, match="evaluation data"):
        read_prompts(copy)
