#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md ("On a GPU"), in two phases on one machine:
#
#   bash benchmarks/gpu.sh timings OUT_DIR          # step time, ops and memory (fp32, bf16; eager and compiled),
#                                                   # inference cost, the Order I projection, a CUDA smoke
#   bash benchmarks/gpu.sh mini OUT_DIR [STEPS]     # mini-MTIL at STEPS (default 1000) per task for every method,
#                                                   # and the MoE-Adapters variants at 150 steps, side by side
#   bash benchmarks/gpu.sh merging OUT_DIR [STEPS]  # expert merging (Park 2024) at STEPS (default 1000) per task:
#                                                   # 22 and 55 experts, merging off and every 100 steps, seeds 0-2
#
# Timings run alone on the GPU; the mini-MTIL runs share it (each is small and launch-bound). Logs and result tables
# land flat in OUT_DIR; each run's full report stays under $RUNS_DIR (default /tmp/gpu-runs). Assets come from
# $HF_MOE_CL_ASSETS or ../shared/assets as everywhere else; PYTHON picks the interpreter.
set -u
phase=${1:?timings, mini or merging}
out=${2:?output folder}
steps=${3:-1000}
py=${PYTHON:-python}
runs=${RUNS_DIR:-/tmp/gpu-runs}
mkdir -p "$out" "$runs"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1

mini() {  # name, then mini_mtil.py arguments
    local name=$1
    shift
    "$py" benchmarks/mini_mtil.py --device cuda --output_dir "$runs/$name" "$@" >"$out/mini-$name.log" 2>&1
    echo "$name exit $?" >>"$out/mini-exits.txt"
}

case "$phase" in
timings)
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        "$py" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__)"
        for precision in "" --bf16; do
            "$py" benchmarks/step_time.py --model vit-b16-random --batch_size 64 --steps 20 --compile $precision
        done
        "$py" benchmarks/step_time.py --model vit-b16-random --batch_size 64 --steps 20 --tasks 30
        "$py" benchmarks/inference_cost.py --model vit-b16-random --batch_size 32 --device cuda --tasks 30
        "$py" benchmarks/order1_cost.py --model vit-b16-random --scale 0.01 --device cuda --bf16 \
            --eval_batch_size 512 --eval_cache_gb 64 --num_workers 8
        "$py" benchmarks/inference_cost.py --model vit-b16-random --batch_size 128 --device cuda --bf16
        "$py" benchmarks/inference_cost.py --model vit-b16-random --batch_size 32 --device cuda
        "$py" benchmarks/inference_cost.py --model proxy-clip --batch_size 64 --device cuda
    } >"$out/timings.txt" 2>&1
    # CUDA smoke of every MoE path (DDAS off: the reference images stay home), and the per-step time it implies.
    mini smoke-moe --steps_per_task 20 --methods moe-adapters,individual-finetune &
    mini smoke-variants --steps_per_task 20 --methods moe-adapters --freeze_policy coverage \
        --merge_experts_every 10 --num_experts 55 &
    wait
    ;;
mini)
    for method in moe-adapters individual-finetune full-finetune lora zero-shot; do
        mini "$method-$steps" --steps_per_task "$steps" --methods "$method" &
    done
    mini moe-150 --methods moe-adapters &
    mini coverage-150 --methods moe-adapters --freeze_policy coverage --freeze_coverage 1.0 &
    mini merge-150 --methods moe-adapters --merge_experts_every 100 &
    mini experts55-150 --methods moe-adapters --num_experts 55 &
    mini experts55-merge-150 --methods moe-adapters --num_experts 55 --merge_experts_every 100 &
    wait
    ;;
merging)
    for experts in 22 55; do
        for every in 0 100; do
            for seed in 0 1 2; do
                mini "experts$experts-merge$every-seed$seed-$steps" --steps_per_task "$steps" --methods moe-adapters \
                    --num_experts "$experts" --merge_experts_every "$every" --seed "$seed" &
            done
        done
    done
    wait
    ;;
*)
    echo "unknown phase $phase: timings, mini or merging" >&2
    exit 2
    ;;
esac
