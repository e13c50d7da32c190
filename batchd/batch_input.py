"""A batch's inputs made into the model's input: encoded JPEGs decoded on the device
(batchd.device_decode), then every row stacked into one padded, normalised tensor of the
bucket's size in reusable buffers. Used on the model's thread only, one batch at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from batchd.device_decode import DeviceDecoder, is_encoded
from batchd.errors import BatchdError
from batchd.preprocess import Preprocessor


class BatchInput:
    """Assembles the batches of one model on `device`."""

    def __init__(self, preprocessor: Preprocessor, device: torch.device,
                 decoder: DeviceDecoder | None = None) -> None:
        self.preprocessor = preprocessor
        self.input_shape = preprocessor.input_shape
        self.device = device
        self.decoder = decoder
        self._staging: dict[int, torch.Tensor] = {}
        self._device_staging: dict[int, torch.Tensor] = {}

    def decoded(self, items: Sequence[torch.Tensor]
                ) -> tuple[list[torch.Tensor], dict[int, BatchdError]]:
        """The items with their encoded JPEGs decoded on the device (DeviceDecoder.pixels),
        and the error of each that did not decode."""
        if self.decoder is None:
            if any(is_encoded(item) for item in items):
                raise ValueError("an encoded image for a model whose preprocess.decode is "
                                 "'cpu'")
            return list(items), {}
        return self.decoder.pixels(items, self.input_shape)

    def assemble(self, items: Sequence[torch.Tensor], bucket: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One batch of `bucket` rows in `dtype` on the device: the items, then zero rows.

        uint8 images travel to the device as uint8 (a quarter of the bytes) and are
        normalised there, once for the whole batch; those decoded on the device are
        already there.
        """
        if len(items) > bucket:
            raise ValueError(f"{len(items)} items do not fit a bucket of {bucket}")
        for item in items:
            if tuple(item.shape) != self.input_shape:
                raise ValueError(f"input of shape {list(item.shape)}, expected "
                                 f"{list(self.input_shape)}")
        uint8 = all(item.dtype == torch.uint8 for item in items)
        # (by type: the model's "cuda" and a decoded image's "cuda:0" are one device)
        decoded_there = self.device.type != "cpu" and any(
            item.device.type == self.device.type for item in items)
        if uint8 and decoded_there:
            buffer = self._device_buffer(bucket)
            torch.stack([item.to(self.device, non_blocking=True) for item in items],
                        out=buffer[:len(items)])
            buffer[len(items):].zero_()
            return self.preprocessor.normalize(buffer).to(dtype)
        if uint8:
            staging = self.staging_buffer(bucket)
            torch.stack(list(items), out=staging[:len(items)])
            staging[len(items):].zero_()
            batch = self.preprocessor.normalize(staging.to(self.device, non_blocking=True))
            return batch.to(dtype)
        batch = torch.zeros((bucket, *self.input_shape), dtype=torch.float32, device=self.device)
        for index, item in enumerate(items):
            row = item.to(self.device, non_blocking=True).unsqueeze(0)
            batch[index] = self.preprocessor.normalize(row)[0] if item.dtype == torch.uint8 \
                else row[0].to(torch.float32)
        return batch.to(dtype)

    def staging_buffer(self, bucket: int) -> torch.Tensor:
        """A reusable uint8 host buffer per bucket; pinned on CUDA so the upload is async.

        Reuse is safe: the previous batch's output was copied back to the host (which
        waits for the stream) before the next batch is assembled on this same thread.
        """
        buffer = self._staging.get(bucket)
        if buffer is None:
            pin = self.device.type == "cuda"
            buffer = torch.zeros((bucket, *self.input_shape), dtype=torch.uint8, pin_memory=pin)
            self._staging[bucket] = buffer
        return buffer

    def _device_buffer(self, bucket: int) -> torch.Tensor:
        """A reusable uint8 buffer per bucket on the device, for batches decoded there
        (reused as the staging buffer is: the previous batch has finished by then)."""
        buffer = self._device_staging.get(bucket)
        if buffer is None:
            buffer = torch.empty((bucket, *self.input_shape), dtype=torch.uint8,
                                 device=self.device)
            self._device_staging[bucket] = buffer
        return buffer
