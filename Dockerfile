# batchd: CPU image by default (PyTorch's CPU wheels; see docs/deployment.md for measured sizes).
#   docker build -t batchd .
# CUDA image: the same base with PyTorch's CUDA wheels (they bundle the CUDA runtime; the
# node needs only the NVIDIA driver and container toolkit):
#   docker build -t batchd:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# Another base (BASE_IMAGE) needs: Python 3.11+ as `python3` with pip, Python's headers
# (inductor compiles C++ against Python.h at warm-up; without them batchd exits 1 there),
# g++ (installed here with apt-get when missing), and `useradd`. pip may install into the
# system Python (PIP_BREAK_SYSTEM_PACKAGES below, for bases that mark it externally
# managed). A base that already has torch and torchvision (Debian's python3-torch, say)
# builds with TORCH_SOURCE=base. `make image-check` builds such a base from Debian's
# packages where Docker Hub cannot be reached.
#
# PIP_ARGS goes to every pip step: a mirror (--index-url https://mirror/simple), or, as
# the check does, a wheel folder served over HTTP on the build host (--no-index
# --find-links http://127.0.0.1:PORT/ with --network host). Nothing in it ends up in a
# layer's files; a CA certificate or an index password belongs in a BuildKit secret,
# never in a build argument, which `docker history` shows.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_SOURCE=pip
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG PIP_ARGS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    TORCHINDUCTOR_CACHE_DIR=/home/batchd/.cache/torchinductor

# torch.compile's CPU backend (inductor) compiles C++ at start-up: it needs g++.
# hadolint ignore=DL3008
RUN if ! command -v g++ >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends g++ \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin batchd \
    && mkdir -p /home/batchd/.cache/torchinductor \
    && chown -R 10001:10001 /home/batchd/.cache

WORKDIR /app
# PIP_ARGS is split into options on purpose (hadolint takes it for an unpinned package).
# hadolint ignore=SC2086,DL3013
RUN if [ "${TORCH_SOURCE}" = pip ]; then \
        python3 -m pip install ${PIP_ARGS} --index-url "${TORCH_INDEX_URL}" \
            "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"; \
    else \
        python3 -c "import torch, torchvision; print('torch', torch.__version__, 'from the base')"; \
    fi

COPY pyproject.toml README.md ./
COPY batchd ./batchd
COPY config/default.toml ./config/default.toml
# The project itself, its dependencies within pyproject.toml's ranges, and its onnx extra:
# ONNX Runtime is a candidate runtime for every bucket, and on CPU it served ResNet-18 at
# 64x64 3x faster than eager at batch 1 (docs/runtimes.md); an image without it would
# serve slower than `make serve`. With torch from the base, its own dependencies are the
# base's business: a distribution's torch may declare pins (sympy==...) that its packaged
# neighbours do not meet, so pip is not asked; and pip cannot uninstall a distribution's
# packages, so ours go beside them (/usr/local).
# hadolint ignore=SC2086,DL3013
RUN if [ "${TORCH_SOURCE}" = pip ]; then \
        python3 -m pip install ${PIP_ARGS} ".[onnx]"; \
    else \
        python3 -c "import tomllib; project = tomllib.load(open('pyproject.toml', 'rb'))['project']; deps = project['dependencies'] + project['optional-dependencies']['onnx']; print('\n'.join(d for d in deps if not d.startswith('torch')))" > /tmp/requirements.txt \
        && python3 -m pip install ${PIP_ARGS} --ignore-installed -r /tmp/requirements.txt \
        && python3 -m pip install ${PIP_ARGS} --no-deps . \
        && rm /tmp/requirements.txt; \
    fi \
    && rm -rf build ./*.egg-info

USER 10001:10001
# 8000: HTTP; 8001: gRPC, where the config sets server.grpc_port (Triton's port for it)
EXPOSE 8000 8001
# `batchd health` reads the port from PID 1's own command line (--port, else the config's
# server.port), so the check follows whatever port the container is run with.
HEALTHCHECK --interval=10s --timeout=3s --start-period=180s --retries=3 \
    CMD ["batchd", "health"]
STOPSIGNAL SIGTERM
# Exec form, no shell in between: batchd runs as PID 1 and receives SIGTERM itself, so it
# drains the requests it accepted before exiting 0 (see docs/failures.md, Graceful shutdown).
ENTRYPOINT ["batchd", "serve"]
CMD ["--config", "config/default.toml", "--host", "0.0.0.0"]
