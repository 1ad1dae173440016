"""What row invariance costs a plain int4 step (issue 12): one-token step times, interleaved in one process.

Rows timed (each a lower + upper call of the engine, or one call of genai's graph):
- ``genai-graph``: onnxruntime-genai's int4 model.onnx stepped from Python ONNX Runtime with IOBinding
  and a shared KV buffer (the same binary and thread pool as the engine);
- one row per ``NAME=EXPORT`` argument, each run with ``row_calls="native"``: the shipped int4 export
  (exact) or its ``no-pad`` variant (``export_variant.py``). Give one per process: several engines in one
  process do not time alike (the one loaded first runs slowest), see README.md.

Usage: python step_cost.py GENAI_FOLDER NAME=EXPORT  (prints JSON lines, one per context)
"""

import json
import os
import sys
import time

os.environ.setdefault("SPAF_EDGE_THREAD_POOL", "global")
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

import spaf_edge.runtime.session as S  # noqa: E402
from spaf_edge.core.prompt_sets import load_prompts  # noqa: E402
from spaf_edge.runtime.engine import Engine  # noqa: E402

genai_folder = sys.argv[1]
exports = dict(arg.split("=", 1) for arg in sys.argv[2:])
engines = {name: Engine.from_folder(path, threads=2, row_calls="native") for name, path in exports.items()}
options = S.compatible_session_options()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
options.log_severity_level = 3
genai = ort.InferenceSession(os.path.join(genai_folder, "model.onnx"), options, providers=["CPUExecutionProvider"])
MAX = 2048
kv = {i.name: ort.OrtValue.ortvalue_from_numpy(np.random.rand(1, 3, MAX, 64).astype(np.float32))
      for i in genai.get_inputs() if i.name.startswith("past")}
logits = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, 49152), np.float32))
binding = genai.io_binding()
ids_buf = np.full((1, 1), 42, np.int64)

short = "Write a short story about a lighthouse keeper who finds a message in a bottle."
long = max((p.text for p in load_prompts("grounded")), key=len)
for prompt, new in ((short, 100), (long, 4)):
    state = {}
    for name, engine in engines.items():
        engine.generate(prompt, max_new_tokens=new, mode="greedy")
        d = engine.decoder
        state[name] = (d, d.lower.kv.length, d.upper.kv.length, d.tokens[-1])
    context = next(iter(state.values()))[1]
    mask = np.ones((1, context + 1), np.int64)

    def genai_step():
        binding.bind_cpu_input("input_ids", ids_buf)
        binding.bind_cpu_input("attention_mask", mask)
        for n, v in kv.items():
            binding.bind_ortvalue_input(n, v)
            binding.bind_ortvalue_output(n.replace("past_key_values", "present"), v)
        binding.bind_ortvalue_output("logits", logits)
        genai.run_with_iobinding(binding)

    def engine_step(name):
        d, lower, upper, token = state[name]
        d.run_lower([token], row=0)
        d.run_upper(1, num_logits=1)
        d.lower.kv.rewind_to(lower)
        d.upper.kv.rewind_to(upper)

    steps = {"genai-graph": genai_step, **{name: (lambda name=name: engine_step(name)) for name in engines}}
    # Short rounds, order alternating, ratios taken within a round: the VM's speed drifts between rounds.
    times = {name: [] for name in steps}
    for rep in range(40):
        for name in (list(steps) if rep % 2 == 0 else list(steps)[::-1]):
            for _ in range(5):
                steps[name]()
            start = time.perf_counter()
            for _ in range(30):
                steps[name]()
            times[name].append((time.perf_counter() - start) / 30 * 1e3)
    medians = {name: round(float(np.median(v)), 3) for name, v in times.items()}
    ratios = {name: round(float(np.median(np.array(times["genai-graph"]) / np.array(v))), 3) for name, v in times.items()}
    print(json.dumps({"context": context, "ms_per_step_median": medians, "genai_graph_time_over_row_median": ratios}))
