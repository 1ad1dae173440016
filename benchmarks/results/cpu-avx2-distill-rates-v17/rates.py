"""Distill rate by backend on the same 64 training prompts (`prompts.jsonl`: rows 1000-1063 of the
committed greedy corpus, 40-80 prompt tokens), 256 new tokens, greedy and sampled at 0.7, CPU,
2 threads; model and engine loads are not timed. Writes rates.json and the replies beside itself.

Run from the repository root: `.venv/bin/python benchmarks/results/cpu-avx2-distill-rates-v17/rates.py`.
"""

import json
from pathlib import Path

import torch

from spaf_edge.training.distill import distill

HERE = Path(__file__).resolve().parent
RUNS = [("torch", 0.7, {"batch_size": 64}), ("onnx", 0.7, {"threads": 2}),
        ("torch", 0.0, {"batch_size": 64}), ("onnx", 0.0, {"threads": 2})]


def main() -> None:
    torch.set_num_threads(2)
    results = []
    for backend, temperature, extra in RUNS:
        out = HERE / f"replies_{backend}_{temperature}.jsonl"
        out.unlink(missing_ok=True)
        device = {"device": "cpu"} if backend == "torch" else {}
        summary = distill(HERE / "prompts.jsonl", out, backend=backend, temperature=temperature, seed=0,
                          max_new_tokens=256, max_prompt_tokens=512, progress=False, **device, **extra)
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        line = dict(backend=backend, temperature=temperature, **extra, replies=summary.written,
                    tokens=summary.new_tokens, seconds=round(summary.seconds, 1),
                    tok_s=round(summary.tokens_per_second, 1),
                    at_limit=sum(row["finish_reason"] == "length" for row in rows))
        print(json.dumps(line), flush=True)
        results.append(line)
    (HERE / "rates.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
