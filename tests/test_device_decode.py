"""Decoding on the device (preprocess.decode = "device"): the routing after the header
checks, the configuration errors, and the batch path with its per-image failures.

Without a GPU, the batch path runs through torchvision's CPU decoder (the tests add
"cpu" to batchd.model.DEVICE_DECODING, and to a server's processes through
BATCHD_DEVICE_DECODING_ALSO): the same routing, items, batches, slots, fallbacks and
metrics as on CUDA, where only the decoding call differs. The CUDA-only checks (parity,
the corruption loop, memory) are at the end, skipped without a device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

from batchd.config import PreprocessConfig, load_config
from batchd.device_decode import DeviceDecoder, encoded, is_encoded, route
from batchd.errors import BadInput, ConfigError
from batchd.preprocess import Preprocessor
from tests.conftest import png_bytes, run_server, write_config

pytestmark = pytest.mark.anyio

DIGITS_PREPROCESS = PreprocessConfig(resize=8, crop=8, mean=(0.31,), std=(0.38,),
                                     color_mode="L")


def jpeg(image: Image.Image, **save: Any) -> bytes:
    return png_bytes(image, "JPEG", quality=95, **save)


def corrupt(data: bytes) -> bytes:
    """A JPEG whose header passes every check but whose scan is cut short."""
    return data[:-10]


@pytest.fixture(scope="module")
def digits() -> list[Image.Image]:
    from batchd.digits import digit_images

    return digit_images("held_out")[0][:8]


def device_decoding_config(path: Path, server: dict[str, Any] | None = None,
                           **batching: Any) -> Path:
    """The digits model with decode = "device" on the device "auto" picks."""
    config = write_config(path, batching=batching or None, server=server)
    text = config.read_text().replace('color_mode = "L"', 'color_mode = "L"\ndecode = "device"')
    config.write_text(text.replace('device = "cpu"', 'device = "auto"'))
    return config


def test_route_sends_only_upright_baseline_jpegs_to_the_device(
        digits: list[Image.Image]) -> None:
    preprocessor = Preprocessor(DIGITS_PREPROCESS)
    rotated = digits[0].convert("RGB")
    exif, upright = Image.Exif(), Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to be upright
    upright[0x0112] = 1
    cases = {
        None: jpeg(digits[0]),
        "progressive": jpeg(digits[0], progressive=True),
        "format": png_bytes(digits[0]),
        "color_mode": jpeg(digits[0].convert("CMYK")),
        "exif_orientation": jpeg(rotated, exif=exif),
    }
    for reason, data in cases.items():
        assert route(preprocessor.open(data)) == reason
    # an orientation given only in XMP turns the image too, on the CPU path
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/'
           b'1999/02/22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/'
           b'tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    sideways = jpeg(Image.new("RGB", (16, 8), "red"), xmp=xmp)
    assert preprocessor.decode(sideways).size == (8, 16)
    assert route(preprocessor.open(sideways)) == "exif_orientation"
    assert route(preprocessor.open(jpeg(rotated, exif=upright))) is None
    assert route(preprocessor.open(jpeg(digits[0].convert("RGB")))) is None


def test_a_bad_image_in_a_batch_fails_alone(digits: list[Image.Image]) -> None:
    """Each image decoded in a batch is the image decoded alone; one that neither the
    decoder nor the CPU path decodes is its own BadInput, counted."""
    decoder = DeviceDecoder(Preprocessor(DIGITS_PREPROCESS), torch.device("cpu"))
    good = [encoded(jpeg(image)) for image in digits[:3]]
    alone = [decoder.decode([item])[0] for item in good]
    batch = decoder.decode([good[0], encoded(corrupt(jpeg(digits[3]))), good[1], good[2]])
    assert isinstance(batch[1], BadInput)
    for got, want in zip([batch[0], *batch[2:]], alone, strict=True):
        assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)
        assert got.shape == (1, 8, 8) and got.dtype == torch.uint8
        assert torch.equal(got, want)
    assert (decoder.stats.batches, decoder.stats.images) == (4, 7)
    assert (decoder.stats.refused, decoder.stats.failed) == (1, 1)


def test_device_pixels_are_close_to_pillows() -> None:
    """The tensor resize is the counterpart of Pillow's: a photo-like 640x480 JPEG at
    the ResNet preprocessing differs by at most one level, and rarely."""
    from batchd.bucket_runtimes import probe_jpeg

    preprocessor = Preprocessor(PreprocessConfig())
    data = probe_jpeg()
    cpu = preprocessor.load(data)
    device = DeviceDecoder(preprocessor, torch.device("cpu")).decode([encoded(data)])[0]
    assert isinstance(device, torch.Tensor) and device.shape == cpu.shape == (3, 224, 224)
    difference = (cpu.int() - device.int()).abs()
    assert difference.max().item() <= 1
    assert difference.float().mean().item() < 0.25


def test_an_image_the_device_refuses_is_exactly_the_cpu_paths(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused by the device decoder, an image is decoded, resized and cropped once, by
    Pillow, as with decode = "cpu" (and not resized again after)."""
    from batchd.bucket_runtimes import probe_jpeg

    preprocessor = Preprocessor(PreprocessConfig())
    decoder = DeviceDecoder(preprocessor, torch.device("cpu"))

    def refuse(images: list[torch.Tensor]) -> list[torch.Tensor]:
        raise RuntimeError("the decoder refuses it")

    monkeypatch.setattr(decoder, "_decode_all", refuse)
    data = probe_jpeg()
    (result,) = decoder.decode([encoded(data)])
    assert isinstance(result, torch.Tensor)
    assert torch.equal(result, preprocessor.load(data))
    assert (decoder.stats.refused, decoder.stats.failed) == (1, 0)


def test_out_of_device_memory_is_not_a_refused_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of memory raises (the model's thread turns it into 503 model_overloaded and
    counts the streak), rather than sending every image to Pillow."""
    decoder = DeviceDecoder(Preprocessor(DIGITS_PREPROCESS), torch.device("cpu"))

    def out_of_memory(images: list[torch.Tensor]) -> list[torch.Tensor]:
        raise torch.cuda.OutOfMemoryError("no room")

    monkeypatch.setattr(decoder, "_decode_all", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        decoder.decode([encoded(b"\xff\xd8")])
    assert decoder.stats.refused == 0


def test_encoded_items_are_one_dimensional() -> None:
    item = encoded(b"\xff\xd8\xff\xe0")
    assert is_encoded(item) and item.dtype == torch.uint8 and item.tolist() == [255, 216, 255, 224]
    assert not is_encoded(torch.zeros(1, 8, 8, dtype=torch.uint8))


def test_decode_device_with_a_cpu_device_names_the_key(tmp_path: Path) -> None:
    config = device_decoding_config(tmp_path / "digits.toml")
    config.write_text(config.read_text().replace('device = "auto"', 'device = "cpu"'))
    with pytest.raises(ConfigError, match=r"digits\.toml.*preprocess\.decode.*CUDA"):
        load_config(config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks the GPU here")
def test_decode_device_without_a_gpu_stops_start_up(tmp_path: Path) -> None:
    from batchd.model import ServedModel

    config = load_config(device_decoding_config(tmp_path / "digits.toml"))
    with pytest.raises(ConfigError, match=r"'digits'.*preprocess\.decode.*CUDA.*cpu"):
        ServedModel.from_config(config.models[0])


async def test_one_batch_mixes_device_and_cpu_decoding(
        tmp_path: Path, digits: list[Image.Image], monkeypatch: pytest.MonkeyPatch) -> None:
    """Held worker, one batch: two baseline JPEGs go encoded, a progressive JPEG and a PNG
    decode on the CPU, a corrupt JPEG is answered 400 alone. Every answer equals the
    offline model's on the same input; the metrics count each route."""
    monkeypatch.setattr("batchd.model.DEVICE_DECODING", {"cuda", "cpu"})
    bodies = [jpeg(digits[0]), jpeg(digits[1], progressive=True), png_bytes(digits[2]),
              corrupt(jpeg(digits[3])), jpeg(digits[4])]
    config = device_decoding_config(tmp_path / "digits.toml", max_batch_size=8, buckets=[8])
    with run_server(config) as server:
        model = server.app.state.runtime.slots["digits"].model
        batches = server.metric("batchd_batches_total")
        responses = await server.post_batched(bodies)
        assert [response.status_code for response in responses] == [200, 200, 200, 400, 200]
        assert responses[3].json()["reason"] == "bad_input"
        # one bucket, so no split: the first alone (it may have reached the held thread),
        # then the other four in one batch, encoded and decoded inputs mixed
        assert server.metric("batchd_batches_total") - batches <= 2
        assert server.metric("batchd_device_decode_images_total") == 3
        assert server.metric("batchd_device_decode_refused_total") == 1
        assert server.metric("batchd_device_decode_failed_total") == 1
        preprocessor = model.preprocessor
        offline = {0: encoded(bodies[0]), 1: preprocessor.load(bodies[1]),
                   2: preprocessor.load(bodies[2]), 4: encoded(bodies[4])}
        for index, item in offline.items():
            probabilities = torch.softmax(model.reference(item), 0)
            answer = {row["label"]: row["prob"]
                      for row in responses[index].json()["predictions"]}
            for label, probability in enumerate(probabilities.tolist()):
                assert answer[str(label)] == pytest.approx(probability, abs=1e-5)
        fallbacks = {reason: server.metric("batchd_decode_fallbacks_total", {"reason": reason})
                     for reason in ("format", "progressive", "color_mode", "exif_orientation")}
        assert fallbacks == {"format": 1, "progressive": 1, "color_mode": 0,
                             "exif_orientation": 0}
        # a request that names a non-image is still refused before anything queues
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            refused = await client.post("/predict", content=b"%PDF-1.4 nothing",
                                        headers={"content-type": "application/octet-stream"})
        assert refused.status_code == 415
        assert server.metric("batchd_device_decode_images_total") == 3 + 2  # the offline 2


def test_through_two_front_ends_and_the_engine(
        tmp_path: Path, digits: list[Image.Image], monkeypatch: pytest.MonkeyPatch) -> None:
    """server.workers = 2: the encoded JPEGs cross the shared-memory slots to the engine,
    which decodes them in its batches; the front ends count the fallbacks (summed in
    /metrics), the engine the device decoding. Answers equal the offline model's."""
    from batchd.model import ServedModel
    from tests.test_workers import serve_processes

    monkeypatch.setenv("BATCHD_DEVICE_DECODING_ALSO", "cpu")  # the server's processes too
    monkeypatch.setattr("batchd.model.DEVICE_DECODING", {"cuda", "cpu"})
    config = device_decoding_config(tmp_path / "digits.toml", server={"workers": 2},
                                    max_batch_size=8, buckets=[8])
    bodies = [*(jpeg(image) for image in digits), png_bytes(digits[0]),
              corrupt(jpeg(digits[1]))]
    model = ServedModel.from_config(load_config(config).models[0])
    with serve_processes(tmp_path, config=config) as server, httpx.Client(
            base_url=server.url, timeout=60) as client:
        for _ in range(3):
            for index, body in enumerate(bodies):
                response = client.post("/predict?top_k=10", content=body,
                                       headers={"content-type": "image/jpeg"})
                if index == len(bodies) - 1:
                    assert response.status_code == 400, response.text
                    continue
                assert response.status_code == 200, response.text
                item = encoded(body) if index < len(digits) else model.preprocessor.load(body)
                probabilities = torch.softmax(model.reference(item), 0).tolist()
                answer = {row["label"]: row["prob"] for row in response.json()["predictions"]}
                assert [answer[str(label)] for label in range(10)] == pytest.approx(
                    probabilities, abs=1e-5)
        assert server.metric("batchd_decode_fallbacks_total", {"reason": "format"}) == 3
        assert server.metric("batchd_device_decode_images_total") == 3 * (len(digits) + 1)
        assert server.metric("batchd_device_decode_failed_total") == 3


# -- on a CUDA device only ---------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_decoding_never_corrupts_and_holds_its_memory() -> None:
    """Thousands of batched decodes on the device, each compared with a reference decode
    of the same bytes; freed tensors with queued work on the stream between them (what
    corrupts an unsynchronised nvJPEG). Memory after the loop equals memory after the
    first hundred batches."""
    from batchd.bucket_runtimes import probe_jpeg

    device = torch.device("cuda")
    decoder = DeviceDecoder(Preprocessor(PreprocessConfig()), device)
    images = [encoded(probe_jpeg(640 - 32 * index, 480)) for index in range(8)]
    reference = [decoder.decode([image])[0] for image in images]
    assert all(isinstance(item, torch.Tensor) and item.shape == (3, 224, 224)
               and item.device.type == "cuda" for item in reference)
    mismatches, used_at_100 = 0, 0
    for round_ in range(2000):
        scratch = torch.randn(2048, 2048, device=device)
        total = (scratch @ scratch).sum()  # queued work that reads `scratch`...
        del scratch  # ...freed to the allocator while it still runs
        batch = decoder.decode(images)
        mismatches += sum(not torch.equal(got, want) for got, want in  # type: ignore[arg-type]
                          zip(batch, reference, strict=True))
        total.item()
        if round_ == 100:
            used_at_100 = torch.cuda.memory_allocated(device)
    assert mismatches == 0
    assert torch.cuda.memory_allocated(device) <= used_at_100 + 16 * 2**20


@needs_cuda
def test_cuda_batch_with_fallbacks_and_a_corrupt_jpeg(digits: list[Image.Image]) -> None:
    decoder = DeviceDecoder(Preprocessor(DIGITS_PREPROCESS), torch.device("cuda"))
    batch = decoder.decode([encoded(jpeg(digits[0])), encoded(corrupt(jpeg(digits[1]))),
                            encoded(jpeg(digits[2]))])
    assert isinstance(batch[1], BadInput)
    assert all(isinstance(item, torch.Tensor) and item.device.type == "cuda"
               and item.shape == (1, 8, 8) for item in (batch[0], batch[2]))


@needs_cuda
def test_cuda_model_serves_a_mixed_batch_at_its_input_shape(
        tmp_path: Path, digits: list[Image.Image]) -> None:
    """A model on "cuda" (no index) runs a batch of device-decoded and CPU-decoded
    images: the rows are stacked on the device at the model's input shape."""
    from batchd.model import ServedModel

    config = load_config(device_decoding_config(tmp_path / "digits.toml"))
    model = ServedModel.from_config(config.models[0])
    assert model.device.type == "cuda" and model.device_decoder is not None
    pixels = model.preprocessor.load(png_bytes(digits[1]))
    rows = model.run_batch([encoded(jpeg(digits[0])), pixels, encoded(jpeg(digits[2]))], 4)
    assert all(isinstance(row, torch.Tensor) and row.shape == (10,) for row in rows)
    assert torch.allclose(rows[1], model.reference(pixels), atol=1e-4)  # type: ignore[arg-type]


def test_routing_counts_nothing_for_cpu_models(tmp_path: Path,
                                               digits: list[Image.Image]) -> None:
    """Without decode = "device" nothing changes: no fallback or device series at all."""
    with run_server(write_config(tmp_path / "digits.toml")) as server:
        with server.client() as client:
            answer = client.post("/predict", content=jpeg(digits[0]),
                                 headers={"content-type": "image/jpeg"})
        assert answer.status_code == 200
        text = httpx.get(f"{server.url}/metrics").text
        assert "batchd_device_decode_images_total" not in text
        assert 'batchd_decode_fallbacks_total{' not in text

