"""CPU time (best of N, 1 thread) of a decode step (lower + upper, S=1), a verify (S=2..8), a
draft-head call, and TTFT of a 100-token prompt (generate 1 token).

usage: python benchmarks/engine/step_cost.py EXPORT_DIR
"""

import sys
import time

from spaf_edge.runtime import Engine

folder = sys.argv[1]
engine = Engine.from_folder(folder, threads=1, verify=False)
d = engine.decoder
prompt = list(range(1000, 1100))  # 100 tokens
d.prefill(prompt)
P = d.lower.kv.length

def step(S):
    d.lower.kv.rewind_to(P)
    d.upper.kv.rewind_to(P)
    d._run_lower([5] * S, row=0)
    d._run_upper(S, num_logits=S)

def measure(fn, reps=15):
    fn()
    best_cpu = best_wall = 1e9
    for _ in range(reps):
        c, w = time.process_time(), time.perf_counter()
        fn()
        best_cpu = min(best_cpu, time.process_time() - c)
        best_wall = min(best_wall, time.perf_counter() - w)
    return best_cpu * 1e3, best_wall * 1e3

d.buffers.ensure_rows(8, logit_rows=8)
res = {S: measure(lambda: step(S)) for S in (1, 2, 6, 8)}
print(" ".join(f"S={S} {c:.1f}ms({c / res[1][0]:.2f}x)" for S, (c, w) in res.items()))
buffers = d.buffers
c, _ = measure(lambda: d.draft_head.run(buffers.hidden.view(0, 1), buffers.prev_tops.view(0, 1),
                                        buffers.prev_tops.view(1, 2)))
print(f"draft_head {c:.1f}ms")
ttft = measure(lambda: engine.generate(prompt, max_new_tokens=1, mode="greedy"), reps=7)
print(f"TTFT 100-token prompt: cpu {ttft[0]:.0f} ms, wall {ttft[1]:.0f} ms")
