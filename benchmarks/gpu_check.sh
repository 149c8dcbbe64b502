#!/usr/bin/env bash
# Issue 6's GPU measurements, prepared to fit a short lease of a GPU machine (15 minutes of
# device time in all, 10 minutes a command): run from the repository root,
#
#   bash benchmarks/gpu_check.sh trainer      # GPT-2-small (seq 1024, bf16) and default: MFU
#   bash benchmarks/gpu_check.sh optimizers   # the optimizer table on the GPU
#
# one part per call. Results (JSON + Markdown) and logs go to $OUT (the device tool's folder that
# comes back) or, without it, to benchmarks/results. The GPU machine's image has JAX, Flax,
# Optax and orbax but no tensorboardX or optuna; neither benchmark imports them, so the
# repository on PYTHONPATH is all it needs (nothing is installed). QUICK=1 runs each part at the
# benchmarks' test sizes, to check this script on a CPU.
#
# The optimizer part leaves LAMB and Adafactor out (on a CPU host Optax takes about a minute to
# compile each of their 1000-leaf steps, which would not fit the command's 10 minutes beside the
# rest; `python -m benchmarks.optimizers --optimizers lamb,adafactor --compile-leaves ""` is a
# third call where time is left) and sweeps compile time at 10 and 100 leaves only: compile
# time is host work, measured in full on CPU.
set -u -o pipefail
part=${1:-}
case "$part" in
trainer | optimizers) ;;
*)
    echo "usage: bash benchmarks/gpu_check.sh trainer|optimizers" >&2
    exit 2
    ;;
esac
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=$(command -v python3 || command -v python)

"$py" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())" 2>&1 | tee "$out/environment.txt" || exit 1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm \
    --format=csv >>"$out/environment.txt" 2>&1

quick=()
[ "${QUICK:-0}" = 1 ] && quick=(--quick)
case "$part" in
trainer)
    # bench SECONDS ARGS...: one benchmark run, at most SECONDS (never fewer than 30) long.
    bench() {
        local limit=$(($1 > 30 ? $1 : 30))
        shift
        timeout "$limit" "$py" -m benchmarks.trainer --steps 40 --window 5 --warmup 5 \
            --out "$out" "${quick[@]}" "$@" 2>&1 | tee -a "$out/trainer.log"
    }
    if [ "${QUICK:-0}" = 1 ]; then
        bench 540 --recipes default
        exit
    fi
    # GPT-2-small without remat: on an 80 GB H100 its activations at batch 32 x 1024 (about
    # 25 GB with fused attention, the float32 logits included) fit, and remat would spend a
    # third more FLOPs that MFU does not count. Its attention is `auto`: cuDNN's fused kernel,
    # which no CPU run can trace; should that run fail, the recipe as it stands (remat, the
    # written-out attention) runs instead, so the lease still gives an MFU, and the default
    # recipe then takes the written-out attention too.
    start=$SECONDS
    attention=()
    if ! bench 330 --recipes gpt2_small --override gpt2_small:model.remat=false; then
        attention=(--override model.attention=xla)
        bench $((450 - (SECONDS - start))) --recipes gpt2_small "${attention[@]}"
    fi
    bench $((540 - (SECONDS - start))) --recipes default "${attention[@]}"
    ;;
optimizers)
    size=()
    [ "${QUICK:-0}" = 1 ] && size=(--size 20000 --leaves 20 --repeats 2 --warmup 1)
    timeout 540 "$py" -m benchmarks.optimizers \
        --optimizers sgd_momentum,adam,adamw,lion,clip_adamw_cosine \
        --compile-leaves 10,100 --out "$out" "${size[@]}" "${quick[@]}" 2>&1 |
        tee "$out/optimizers.log"
    ;;
esac
