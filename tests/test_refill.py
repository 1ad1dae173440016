"""Refilled batches (distill's torch backend on a CPU): each reply is what the prompt gets decoded alone,
whatever the slot count, and a sampled reply depends on its own seed only."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import make_tiny_base, make_tiny_tokenizer

from spaf_edge.training import refill
from spaf_edge.training.distill import generate_batch
from spaf_edge.training.refill import generate_refilled, pick_tokens

pytestmark = pytest.mark.usefixtures("single_thread")
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_base("llama", eos_token_id=tokenizer.eos_token_id).eval()
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 40, (11,), generator=generator).tolist()
    prompts = [torch.randint(5, 60, (n,), generator=generator).tolist() for n in lengths]
    # The tiny model rarely says its EOS: stop at its two most frequent tokens instead, so replies end
    # at different steps (some at once, some at the limit) and slots are refilled mid-batch.
    free = [alone(model, tokenizer, prompt, [tokenizer.eos_token_id])[0] for prompt in prompts]
    stops = [token for token, _ in Counter(t for reply in free for t in reply).most_common(2)]
    return model, tokenizer, prompts, stops


def alone(model, tokenizer, prompt, stops):
    return generate_batch(model, [prompt], tokenizer.pad_token_id, stops, NEW_TOKENS, 0.0, 1.0)[0]


def refilled(model, prompts, stops, slots, pick):
    results = {}
    for number, tokens, finish in generate_refilled(model, prompts, stops, NEW_TOKENS, slots, pick):
        assert number not in results
        results[number] = (tokens, finish)
    assert sorted(results) == list(range(len(prompts)))
    return [results[number] for number in range(len(prompts))]


def test_greedy_replies_are_each_prompt_decoded_alone_for_any_slot_count(tiny):
    model, tokenizer, prompts, stops = tiny
    expected = [alone(model, tokenizer, prompt, stops) for prompt in prompts]
    lengths = [len(tokens) for tokens, _ in expected]
    assert 0 in lengths and NEW_TOKENS in lengths and len(set(lengths)) >= 4  # the case this test is for
    assert {finish for _, finish in expected} == {"eos", "length"}
    for slots in (1, 3, len(prompts)):
        assert refilled(model, prompts, stops, slots, pick_tokens(0.0, 1.0, [])) == expected


def test_a_prompt_longer_than_the_cache_widens_it(tiny, monkeypatch):
    model, tokenizer, prompts, stops = tiny
    short, long = [7, 8], list(range(5, 45))
    widened = []
    original = refill.place

    def place(cache, mask, index, single):
        widened.append(single.layers[0].keys.shape[-2] > mask.shape[1])
        return original(cache, mask, index, single)

    monkeypatch.setattr(refill, "place", place)
    batch = [short, short, long]
    expected = [alone(model, tokenizer, prompt, stops) for prompt in batch]
    assert refilled(model, batch, stops, 2, pick_tokens(0.0, 1.0, [])) == expected
    assert True in widened


def test_sampled_replies_follow_their_own_seed_not_the_batch(tiny):
    model, _, prompts, stops = tiny
    seeds = [100 + number for number in range(len(prompts))]
    two = refilled(model, prompts, stops, 2, pick_tokens(1.0, 0.9, seeds))
    five = refilled(model, prompts, stops, 5, pick_tokens(1.0, 0.9, seeds))
    assert two == five
    # The last prompts alone (a resumed run): the same draws.
    assert refilled(model, prompts[6:], stops, 3, pick_tokens(1.0, 0.9, seeds[6:])) == two[6:]
    other = refilled(model, prompts, stops, 2, pick_tokens(1.0, 0.9, [seed + 1 for seed in seeds]))
    assert other != two


def test_top_p_keeps_the_smallest_head_that_reaches_it():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = Counter(pick_tokens(1.0, 0.75, [seed])(logits, [0])[0] for seed in range(400))
    assert set(seen) == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3
    assert 0.55 < seen[0] / 400 < 0.70  # 0.5 / 0.8 renormalised
    assert pick_tokens(0.0, 1.0, [])(logits, [0]) == [0]
