#!/usr/bin/env bash
# Every GPU-marked test and GPU benchmark, in under 8 minutes, on a lent GPU machine (its python3 holds a CUDA
# PyTorch; the rest comes from the wheels tools/gpu_wheels.sh fetched into .whl/). Logs go to $OUT (or
# /tmp/gpu-check). From this machine, after `bash tools/gpu_wheels.sh`:
#   device run: command "bash tools/gpu_check.sh", carry [".whl"], timeout_s 560
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out="${OUT:-/tmp/gpu-check}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export FLUXSTUDIO_GPU_TESTS=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,compute_cap,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$out/gpu.txt"

status=0
# the GPU tests: the CUDA probe, builds on CUDA (NF4, GGUF K-quants, ComfyUI-native), previews on CUDA
timeout 330 python3 -m pytest -m gpu -q -p no:cacheprovider --basetemp=/tmp/gpu-tests -o addopts="" 2>&1 \
    | tee "$out/tests.log" || status=1
# the preview benchmark on a quarter of FLUX.1-dev's depth (5 + 10 blocks): unfused LoRAs against the fused
# outputs, diffusers NF4 / fp8 and ComfyUI-native fp8 / NVFP4
timeout 150 python3 bench/preview_speed.py --double 5 --single 10 --size 512 --steps 8 --workdir /tmp/gpu-bench 2>&1 \
    | grep -v -e "it/s]" -e "Warning" | tee "$out/preview_speed.log" || status=1
rm -rf /tmp/gpu-tests /tmp/gpu-bench
exit $status
