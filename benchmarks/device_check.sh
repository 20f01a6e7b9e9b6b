#!/usr/bin/env bash
# The CUDA check in one command (at most about 8.3 minutes on one GPU, by its timeouts): the throughput tables
# on CUDA (reference vs relreason vs backbone alone; relreason's steps after the first run under
# torch.cuda.set_sync_debug_mode("error"), so a host sync inside a step is reported and fails the
# script), Conv-4 compiled at the paper's K=32, then a short pretraining run on CUDA with bf16 and
# channels_last and its evaluation.
#
#   bash benchmarks/device_check.sh OUT_DIR          # from the repository root
#
# It runs from src/ without installing (no package index is needed) and writes seven small
# files to OUT_DIR. Fashion-MNIST is read from data/FashionMNIST/raw when that folder holds its IDX .gz
# files; otherwise the benchmark uses synthetic images.
# DEVICE=cpu QUICK=1 runs the same steps tiny, on the CPU, to check the script itself (its "compile"
# line then runs uncompiled: compiling on a small CPU takes longer than the whole check).
set -uo pipefail
out=${1:?give the folder for the results}
device=${DEVICE:-cuda}
mkdir -p "$out"
work=$(mktemp -d)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Time limits are for the GPU; the tiny CPU check (run by the tests, beside other work) gets four times as long.
scale=1
if [[ -n "${QUICK:-}" ]]; then
    scale=4
    conv4=(--views 2 --batch-size 8 --modes fp32 bf16 --steps 2 --warmup 1 --dataset synthetic)
    compiled=(--views 2 --batch-size 8 --modes bf16 --steps 2 --warmup 1 --dataset synthetic)
    resnet=(--views 2 --batch-size 8 --modes fp32 --steps 2 --warmup 1 --dataset synthetic)
    pretrain=(--epochs 1)
else
    conv4=(--views 4 16 32 --modes fp32 bf16+cl --steps 20 --warmup 5)
    compiled=(--views 32 --modes bf16+cl+compile --steps 20 --warmup 5)
    resnet=(--views 16 32 --modes fp32 bf16+cl --steps 10 --warmup 3)
    pretrain=()
fi

{
    command -v nvidia-smi >/dev/null && timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    timeout 30 python3 -c "import os, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cores', os.cpu_count())"
    df -h /dev/shm  # DataLoader workers pass batches through it: the reference falls back to 4 workers if it is small
} > "$out/machine.txt" 2>&1
status=0
bench() {  # seconds, output file, arguments of throughput.py
    local limit=$1 file=$2
    shift 2
    timeout $((limit * scale)) python3 benchmarks/throughput.py --device "$device" "$@" 2>&1 | tee "$out/$file" || status=1
}
bench 110 throughput_conv4.md --backbones conv4 "${conv4[@]}"
bench 140 throughput_conv4_compile.md --backbones conv4 --skip-reference "${compiled[@]}"
bench 90 throughput_resnet32.md --backbones resnet32 "${resnet[@]}"
amp=(--amp bf16 --channels-last)
# --time-limit: stops in time and still exports the backbone, so the evaluation has something to evaluate.
timeout $((60 * scale)) python3 -m relreason pretrain --config digits_conv4 --device "$device" "${amp[@]}" \
    --time-limit 0.6 "${pretrain[@]}" --output-dir "$work/run" --no-progress --no-tensorboard > "$out/pretrain.log" 2>&1 || status=1
timeout $((50 * scale)) python3 -m relreason evaluate --run-dir "$work/run" --device "$device" 2>&1 \
    | tee "$out/evaluate.md" || status=1
cp "$work/run/evaluation.json" "$out/" 2>/dev/null || status=1
rm -rf "$work"
exit $status
