#!/usr/bin/env bash
# GPU check (CUDA, NCCL): what the CPU tests cannot show. On SmolLM2-135M with every linear layer a target:
#   1. plan with plain data parallelism and with --fsdp (FSDP2 shards), and compare the two plans;
#   2. train a few bf16 steps under --fsdp and under --deepspeed zero3, with no CPU test patches;
#   3. export each run as a PEFT adapter and verify it against the trained adapter;
#   4. serve the export with vLLM and run the serving benchmark on the GPU (skipped without a CUDA vLLM);
# then print one summary table. Under 8 minutes on one H200 (most of it is process start-up).
#
#   scripts/gpu_check.sh [WORK_DIR]        # default out/gpu-check; NPROC defaults to the number of GPUs
#
# PYTHON (default .venv/bin/python) must be an environment with the project installed (pip install -e '.[dev]')
# and a CUDA build of torch. Every step runs under `timeout`; a failed step is reported and the rest still run.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
WORK=${1:-out/gpu-check}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
MODEL=${MODEL:-smollm2-135m}
DATA=${DATA:-sarcasm-lm}

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check: no CUDA device is visible to $PYTHON (torch.cuda.is_available() is False); run this on a machine with an NVIDIA GPU and a CUDA build of torch." >&2
    exit 2
fi
NPROC=${NPROC:-$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")}
mkdir -p "$WORK"
rm -rf "$WORK"/plan_*.gora "$WORK"/runs "$WORK"/exports "$WORK"/logs
mkdir -p "$WORK/logs"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=false

ROWS=()      # "step|seconds|result|detail"
FAILED=0

# step NAME DETAIL_COMMAND -- COMMAND...: run COMMAND with a timeout, log it, record time and outcome.
# DETAIL_COMMAND runs after success and prints one short line for the table (peak memory, difference...).
step() {
    local name=$1 detail=$2; shift 3
    local log="$WORK/logs/$name.log" start end seconds result note
    echo "[gpu-check] $name: $*"
    start=$(date +%s.%N)
    timeout "$STEP_TIMEOUT" "$@" >"$log" 2>&1
    local rc=$?
    end=$(date +%s.%N)
    seconds=$("$PYTHON" -c "print(f'{$end - $start:.1f}')")
    if [ $rc -eq 0 ]; then
        result=ok
        note=$(eval "$detail" 2>/dev/null | tail -n 1)
    else
        result="FAILED (rc $rc)"
        # the one-sentence "Error: ..." of a goraplan/gorafit process, else the last error line of the log
        note=$(grep -m 1 -E '^(\[rank[0-9]+\]: )?Error: ' "$log" || grep -iE 'error|exception' "$log" \
               | grep -v 'To enable traceback' | tail -n 1)
        note=$(echo "$note" | cut -c1-140)
        FAILED=1
    fi
    ROWS+=("$name|$seconds|$result|$note")
}

torchrun=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC")
plan_args=(build --model "$MODEL" --data "$DATA" --target-modules all-linear --steps 16 --batch-size 4
           --max-length 128 --dtype bfloat16 --overwrite)
peak_of() { grep -o 'peak memory [0-9]* MiB' "$WORK/logs/$1.log" | tail -n 1; }

# ---------------------------------------------------------------------------- 1. plan: data parallel vs FSDP
step plan_ddp "peak_of plan_ddp" -- "${torchrun[@]}" -m goraplan "${plan_args[@]}" -o "$WORK/plan_ddp.gora"
step plan_fsdp "peak_of plan_fsdp" -- "${torchrun[@]}" -m goraplan "${plan_args[@]}" --fsdp -o "$WORK/plan_fsdp.gora"
step plans_agree "cat $WORK/logs/plans_agree.log" -- "$PYTHON" - "$WORK/plan_ddp.gora" "$WORK/plan_fsdp.gora" <<'EOF'
import sys
import goraplan
a, b = goraplan.load_plan(sys.argv[1]), goraplan.load_plan(sys.argv[2])
assert a.ranks == b.ranks, "the sharded plan's ranks differ"
imp = max(abs(x.importance - y.importance) / x.importance for x, y in zip(a.manifest.modules, b.manifest.modules))
ten = max(float((a.tensors[k] - b.tensors[k]).abs().max() / a.tensors[k].abs().max()) for k in a.tensors)
print(f"same ranks; importance rel diff {imp:.1e}, tensors rel diff {ten:.1e}")
EOF

# ---------------------------------------------------------------------------- 2. train a few bf16 steps
train_args=(--bf16 --dtype float32 --max-steps 8 --batch-size 4 --logging-steps 1 --save-steps 8 --eval-fraction 0
            --report-to none --disable-tqdm --overwrite)
run_peak() { "$PYTHON" -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{r.get('peak_memory_mb')} MiB peak, train loss {r.get('metrics', r).get('train_loss')}\")" "$WORK/runs/$1/run.json"; }
step train_fsdp "run_peak fsdp" -- "${torchrun[@]}" -m gorafit run "$WORK/plan_fsdp.gora" --fsdp "${train_args[@]}" \
    -o "$WORK/runs/fsdp"
step train_zero3 "run_peak zero3" -- "${torchrun[@]}" -m gorafit run "$WORK/plan_fsdp.gora" --deepspeed zero3 \
    "${train_args[@]}" -o "$WORK/runs/zero3"

# ---------------------------------------------------------------------------- 3. export and verify
for run in fsdp zero3; do
    step "export_$run" "echo exported" -- "$PYTHON" -m gorafit export "$WORK/runs/$run" --format peft \
        -o "$WORK/exports/$run" --overwrite
    step "verify_$run" "grep -i 'largest' $WORK/logs/verify_$run.log | tail -n 1" -- \
        "$PYTHON" -m gorafit verify "$WORK/exports/$run"
done

# ---------------------------------------------------------------------------- 4. SERVING with vLLM
# VLLM_PYTHON (default .venv-serve/bin/python, else PYTHON) must import a CUDA build of vLLM (pip install vllm).
# serve_verify: the fsdp export served as its printed command serves it (smallest --max-lora-rank,
# --lora-target-modules) gives PEFT's greedy tokens; serve_bench: the serving benchmark (LoRA r=8 vs GoRA r_max
# 8/16/32, 1 and 4 adapters, default and limited wrappers, merged floor) in bfloat16, written to
# benchmarks/results/serve-cuda.{json,md}.
serving_steps() {
    local vllm_python=${VLLM_PYTHON:-.venv-serve/bin/python}
    [ -x "$vllm_python" ] || vllm_python=$PYTHON
    if ! "$vllm_python" -c "import vllm, torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
        ROWS+=("serve_vllm|0|skipped|no CUDA vLLM in $vllm_python: set VLLM_PYTHON to a venv with pip install vllm")
        return
    fi
    step serve_verify "grep -i 'largest' $WORK/logs/serve_verify.log | tail -n 1" -- \
        "$PYTHON" -m gorafit verify "$WORK/exports/fsdp" --engine vllm --python "$vllm_python"
    STEP_TIMEOUT=${SERVE_BENCH_TIMEOUT:-1800} step serve_bench \
        "grep -E '^Wrote' $WORK/logs/serve_bench.log | tail -n 1" -- \
        "$PYTHON" benchmarks/bench_serve.py --device cuda --dtype bfloat16 --vllm-python "$vllm_python" \
        --work "$WORK/bench-serve" --rounds 3 --new-tokens 64
}
serving_steps

# ---------------------------------------------------------------------------- summary
echo
echo "GPU check: $MODEL, $NPROC process(es), $("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0))")"
printf '| %-14s | %8s | %-14s | %s\n' step seconds result detail
printf '|%s|%s|%s|%s\n' "----------------" "----------" "----------------" "--------"
for row in "${ROWS[@]}"; do
    IFS='|' read -r name seconds result note <<<"$row"
    printf '| %-14s | %8s | %-14s | %s\n' "$name" "$seconds" "$result" "$note"
done
echo "logs: $WORK/logs"
exit $FAILED
