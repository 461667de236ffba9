"""The configuration contract: TOML file, then P2PULL_* variables, then keyword overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pull.config import (_KEYS, Config, RegistryConfig, default_data_dir, load_config,
                           parse_size)
from p2pull.errors import UsageError

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p2pull.toml"
    path.write_text(text)
    return path


def test_no_file_no_env_gives_defaults():
    config = load_config(env={})
    assert config.listen == "0.0.0.0:7420"
    assert config.cluster == "default"
    assert config.chunk_size is None
    assert config.discovery == ("mdns", "static")
    assert config.default_registry == "docker.io"
    assert config.registries == {}


def test_documented_example_file_loads_as_the_defaults(tmp_path):
    """configs/p2pull.toml documents every key with its default value."""
    documented = load_config(REPO / "configs" / "p2pull.toml", env={})
    defaults = Config()
    for name in _KEYS:
        if name not in ("data_dir", "socket"):
            assert getattr(documented, name) == getattr(defaults, name), name


def test_documented_file_names_every_key_and_variable():
    text = (REPO / "configs" / "p2pull.toml").read_text()
    for key, (var, _) in _KEYS.items():
        assert key in text, key
        assert var in text, var


def test_every_config_field_has_a_key():
    fields = set(Config.__dataclass_fields__) - {"registries"}
    assert fields == set(_KEYS)


def test_file_values(tmp_path):
    path = write(tmp_path, """
data_dir = "/srv/p2pull"
listen = "10.0.0.1:9000"
cluster = "prod"
secret_file = "/etc/p2pull/secret"
peers = ["a:7420", "b:7420"]
discovery = ["dns:p2pull.default.svc"]
chunk_size = "16MiB"
mirror_listen = "127.0.0.1:7421"
metrics_listen = "127.0.0.1:7422"
insecure_registries = ["reg.internal:5000"]
default_registry = "reg.internal:5000"
origin_max_connections = 32
origin_attempts = 3
origin_timeout = 2.5
""")
    config = load_config(path, env={})
    assert config.data_dir == Path("/srv/p2pull")
    assert config.socket == Path("/srv/p2pull/p2pull.sock")
    assert config.listen == "10.0.0.1:9000"
    assert config.cluster == "prod"
    assert config.secret_file == Path("/etc/p2pull/secret")
    assert config.peers == ("a:7420", "b:7420")
    assert config.discovery == ("dns:p2pull.default.svc",)
    assert config.chunk_size == 16 * 2**20
    assert config.mirror_listen == "127.0.0.1:7421"
    assert config.metrics_listen == "127.0.0.1:7422"
    assert config.insecure_registries == ("reg.internal:5000",)
    assert config.default_registry == "reg.internal:5000"
    assert config.origin_max_connections == 32
    assert config.origin_attempts == 3
    assert config.origin_timeout == 2.5


def test_config_file_from_environment(tmp_path):
    path = write(tmp_path, 'cluster = "from-file"\n')
    assert load_config(env={"P2PULL_CONFIG": str(path)}).cluster == "from-file"
    # an explicit path wins over $P2PULL_CONFIG
    other = tmp_path / "other.toml"
    other.write_text('cluster = "explicit"\n')
    assert load_config(other, env={"P2PULL_CONFIG": str(path)}).cluster == "explicit"


def test_env_overrides_file_and_keywords_override_env(tmp_path):
    path = write(tmp_path, 'cluster = "file"\norigin_attempts = 3\npeers = ["f:1"]\n')
    env = {"P2PULL_CLUSTER": "env", "P2PULL_PEERS": "e1:1, e2:2,,"}
    config = load_config(path, env=env)
    assert config.cluster == "env"
    assert config.origin_attempts == 3  # not in env: the file's
    assert config.peers == ("e1:1", "e2:2")
    config = load_config(path, env=env, cluster="keyword")
    assert config.cluster == "keyword"
    assert config.peers == ("e1:1", "e2:2")


ENV_SAMPLES = {
    "data_dir": ("/x/data", Path("/x/data")),
    "socket": ("/x/sock", Path("/x/sock")),
    "listen": ("1.2.3.4:5", "1.2.3.4:5"),
    "cluster": ("c1", "c1"),
    "secret_file": ("/x/secret", Path("/x/secret")),
    "peers": ("a:1,b:2", ("a:1", "b:2")),
    "discovery": ("mdns, dns:svc", ("mdns", "dns:svc")),
    "chunk_size": ("4MiB", 4 * 2**20),
    "mirror_listen": ("127.0.0.1:1", "127.0.0.1:1"),
    "metrics_listen": ("127.0.0.1:2", "127.0.0.1:2"),
    "insecure_registries": ("r1:5000,r2", ("r1:5000", "r2")),
    "default_registry": ("ghcr.io", "ghcr.io"),
    "origin_max_connections": ("7", 7),
    "origin_attempts": ("2", 2),
    "origin_timeout": ("0.5", 0.5),
    "upload_slots": ("3", 3),
    "upload_when_busy": ("answer", "answer"),
    "upload_rate": ("50MB", 50 * 10**6),
    "upload_burst": ("1MiB", 2**20),
    "download_rate": ("2MB", 2 * 10**6),
    "peer_timeout": ("2.5", 2.5),
    "peer_tcp_congestion": ("cubic", "cubic"),
    "rack": ("row-3.rack_12", "row-3.rack_12"),
}


def test_samples_cover_every_key():
    assert set(ENV_SAMPLES) == set(_KEYS)


@pytest.mark.parametrize("key", sorted(_KEYS))
def test_every_key_is_reachable_by_its_env_var(key, tmp_path):
    var = _KEYS[key][0]
    assert var == "P2PULL_" + key.upper()
    text, expected = ENV_SAMPLES[key]
    config = load_config(env={var: text})
    assert getattr(config, key) == expected
    # and env wins over the file for that key
    value = f'"{text}"' if not isinstance(expected, tuple) else repr(list(expected))
    path = write(tmp_path, f"{key} = {value}\n")
    assert getattr(load_config(path, env={var: text}), key) == expected


def test_env_wins_over_file_for_every_key(tmp_path):
    path = write(tmp_path, 'cluster = "file"\nchunk_size = "1MiB"\norigin_timeout = 9.0\n')
    config = load_config(path, env={"P2PULL_CHUNK_SIZE": "auto",
                                    "P2PULL_ORIGIN_TIMEOUT": "1"})
    assert config.chunk_size is None
    assert config.origin_timeout == 1.0
    assert config.cluster == "file"


def test_chunk_size_values(tmp_path):
    assert load_config(env={"P2PULL_CHUNK_SIZE": "auto"}).chunk_size is None
    assert load_config(env={"P2PULL_CHUNK_SIZE": "16MiB"}).chunk_size == 16 * 2**20
    assert load_config(env={"P2PULL_CHUNK_SIZE": "1MB"}).chunk_size == 10**6
    assert load_config(write(tmp_path, "chunk_size = 1048576\n"), env={}).chunk_size == 2**20
    with pytest.raises(UsageError, match="chunk_size"):
        load_config(env={"P2PULL_CHUNK_SIZE": "1KiB"})


def test_upload_when_busy_takes_only_its_two_values():
    assert load_config(env={}).upload_when_busy == "queue"
    with pytest.raises(UsageError, match="upload_when_busy.*answer, queue"):
        load_config(env={"P2PULL_UPLOAD_WHEN_BUSY": "wait"})


@pytest.mark.parametrize("text, expected", [
    ("16MiB", 16 * 2**20), ("16 MiB", 16 * 2**20), ("2GB", 2 * 10**9), ("2gib", 2 * 2**30),
    ("1.5GiB", 3 * 2**29), ("100", 100), ("100b", 100), ("4k", 4000), ("4KiB", 4096),
    ("1TiB", 2**40), ("3tb", 3 * 10**12), (512, 512),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "-1MiB", "16 furlongs", "1e6", "1,5MiB", "x16"])
def test_parse_size_refuses(text):
    with pytest.raises(UsageError, match="size"):
        parse_size(text)


def test_unknown_key_in_file(tmp_path):
    path = write(tmp_path, 'chunksize = "1MiB"\n')
    with pytest.raises(UsageError, match="'chunksize'"):
        load_config(path, env={})


@pytest.mark.parametrize("var, value, key", [
    ("P2PULL_ORIGIN_ATTEMPTS", "many", "origin_attempts"),
    ("P2PULL_ORIGIN_MAX_CONNECTIONS", "1.5", "origin_max_connections"),
    ("P2PULL_ORIGIN_TIMEOUT", "soon", "origin_timeout"),
    ("P2PULL_CHUNK_SIZE", "big", "chunk_size"),
    ("P2PULL_CHUNK_SIZE", "1KiB", "chunk_size"),
])
def test_bad_env_values_name_the_key(var, value, key):
    with pytest.raises(UsageError) as info:
        load_config(env={var: value})
    assert key in str(info.value)
    assert value in str(info.value)


@pytest.mark.parametrize("line, key", [
    ("origin_attempts = \"many\"", "origin_attempts"),
    ("origin_timeout = [1]", "origin_timeout"),
    ("peers = 5", "peers"),
    ("data_dir = 5", "data_dir"),
    ("chunk_size = \"16 furlongs\"", "chunk_size"),
    ("chunk_size = 1.5", "chunk_size"),
])
def test_bad_file_values_name_the_key(tmp_path, line, key):
    with pytest.raises(UsageError, match=key):
        load_config(write(tmp_path, line + "\n"), env={})


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})
    with pytest.raises(UsageError, match="not valid TOML"):
        load_config(write(tmp_path, "cluster = \n"), env={})


def test_registry_tables(tmp_path):
    path = write(tmp_path, """
[registries."reg.example.com:5000"]
username = "puller"
password = "s3cret"
mirrors = ["mirror1:5000", "mirror2"]

[registries."plain.internal"]
insecure = true
mirrors = "m1, m2"
""")
    config = load_config(path, env={})
    reg = config.registry("reg.example.com:5000")
    assert reg == RegistryConfig(username="puller", password="s3cret",
                                 mirrors=("mirror1:5000", "mirror2"))
    assert config.registry("plain.internal").mirrors == ("m1", "m2")
    assert config.registry("plain.internal").insecure is True
    assert config.registry("unknown.example.com") == RegistryConfig()
    assert config.is_insecure("plain.internal")
    assert not config.is_insecure("reg.example.com:5000")


def test_unknown_key_in_registry_table(tmp_path):
    path = write(tmp_path, '[registries."r.example.com"]\nuser = "x"\n')
    with pytest.raises(UsageError, match="user") as info:
        load_config(path, env={})
    assert "r.example.com" in str(info.value)


@pytest.mark.parametrize("host", ["127.0.0.1:5000", "127.0.0.1", "127.1.2.3:80", "localhost",
                                  "localhost:5000", "[::1]:5000", "[::1]"])
def test_loopback_registries_are_insecure(host):
    assert Config().is_insecure(host)


@pytest.mark.parametrize("host", ["registry.example.com", "docker.io", "10.0.0.1:5000",
                                  "127.example.com", "127.0.0.1.nip.io:5000",
                                  "localhost.example.com", "[2001:db8::1]:5000",
                                  "mylocalhost:5000"])
def test_other_registries_are_secure(host):
    assert not Config().is_insecure(host)


def test_listed_insecure_registries():
    config = load_config(env={"P2PULL_INSECURE_REGISTRIES": "reg.internal:5000,plain"})
    assert config.is_insecure("reg.internal:5000")
    assert config.is_insecure("plain")
    assert not config.is_insecure("reg.internal:5001")
    assert not config.is_insecure("other")


def test_socket_defaults_under_data_dir(tmp_path):
    assert load_config(env={"P2PULL_DATA_DIR": "/d"}).socket == Path("/d/p2pull.sock")
    path = write(tmp_path, 'data_dir = "/from/file"\n')
    assert load_config(path, env={}).socket == Path("/from/file/p2pull.sock")
    assert load_config(env={}, data_dir=Path("/kw")).socket == Path("/kw/p2pull.sock")
    # an explicit socket wins, wherever it comes from
    assert load_config(env={"P2PULL_DATA_DIR": "/d", "P2PULL_SOCKET": "/s.sock"}).socket == \
        Path("/s.sock")
    path = write(tmp_path, 'socket = "/file.sock"\n')
    assert load_config(path, env={"P2PULL_DATA_DIR": "/d"}).socket == Path("/file.sock")


def test_default_data_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    config = Config()
    assert config.data_dir == tmp_path / "p2pull"
    assert config.socket == tmp_path / "p2pull" / "p2pull.sock"


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        Config().cluster = "x"  # type: ignore[misc]


def test_an_empty_environment_variable_counts_as_unset(tmp_path):
    config = load_config(env={"P2PULL_DATA_DIR": "", "P2PULL_CLUSTER": " "})
    assert config.data_dir == default_data_dir()
    assert config.cluster == "default"


@pytest.mark.parametrize("label", ["two words", "a/b", "x" * 64, "rück"])
def test_a_rack_label_people_could_not_type_into_a_hello_is_refused(label):
    with pytest.raises(UsageError, match="rack label"):
        load_config(env={"P2PULL_RACK": label})


def test_an_empty_rack_label_is_none(tmp_path):
    assert load_config(write(tmp_path, 'rack = ""\n'), env={}).rack is None
    assert load_config(write(tmp_path, 'rack = "r7"\n'), env={}).rack == "r7"
