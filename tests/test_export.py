"""Export with verified parity, serving the artifacts, and `batchd inspect`."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from batchd.checkpoint import load_network
from batchd.config import load_config
from batchd.digits import build_model
from batchd.errors import CheckpointError, ConfigError
from batchd.export import ParityError, export_model, seeded_inputs, trace_torchscript
from batchd.model import ServedModel
from tests.conftest import (
    DIGITS_CHECKPOINT,
    ROOT,
    digits_model_table,
    png_bytes,
    run_server,
    write_config,
)

FORMATS = {"torchscript": ".ts", "exported": ".pt2", "onnx": ".onnx"}
SERVED_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def digits_config(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = write_config(tmp_path_factory.mktemp("export") / "c.toml")
    return load_config(path).models[0]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, digits_config: Any) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("artifacts")
    made = {}
    for fmt, suffix in FORMATS.items():
        out = folder / f"digits{suffix}"
        report = export_model(digits_config, fmt, out, progress=lambda line: None)  # type: ignore[arg-type]
        assert report.ok
        assert report.batch_sizes == (1, 8, 32)  # 1, the middle bucket, the largest
        made[fmt] = out
    return made


def test_every_format_exports_with_parity(artifacts: dict[str, Path]) -> None:
    for fmt, path in artifacts.items():
        assert path.is_file() and path.stat().st_size > 100_000, fmt
        assert not list(path.parent.glob(".*")), "no temporary files left behind"


def test_cli_export_prints_the_difference(tmp_path: Path) -> None:
    out = tmp_path / "digits.ts"
    result = subprocess.run(
        [sys.executable, "-m", "batchd", "export", "--config", str(ROOT / "config/default.toml"),
         "--format", "torchscript", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "max |exported - eager| =" in result.stdout
    assert "parity PASS" in result.stdout
    assert out.is_file()


def test_failed_parity_leaves_no_file_and_exits_non_zero(tmp_path: Path,
                                                         digits_config: Any) -> None:
    out = tmp_path / "digits.onnx"
    with pytest.raises(ParityError, match="no file written"):
        # onnxruntime differs from eager by ~1e-6: a zero tolerance must fail
        export_model(digits_config, "onnx", out, tolerance=0.0, progress=lambda line: None)
    assert list(tmp_path.iterdir()) == []
    result = subprocess.run(
        [sys.executable, "-m", "batchd", "export", "--config", str(ROOT / "config/default.toml"),
         "--format", "onnx", "--out", str(out), "--tolerance", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "parity FAIL" in result.stdout
    assert not out.exists()


def test_a_train_mode_trace_is_the_trap_export_avoids(digits_config: Any) -> None:
    network, _ = load_network(digits_config)
    inputs = seeded_inputs((1, 8, 8), 16)
    with torch.no_grad():
        eager = network(inputs)
        network.train()
        with warnings.catch_warnings():  # the tracer rightly warns about train-mode branches
            warnings.simplefilter("ignore")
            train_trace = torch.jit.trace(network, inputs)
        train_trace_eval_output = train_trace(inputs)
    # BatchNorm in the train-mode trace used this batch's statistics, not the running ones.
    assert not torch.allclose(train_trace_eval_output, eager, atol=1e-3)
    with pytest.raises(ValueError, match="train mode"):
        trace_torchscript(network, inputs, Path("/nonexistent/never-written.ts"))
    network.eval()


def artifact_config(tmp_path: Path, artifacts: dict[str, Path]) -> Path:
    blocks = [digits_model_table(f"digits-{fmt}", source={"artifact": str(path)},
                                 checkpoint=None, candidates=None,
                                 batching={"max_batch_size": 8, "buckets": [1, 4, 8],
                                           "max_wait_ms": 20})
              for fmt, path in artifacts.items()]
    path = tmp_path / "artifacts.toml"
    path.write_text('[server]\nhost = "127.0.0.1"\nport = 0\n' + "".join(blocks))
    return path


def test_artifacts_serve_like_the_eager_model(tmp_path: Path, artifacts: dict[str, Path],
                                              digits_config: Any,
                                              held_out: tuple[list[Any], list[int]]) -> None:
    eager = ServedModel.from_config(digits_config.with_runtime(compile=False))
    images = held_out[0][:12]
    expected = [torch.softmax(eager.reference(eager.preprocessor.load(i)), 0) for i in images]

    async def predict_all(url: str, model: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return list(await asyncio.gather(*(
                client.post(f"/models/{model}/predict?top_k=10", content=png_bytes(image),
                            headers={"content-type": "image/png"}) for image in images)))

    with run_server(artifact_config(tmp_path, artifacts)) as server:
        for fmt in FORMATS:
            responses = asyncio.run(predict_all(server.url, f"digits-{fmt}"))
            for response, want in zip(responses, expected, strict=True):
                assert response.status_code == 200, (fmt, response.text)
                for prediction in response.json()["predictions"]:
                    assert prediction["prob"] == pytest.approx(
                        float(want[int(prediction["label"])]), abs=SERVED_TOLERANCE), fmt
        assert server.metric("batchd_batch_size_count", {"model": "digits-onnx"}) < 12


def test_artifact_config_rules(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    path = artifact_config(tmp_path, {"onnx": artifacts["onnx"]})
    path.write_text(path.read_text().replace("compile = false", "compile = true"))
    with pytest.raises(ConfigError, match=r"models\[0\]\.runtime\.compile"):
        load_config(path)
    path = artifact_config(tmp_path, {"exported": artifacts["exported"]})
    with_checkpoint = f'checkpoint = "{DIGITS_CHECKPOINT}"\n[models.source]'
    path.write_text(path.read_text().replace("[models.source]", with_checkpoint, 1))
    with pytest.raises(ConfigError, match=r"models\[0\]\.checkpoint"):
        load_config(path)


def test_inspect_lists_tensors_and_explains_a_mismatch(tmp_path: Path) -> None:
    checkpoint = tmp_path / "trained.pt"
    torch.save({"model": build_model(num_classes=12).state_dict(), "epoch": 7,
                "classes": [f"class-{i}" for i in range(12)]}, checkpoint)
    config = write_config(tmp_path / "c.toml")
    result = subprocess.run(
        [sys.executable, "-m", "batchd", "inspect", str(checkpoint), "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    out = result.stdout
    assert "a training checkpoint: state_dict under 'model'" in out
    assert "epoch: 7" in out
    assert "0.weight               32x1x3x3" in out
    assert "shape of 11.weight: checkpoint has [12, 64], model expects [10, 64]" in out
    assert "trained for 12 classes, but the config's source.num_classes is 10" in out
    fits = subprocess.run(
        [sys.executable, "-m", "batchd", "inspect", str(DIGITS_CHECKPOINT), "--config",
         str(config)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert fits.returncode == 0
    assert "a bare state_dict" in fits.stdout
    assert "fits model 'digits'" in fits.stdout


def test_checkpoint_classes_are_used_or_must_agree(tmp_path: Path) -> None:
    state = torch.load(DIGITS_CHECKPOINT, weights_only=True)
    checkpoint = tmp_path / "with-classes.pt"
    classes = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    torch.save({"model": state, "classes": classes}, checkpoint)
    config_path = write_config(tmp_path / "c.toml", checkpoint=checkpoint)
    config = load_config(config_path).models[0]
    without_labels = dataclasses.replace(config, labels=())
    assert ServedModel.from_config(without_labels).labels == tuple(classes)
    with pytest.raises(CheckpointError, match="disagree"):
        ServedModel.from_config(config)  # the config's labels are "0".."9"
