"""One SpAF draft setting, timed on a prompt set in its own process (alternate settings between processes).

Greedy, the engine's default proposers (SpAF chains, lookup chains when the text repeats), 128 new
tokens a prompt; only the SpAF chain's length N and stop threshold eta change.

usage: python eta_ab.py EXPORT_DIR PROMPT_SET PER_CATEGORY N ETA OUT.jsonl
"""

import json
import sys

from spaf_edge.core.prompt_sets import load_prompts
from spaf_edge.runtime import Engine

folder, prompt_set, per_category, n, eta, out = sys.argv[1:7]
options = {"num_draft_tokens": int(n), "serial_parallel_transition": 0, "draft_stop_threshold": float(eta)}
engine = Engine.from_folder(folder, threads=2, thread_pool="global")
prompts = load_prompts(prompt_set, per_category=int(per_category))
engine.generate(prompts[0].text, max_new_tokens=16, **options)  # warm-up
tokens = steps = 0
seconds = 0.0
for prompt in prompts:
    result = engine.generate(prompt.text, max_new_tokens=128, **options)
    tokens += len(result.tokens)
    steps += result.stats.verify_steps
    seconds += result.stats.wall_seconds
same = engine.generate(prompts[-1].text, max_new_tokens=128, mode="greedy").tokens == result.tokens
row = {"export": folder, "prompts": prompt_set, "n": int(n), "eta": float(eta), "tok_s": round(tokens / seconds, 2),
       "tau": round(tokens / steps, 3), "same_as_greedy": same}
print(json.dumps(row))
with open(out, "a") as handle:
    handle.write(json.dumps(row) + "\n")
