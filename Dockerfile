# batchd: CPU image by default.
#   docker build -t batchd .
# CUDA image: the same Python base with PyTorch's CUDA wheels (they bundle the CUDA
# runtime; the node needs only the NVIDIA driver and container toolkit):
#   docker build -t batchd:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# or any other base with Python 3.11+: --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCHINDUCTOR_CACHE_DIR=/home/batchd/.cache/torchinductor

# torch.compile's CPU backend (inductor) compiles C++ at start-up: it needs g++.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin batchd

WORKDIR /app
RUN pip install --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

COPY pyproject.toml README.md ./
COPY batchd ./batchd
COPY config ./config
RUN pip install .

USER 10001:10001
EXPOSE 8000
# `batchd health` reads the port from PID 1's own command line (--port, else the config's
# server.port), so the check follows whatever port the container is run with.
HEALTHCHECK --interval=10s --timeout=3s --start-period=180s --retries=3 \
    CMD ["batchd", "health"]
STOPSIGNAL SIGTERM
# Exec form, no shell in between: batchd runs as PID 1 and receives SIGTERM itself, so it
# drains the requests it accepted before exiting 0 (see README, Graceful shutdown).
ENTRYPOINT ["batchd", "serve"]
CMD ["--config", "config/default.toml", "--host", "0.0.0.0"]
