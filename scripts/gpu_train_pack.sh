#!/usr/bin/env bash
# Pack what scripts/gpu_train_leg.sh needs on an offline GPU machine into carry folders; unpack what a
# leg brought back (docs/training.md, "GPU legs").
#
#   scripts/gpu_train_pack.sh [DEST]              # default DEST: runs/gpu_leg (git-ignored)
#   scripts/gpu_train_pack.sh --unpack FILES DIR  # a leg's returned files -> DIR (new): the run folder
#                                                 # (run.tar.gz.part_*) and DIR/replies.jsonl.gz
#                                                 # (replies.jsonl.gz.part_*), whichever came back
#
# env: PROMPTS  training prompts the leg distills replies of, bundled gzipped
#               [../shared/data/train_prompts.jsonl beside the repository; skipped with a note when
#               absent; empty: none, the leg trains without distilling]. Never MT-Bench.
#      REPLIES  replies the leg's distill continues (done prompts are skipped), .jsonl or .jsonl.gz: the
#               committed corpus, or what an earlier leg brought back (DIR/replies.jsonl.gz of --unpack)
#               [models/smollm2-135m-instruct/distilled_replies.jsonl.gz; empty: none]
#      DATA     training JSONL when the leg has no replies, plain or .gz/.xz
#               [models/smollm2-135m-instruct/distilled_replies.jsonl.gz]; bundled unless git tracks it
#      STATE    a run folder to continue (checkpoint/, settings.json, train_log.jsonl; e.g. DIR of
#               --unpack, or a committed compact state); bundled unless git tracks it; unset: the leg
#               starts a new run
#      PART_KB  KiB per carry part; default: what one call leaves beside the working tree (64 MiB in
#               all), less 1 MiB
#      PYTHON   [.venv/bin/python if present, else python3]
#
# The bundle: the embedded default's GGUF (the GPU machine rebuilds the same base from it), the gguf
# wheel (downloaded once; else the installed package), PROMPTS and REPLIES gzipped, DATA and STATE when
# not tracked, a manifest and SHA256SUMS; one gzipped tar (the GGUF shrinks from 94 to 88 MiB) split
# into DEST/carry_1..N. Each device call carries one part and copies it to /tmp/leg_bundle; the last
# call also runs the leg (the commands are printed at the end). A warm machine keeps /tmp for 30 s
# after a call: make the calls back to back.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
fail() { echo "gpu_train_pack: $*" >&2; exit 1; }

join_parts() {  # join_parts FILES NAME TMP: FILES/NAME.part_* -> TMP/NAME, checked against the leg's checksums
    local files=$1 name=$2 tmp=$3 sums
    cat "$files/$name".part_* > "$tmp/$name"
    for sums in "$files/SHA256SUMS" "$files/$name.sha256"; do
        [[ -f $sums ]] || continue
        (cd "$tmp" && sha256sum --quiet -c --ignore-missing "$sums") || fail "$name: checksum mismatch ($sums)"
        return 0
    done
    echo "note: no checksum for $name came back"
}

unpack() {  # unpack FILES DIR
    local files=$1 dir=$2 tmp
    compgen -G "$files/*.part_*" > /dev/null || fail "no *.part_* in $files (a leg's \$OUT files)"
    [[ -e $dir ]] && fail "$dir exists; pass a new folder (or remove it) so no state is mixed"
    tmp=$(mktemp -d)
    mkdir -p "$tmp/out"
    if compgen -G "$files/run.tar.gz.part_*" > /dev/null; then
        join_parts "$files" run.tar.gz "$tmp"
        tar -xzf "$tmp/run.tar.gz" -C "$tmp"
        mv "$tmp/run"/* "$tmp/out/"
    fi
    if compgen -G "$files/replies.jsonl.gz.part_*" > /dev/null; then
        join_parts "$files" replies.jsonl.gz "$tmp"
        gzip -t "$tmp/replies.jsonl.gz" || fail "replies.jsonl.gz does not decompress"
        mv "$tmp/replies.jsonl.gz" "$tmp/out/"
    fi
    mkdir -p "$(dirname "$dir")"
    mv "$tmp/out" "$dir"
    rm -rf "$tmp"
    echo "unpacked to $dir"
    if [[ -f $dir/checkpoint/trainer_state.json ]]; then
        echo "run: resume with spaf-edge train --out $dir --resume --data FILE, or the next leg's STATE=$dir"
        echo "commit its compact state: $dir/checkpoint, settings.json, train_log.jsonl (final/ is a copy)"
    else
        echo "no run came back (a distill-only leg, or BRING=replies, or it did not fit: see leg.log)"
    fi
    if [[ -f $dir/replies.jsonl.gz ]]; then
        echo "replies: $(gunzip -c "$dir/replies.jsonl.gz" | wc -l) rows in $dir/replies.jsonl.gz (all of the leg's," \
             "the bundle's included); the next leg's REPLIES=$dir/replies.jsonl.gz; train on them with --data"
    fi
}

if [[ ${1:-} == --unpack ]]; then
    [[ $# -eq 3 ]] || fail "usage: gpu_train_pack.sh --unpack FILES DIR"
    unpack "$2" "$3"
    exit 0
fi

DEST=${1:-runs/gpu_leg}
CORPUS=models/smollm2-135m-instruct/distilled_replies.jsonl.gz
DATA=${DATA:-$CORPUS}
STATE=${STATE:-}
PROMPTS=${PROMPTS-$REPO/../shared/data/train_prompts.jsonl}
REPLIES=${REPLIES-$CORPUS}
git check-ignore -q "$DEST" || fail "$DEST is not git-ignored: it would travel with the working tree (use runs/...)"
[[ -f $DATA ]] || fail "DATA=$DATA: no such file"
[[ -z $REPLIES || -f $REPLIES ]] || fail "REPLIES=$REPLIES: no such file"
for file in "$PROMPTS" "$REPLIES"; do  # never MT-Bench or the grounded evaluation prompts
    if [[ -n $file ]]; then
        "$PYTHON" -c "import sys; from spaf_edge.training.data import refuse_evaluation_data
refuse_evaluation_data(sys.argv[1])" "$file" || fail "$file: refused (see above)"
    fi
done

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

bundle_gzipped() {  # bundle_gzipped KEY FILE NAME: FILE gzipped as files/KEY/NAME.gz, named in the manifest
    mkdir -p "$DEST/files/$1"
    case $2 in
        *.gz) cp "$2" "$DEST/files/$1/$3.gz" ;;
        *) gzip -c "$2" > "$DEST/files/$1/$3.gz" ;;
    esac
    printf '%s\tbundle:%s/%s.gz\n' "$1" "$1" "$3" >> "$MANIFEST"
}

if [[ -z $PROMPTS ]]; then
    echo "PROMPTS is empty: no prompts bundled, the leg trains without distilling"
elif [[ ! -f $PROMPTS ]]; then
    echo "note: PROMPTS=$PROMPTS is absent: no prompts bundled, the leg trains without distilling"
else
    bundle_gzipped prompts "$PROMPTS" "$(basename "${PROMPTS%.gz}")"
    echo "prompts: $(gzip -cdf "$PROMPTS" | wc -l) rows from $PROMPTS"
fi
if [[ -n $REPLIES ]]; then
    gzip -t "$REPLIES" 2>/dev/null || [[ $REPLIES != *.gz ]] || fail "REPLIES=$REPLIES does not decompress"
    bundle_gzipped replies "$REPLIES" replies.jsonl
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
    (( index == COUNT )) && command="$command && scripts/gpu_train_leg.sh /tmp/leg_bundle"
    echo "  call $index: $command"
done
echo "The last call with timeout_s 600: the leg ends within LEG_SECONDS (560 s)."
echo "Then here: scripts/gpu_train_pack.sh --unpack FILES_AT runs/NAME (the run, and NAME/replies.jsonl.gz)"
