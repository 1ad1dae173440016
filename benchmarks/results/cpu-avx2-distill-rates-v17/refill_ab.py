"""Refilled batches against transformers `generate` batch after batch, greedy, on 128 training prompts
(`prompts128.jsonl`: the prompts of rows 1000-1127 of the committed greedy corpus), 64 rows at a
time, 256 new tokens, CPU, 2 threads; the model load is not timed. Prints one JSON line per mode and
how many replies the two modes share. Run from the repository root:
`.venv/bin/python benchmarks/results/cpu-avx2-distill-rates-v17/refill_ab.py refill,generate`.
"""

import json
import sys
import time
from pathlib import Path

import torch

from spaf_edge.models.loading import load_base_model, resolve_base_model
from spaf_edge.prompts import encode_prompt
from spaf_edge.training.distill import eos_token_ids, generate_batch
from spaf_edge.training.refill import generate_refilled, pick_tokens

HERE = Path(__file__).resolve().parent
SLOTS, NEW_TOKENS = 64, 256


def main(modes: list[str]) -> None:
    torch.set_num_threads(2)
    model, tokenizer = load_base_model(resolve_base_model("default"))
    model.eval()
    rows = [json.loads(line) for line in (HERE / "prompts128.jsonl").read_text(encoding="utf-8").splitlines()]
    prompts = sorted((encode_prompt(tokenizer, row["prompt"]) for row in rows), key=len)  # as distill orders them
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies = {}
    for mode in modes:
        started = time.perf_counter()
        if mode == "generate":
            out = []
            for start in range(0, len(prompts), SLOTS):
                out += generate_batch(model, prompts[start:start + SLOTS], pad, eos, NEW_TOKENS, 0.0, 1.0)
        else:
            ended = {n: (tokens, finish) for n, tokens, finish in
                     generate_refilled(model, prompts, eos, NEW_TOKENS, SLOTS, pick_tokens(0.0, 1.0, []))}
            out = [ended[n] for n in range(len(prompts))]
        seconds = time.perf_counter() - started
        tokens = sum(len(reply) for reply, _ in out)
        replies[mode] = out
        print(json.dumps(dict(mode=mode, prompts=len(prompts), tokens=tokens, seconds=round(seconds, 1),
                              tok_s=round(tokens / seconds, 1))), flush=True)
    if len(replies) == 2:
        first, second = replies.values()
        print("identical replies", sum(a == b for a, b in zip(first, second)), "of", len(prompts))


if __name__ == "__main__":
    main(sys.argv[1].split(","))
