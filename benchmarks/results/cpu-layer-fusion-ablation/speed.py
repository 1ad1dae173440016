"""One engine per process: SpAF greedy and plain greedy on 8 MT-Bench first turns (every 10th), 96 tokens.

Prints one JSON line: tokens/s of each, SpAF's speedup over plain greedy measured in the same
process, whether the tokens were identical and the engine's lossless verdict.
Usage: python speed.py EXPORT_FOLDER (alternate folders across processes: never time two in one)
"""

import json
import sys
import time

from spaf_edge.core.prompt_sets import load_prompts
from spaf_edge.runtime.engine import Engine

engine = Engine.from_folder(sys.argv[1])
prompts = [prompt.text for prompt in load_prompts(None)][::10][:8]
engine.generate(prompts[0], max_new_tokens=16)  # warm the sessions
new = 0
spaf_s = plain_s = 0.0
same = True
for text in prompts:
    start = time.perf_counter()
    spaf = engine.generate(text, max_new_tokens=96)
    spaf_s += time.perf_counter() - start
    start = time.perf_counter()
    plain = engine.generate(text, max_new_tokens=96, mode="greedy")
    plain_s += time.perf_counter() - start
    new += len(spaf.tokens)
    same &= spaf.tokens == plain.tokens
print(json.dumps({"folder": sys.argv[1], "spaf_tok_s": round(new / spaf_s, 1), "plain_tok_s": round(new / plain_s, 1),
                  "ratio": round(plain_s / spaf_s, 3), "identical": same, "lossless": engine.lossless}))
