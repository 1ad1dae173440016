#!/usr/bin/env bash
# GPU check of distributed training: `spaf-edge train` under DeepSpeed ZeRO-2 (bf16, the shipped
# configs/deepspeed/zero2.json) and under accelerate's bf16 autocast, on one GPU, fully offline.
#
#   scripts/gpu_check_deepspeed.sh                # on the GPU machine (needs .whl/, see docs/training.md)
#   scripts/gpu_check_deepspeed.sh --cpu-dry-run  # the same flow on CPU (fp32), without installing anything
#
# Steps: print nvidia-smi and versions; install DeepSpeed and its missing dependencies from .whl/
# into $SITE (pip --no-index; DeepSpeed from its sdist with DS_BUILD_OPS=0, falling back to the
# prebuilt .whl/built/ wheel); build a tiny random Llama; train 20 steps with ZeRO-2, resume to 24;
# train 20 steps without DeepSpeed (bf16 autocast, bf16 base) and 20 with ZeRO-3 (configs/deepspeed/
# zero3.json); load every result in a CPU process.
# Logs and summary.json go to $OUT (or a temp folder). Exit code 0 only when every check passes.
set -uo pipefail

DRY=0
[[ "${1:-}" == "--cpu-dry-run" ]] && DRY=1
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
LOGS=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
WORK=$(mktemp -d /tmp/gpu_check_work.XXXXXX)
mkdir -p "$LOGS"
exec > >(tee "$LOGS/gpu_check.log") 2>&1
STARTED=$SECONDS
RESULTS=()
FAILED=0

run_check() {  # run_check NAME TIMEOUT_S COMMAND...: log to $LOGS/NAME.log, record PASS/FAIL and seconds
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name"
    timeout "$limit" bash -c '"$@"' run_check "$@" >"$LOGS/$name.log" 2>&1  # functions are exported below
    rc=$?
    if [[ $rc -eq 0 ]]; then
        RESULTS+=("PASS $name $((SECONDS - start)) s")
    else
        RESULTS+=("FAIL $name (exit $rc after $((SECONDS - start)) s; see $name.log)")
        FAILED=1
        tail -n 40 "$LOGS/$name.log"
    fi
}

echo "== machine"
if [[ $DRY -eq 1 ]]; then
    echo "cpu dry run: fp32 on CPU, nothing installed"
    PRECISION=no
else
    nvidia-smi || echo "nvidia-smi failed"
    PRECISION=bf16
    install_deepspeed() {
        "$PYTHON" -m pip install --no-index --no-deps --upgrade --target "$SITE" "$REPO"/.whl/*.whl || return 1
        PYTHONPATH="$SITE" DS_BUILD_OPS=0 "$PYTHON" -m pip install --no-index --no-deps --upgrade \
            --no-build-isolation --target "$SITE" "$REPO"/.whl/deepspeed-*.tar.gz && return 0
        echo "building DeepSpeed from its sdist failed; installing the prebuilt wheel"
        "$PYTHON" -m pip install --no-index --no-deps --upgrade --target "$SITE" "$REPO"/.whl/built/deepspeed-*.whl
    }
    export PYTHON SITE REPO
    export -f install_deepspeed
    run_check install 150 install_deepspeed
fi
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false

"$PYTHON" - <<'EOF'
import importlib, platform, sys
print("python", sys.version.split()[0], platform.machine())
for name in ("torch", "accelerate", "transformers", "deepspeed", "pydantic"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), getattr(module, "__file__", ""))
    except Exception as exc:  # report every missing piece, do not stop here
        print(name, "NOT IMPORTABLE:", exc)
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF

[[ $DRY -eq 0 ]] && { timeout 60 "$PYTHON" -m deepspeed.env_report 2>&1 | tail -n 30 || true; }

make_model() {
    "$PYTHON" - "$WORK" <<'EOF'
import json, random, sys, types
from pathlib import Path

sys.path.insert(0, "tests")
try:
    import pytest  # noqa: F401  (conftest decorates its fixtures with it)
except ImportError:
    stub = types.ModuleType("pytest")
    stub.fixture = lambda *args, **kwargs: args[0] if args and callable(args[0]) else (lambda func: func)
    sys.modules["pytest"] = stub
from conftest import make_tiny_base, make_tiny_tokenizer

work = Path(sys.argv[1])
tokenizer = make_tiny_tokenizer()
model = make_tiny_base("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                       initializer_range=0.2, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
model.save_pretrained(work / "model")
tokenizer.save_pretrained(work / "model")
words = ["the cat", "a dog", "runs", "sleeps", "on the mat", "quickly", "and", "then", "big", "red"]
rng = random.Random(0)
with open(work / "data.jsonl", "w") as handle:
    for _ in range(400):
        handle.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(12)) + "."}) + "\n")
print("tiny model and data in", work)
EOF
}

train() {  # train RUN_NAME [extra spaf-edge train options...]
    local run=$1
    shift
    "$PYTHON" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision "$PRECISION" \
        --dynamo_backend no -m spaf_edge train --base-model "$WORK/model" --data "$WORK/data.jsonl" \
        --out "$WORK/$run" --batch-size 8 --seq-len 64 --lr 1e-2 --warmup 2 --save-every 10 \
        --eval-every 10 --no-progress "$@"
}

check_run() {  # check_run RUN_NAME STEPS ZERO(0|1): summary, loss went down, CPU load of final/ and checkpoint/
    CUDA_VISIBLE_DEVICES="" "$PYTHON" - "$WORK" "$@" <<'EOF'
import json, math, sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from spaf_edge.model import SpAFModel
from spaf_edge.training.checkpoint import load_trainer_state

work, run, steps, zero = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
run_dir = work / run
rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
train = [row for row in rows if row["split"] == "train"]
assert [row["step"] for row in train] == list(range(1, steps + 1)), [row["step"] for row in train]
assert all(math.isfinite(row["total"]) for row in train)
first, last = sum(r["total"] for r in train[:3]) / 3, sum(r["total"] for r in train[-3:]) / 3
assert last < first, f"loss did not go down: {first:.4f} -> {last:.4f}"
model = SpAFModel.from_pretrained(work / "model", components=run_dir / "final")
weights = load_file(str(run_dir / "final" / "spaf_components.safetensors"))
assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
# fp32 master weights, not bf16 copies widened to fp32 (a bf16 round trip would change some values)
assert any(not torch.equal(w, w.bfloat16().float()) for w in weights.values() if w.is_floating_point())
SpAFModel.from_pretrained(work / "model", components=run_dir / "checkpoint" / "components")
state = load_trainer_state(run_dir / "checkpoint")
assert state["step"] == steps and state["world_size"] == 1
assert isinstance(state["optimizer"], list) == zero, type(state["optimizer"])
hidden = torch.randn(2, 5, model.hidden_size)
assert torch.isfinite(model.draft_logits(hidden)).all()
print(f"{run}: {steps} steps, loss {first:.4f} -> {last:.4f}, components load on CPU")
EOF
}

cd "$REPO" || exit 1
export PYTHON WORK PRECISION
export -f make_model train check_run
run_check make_model 120 make_model
run_check deepspeed_zero2 150 train ds --cutoff-layer 2 --steps 20 --deepspeed configs/deepspeed/zero2.json
run_check deepspeed_zero2_load 90 check_run ds 20 1
run_check deepspeed_resume 150 train ds --resume --steps 24 --deepspeed configs/deepspeed/zero2.json
run_check deepspeed_resume_load 90 check_run ds 24 1
run_check autocast 150 train ac --cutoff-layer 2 --steps 20
run_check autocast_load 90 check_run ac 20 0
run_check deepspeed_zero3 150 train z3 --cutoff-layer 2 --steps 20 --deepspeed configs/deepspeed/zero3.json
run_check deepspeed_zero3_load 90 check_run z3 20 1
for run in ds ac z3; do
    [[ -f "$WORK/$run/train_log.jsonl" ]] && cp "$WORK/$run/train_log.jsonl" "$LOGS/${run}_train_log.jsonl"
done

echo
echo "== summary ($((SECONDS - STARTED)) s)"
printf '%s\n' "${RESULTS[@]}"
"$PYTHON" - "$LOGS/summary.json" "$FAILED" "$((SECONDS - STARTED))" "${RESULTS[@]}" <<'EOF'
import json, sys
path, failed, seconds, results = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4:]
json.dump({"passed": not failed, "seconds": seconds, "checks": results}, open(path, "w"), indent=2)
EOF
if [[ $FAILED -eq 0 ]]; then echo "GPU CHECK: PASS"; else echo "GPU CHECK: FAIL"; fi
rm -rf "$WORK"
exit $FAILED
