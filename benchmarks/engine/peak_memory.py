"""Peak resident memory of the SpAF engine and of onnxruntime-genai, each case in a fresh process.

Cases (chat template applied): plain greedy on one prompt (64 new tokens), plain greedy on four prompts
(256 new tokens each: more distinct tokens touch more embedding rows), and SpAF greedy on
the first prompt; genai greedy on the first prompt. Reports the RSS after loading and the
peak RSS (ru_maxrss) of each process, in MiB.

usage: python benchmarks/engine/peak_memory.py EXPORT_DIR [THREADS]
"""

import json
import subprocess
import sys

CASE = r"""
import json, resource, sys
import numpy as np

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

folder, threads, case = sys.argv[1], int(sys.argv[2]), sys.argv[3]
prompts = ["Write a short story about a robot learning to paint.", "Explain how a refrigerator works.",
           "Give me three tips for learning a new language.", "Describe the water cycle in simple terms."]
if case == "genai":
    import onnxruntime_genai as og
    from spaf_edge.bench.genai_model import build_genai_model, genai_config
    from spaf_edge.models.loading import cache_dir
    from spaf_edge.core.manifest import Manifest
    from spaf_edge.runtime.tokenizer import TextTokenizer
    tokenizer = TextTokenizer.from_folder(folder, Manifest.load(folder, verify_files=False).chat_template)
    ids = tokenizer.encode_prompt(prompts[0], chat=True)
    base = str(cache_dir() / "models" / "smollm2-135m-instruct")
    model = og.Model(genai_config(og, build_genai_model(base, "fp32", "cpu"), "cpu", threads))
    loaded = rss_mib()
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 64, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([ids], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    distinct = len(set(int(t) for t in generator.get_sequence(0)))
else:
    from spaf_edge.runtime import Engine
    engine = Engine.from_folder(folder, threads=threads, verify=False)
    loaded = rss_mib()
    mode, count, new = {"greedy": ("greedy", 1, 64), "greedy4x256": ("greedy", 4, 256),
                        "spaf": ("spaf", 1, 64)}[case]
    seen = set()
    for prompt in prompts[:count]:
        result = engine.generate(prompt, max_new_tokens=new, mode=mode, chat=True, temperature=0.0)
        seen |= set(result.prompt_ids) | set(result.tokens)
    distinct = len(seen)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"case": case, "loaded_mib": round(loaded, 1), "peak_mib": round(peak, 1),
                  "distinct_tokens": distinct}))
"""

folder = sys.argv[1]
threads = sys.argv[2] if len(sys.argv) > 2 else "2"
for case in ("greedy", "greedy4x256", "spaf", "genai"):
    done = subprocess.run([sys.executable, "-c", CASE, folder, threads, case], capture_output=True, text=True)
    if done.returncode:
        print(f"{case}: failed\n{done.stderr[-1500:]}")
        continue
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{row['case']:<12} loaded {row['loaded_mib']:7.1f} MiB  peak {row['peak_mib']:7.1f} MiB  "
          f"({row['distinct_tokens']} distinct tokens)")
