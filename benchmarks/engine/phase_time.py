"""Wall time per graph during one generated answer, plain greedy and SpAF, with the export's defaults.

Wraps each graph's ``run`` with a timer: how much of SpAF's time goes to the lower stack,
the upper stack, the AlignmentHead (drafter) and the draft head.

usage: python benchmarks/engine/phase_time.py EXPORT_DIR [THREADS]
"""

import collections
import platform
import sys
import time

import onnxruntime

from spaf_edge.runtime import Engine

folder, threads = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2
engine = Engine.from_folder(folder, threads=threads, thread_pool="global")
decoder = engine.decoder
seconds: dict[str, float] = collections.defaultdict(float)
calls: collections.Counter = collections.Counter()


def timed(graph, name: str) -> None:
    run = graph.run

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        run(*args, **kwargs)
        seconds[name] += time.perf_counter() - start
        calls[name] += 1

    graph.run = wrapper


draft_calls = decoder.proposer.spaf.calls
for graph, name in ((decoder.lower, "lower"), (decoder.upper, "upper"), (draft_calls.drafter, "drafter"),
                    (draft_calls.draft_head, "draft_head")):
    timed(graph, name)
print(f"{platform.processor() or platform.machine()}, onnxruntime {onnxruntime.__version__}, {threads} threads, "
      f"defaults {engine.defaults}")
prompt = "Write a Python function that checks whether a string is a palindrome, with tests."
for mode in ("greedy", "spaf"):
    seconds.clear()
    calls.clear()
    start = time.perf_counter()
    result = engine.generate(prompt, max_new_tokens=128, mode=mode)
    wall = time.perf_counter() - start
    print(f"{mode}: {len(result.tokens)} tokens, {len(result.tokens) / wall:.1f} tok/s, "
          f"{result.stats.verify_steps} verify steps, {wall * 1000:.0f} ms")
    for name in seconds:
        print(f"  {name:<10} {calls[name]:>4} calls {seconds[name] * 1000:>6.0f} ms "
              f"{seconds[name] * 1000 / calls[name]:>6.2f} ms/call")
    print(f"  {'other':<10} {(wall - sum(seconds.values())) * 1000:>17.0f} ms")
