"""SpAF stop thresholds timed side by side: one engine, every prompt run once per setting, the
settings' order rotating from prompt to prompt, so the VM's speed drift (±20 % over minutes) falls
on all settings alike. Separate processes per setting (`eta_ab.py`) did not resolve 10 % here.

Greedy, the engine's default proposers, N 4, s 0, 128 new tokens a prompt. Per setting: tok/s over
the whole set, tau, and the ratio to the first setting per pass (geometric mean over passes).

usage: python eta_paired.py EXPORT_DIR PROMPT_SET PER_CATEGORY PASSES ETA[,ETA...] OUT.jsonl
"""

import json
import sys

from spaf_edge.core.prompt_sets import load_prompts
from spaf_edge.runtime import Engine

folder, prompt_set, per_category, passes, etas, out = sys.argv[1:7]
etas = [float(x) for x in etas.split(",")]
engine = Engine.from_folder(folder, threads=2, thread_pool="global")
prompts = load_prompts(prompt_set, per_category=int(per_category))
ids = [engine.encode(p.text) for p in prompts]


def options(eta):
    return {"num_draft_tokens": 4, "serial_parallel_transition": 0, "draft_stop_threshold": eta}


engine.generate(ids[0], max_new_tokens=16, **options(etas[0]))  # warm-up
reference = [engine.generate(x, max_new_tokens=128, mode="greedy").tokens for x in ids]
for run in range(int(passes)):
    seconds = dict.fromkeys(etas, 0.0)
    tokens = dict.fromkeys(etas, 0)
    steps = dict.fromkeys(etas, 0)
    same = dict.fromkeys(etas, 0)
    for i, x in enumerate(ids):
        for j in range(len(etas)):
            eta = etas[(i + j + run) % len(etas)]
            result = engine.generate(x, max_new_tokens=128, **options(eta))
            seconds[eta] += result.stats.wall_seconds
            tokens[eta] += len(result.tokens)
            steps[eta] += result.stats.verify_steps
            same[eta] += result.tokens == reference[i]
    rows = [{"export": folder, "prompts": prompt_set, "pass": run, "eta": eta,
             "tok_s": round(tokens[eta] / seconds[eta], 2), "tau": round(tokens[eta] / steps[eta], 3),
             "vs_first": round((tokens[eta] / seconds[eta]) / (tokens[etas[0]] / seconds[etas[0]]), 3),
             "same_as_greedy": f"{same[eta]}/{len(ids)}"} for eta in etas]
    with open(out, "a") as handle:
        for row in rows:
            print(json.dumps(row), flush=True)
            handle.write(json.dumps(row) + "\n")
