"""Plain greedy: SpAF engine vs onnxruntime-genai in one process, back to back, order alternating.

Reports decode tok/s (wall, tokens after the first) and CPU ms per decoded token (process time,
robust against other jobs). Needs onnxruntime-genai (the `baselines` extra).

usage: python benchmarks/engine/vs_genai.py EXPORT_DIR [ROUNDS] [THREADS] [THREAD_POOL]

THREAD_POOL: the engine's, global (the CLI's default) or session (the library's); see docs/runtime.md.
"""

import math
import sys
import time

import numpy as np
import onnxruntime_genai as og

from spaf_edge.bench.genai_model import build_genai_model, genai_config
from spaf_edge.models.loading import cache_dir
from spaf_edge.runtime import Engine

folder, rounds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 2
pool = sys.argv[4] if len(sys.argv) > 4 else "global"
base = str(cache_dir() / "models" / "smollm2-135m-instruct")
engine = Engine.from_folder(folder, threads=threads, verify=False, thread_pool=pool)
print(f"threads={threads}, engine thread pool: {pool}")
model = og.Model(genai_config(og, build_genai_model(base, "fp32", "cpu"), "cpu", threads))
N = 64
prompts = ["Write a short story about a robot learning to paint.", "Explain how a refrigerator works.",
           "Give me three tips for learning a new language.", "Describe the water cycle in simple terms.",
           "What are the pros and cons of electric cars?", "Summarize the plot of Romeo and Juliet."]
ids = [engine.encode(p) for p in prompts]

def run_engine(p):
    c0 = time.process_time()
    r = engine.generate(p, max_new_tokens=N, mode="greedy", chat=False, temperature=0.0)
    s = r.stats
    cpu = time.process_time() - c0
    return s.new_tokens, s.wall_seconds - s.first_token_seconds, cpu, r.tokens

def run_genai(p):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(p) + N, do_sample=False)
    c0 = time.process_time()
    g = og.Generator(model, params)
    g.append_tokens(np.asarray([p], dtype=np.int32))
    toks, first = [], 0.0
    while len(toks) < N and not g.is_done():
        g.generate_next_token()
        toks.append(int(g.get_next_tokens()[0]))
        first = first or time.perf_counter()
    return len(toks), time.perf_counter() - first, time.process_time() - c0, toks

run_engine(ids[0][:20])  # warm up both
run_genai(ids[0][:20])
acc = {"engine": [0, 0.0, 0.0], "genai": [0, 0.0, 0.0]}
ratios, same = [], 0
for r in range(rounds):
    for i, p in enumerate(ids):
        order = [("engine", run_engine), ("genai", run_genai)]
        if (i + r) % 2:
            order.reverse()
        out = {}
        for name, fn in order:
            n, dec, cpu, toks = fn(p)
            out[name] = (n, dec, toks)
            acc[name][0] += n - 1
            acc[name][1] += dec
            acc[name][2] += cpu
        ratios.append(((out["engine"][0] - 1) / out["engine"][1]) / ((out["genai"][0] - 1) / out["genai"][1]))
        same += out["engine"][2][: len(out["genai"][2])] == out["genai"][2]
for name, (n, dec, cpu) in acc.items():
    print(f"{name}: decode {n / dec:.1f} tok/s (wall), {1e3 * cpu / n:.1f} ms CPU per token (incl. prefill)")
geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
print(f"engine/genai decode speed, geomean over {len(ratios)} pairs: {geo:.2f}x "
      f"(range {min(ratios):.2f}-{max(ratios):.2f}); identical tokens {same}/{len(ratios)}")
