"""Config loading: defaults, layering, validation messages, round trip."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

import processors
from stream.config import (
    EMBEDDED_DEFAULT_OVERRIDES,
    Config,
    ConfigError,
    ModelConfig,
    load_config,
    parse_address,
)
from stream.protocol import Dims

HOME_ENV = {"HOME": "/home/op"}


def load(**overrides: object) -> Config:
    return load_config(env=HOME_ENV, overrides=overrides or None)


def test_defaults() -> None:
    cfg = load_config(env=HOME_ENV)
    assert cfg.ingest.tcp == "127.0.0.1:7400"
    assert cfg.ingest.udp == "127.0.0.1:7400"
    assert cfg.ingest.max_frame_bytes == 1 << 20
    assert (cfg.ingest.queue, cfg.ingest.udp_buffer) == (8192, 8192)
    assert cfg.output.tcp == "127.0.0.1:7401"
    assert (cfg.output.jsonl, cfg.output.stdout, cfg.output.subscriber_buffer) == ("", False, 4096)
    assert cfg.metrics.listen == "127.0.0.1:9400"
    assert cfg.batching.buckets == (1, 8, 32, 64, 96, 128, 192, 256)
    assert cfg.batching.max_wait_ms == 0.5
    assert cfg.batching.adaptive is False
    assert cfg.batching.slo_p99_ms == 5.0
    m = cfg.model
    assert (m.state_dim, m.proprio_dim, m.tactile_dim, m.motor_dim) == (32, 64, 32, 32)
    assert (m.retention_depth, m.protention_horizon, m.hidden_dim) == (10, 5, 64)
    assert (m.som_grid, m.attention_heads, m.seed, m.params) == ((20, 20), 2, 0, "")
    assert cfg.state.checkpoint_interval_s == 5.0
    assert cfg.state.max_streams == 4096
    assert (cfg.synthetic.streams, cfg.synthetic.rate_hz) == (0, 100.0)
    assert cfg.device.count == 1
    assert (cfg.log.level, cfg.log.status_interval_s) == ("info", 1.0)
    assert cfg.dims == Dims(32, 64, 32, 32)


def test_default_directories_follow_xdg_or_home() -> None:
    cfg = load_config(env=HOME_ENV)
    assert cfg.state.dir == "/home/op/.local/state/enactive-stream"
    assert cfg.device.compilation_cache_dir == "/home/op/.cache/enactive-stream/jax"
    xdg = {**HOME_ENV, "XDG_STATE_HOME": "/xs", "XDG_CACHE_HOME": "/xc"}
    cfg = load_config(env=xdg)
    assert cfg.state.dir == "/xs/enactive-stream"
    assert cfg.device.compilation_cache_dir == "/xc/enactive-stream/jax"
    explicit = load_config(env=xdg, overrides={"state.dir": "/data/st"})
    assert explicit.state.dir == "/data/st"


def test_config_is_frozen() -> None:
    cfg = load_config(env=HOME_ENV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batching.max_wait_ms = 3.0  # type: ignore[misc]


def test_file_then_env_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        "[batching]\nmax_wait_ms = 1.5\nbuckets = [2, 4]\n"
        '[ingest]\ntcp = "127.0.0.1:9000"\nqueue = 10\n'
        "[model]\nseed = 7\n"
    )
    env = {
        **HOME_ENV,
        "ENACTIVE_BATCHING_MAX_WAIT_MS": "5",
        "ENACTIVE_INGEST_TCP": "127.0.0.1:0",
        "ENACTIVE_BATCHING_BUCKETS": "[1, 8]",
        "ENACTIVE_OUTPUT_STDOUT": "true",
        "ENACTIVE_MODEL_PARAMS": "123",  # a file name, even though it looks like a number
        "UNRELATED": "x",
    }
    cfg = load_config(path, env=env, overrides={"ingest.tcp": "127.0.0.1:1", "model.seed": 9})
    assert cfg.batching.max_wait_ms == 5.0  # env beats file
    assert isinstance(cfg.batching.max_wait_ms, float)
    assert cfg.batching.buckets == (1, 8)  # env list parsed as TOML
    assert cfg.ingest.tcp == "127.0.0.1:1"  # override beats env
    assert cfg.ingest.queue == 10  # file beats default
    assert cfg.model.seed == 9  # override beats file
    assert cfg.output.stdout is True
    assert cfg.model.params == "123"


def test_string_overrides_are_parsed_like_env() -> None:
    cfg = load(**{"batching.max_wait_ms": "0.5", "batching.buckets": "[4, 16]"})
    assert cfg.batching.max_wait_ms == 0.5
    assert cfg.batching.buckets == (4, 16)


def test_enactive_config_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "via-env.toml"
    path.write_text("[synthetic]\nstreams = 3\n")
    env = {**HOME_ENV, "ENACTIVE_CONFIG": str(path)}
    assert load_config(env=env).synthetic.streams == 3
    other = tmp_path / "explicit.toml"
    other.write_text("[synthetic]\nstreams = 5\n")
    assert load_config(other, env=env).synthetic.streams == 5  # an explicit path wins


def test_embedded_default_overrides() -> None:
    cfg = load_config(env=HOME_ENV, overrides=EMBEDDED_DEFAULT_OVERRIDES)
    assert (cfg.synthetic.streams, cfg.synthetic.rate_hz) == (64, 100.0)
    base = load_config(env=HOME_ENV)
    assert dataclasses.replace(cfg, synthetic=base.synthetic) == base


@pytest.mark.parametrize(
    ("key", "value", "expect"),
    [
        ("batching.max_wait_ms", -1, "batching.max_wait_ms = -1: must be a number in [0, 1000]"),
        ("batching.max_wait_ms", 1001.5, "= 1001.5: must be a number in [0, 1000]"),
        ("batching.max_wait_ms", True, "= true: must be a number in [0, 1000]"),
        ("batching.buckets", [], "batching.buckets = []: must be a non-empty"),
        ("batching.buckets", [8, 1], "did you mean [1, 8]?"),
        ("batching.buckets", [1, 1, 8], "did you mean [1, 8]?"),
        ("batching.buckets", [0, 8], "integers in [1, 65536]"),
        ("batching.buckets", [1, 65537], "integers in [1, 65536]"),
        ("batching.buckets", [1.0, 8], "integers in [1, 65536]"),
        ("batching.slo_p99_ms", 0, "batching.slo_p99_ms = 0: must be a number in (0, 60000]"),
        ("batching.adaptive", 1, "batching.adaptive = 1: must be a boolean"),
        ("ingest.tcp", "7400", 'ingest.tcp = "7400": must be "host:port"'),
        ("ingest.tcp", ":7400", "port in [0, 65535]"),
        ("ingest.udp", "127.0.0.1:65536", 'ingest.udp = "127.0.0.1:65536"'),
        ("ingest.udp", "::1:7400", "[::1]:7400"),
        ("metrics.listen", 9400, "metrics.listen = 9400: must be a string"),
        ("ingest.max_frame_bytes", 63, "ingest.max_frame_bytes = 63: must be an integer in [64,"),
        ("ingest.max_frame_bytes", (64 << 20) + 1, "[64, 67108864]"),
        ("ingest.queue", 0, "ingest.queue = 0: must be an integer in [1,"),
        ("ingest.queue", True, "ingest.queue = true: must be an integer"),
        ("ingest.udp_buffer", 1.5, "ingest.udp_buffer = 1.5: must be an integer"),
        ("output.subscriber_buffer", 0, "output.subscriber_buffer = 0"),
        ("output.stdout", "yes", 'output.stdout = "yes": must be a boolean'),
        ("model.state_dim", 0, "model.state_dim = 0: must be an integer in [1, 4096]"),
        ("model.proprio_dim", 4097, "model.proprio_dim = 4097: must be an integer in [1, 4096]"),
        ("model.hidden_dim", -3, "model.hidden_dim = -3"),
        ("model.attention_heads", 3, "model.attention_heads = 3: must divide model.state_dim"),
        ("model.attention_heads", 0, "model.attention_heads = 0: must be an integer in [1,"),
        ("model.attention_heads", 64, "model.attention_heads = 64: must divide model.state_dim"),
        ("model.retention_depth", 1025, "model.retention_depth = 1025: must be an integer in"),
        ("model.protention_horizon", 257, "= 257: must be an integer in [1, 256]"),
        ("model.som_grid", [20], "model.som_grid = [20]: must be a list of 2 integers in [1, 128]"),
        ("model.som_grid", [20, 129], "[1, 128]"),
        ("model.seed", -1, "model.seed = -1"),
        ("state.max_streams", 0, "state.max_streams = 0: must be an integer in [1, 10000000]"),
        ("state.max_known_streams", 10, "state.max_known_streams = 10: must be at least"),
        ("state.max_streams", 100, "must be at least the largest batching bucket, 256"),
        ("state.max_streams", 10_000_001, "[1, 10000000]"),
        ("state.checkpoint_interval_s", 0, "= 0: must be a number in (0, 86400]"),
        ("state.checkpoint_interval_s", 86401, "= 86401: must be a number in (0, 86400]"),
        ("synthetic.streams", -1, "synthetic.streams = -1: must be an integer in [0, 1000000]"),
        ("synthetic.rate_hz", 0, "synthetic.rate_hz = 0: must be a number in (0, 100000]"),
        ("synthetic.rate_hz", float("nan"), "synthetic.rate_hz = nan"),
        ("device.count", 0, "device.count = 0: must be an integer in [1,"),
        ("log.level", "loud", "log.level = \"loud\": must be one of 'debug', 'info', 'warning'"),
        ("log.status_interval_s", -1, "log.status_interval_s = -1: must be a number in [0,"),
    ],
)
def test_validation_messages(key: str, value: object, expect: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(**{key: value})
    message = str(info.value)
    assert expect in message
    assert message.startswith(f"{key} = "), message
    assert f"override {key}" in message  # says where the bad value came from


def test_log_format_is_text_or_json() -> None:
    assert load().log.format == "text"
    assert load(**{"log.format": "json"}).log.format == "json"
    assert load_config(env={**HOME_ENV, "ENACTIVE_LOG_FORMAT": "json"}).log.format == "json"
    with pytest.raises(ConfigError, match=r"log.format = \"xml\": must be one of 'text', 'json'"):
        load(**{"log.format": "xml"})


def test_attention_heads_message_lists_divisors() -> None:
    with pytest.raises(ConfigError, match=r"choose one of 1, 2, 4, 8, 16, 32"):
        load(**{"model.attention_heads": 3})
    assert load(**{"model.attention_heads": 8, "model.state_dim": 64}).model.attention_heads == 8


def test_model_sizes_past_what_the_model_takes_are_config_errors() -> None:
    # `check-config` once accepted this and `run` then died in a worker thread.
    with pytest.raises(ConfigError) as info:
        load(**{"model.retention_depth": 2000})
    message = str(info.value)
    assert message.startswith("model.retention_depth = 2000: must be an integer in [1, 1024]")
    assert processors.MODEL_BOUNDS["retention_depth"] == (1, 1024)  # the bound is the model's


_SIZES = [f.name for f in dataclasses.fields(ModelConfig) if f.name in processors.MODEL_BOUNDS]


@pytest.mark.parametrize("key", _SIZES)
def test_model_sizes_take_default_and_bounds_from_processors(key: str) -> None:
    lo, hi = processors.MODEL_BOUNDS[key]
    model = processors.ModelConfig()
    assert getattr(load().model, key) == getattr(model, key)

    def at(v: int) -> dict[str, object]:
        if key == "som_grid":
            return {"model.som_grid": [v, v]}
        if key == "attention_heads":  # it must divide state_dim too
            return {"model.attention_heads": v, "model.state_dim": min(max(v, 1), hi)}
        return {f"model.{key}": v, "model.attention_heads": 1}

    for v in (lo, hi):  # what loads, the model takes
        got = getattr(load(**at(v)).model_config, key)
        assert got == ((v, v) if key == "som_grid" else v)
    for v in (lo - 1, hi + 1):
        with pytest.raises(ConfigError, match=re.escape(f"model.{key} = ")) as info:
            load(**at(v))
        assert f"[{lo}, {hi}]" in str(info.value)


def test_model_config_is_the_models() -> None:
    cfg = load(**{"model.state_dim": 16, "model.som_grid": [4, 5], "model.attention_heads": 4})
    assert cfg.model_config == processors.ModelConfig(
        state_dim=16, som_grid=(4, 5), attention_heads=4
    )


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_env_value_error_names_the_variable() -> None:
    env = {**HOME_ENV, "ENACTIVE_BATCHING_MAX_WAIT_MS": "-1"}
    with pytest.raises(ConfigError) as info:
        load_config(env=env)
    assert "batching.max_wait_ms = -1: must be a number in [0, 1000]" in str(info.value)
    assert "ENACTIVE_BATCHING_MAX_WAIT_MS" in str(info.value)


@pytest.mark.parametrize(
    ("where", "expect"),
    [
        ("file:[batching]\nmax_wait = 1\n", "unknown key batching.max_wait"),
        ("file:[batchin]\nmax_wait_ms = 1\n", "unknown section [batchin]"),
        ("file:streams = 3\n", "must be inside a [section]"),
        ("env:ENACTIVE_BATCHING_MAXWAIT_MS", "unknown key batching.maxwait_ms"),
        ("env:ENACTIVE_NOPE_X", "unknown section [nope]"),
        ("override:batching.max_wait", "unknown key batching.max_wait"),
        ("override:nosuch", "unknown section [nosuch]"),
    ],
)
def test_unknown_keys_are_errors(tmp_path: Path, where: str, expect: str) -> None:
    kind, _, what = where.partition(":")
    path, env, overrides = None, dict(HOME_ENV), {}
    if kind == "file":
        path = tmp_path / "c.toml"
        path.write_text(what)
    elif kind == "env":
        env[what] = "1"
    else:
        overrides[what] = 1
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env, overrides=overrides)
    message = str(info.value)
    assert expect in message
    assert "valid" in message  # the valid names are listed


def test_unknown_key_suggests_and_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as info:
        load(**{"batching.max_wait": 1})
    message = str(info.value)
    assert "did you mean 'max_wait_ms'?" in message
    assert "buckets, max_wait_ms, adaptive, slo_p99_ms" in message


def test_bad_toml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[batching]\nmax_wait_ms = 1\nthis is not toml\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env=HOME_ENV)
    assert str(path) in str(info.value)
    assert "line 3" in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.toml", env=HOME_ENV)


def test_to_toml_round_trips(tmp_path: Path) -> None:
    cfg = load(
        **{
            "ingest.tcp": "[::1]:0",
            "ingest.udp": "",
            "output.jsonl": 'out "quoted" \\ dir\tx/m.jsonl',
            "batching.buckets": [2, 16, 128],
            "batching.max_wait_ms": 0.25,
            "model.som_grid": [7, 9],
            "log.level": "debug",
        }
    )
    path = tmp_path / "effective.toml"
    path.write_text(cfg.to_toml())
    again = load_config(path, env=HOME_ENV)
    assert again == cfg
    assert again.to_toml() == cfg.to_toml()


def test_as_dict_lists_every_section_with_plain_values() -> None:
    d = load_config(env=HOME_ENV).as_dict()
    assert list(d) == [
        "ingest", "output", "metrics", "batching", "model", "state", "synthetic", "device", "log",
        "security", "nats", "record", "mqtt", "lsl", "align", "cluster",
    ]  # fmt: skip
    assert d["batching"]["buckets"] == [1, 8, 32, 64, 96, 128, 192, 256]
    assert d["model"]["som_grid"] == [20, 20]


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("127.0.0.1:7400", ("127.0.0.1", 7400)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:7400", ("::1", 7400)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_parse_address(text: str, expect: tuple[str, int]) -> None:
    assert parse_address(text) == expect


@pytest.mark.parametrize(
    "text", ["", "7400", ":7400", "host:", "host:-1", "host:65536", "::1:7400", "[::1]7400", "h:x"]
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_docs_describe_every_key_and_show_the_defaults(tmp_path: Path) -> None:
    docs = Path(__file__).parents[2] / "docs" / "configuration.md"
    text = docs.read_text()
    defaults = load_config(env=HOME_ENV)
    for section, values in defaults.as_dict().items():
        for key in values:
            assert f"`ENACTIVE_{section.upper()}_{key.upper()}`" in text, (section, key)
    complete = text.split("## A complete file", 1)[1]
    example = complete.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "from-docs.toml"
    path.write_text(example)
    assert load_config(path, env=HOME_ENV) == defaults


@pytest.mark.parametrize(
    ("threads", "count", "environ", "expect"),
    [
        (0, 1, {}, None),  # auto: one core left to the host
        (0, 1, {"PJRT_NPROC": "5"}, 5),  # auto keeps what the operator exported
        (0, 4, {"PJRT_NPROC": "2"}, 4),  # never fewer than the devices of a sharded step
        (3, 1, {"PJRT_NPROC": "5"}, 3),  # an explicit value wins
        (0, 1, {"PJRT_NPROC": "lots"}, None),  # junk in the environment: auto
    ],
)
def test_xla_cpu_threads(threads: int, count: int, environ: dict, expect: int | None) -> None:
    from stream.xla import xla_cpu_threads

    config = load(**{"device.cpu_threads": threads, "device.count": count})
    got = xla_cpu_threads(config, environ)
    if expect is None:
        expect = max(len(os.sched_getaffinity(0)) - 1, 1)
    assert got == expect
    assert environ["PJRT_NPROC"] == str(expect)


def test_record_path_is_off_by_default_and_a_path() -> None:
    assert load_config(env=HOME_ENV).record.path == ""
    cfg = load_config(env={**HOME_ENV, "ENACTIVE_RECORD_PATH": "123"})
    assert cfg.record.path == "123"  # a file named 123, not a number
    with pytest.raises(ConfigError, match=r"record\.path = 5: must be a string"):
        load_config(env=HOME_ENV, overrides={"record.path": 5})


CLUSTER = {"nats.url": "nats://127.0.0.1:4222", "cluster.instances": 3, "cluster.partitions": 12}


@pytest.mark.parametrize(
    ("overrides", "expect"),
    [
        ({"cluster.instance": 1}, "cluster.instance is set but cluster.instances is not"),
        ({**CLUSTER, "nats.url": ""}, "[cluster] shares the NATS frames stream's partitions"),
        ({**CLUSTER, "nats.consume": False}, "keep nats.consume = true"),
        ({**CLUSTER, "cluster.partitions": 2}, "cluster.partitions = 2: must be at least"),
        ({**CLUSTER, "cluster.instance": 3}, "cluster.instance = 3: instances are numbered 0 to 2"),
        ({**CLUSTER, "cluster.instance": "first"}, 'or "auto"'),
        ({**CLUSTER, "nats.subjects": "sensors.*"}, "partitioned on the stream id after its"),
        ({**CLUSTER, "cluster.state_bucket": "a.b"}, "must be a JetStream name"),
    ],
)
def test_cluster_is_checked(overrides: dict, expect: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env=HOME_ENV, overrides=overrides)
    assert expect in str(info.value)


def test_cluster_instance_auto_comes_from_the_host_name() -> None:
    from stream.daemon import cluster_of

    cfg = load_config(env=HOME_ENV, overrides=CLUSTER)
    assert cfg.cluster.instance == "auto"
    cluster = cluster_of(cfg, "enactive-stream-2")
    assert cluster is not None and (cluster.instance, cluster.owned) == (2, [2, 5, 8, 11])
    with pytest.raises(ConfigError, match="has none"):
        cluster_of(cfg, "laptop")
    with pytest.raises(ConfigError, match="the host name gives 7"):
        cluster_of(cfg, "enactive-stream-7")
    assert cluster_of(load_config(env=HOME_ENV)) is None
