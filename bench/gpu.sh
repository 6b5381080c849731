#!/usr/bin/env bash
# GPU throughput benchmark (docs/gpu-benchmarks.md), meant to run ON a GPU machine from the repo root:
#   bash bench/gpu.sh --workloads w3 [gpu_throughput.py arguments]   (make bench-gpu: w1)
# Installs the wheels carried in .whl/ when deepspeed is missing (machines with no registry access),
# then runs bench/gpu_throughput.py. Results go to ${OUT:-gpu_bench}/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c 'import deepspeed' 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "deepspeed is not installed and no wheels are in .whl/ (see docs/gpu-benchmarks.md)" >&2
        exit 2
    fi
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The training package and the bench import the collection's module_utils by its collection path:
# this checkout is the collection dsmesh.cluster.
mkdir -p /tmp/site/ansible_collections/dsmesh
ln -sfn "$PWD" /tmp/site/ansible_collections/dsmesh/cluster
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# ninja (a carried wheel where the machine has none) for DeepSpeed's JIT-built ops (FusedAdam)
if [ -d /tmp/site/bin ]; then export PATH=/tmp/site/bin:$PATH; fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# DeepSpeed 0.19.8's JIT op builder cannot parse arch names like "9.0a" (ValueError: invalid
# literal for int() with base 10: '0a'); sm_90 code runs on H100/H200 all the same.
if [ -n "${TORCH_CUDA_ARCH_LIST:-}" ]; then export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST//a/}"; fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
$PY -c 'import torch, transformers, deepspeed; print("torch", torch.__version__, "transformers", transformers.__version__, "deepspeed", deepspeed.__version__, torch.cuda.get_device_name())'
# BENCH: which bench module runs in this environment (bench.gpu_cache_miss: why a relaunch misses the cache)
exec $PY -m "${BENCH:-bench.gpu_throughput}" --out "${OUT:-gpu_bench}" "$@"
