"""Config loading: every mistake fails at start-up naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchd.config import load_config
from batchd.errors import ConfigError
from tests.conftest import ROOT, write_config


def test_default_config_loads() -> None:
    config = load_config(ROOT / "config" / "default.toml")
    model = config.model("digits")
    assert config.server.default_model == "digits"
    assert model.checkpoint == (ROOT / "batchd" / "assets" / "digits.pt").resolve()
    assert model.batching.bucket_sizes == (1, 2, 4, 8, 16, 32)
    assert model.preprocess.color_mode == "L"
    assert model.source.builder == "batchd.digits:build_model"


def test_resnet18_config_parses(tmp_path: Path) -> None:
    text = (ROOT / "config" / "resnet18.toml").read_text()
    checkpoint = tmp_path / "r.pt"
    checkpoint.write_bytes(b"")
    text = text.replace("../checkpoints/resnet18-10.pt", str(checkpoint))
    (tmp_path / "r.toml").write_text(text)
    model = load_config(tmp_path / "r.toml").models[0]
    assert model.source.arch == "resnet18"
    assert (model.preprocess.resize, model.preprocess.crop) == (256, 224)
    assert len(model.labels) == 10


def test_buckets_default_to_powers_of_two(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", batching={"max_batch_size": 12, "buckets": []})
    assert load_config(path).models[0].batching.bucket_sizes == (1, 2, 4, 8, 12)


@pytest.mark.parametrize(
    ("batching", "server", "key"),
    [
        ({"max_batch_size": 0, "buckets": []}, {}, "models[0].batching.max_batch_size"),
        ({"buckets": [1, 64]}, {}, "models[0].batching.buckets"),
        ({"max_wait_ms": -1}, {}, "models[0].batching.max_wait_ms"),
        ({"max_batch_size": "8"}, {}, "models[0].batching.max_batch_size"),
        ({"surprise": 1}, {}, "models[0].batching.surprise"),
        ({}, {"port": 70000}, "server.port"),
        ({}, {"portt": 1}, "server.portt"),
        ({}, {"default_model": "nope"}, "server.default_model"),
        ({}, {"log_level": "loud"}, "server.log_level"),
        ({}, {"gil_switch_interval_ms": 0}, "server.gil_switch_interval_ms"),
        ({"priority_levels": 0}, {}, "models[0].batching.priority_levels"),
        ({"priority_levels": 2, "default_priority": 3}, {},
         "models[0].batching.default_priority"),
        ({"priority_share": 1.0}, {}, "models[0].batching.priority_share"),
        ({"levels": [{}, {}]}, {}, "models[0].batching.levels"),
        ({"priority_levels": 2, "levels": [{"max_queue_size": -1}]}, {},
         "models[0].batching.levels[0]"),
        ({"priority_levels": 2, "levels": [{"queue_timeout": 1}]}, {},
         "models[0].batching.levels[0].queue_timeout"),
        # TOML has nan and inf: accepted, they answered every prediction 500
        ({"queue_timeout_ms": float("nan")}, {}, "models[0].batching.queue_timeout_ms"),
        ({"max_wait_ms": float("inf")}, {}, "models[0].batching.max_wait_ms"),
        ({"priority_levels": 2, "levels": [{"queue_timeout_ms": float("nan")}]}, {},
         "models[0].batching.levels[0].queue_timeout_ms"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path: Path, batching: dict, server: dict,
                                      key: str) -> None:
    path = write_config(tmp_path / "bad.toml", batching=batching, server=server)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(path) in str(error.value)
    assert key in str(error.value)


def test_files_that_are_no_toml_and_odd_values_are_config_errors(tmp_path: Path) -> None:
    """Bytes that are not UTF-8, arrays nested past Python's recursion, a normalisation
    that is not finite, a tolerance that is not positive and a device index in another
    script's digits: each a ConfigError naming the file (and the key), never a traceback
    or a server that starts."""
    cases = {
        "bytes.toml": (b"[server]\nhost = \"\xff\xfe\"\n", "not valid TOML"),
        "deep.toml": (b"x = " + b"[" * 3000 + b"]" * 3000 + b"\n", "not valid TOML"),
    }
    for name, (content, words) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ConfigError, match=words):
            load_config(tmp_path / name)
    default = (ROOT / "config" / "default.toml").read_text()
    for old, new, key in (
            ("mean = [0.31]", "mean = [nan]", "models[0].preprocess.mean[0]"),
            ('device = "auto"', 'device = "cuda:\u0663"', "runtime.device"),
            ('device = "auto"', 'device = "auto"\ndtype_tolerance = -1.0',
             "runtime.dtype_tolerance")):
        assert old in default, old
        path = tmp_path / "odd.toml"
        path.write_text(default.replace(old, new).replace(
            '"../batchd/assets/digits.pt"', f'"{ROOT}/batchd/assets/digits.pt"'))
        with pytest.raises(ConfigError) as error:
            load_config(path)
        assert key in str(error.value) and str(path) in str(error.value), error.value


def test_a_builder_that_cannot_be_called_so_is_a_config_error(tmp_path: Path) -> None:
    """An empty builder name, or kwargs the builder does not take, name the key (they
    were a ValueError and a TypeError out of start-up)."""
    from batchd.checkpoint import build_network

    for builder, kwargs, words in ((":", {}, "source.builder"),
                                   ("batchd.digits:build_model", {"bogus": 1},
                                    "source.kwargs")):
        path = write_config(tmp_path / "b.toml", builder=builder, builder_kwargs=kwargs)
        with pytest.raises(ConfigError, match=words):
            build_network(load_config(path).models[0])


def test_missing_checkpoint_names_the_key(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", checkpoint=tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match=r"models\[0\]\.checkpoint.*missing\.pt"):
        load_config(path)


def test_source_needs_exactly_one_of_arch_or_builder(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml")
    path.write_text(path.read_text().replace("num_classes = 10",
                                             'num_classes = 10\narch = "resnet18"'))
    with pytest.raises(ConfigError, match=r"models\[0\]\.source"):
        load_config(path)


def test_wrong_number_of_mean_values(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml")
    path.write_text(path.read_text().replace("mean = [0.31]", "mean = [0.3, 0.3, 0.3]"))
    with pytest.raises(ConfigError, match=r"models\[0\]\.preprocess\.mean"):
        load_config(path)


def test_not_toml_and_not_found(tmp_path: Path) -> None:
    (tmp_path / "broken.toml").write_text("[server\n")
    with pytest.raises(ConfigError, match=r"broken\.toml: not valid TOML"):
        load_config(tmp_path / "broken.toml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")


def test_priority_levels_inherit_the_models_limits(tmp_path: Path) -> None:
    path = write_config(tmp_path / "p.toml", batching={
        "priority_levels": 3, "max_queue_size": 100, "queue_timeout_ms": 2000,
        "levels": [{"queue_timeout_ms": 250}, {"max_queue_size": 10}]})
    batching = load_config(path).models[0].batching
    assert batching.level_limits() == ((100, 250.0), (10, 2000.0), (100, 2000.0))
    assert batching.default_level == 3


def test_request_items_default_to_what_every_queue_holds(tmp_path: Path) -> None:
    """By default one request brings at most 4 x max_batch_size samples, or fewer where a
    level's queue holds fewer (a larger request could never be queued); a value set is
    kept."""
    def limit(**batching: object) -> int:
        path = write_config(tmp_path / "r.toml",
                            batching={"max_batch_size": 8, "buckets": [], **batching})
        return load_config(path).models[0].batching.request_item_limit

    assert limit(max_queue_size=100) == 32
    assert limit(max_queue_size=12) == 12
    assert limit(max_queue_size=100, priority_levels=2,
                 levels=[{"max_queue_size": 20}]) == 20
    assert limit(max_queue_size=12, max_request_items=16) == 16


def test_the_process_takes_the_switch_interval(tmp_path: Path) -> None:
    import sys

    from batchd.process import configure_process

    before = sys.getswitchinterval()
    path = write_config(tmp_path / "s.toml", server={"gil_switch_interval_ms": 0.5})
    try:
        configure_process(load_config(path))
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    finally:
        sys.setswitchinterval(before)
