"""The per-request baseline batchd must beat: the server most tutorials teach.

One Starlette route reads the upload (multipart or a raw body), decodes it and calls the
eval-mode model on a batch of one, inside the request, with the same model, checkpoint and
preprocessing as batchd (it reuses batchd's config loading and Preprocessor so the
comparison is about serving, not about preprocessing). Run by uvicorn, in the environment
a user would start it in:

    BATCHD_BASELINE_CONFIG=config/resnet18-64.toml uvicorn loadtest.baseline:app --port 8001
"""

from __future__ import annotations

import os

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from batchd.checkpoint import load_network
from batchd.config import load_config
from batchd.preprocess import Preprocessor

config = load_config(os.environ.get("BATCHD_BASELINE_CONFIG", "config/default.toml"))
model_config = config.model(config.server.default_model)
network, _ = load_network(model_config)
network.eval()
preprocessor = Preprocessor(model_config.preprocess)
labels = model_config.labels or tuple(str(i) for i in range(1000))


async def predict(request: Request) -> JSONResponse:
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async with request.form() as form:
            data = await form["file"].read()  # type: ignore[union-attr]
    else:
        data = await request.body()
    image = preprocessor.load(data)
    with torch.inference_mode():
        logits = network(preprocessor.normalize(image.unsqueeze(0)))[0]
    probs = torch.softmax(logits, dim=0)
    values, indices = torch.topk(probs, 3)
    return JSONResponse({"model": model_config.name, "predictions": [
        {"label": labels[i], "prob": float(v)}
        for v, i in zip(values.tolist(), indices.tolist(), strict=True)]})


async def ready(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ready"})


app = Starlette(routes=[Route("/predict", predict, methods=["POST"]),
                        Route("/ready", ready, methods=["GET"])])
