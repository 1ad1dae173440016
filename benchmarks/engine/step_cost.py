"""CPU time (best of N, 1 thread) of a decode step (lower + upper, S=1), a verify (S=2..8),
one aligned draft (AlignmentHead + draft head), and TTFT of a 100-token prompt (generate 1 token).

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
    d.run_lower([5] * S, row=0)
    d.run_upper(S, num_logits=S)

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
calls = d.proposer.spaf.calls


def draft() -> None:
    """One aligned draft: the AlignmentHead, then the draft head on its pseudo state (an attending
    adapter's drafted entry is dropped again)."""
    length = calls.adapter_length if calls.attends else 0
    calls.head(calls.align(5, calls.exact_hidden(), 2), calls.exact_top(), 2)
    if calls.attends:
        calls.rewind_adapter(length)


c, _ = measure(draft)
print(f"one aligned draft (AlignmentHead + draft head) {c:.2f}ms")
ttft = measure(lambda: engine.generate(prompt, max_new_tokens=1, mode="greedy"), reps=7)
print(f"TTFT 100-token prompt: cpu {ttft[0]:.0f} ms, wall {ttft[1]:.0f} ms")
