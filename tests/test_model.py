"""Model loading (strict, weights_only, eval) and the batch runner's padding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from batchd.checkpoint import load_network
from batchd.config import load_config
from batchd.digits import build_model
from batchd.errors import CheckpointError
from batchd.model import ServedModel
from tests.conftest import DIGITS_CHECKPOINT, write_config


def digits_config(tmp_path: Path, checkpoint: Path = DIGITS_CHECKPOINT):  # type: ignore[no-untyped-def]
    return load_config(write_config(tmp_path / "c.toml", checkpoint=checkpoint)).models[0]


def test_loads_in_eval_mode(tmp_path: Path) -> None:
    network, _ = load_network(digits_config(tmp_path))
    assert not network.training
    assert all(not module.training for module in network.modules())


def test_training_checkpoint_with_model_key(tmp_path: Path) -> None:
    state = torch.load(DIGITS_CHECKPOINT, weights_only=True)
    path = tmp_path / "train.pt"
    torch.save({"model": state, "epoch": 40, "optimizer": {"lr": torch.tensor(0.1)}}, path)
    network, _ = load_network(digits_config(tmp_path, path))
    assert torch.equal(network.state_dict()["0.weight"], state["0.weight"])


def test_mismatched_head_names_keys_and_shapes(tmp_path: Path) -> None:
    path = tmp_path / "eleven.pt"
    torch.save(build_model(num_classes=11).state_dict(), path)
    with pytest.raises(CheckpointError) as error:
        load_network(digits_config(tmp_path, path))
    message = str(error.value)
    assert "shape of 11.weight: checkpoint has [11, 64], model expects [10, 64]" in message
    assert "shape of 11.bias" in message


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    state = torch.load(DIGITS_CHECKPOINT, weights_only=True)
    state["extra.weight"] = torch.zeros(2, 2)
    del state["0.bias"]
    path = tmp_path / "keys.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        load_network(digits_config(tmp_path, path))
    assert "missing keys: 0.bias [32]" in str(error.value)
    assert "unexpected keys: extra.weight [2, 2]" in str(error.value)


class Pickled:
    """Not a tensor: weights_only loading must refuse it."""


def test_pickled_object_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "object.pt"
    torch.save({"model": build_model(), "thing": Pickled()}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_network(digits_config(tmp_path, path))


def test_padding_never_changes_an_answer(tmp_path: Path) -> None:
    config = digits_config(tmp_path)
    model = ServedModel.from_config(config.with_runtime(compile=False))
    torch.manual_seed(0)
    items = [torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8) for _ in range(5)]
    alone = [model.reference(item) for item in items]
    for bucket in (5, 8, 32):
        rows = model.run_batch(items, bucket)
        assert len(rows) == 5
        for row, want in zip(rows, alone, strict=True):
            torch.testing.assert_close(row, want, atol=1e-5, rtol=1e-5)


def test_top_k_is_sorted_and_labelled(tmp_path: Path) -> None:
    model = ServedModel.from_config(digits_config(tmp_path))
    logits = torch.tensor([0.0, 3.0, 1.0, 0, 0, 0, 0, 0, 0, 2.0])
    top = model.top_k(logits, 3)
    assert [label for label, _ in top] == ["1", "9", "2"]
    assert top[0][1] == pytest.approx(float(torch.softmax(logits, 0)[1]))


def test_bfloat16_runs_within_its_checked_tolerance(tmp_path: Path) -> None:
    config = digits_config(tmp_path)
    eager = ServedModel.from_config(config.with_runtime(compile=False))
    low = ServedModel.from_config(config.with_runtime(compile=False, dtype="bfloat16"))
    assert low.low_precision_error is not None and 0 < low.low_precision_error <= 0.01
    torch.manual_seed(1)
    items = [torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8) for _ in range(3)]
    for row, item in zip(low.run_batch(items, 4), items, strict=True):
        assert row.dtype == torch.float32
        difference = torch.softmax(row, 0) - torch.softmax(eager.reference(item), 0)
        assert float(difference.abs().max()) < 0.02
    strict = config.with_runtime(compile=False, dtype="bfloat16", dtype_tolerance=1e-9)
    with pytest.raises(CheckpointError, match="dtype_tolerance"):
        ServedModel.from_config(strict)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_matches_cpu(tmp_path: Path) -> None:
    config = digits_config(tmp_path)
    cpu = ServedModel.from_config(config.with_runtime(compile=False))
    gpu = ServedModel.from_config(config.with_runtime(compile=False, device="cuda"))
    items = [torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8) for _ in range(5)]
    assert gpu.inputs.staging_buffer(8).is_pinned()
    for row, item in zip(gpu.run_batch(items, 8), items, strict=True):
        torch.testing.assert_close(row, cpu.reference(item), atol=1e-4, rtol=1e-4)
