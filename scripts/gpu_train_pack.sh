#!/usr/bin/env bash
# Pack what scripts/gpu_train_leg.sh needs on an offline GPU machine into carry folders; unpack what a
# leg brought back (docs/training.md, "GPU legs").
#
#   scripts/gpu_train_pack.sh [DEST]                 # default DEST: runs/gpu_leg (git-ignored)
#   scripts/gpu_train_pack.sh --unpack FILES RUN_DIR # a leg's returned files (run.tar.gz.part_*) -> RUN_DIR
#
# env: DATA     training JSONL, plain or .gz/.xz [models/smollm2-135m-instruct/distilled_replies.jsonl];
#               bundled unless git tracks it (a tracked file travels with the working tree)
#      STATE    a run folder to resume (checkpoint/, settings.json, train_log.jsonl; e.g. a committed
#               compact state); bundled unless git tracks it; unset: the leg starts a new run
#      PART_KB  KiB per carry part; default: what one call leaves beside the working tree (64 MiB in
#               all), less 1 MiB
#      PYTHON   [.venv/bin/python if present, else python3]
#
# The bundle: the embedded default's GGUF (the GPU machine rebuilds the same base from it), the gguf
# wheel (downloaded once; else the installed package), DATA and STATE when not tracked, a manifest and
# SHA256SUMS; one gzipped tar (the GGUF shrinks from 94 to 88 MiB: with a working tree of 17 MiB,
# two calls instead of three) split into DEST/carry_1..N. Each device call carries one part and copies it to
# /tmp/leg_bundle; the last call also runs the leg (the commands are printed at the end). A warm
# machine keeps /tmp for 30 s after a call: make the calls back to back.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
fail() { echo "gpu_train_pack: $*" >&2; exit 1; }

unpack() {  # unpack FILES RUN_DIR
    local files=$1 run_dir=$2 tmp
    compgen -G "$files/run.tar.gz.part_*" > /dev/null || fail "no run.tar.gz.part_* in $files (a leg's \$OUT files)"
    [[ -e $run_dir ]] && fail "$run_dir exists; pass a new folder (or remove it) so no state is mixed"
    tmp=$(mktemp -d)
    cat "$files"/run.tar.gz.part_* > "$tmp/run.tar.gz"
    if [[ -f $files/run.tar.gz.sha256 ]]; then
        (cd "$tmp" && sha256sum --quiet -c "$files/run.tar.gz.sha256") || fail "run.tar.gz checksum mismatch"
    fi
    tar -xzf "$tmp/run.tar.gz" -C "$tmp"
    mkdir -p "$(dirname "$run_dir")"
    mv "$tmp/run" "$run_dir"
    rm -rf "$tmp"
    echo "unpacked to $run_dir; resume: spaf-edge train --out $run_dir --resume [--data FILE]"
    echo "commit its compact state: $run_dir/checkpoint, settings.json, train_log.jsonl (final/ is a copy)"
}

if [[ ${1:-} == --unpack ]]; then
    [[ $# -eq 3 ]] || fail "usage: gpu_train_pack.sh --unpack FILES RUN_DIR"
    unpack "$2" "$3"
    exit 0
fi

DEST=${1:-runs/gpu_leg}
DATA=${DATA:-models/smollm2-135m-instruct/distilled_replies.jsonl}
STATE=${STATE:-}
git check-ignore -q "$DEST" || fail "$DEST is not git-ignored: it would travel with the working tree (use runs/...)"
[[ -f $DATA ]] || fail "DATA=$DATA: no such file"

tracked() { git ls-files --error-unmatch -- "$1" > /dev/null 2>&1; }
relative() { realpath --relative-to="$REPO" "$1"; }

rm -rf "$DEST"
mkdir -p "$DEST/files/base" "$DEST/files/wheels"
MANIFEST=$DEST/files/manifest.tsv

GGUF=$("$PYTHON" -c "from spaf_edge.models.loading import default_gguf_path; print(default_gguf_path())")
cp "$GGUF" "$DEST/files/base/"
GGUF_VERSION=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('gguf'))")
if ! "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$DEST/files/wheels" "gguf==$GGUF_VERSION"; then
    echo "pip download of gguf $GGUF_VERSION failed; bundling the installed package instead"
    SITE=$("$PYTHON" -c "import gguf, pathlib; print(pathlib.Path(gguf.__file__).parent.parent)")
    mkdir -p "$DEST/files/site"
    cp -r "$SITE/gguf" "$DEST/files/site/"
fi

if tracked "$DATA"; then
    printf 'data\t%s\n' "$(relative "$DATA")" >> "$MANIFEST"
else
    mkdir -p "$DEST/files/data"
    case $DATA in
        *.gz|*.xz) cp "$DATA" "$DEST/files/data/" ;;
        *) gzip -c "$DATA" > "$DEST/files/data/$(basename "$DATA").gz" ;;
    esac
    printf 'data\tbundle:data/%s\n' "$(ls "$DEST/files/data")" >> "$MANIFEST"
fi

if [[ -n $STATE ]]; then
    [[ -f $STATE/checkpoint/trainer_state.json ]] || fail "STATE=$STATE has no checkpoint/trainer_state.json"
    if tracked "$STATE/checkpoint/trainer_state.json"; then
        printf 'state\t%s\n' "$(relative "$STATE")" >> "$MANIFEST"
    else
        mkdir -p "$DEST/files/state"
        cp -r "$STATE/checkpoint" "$DEST/files/state/"
        for name in settings.json train_log.jsonl; do
            [[ -f $STATE/$name ]] && cp "$STATE/$name" "$DEST/files/state/"
        done
        printf 'state\tbundle:state\n' >> "$MANIFEST"
    fi
fi

(cd "$DEST/files" && find . -type f ! -name SHA256SUMS -print0 | sort -z | xargs -0 sha256sum > SHA256SUMS)
tar -C "$DEST" -czf "$DEST/bundle.tar.gz" files
rm -rf "$DEST/files"

# One call carries the working tree (tracked and untracked files that git does not ignore) and one part.
TREE_BYTES=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null \
    | awk '{ total += $1 } END { print total + 0 }')
TREE_MB=$(( (TREE_BYTES + 1048575) / 1048576 ))
PART_KB=${PART_KB:-$(( (64 - 1) * 1024 - (TREE_BYTES + 1023) / 1024 ))}
(( PART_KB >= 4096 )) || fail "the working tree is $TREE_MB MiB: a call leaves $PART_KB KiB for a part. Commit less, or set PART_KB"
split -b "${PART_KB}k" -d -a 2 "$DEST/bundle.tar.gz" "$DEST/bundle.tar.gz.part_"
rm "$DEST/bundle.tar.gz"
COUNT=0
for part in "$DEST"/bundle.tar.gz.part_*; do
    COUNT=$((COUNT + 1))
    mkdir -p "$DEST/carry_$COUNT"
    mv "$part" "$DEST/carry_$COUNT/"
done

echo "working tree $TREE_MB MiB; $COUNT carry part(s) of <= $PART_KB KiB in $DEST:"
du -sh "$DEST"/carry_*
echo "Device calls, back to back (call K carries $DEST/carry_K; the first empties /tmp/leg_bundle):"
for index in $(seq 1 "$COUNT"); do
    command="mkdir -p /tmp/leg_bundle && cp $DEST/carry_$index/* /tmp/leg_bundle/"
    (( index == 1 )) && command="rm -rf /tmp/leg_bundle && $command"
    (( index == COUNT )) && command="$command && BUDGET=300 scripts/gpu_train_leg.sh /tmp/leg_bundle"
    echo "  call $index: $command"
done
echo "Then here: scripts/gpu_train_pack.sh --unpack FILES_AT runs/NAME"
