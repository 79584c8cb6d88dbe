#!/bin/bash
# The one prepared command for a lent GPU machine (README, "Figures from a GPU"): install the carried
# wheels and previewd, run every GPU-only code path at tiny shapes, then real-size (model, placement)
# pairs, most telling first, until BUDGET seconds are spent. Everything lands in $OUT.
#   bash bench/device/gpu_run.sh [BUDGET_SECONDS]      (device tool: carry [".whl"], timeout_s 570)
set -uo pipefail
BUDGET=${1:-360}
OUT=${OUT:-/tmp/previewd-gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/previewd . \
    || exit 1
export PYTHONPATH=/tmp/previewd:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import sys, torch, diffusers, transformers, peft, optimum.quanto as q, previewd
print(sys.version.split()[0], 'torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers',
      transformers.__version__, 'peft', peft.__version__, 'quanto', q.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/machine.txt"
started=$SECONDS
# Tiny shapes, every placement, bf16 and qfloat8 (ai-toolkit's 24 GB configs quantise and need the
# offloads): the GPU-only paths (device_map loads, offload hooks, pinned restores, quanto on CUDA)
# in about two minutes.
for quantize in "" "--quantize qfloat8"; do
    python3 bench/gpu.py --smoke --device cuda --model qwen_image_2512 --model flux2 $quantize \
        2>&1 | tee -a "$OUT/smoke.jsonl"
done
# The daemon itself on the GPU (device auto: cuda here): the README's first command, tiny models.
rm -rf /tmp/demo && timeout 150 python3 -m previewd init /tmp/demo --tiny --example >/dev/null \
    && timeout 150 python3 -m previewd run -c /tmp/demo/config.yaml --exit-when-idle > "$OUT/daemon.log" 2>&1
echo "daemon exit $?; $(ls /tmp/demo/inbox/example_lora/previews /tmp/demo/outbox/example_request 2>/dev/null | grep -c png) png" \
    | tee -a "$OUT/machine.txt"
left=$((BUDGET - (SECONDS - started)))
# Real size: 1024², 25 steps per timed image; the sweep is 3 checkpoints x 2 prompts at 8 steps.
python3 bench/gpu.py --budget-seconds "$left" --checkpoints 3 --prompts 2 --sweep-steps 8 \
    --pair qwen_image_2512:resident --pair flux2:resident --pair qwen_image_2512:te_offload \
    --pair qwen_image_2512:group_offload --pair qwen_image_edit_plus_2511:resident --pair flux2:te_offload \
    2>&1 | tee "$OUT/gpu.jsonl"
