#!/usr/bin/env bash
# The GPU host's benchmark, for a machine with an NVIDIA GPU and no network (under 10
# minutes), in one run:
#   0. decoding on 1-16 threads in one process (loadtest.decode_scaling): the served
#      preprocessing, its decode and resize alone, and torchvision's decoder, with the
#      pixel difference against Pillow's;
#   1. ResNet-50, 1,000 classes, bf16, buckets up to 256: batchd in one process and with
#      the CPU plan's front ends (server.workers = 0), side by side, against the
#      per-request baseline and the in-process ceiling on the same GPU;
#   2. decoding on the GPU (preprocess.decode = "device"): its CUDA tests (the corruption
#      loop, memory, a corrupt JPEG in a batch), the parity against the CPU path on the
#      generated set (loadtest.parity_decode), and ResNet-50 again at 256 clients with the
#      JPEGs decoded in the batch, against its own device-decoding ceiling;
#   3. the same host's cores alone: ResNet-18 at 64x64 on runtime.device = "cpu", one
#      process against the plan's front ends, at 64 and 256 clients;
#   4. (only when asked: `gpu_check.sh overload`) the overload run of the overload-control
#      issue on the same cores alone: loadtest.overload --device cpu, both objectives,
#      Poisson and bursty at 1.5 and 3 C, and the priority flood (about 4 minutes).
# The argument picks steps: gpu (0-2), cpu (3), overload (4), comma-separated; the
# default, gpu,cpu, fits one 10-minute call, each step under its own timeout.
# Prints requests/s, p99, server CPU per request, the mean batch and the ratios to the
# baseline and to the ceiling.
#
# It installs nothing from the network: packages the machine lacks (starlette, uvicorn,
# python-multipart) must be carried as wheels in .whl/ (see docs/performance.md, GPU).
set -euo pipefail
STEPS="${1:-gpu,cpu}"
wants() { [[ ",$STEPS," == *",$1,"* ]]; }
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/batchd-site \
        .whl/*.whl
    export PYTHONPATH="/tmp/batchd-site:$PWD"
fi
# hey, when carried as a binary beside the wheels, is the cheaper load generator
[ -x .whl/hey ] && export PATH="$PWD/.whl:$PATH"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
echo "steps: $STEPS; $(nproc) cores"
if wants gpu; then
timeout 40 python3 -m loadtest.decode_scaling --threads 1,2,4,8,16 --seconds 1.2
[ -f checkpoints/resnet50-1000.pt ] || python3 -m loadtest.make_checkpoint \
    --arch resnet50 --num-classes 1000 --out checkpoints/resnet50-1000.pt
timeout 170 python3 -m loadtest.bench --workload resnet50-gpu --concurrency 32,256 \
    --requests-per-client 4 --min-requests 200 --ceiling-seconds 2 --workers 0 \
    --loadgen hey
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_device_decode.py || true
timeout 30 python3 -m loadtest.parity_decode --device cuda || true
timeout 120 python3 -m loadtest.bench --workload resnet50-gpu --decode device \
    --concurrency 256 --requests-per-client 4 --min-requests 400 --ceiling-seconds 2 \
    --workers 0 --loadgen hey || true
fi
if wants cpu; then
timeout 180 python3 -m loadtest.bench --workload resnet18-64 --device cpu \
    --concurrency 64,256 --requests-per-client 4 --min-requests 400 --ceiling-seconds 2 \
    --workers 1,0 --loadgen hey
fi
if wants overload; then
timeout 300 python3 -m loadtest.overload --device cpu --slo-ms 250,1000 --seconds 10
fi
