#!/usr/bin/env bash
# The recipe of the project's small LongLLaMA (configs/small-fot.yaml), end to end on one machine with 1 or 2 GPUs:
# corpus, a short probe of the step rate, the FoT run and its no-negatives control (side by side on 2 GPUs), then the
# evaluations (passkey with and without memory layers, held-out perplexity against context). Only `longllama`
# commands: no separate training or evaluation code.
#
#   scripts/small_model_gpu.sh OUT [TRAIN_SECONDS]
#
# The number of steps is whatever TRAIN_SECONDS (default 300) of training fits at the probed rate (STEPS=N sets it
# instead); the config's warm-up is a tenth of it. Other knobs (environment): LENGTHS (passkey lengths, default
# 4k,32k,128k; the README's table used 32k,128k,1m: ~20 s a 1M trial dense, ~50 s with kNN memory on an H200), TRIALS (20), CONTEXTS (perplexity, 0,1k,4k,16k,64k), EXTRA (more train overrides, e.g. for a CPU
# smoke run), EVAL_TIMEOUT (seconds per evaluation command, default none), AFTER_TRAIN (a shell command run once
# both models are trained, e.g. to copy them somewhere safe before the evaluations), EVALUATE=0 (stop after training).
# Everything lands in OUT: runs/<name>/ (log.jsonl, loss.png, model/), *.json results, *.log outputs.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mkdir -p "$1" && cd "$1" && pwd)
train_seconds=${2:-300}
lengths=${LENGTHS:-4k,32k,128k}
trials=${TRIALS:-20}
contexts=${CONTEXTS:-0,1k,4k,16k,64k}
read -r -a extra <<< "${EXTRA:-}"
config=configs/small-fot.yaml
corpus=configs/data/corpus
export PYTHONUNBUFFERED=1

gpus=$(python -c "import torch; print(torch.cuda.device_count())")
echo "== $(date -u +%FT%TZ) $(python -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')") x $gpus"

if [ ! -f "$corpus/manifest.json" ]; then
    if [ -f .carry/corpus.tar.xz ]; then  # the corpus made on the development machine, carried as one archive
        python -c "import tarfile; tarfile.open('.carry/corpus.tar.xz').extractall('configs/data', filter='data')"
    else
        python scripts/prepare_corpus.py --out "$corpus" --threads "$(nproc)"
    fi
fi

if [ -z "${STEPS:-}" ]; then
    longllama train "$config" --out_dir "$out/probe" --steps 60 --log_every 1 --eval_every 0 --save_every 0 \
        --export false --progress false "${extra[@]}" > "$out/probe.log" 2>&1
    STEPS=$(python - "$out/probe/log.jsonl" "$train_seconds" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if '"tokens_per_s"' in line]
rate = statistics.median(r["tokens_per_s"] for r in rows[len(rows) // 2:])  # after the warm-up steps
per_step = rows[-1]["tokens"] / rows[-1]["step"]
print(max(10, int(float(sys.argv[2]) * rate / per_step)))
print(f"probe: {rate:,.0f} tokens/s, {per_step:,.0f} tokens/step", file=sys.stderr)
EOF
)
    rm -rf "$out/probe"
fi
warmup=$((STEPS / 10))
limit=$(python -c "print(round($train_seconds * 1.15 + 30))")  # a safety net only: the steps are meant to fit
echo "== training $STEPS steps (warm-up $warmup), at most $limit s each run"

train() {  # name, gpu, overrides...
    local name=$1 gpu=$2
    shift 2
    CUDA_VISIBLE_DEVICES=$gpu longllama train "$config" --out_dir "$out/runs/$name" --steps "$STEPS" \
        --optim.warmup_steps "$warmup" --max_seconds "$limit" --progress false "${extra[@]}" "$@" \
        > "$out/train-$name.log" 2>&1
}
second_gpu=$((gpus > 1 ? 1 : 0))
start=$(date +%s)
if [ "$gpus" -gt 1 ]; then
    train fot 0 & train no-negatives 1 --data.negatives false & wait
else
    train fot 0
    train no-negatives 0 --data.negatives false
fi
echo "== trained in $(($(date +%s) - start)) s"
tail -n 3 "$out"/runs/*/log.jsonl
eval "${AFTER_TRAIN:-}"
[ "${EVALUATE:-1}" = 0 ] && exit 0

evaluate() {  # gpu, log name, command...
    local gpu=$1 name=$2
    shift 2
    CUDA_VISIBLE_DEVICES=$gpu timeout "${EVAL_TIMEOUT:-0}" "$@" > "$out/$name.log" 2>&1 \
        || echo "!! $name failed: $(tail -n 1 "$out/$name.log")"
}
fot=$out/runs/fot/model
eval_dtype=$([ "$gpus" -gt 0 ] && echo bfloat16 || echo float32)
start=$(date +%s)
{
    evaluate 0 passkey-fot longllama passkey --model "$fot" --lengths "$lengths" --trials "$trials" \
        --dtype "$eval_dtype" --out "$out/passkey-fot.json" --plot "$out/passkey-fot.png"
    evaluate 0 passkey-fot-knn longllama passkey --model "$fot" --mem-top-k 128 --lengths "$lengths" \
        --trials "$trials" --dtype "$eval_dtype" --out "$out/passkey-fot-knn.json"
    evaluate 0 perplexity-fot longllama perplexity --model "$fot" --data "$corpus/heldout.jsonl" \
        --contexts "$contexts" --target-tokens 255 --dtype "$eval_dtype" --out "$out/perplexity-fot.json" --plot "$out/perplexity-fot.png"
} &
{
    evaluate "$second_gpu" passkey-no-negatives longllama passkey --model "$out/runs/no-negatives/model" \
        --lengths "$lengths" --trials "$trials" --dtype "$eval_dtype" --out "$out/passkey-no-negatives.json"
    evaluate "$second_gpu" passkey-no-memory longllama passkey --model "$fot" --mem-layers none \
        --lengths "$lengths" --trials "$trials" --dtype "$eval_dtype" --out "$out/passkey-no-memory.json"
} &
wait
echo "== evaluated in $(($(date +%s) - start)) s"
for log in "$out"/passkey-*.log "$out"/perplexity-*.log; do echo "-- $log"; tr '\r' '\n' < "$log" | grep -v '%|' | tail -n 12; done
