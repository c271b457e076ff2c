"""Settings (gpubox.config): precedence, validation, and the names DESIGN.md promises.

Pure: every load() gets an explicit environ dict, never the real os.environ.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest

from gpubox import config as cfg
from gpubox import errors
from gpubox.store import open_store
from gpubox.store import sqlite as sqlite_store

pytestmark = pytest.mark.timeout(30)

CLASSES = [cfg.CoordinatorConfig, cfg.WorkerConfig, cfg.ClientConfig]


def load(
    cls: Any,
    flags: dict[str, Any] | None = None,
    file_data: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Any:
    """config.load with an empty environment unless one is given."""
    return cfg.load(cls, flags or {}, file_data or {}, {} if environ is None else environ)


def field(cls: Any, name: str) -> dataclasses.Field[Any]:
    return {f.name: f for f in dataclasses.fields(cls)}[name]


# --- precedence --------------------------------------------------------------------------------

# (class, setting, default, top level, section, environment, flag)
LAYERS = [
    (cfg.WorkerConfig, "max_jobs", 4, 5, 6, ("7", 7), 8),
    (cfg.WorkerConfig, "gpus", "all", "none", "0", ("1", "1"), "0,2"),
    (cfg.WorkerConfig, "stop_grace_s", 10.0, 1, 2.5, ("3.5", 3.5), 4.0),
    (
        cfg.CoordinatorConfig,
        "http",
        "127.0.0.1:8470",
        "0.0.0.0:1",
        "0.0.0.0:2",
        ("0.0.0.0:3", "0.0.0.0:3"),
        "0.0.0.0:4",
    ),
    (
        cfg.CoordinatorConfig,
        "bind",
        "tcp://0.0.0.0:8471",
        "tcp://127.0.0.1:1",
        "tcp://127.0.0.1:2",
        ("tcp://127.0.0.1:3", "tcp://127.0.0.1:3"),
        "tcp://127.0.0.1:4",
    ),
    (
        cfg.ClientConfig,
        "url",
        "http://127.0.0.1:8470",
        "http://a:1",
        "http://b:2",
        ("http://c:3", "http://c:3"),
        "https://d:4",
    ),
    (cfg.ClientConfig, "token", "", "t-file", "t-section", ("t-env", "t-env"), "t-flag"),
]


@pytest.mark.parametrize(
    ("cls", "name", "default", "top", "section", "env", "flag"),
    LAYERS,
    ids=[f"{row[0].__name__}.{row[1]}" for row in LAYERS],
)
def test_precedence(
    cls: Any, name: str, default: Any, top: Any, section: Any, env: Any, flag: Any
) -> None:
    """flag > environment > file section > file top level > default, one layer at a time."""
    env_name = field(cls, name).metadata["env"]
    env_text, env_value = env
    section_name = cfg.SECTIONS[cls]
    file_top = {name: top}
    file_both = {name: top, section_name: {name: section}}
    environ = {env_name: env_text}

    assert getattr(load(cls), name) == default
    assert getattr(load(cls, file_data=file_top), name) == top
    assert getattr(load(cls, file_data=file_both), name) == section
    assert getattr(load(cls, file_data={section_name: {name: section}}), name) == section
    assert getattr(load(cls, file_data=file_both, environ=environ), name) == env_value
    assert getattr(load(cls, environ=environ), name) == env_value
    assert getattr(load(cls, {name: flag}, file_both, environ), name) == flag
    assert getattr(load(cls, {name: flag}), name) == flag
    # An unset flag (click passes None) falls through to the next layer.
    assert getattr(load(cls, {name: None}, file_both, environ), name) == env_value
    assert getattr(load(cls, {name: None}, file_both), name) == section


def test_another_roles_section_does_not_apply() -> None:
    file_data = {"client": {"token": "t"}, "worker": {"max_jobs": 2, "heartbeat_interval_s": 1.0}}
    coordinator = load(cfg.CoordinatorConfig, file_data=file_data)
    assert coordinator.heartbeat_interval_s == 2.0
    client = load(cfg.ClientConfig, file_data=file_data)
    assert client.token == "t"
    worker = load(cfg.WorkerConfig, file_data=file_data)
    assert (worker.max_jobs, worker.heartbeat_interval_s) == (2, 1.0)


def test_a_coordinator_section_does_not_leak_into_the_worker() -> None:
    """One file for both roles (as `gpubox up` and a shared /etc file use): the [coordinator]
    table is the coordinator's section, not a top-level value of the worker's `coordinator`
    setting (the link address)."""
    file_data: dict[str, Any] = {
        "coordinator": {"heartbeat_interval_s": 1.0, "liveness_s": 3.0},
        "worker": {"max_jobs": 2},
    }
    worker = load(cfg.WorkerConfig, file_data=file_data)
    assert worker.coordinator == "tcp://127.0.0.1:8471"
    assert (worker.max_jobs, worker.heartbeat_interval_s, worker.liveness_s) == (2, 2.0, 10.0)
    coordinator = load(cfg.CoordinatorConfig, file_data=file_data)
    assert (coordinator.heartbeat_interval_s, coordinator.liveness_s) == (1.0, 3.0)
    # Set in the worker's own section, it is used.
    file_data["worker"]["coordinator"] = "tcp://10.0.0.1:8471"
    assert load(cfg.WorkerConfig, file_data=file_data).coordinator == "tcp://10.0.0.1:8471"


def test_shared_top_level_keys_apply_to_every_role(tmp_path: Path) -> None:
    file_data = {"state_dir": str(tmp_path), "client": {"token": "t"}}
    for cls in CLASSES:
        assert load(cls, file_data=file_data).state_dir == str(tmp_path)
    assert load(cfg.CoordinatorConfig, file_data=file_data).db == f"sqlite:///{tmp_path}/gpubox.db"


def test_load_reads_only_the_environ_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUBOX_MAX_JOBS", "9")
    assert load(cfg.WorkerConfig, environ={}).max_jobs == 4
    assert load(cfg.WorkerConfig, environ={"GPUBOX_MAX_JOBS": "2"}).max_jobs == 2


def test_values_are_converted_to_the_settings_type() -> None:
    config = load(
        cfg.CoordinatorConfig,
        {"http_threads": "8"},
        {"coordinator": {"heartbeat_interval_s": 1}},
        {"GPUBOX_LIVENESS": "7"},
    )
    assert config.http_threads == 8 and isinstance(config.http_threads, int)
    assert config.heartbeat_interval_s == 1.0 and isinstance(config.heartbeat_interval_s, float)
    assert config.liveness_s == 7.0 and isinstance(config.liveness_s, float)
    worker = load(cfg.WorkerConfig, file_data={"worker": {"gpus": 0}})
    assert worker.gpus == "0"


# --- bad values --------------------------------------------------------------------------------


def test_unknown_key_in_a_section() -> None:
    with pytest.raises(errors.ConfigError) as info:
        load(cfg.WorkerConfig, file_data={"worker": {"max_job": 3}})
    assert "max_job" in str(info.value)
    assert "worker" in str(info.value)
    with pytest.raises(errors.ConfigError, match="bnid"):
        load(cfg.CoordinatorConfig, file_data={"coordinator": {"bnid": "tcp://x:1"}})
    with pytest.raises(errors.ConfigError, match="tokn"):
        load(cfg.ClientConfig, file_data={"client": {"tokn": "x"}})


def test_a_key_of_another_role_in_a_section_is_unknown() -> None:
    with pytest.raises(errors.ConfigError, match="max_jobs"):
        load(cfg.CoordinatorConfig, file_data={"coordinator": {"max_jobs": 3}})


@pytest.mark.parametrize("section", [5, "x", ["max_jobs"]])
def test_a_section_that_is_not_a_table(section: Any) -> None:
    """`worker = 5` instead of a [worker] table: one clear line, not a traceback."""
    with pytest.raises(errors.ConfigError) as info:
        load(cfg.WorkerConfig, file_data={"worker": section})
    assert "worker" in str(info.value)


BAD = [
    (cfg.WorkerConfig, {"max_jobs": "x"}, {}, "max_jobs"),
    (cfg.WorkerConfig, {}, {"GPUBOX_MAX_JOBS": "x"}, "max_jobs"),
    (cfg.WorkerConfig, {"max_jobs": 0}, {}, "max_jobs"),
    (cfg.WorkerConfig, {"max_jobs": -1}, {}, "max_jobs"),
    (cfg.WorkerConfig, {"max_jobs": 2.5}, {}, "max_jobs"),
    (cfg.WorkerConfig, {"max_jobs": True}, {}, "max_jobs"),
    (cfg.WorkerConfig, {"max_jobs": ""}, {}, "max_jobs"),
    (cfg.WorkerConfig, {"gpus": "1,a"}, {}, "gpus"),
    (cfg.WorkerConfig, {}, {"GPUBOX_GPUS": "1,a"}, "gpus"),
    (cfg.WorkerConfig, {"gpus": "0,"}, {}, "gpus"),
    (cfg.WorkerConfig, {"gpus": "ALL"}, {}, "gpus"),
    (cfg.WorkerConfig, {"labels": "novalue"}, {}, "labels"),
    (cfg.WorkerConfig, {}, {"GPUBOX_LABELS": "a=1,novalue"}, "labels"),
    (cfg.WorkerConfig, {"labels": "=v"}, {}, "labels"),
    (cfg.WorkerConfig, {"coordinator": "http://x:8471"}, {}, "coordinator"),
    (cfg.WorkerConfig, {"coordinator": "tcp://x"}, {}, "coordinator"),
    (cfg.WorkerConfig, {"stop_grace_s": -1}, {}, "stop_grace_s"),
    (cfg.WorkerConfig, {"resend_s": 0}, {}, "resend_s"),
    (cfg.WorkerConfig, {"fake_gpus": "two"}, {}, "fake_gpus"),
    (cfg.WorkerConfig, {"fake_gpus": "2*A100"}, {}, "fake_gpus"),
    (cfg.WorkerConfig, {"fake_gpus": "x*A100:80"}, {}, "fake_gpus"),
    (cfg.WorkerConfig, {"mounts": "data"}, {}, "mounts"),
    (cfg.WorkerConfig, {"mounts": "data=relative/path"}, {}, "mounts"),
    (cfg.WorkerConfig, {"mounts": "data=/srv:inside"}, {}, "mounts"),
    (cfg.WorkerConfig, {"mounts": "Data=/srv"}, {}, "mounts"),
    (cfg.WorkerConfig, {"mounts": "a=/x,a=/y"}, {}, "mounts"),
    (cfg.WorkerConfig, {}, {"GPUBOX_MOUNTS": "a=/x:/y:/z"}, "mounts"),
    (cfg.WorkerConfig, {"spill_max_bytes": 0}, {}, "spill_max_bytes"),
    (cfg.WorkerConfig, {"heartbeat_interval_s": "fast"}, {}, "heartbeat_interval_s"),
    (cfg.CoordinatorConfig, {"http": "nohost"}, {}, "http"),
    (cfg.CoordinatorConfig, {}, {"GPUBOX_HTTP": "nohost"}, "http"),
    (cfg.CoordinatorConfig, {"http": "host:port"}, {}, "http"),
    (cfg.CoordinatorConfig, {"http": "host:70000"}, {}, "http"),
    (cfg.CoordinatorConfig, {"bind": "http://x"}, {}, "bind"),
    (cfg.CoordinatorConfig, {}, {"GPUBOX_BIND": "http://x"}, "bind"),
    (cfg.CoordinatorConfig, {"bind": "tcp://0.0.0.0"}, {}, "bind"),
    (cfg.CoordinatorConfig, {"http_threads": 0}, {}, "http_threads"),
    (cfg.CoordinatorConfig, {"log_level": "loud"}, {}, "log_level"),
    (cfg.WorkerConfig, {}, {"GPUBOX_LOG_LEVEL": "INFO"}, "log_level"),
    (cfg.CoordinatorConfig, {"max_body_bytes": "1MB"}, {}, "max_body_bytes"),
    (cfg.CoordinatorConfig, {"heartbeat_interval_s": 0}, {}, "heartbeat_interval_s"),
    (cfg.CoordinatorConfig, {"liveness_s": 2.0, "heartbeat_interval_s": 2.0}, {}, "liveness_s"),
    (cfg.CoordinatorConfig, {"liveness_s": 1.0, "heartbeat_interval_s": 2.0}, {}, "liveness_s"),
    (cfg.CoordinatorConfig, {}, {"GPUBOX_LIVENESS": "1"}, "liveness_s"),
    (cfg.CoordinatorConfig, {"public_url": "gpubox.example"}, {}, "public_url"),
    (cfg.CoordinatorConfig, {}, {"GPUBOX_PUBLIC_URL": "https://x.example/gpubox"}, "public_url"),
    (cfg.CoordinatorConfig, {"public_url": "ftp://x.example"}, {}, "public_url"),
    (cfg.ClientConfig, {"url": "127.0.0.1:8470"}, {}, "url"),
    (cfg.ClientConfig, {}, {"GPUBOX_URL": "ftp://x"}, "url"),
]


@pytest.mark.parametrize(
    ("cls", "flags", "environ", "name"),
    BAD,
    ids=[f"{c.__name__}-{f or e}" for c, f, e, _ in BAD],
)
def test_bad_value_names_the_setting(
    cls: Any, flags: dict[str, Any], environ: dict[str, str], name: str
) -> None:
    with pytest.raises(errors.ConfigError) as info:
        load(cls, flags, environ=environ)
    message = str(info.value)
    assert message.startswith(f"{name}:"), message
    assert "\n" not in message


def test_bad_value_in_the_file_names_the_setting() -> None:
    with pytest.raises(errors.ConfigError, match="^max_jobs:"):
        load(cfg.WorkerConfig, file_data={"worker": {"max_jobs": "many"}})
    with pytest.raises(errors.ConfigError, match="^max_jobs:"):
        load(cfg.WorkerConfig, file_data={"max_jobs": [4]})


def test_not_a_number_is_a_bad_value() -> None:
    """ "nan" parses as a float but makes every comparison false: a heartbeat interval of NaN
    would never send a heartbeat, a liveness of NaN would never lose a worker."""
    accepted = []
    for cls in CLASSES:
        for f in dataclasses.fields(cls):
            if f.type != "float":
                continue
            try:
                config = load(cls, {f.name: "nan"})
            except errors.ConfigError as exc:
                assert str(exc).startswith(f"{f.name}:"), exc
            else:
                assert math.isnan(getattr(config, f.name))
                accepted.append(f"{cls.__name__}.{f.name}")
    assert accepted == [], f"NaN accepted for {accepted}"


# --- labels ------------------------------------------------------------------------------------


def test_labels_as_a_toml_table(tmp_path: Path) -> None:
    path = tmp_path / "gpubox.toml"
    path.write_text('[worker]\nmax_jobs = 2\n\n[worker.labels]\ngpu = "a100"\nzone = "eu-1"\n')
    config = load(cfg.WorkerConfig, file_data=cfg.read_file(str(path)))
    assert config.label_map == {"gpu": "a100", "zone": "eu-1"}
    assert config.max_jobs == 2


def test_labels_as_a_table_in_file_data() -> None:
    config = load(cfg.WorkerConfig, file_data={"worker": {"labels": {"gpu": "h100", "n": 2}}})
    assert config.label_map == {"gpu": "h100", "n": "2"}


@pytest.mark.parametrize(
    ("text", "labels"),
    [
        ("k=v,k2=v2", {"k": "v", "k2": "v2"}),
        (" k = v , k2=v2 ,", {"k": "v", "k2": "v2"}),
        ("gpu=a100", {"gpu": "a100"}),
        ("empty=", {"empty": ""}),
        ("", {}),
    ],
)
def test_labels_as_text(text: str, labels: dict[str, str]) -> None:
    assert load(cfg.WorkerConfig, {"labels": text}).label_map == labels
    assert load(cfg.WorkerConfig, environ={"GPUBOX_LABELS": text}).label_map == labels
    assert cfg.parse_labels(text) == labels


def test_parse_labels_of_a_mapping() -> None:
    table: dict[str, Any] = {"a": "1", "b": 2}  # TOML may hold a number
    assert cfg.parse_labels(table) == {"a": "1", "b": "2"}


# --- mounts and fake GPUs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("datasets=/srv/data", {"datasets": cfg.Mount("datasets", "/srv/data", "/mnt/datasets")}),
        ("d=/srv/data:ro", {"d": cfg.Mount("d", "/srv/data", "/mnt/d", True)}),
        ("d=/srv/data:rw", {"d": cfg.Mount("d", "/srv/data", "/mnt/d", False)}),
        ("d=/srv/data:/data", {"d": cfg.Mount("d", "/srv/data", "/data", True)}),
        (
            " a=/x:/in:rw , b-2.c=/y ",
            {
                "a": cfg.Mount("a", "/x", "/in", False),
                "b-2.c": cfg.Mount("b-2.c", "/y", "/mnt/b-2.c", True),
            },
        ),
    ],
)
def test_mounts_as_text(text: str, expected: dict[str, cfg.Mount]) -> None:
    assert cfg.parse_mounts(text) == expected
    assert load(cfg.WorkerConfig, {"mounts": text}).mount_map == expected


def test_mounts_as_a_toml_table(tmp_path: Path) -> None:
    path = tmp_path / "worker.toml"
    path.write_text('[worker.mounts]\ndatasets = "/srv/datasets"\nscratch = "/scratch:/s:rw"\n')
    config = load(cfg.WorkerConfig, file_data=cfg.read_file(str(path)))
    assert config.mount_map == {
        "datasets": cfg.Mount("datasets", "/srv/datasets", "/mnt/datasets", True),
        "scratch": cfg.Mount("scratch", "/scratch", "/s", False),
    }


@pytest.mark.parametrize(
    ("text", "groups"),
    [
        ("", []),
        ("4", [(4, "Fake GPU", 16384)]),
        ("NVIDIA T4:15360", [(1, "NVIDIA T4", 15360)]),
        (
            "2*NVIDIA A100-SXM4-80GB:81920, NVIDIA T4:15360",
            [(2, "NVIDIA A100-SXM4-80GB", 81920), (1, "NVIDIA T4", 15360)],
        ),
    ],
)
def test_fake_gpus(text: str, groups: list[tuple[int, str, int]]) -> None:
    assert cfg.parse_fake_gpus(text) == groups


# --- state folder and store --------------------------------------------------------------------


def test_default_db_is_in_the_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = load(cfg.CoordinatorConfig, {"state_dir": str(state)})
    assert config.db == f"sqlite:///{state}/gpubox.db"


def test_default_db_follows_the_default_state_dir() -> None:
    config = load(cfg.CoordinatorConfig)
    assert config.state_dir == cfg.default_state_dir()
    assert config.db == f"sqlite:///{cfg.default_state_dir()}/gpubox.db"


def test_explicit_db_is_kept(tmp_path: Path) -> None:
    config = load(
        cfg.CoordinatorConfig, {"state_dir": str(tmp_path)}, environ={"GPUBOX_DB": "sqlite:///x"}
    )
    assert config.db == "sqlite:///x"


def test_default_db_of_a_relative_state_dir_is_inside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--state-dir ./state` must put the store in ./state, not in /state."""
    monkeypatch.chdir(tmp_path)
    config = load(cfg.CoordinatorConfig, {"state_dir": "state"})
    opened: list[str] = []

    def fake_store(path: str, upgrade: bool = True) -> Any:  # record, create nothing
        opened.append(path)
        return object()

    monkeypatch.setattr(sqlite_store, "SqliteStore", fake_store)
    open_store(config.db)
    assert len(opened) == 1
    assert Path(opened[0]).resolve() == (tmp_path / "state" / "gpubox.db").resolve()


def test_default_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert cfg.default_state_dir() == "/var/lib/gpubox"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cfg.default_state_dir() == str(tmp_path / ".local" / "state" / "gpubox")
    for cls in CLASSES:
        assert load(cls).state_dir == str(tmp_path / ".local" / "state" / "gpubox")


# --- the config file ---------------------------------------------------------------------------


def test_read_file_without_a_path() -> None:
    assert cfg.read_file(None) == {}
    assert cfg.read_file("") == {}


def test_read_file(tmp_path: Path) -> None:
    path = tmp_path / "gpubox.toml"
    path.write_text('state_dir = "/srv/gpubox"\n[coordinator]\nhttp = "0.0.0.0:80"\n')
    assert cfg.read_file(str(path)) == {
        "state_dir": "/srv/gpubox",
        "coordinator": {"http": "0.0.0.0:80"},
    }


def test_read_file_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(errors.ConfigError) as info:
        cfg.read_file(str(missing))
    assert str(missing) in str(info.value)


def test_read_file_of_a_folder(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError):
        cfg.read_file(str(tmp_path))


@pytest.mark.parametrize(
    "text", [b"[worker\nmax_jobs = 2\n", b"max_jobs = \n", b"a = 1\na = 2\n", b"= 3\n"]
)
def test_read_file_invalid_toml(tmp_path: Path, text: bytes) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(text)
    with pytest.raises(errors.ConfigError) as info:
        cfg.read_file(str(path))
    assert str(path) in str(info.value)


def test_read_file_not_utf8(tmp_path: Path) -> None:
    """A file in another encoding (or a binary file given by mistake) is bad input too."""
    path = tmp_path / "latin1.toml"
    path.write_bytes('[worker]\nname = "bo\u00eete"\n'.encode("latin-1"))
    with pytest.raises(errors.ConfigError) as info:
        cfg.read_file(str(path))
    assert str(path) in str(info.value)


# --- declarations and the contract of DESIGN.md ------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_setting_is_declared_fully(cls: Any) -> None:
    """A new setting without an environment name or help text fails here."""
    envs = []
    for f in dataclasses.fields(cls):
        env = f.metadata.get("env")
        assert isinstance(env, str) and env.startswith("GPUBOX_"), f"{f.name}: env {env!r}"
        assert env == env.upper() and " " not in env, f"{f.name}: env {env!r}"
        help_text = f.metadata.get("help")
        assert isinstance(help_text, str) and help_text.strip(), f"{f.name}: no help text"
        flag = f.metadata.get("flag")
        assert flag is None or (isinstance(flag, str) and flag.startswith("--")), f.name
        assert f.type in ("str", "int", "float", "bool"), f"{f.name}: type {f.type!r}"
        assert f.default is not dataclasses.MISSING, f"{f.name}: no default"
        envs.append(env)
    assert len(envs) == len(set(envs)), "two settings share an environment name"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_class_has_a_file_section(cls: Any) -> None:
    assert cfg.SECTIONS[cls] in ("coordinator", "worker", "client")


CONTRACT = [
    (cfg.CoordinatorConfig, "db", "GPUBOX_DB", "--db"),
    (cfg.CoordinatorConfig, "http", "GPUBOX_HTTP", "--http"),
    (cfg.CoordinatorConfig, "bind", "GPUBOX_BIND", "--bind"),
    (cfg.CoordinatorConfig, "state_dir", "GPUBOX_STATE_DIR", "--state-dir"),
    (cfg.WorkerConfig, "coordinator", "GPUBOX_COORDINATOR", "--coordinator"),
    (cfg.WorkerConfig, "name", "GPUBOX_WORKER_NAME", "--name"),
    (cfg.WorkerConfig, "gpus", "GPUBOX_GPUS", "--gpus"),
    (cfg.WorkerConfig, "max_jobs", "GPUBOX_MAX_JOBS", "--max-jobs"),
    (cfg.WorkerConfig, "state_dir", "GPUBOX_STATE_DIR", "--state-dir"),
    (cfg.ClientConfig, "url", "GPUBOX_URL", "--url"),
    (cfg.ClientConfig, "token", "GPUBOX_TOKEN", "--token"),
    (cfg.ClientConfig, "state_dir", "GPUBOX_STATE_DIR", "--state-dir"),
]


@pytest.mark.parametrize(
    ("cls", "name", "env", "flag"), CONTRACT, ids=[f"{c.__name__}.{n}" for c, n, _, _ in CONTRACT]
)
def test_contract_names(cls: Any, name: str, env: str, flag: str) -> None:
    f = field(cls, name)
    assert f.metadata["env"] == env
    assert f.metadata["flag"] == flag
    # And the environment name really sets it.
    value = {
        "db": "sqlite:///elsewhere.db",
        "http": "127.0.0.1:9999",
        "bind": "tcp://127.0.0.1:9998",
        "coordinator": "tcp://10.0.0.1:8471",
        "name": "box-7",
        "gpus": "0,2",
        "max_jobs": "3",
        "url": "https://gpubox.example.com",
        "token": "tok",
        "state_dir": "/srv/gpubox",
    }[name]
    loaded = getattr(load(cls, environ={env: value}), name)
    assert str(loaded) == value


def test_contract_defaults() -> None:
    coordinator = load(cfg.CoordinatorConfig)
    assert coordinator.http == "127.0.0.1:8470"
    assert coordinator.bind == "tcp://0.0.0.0:8471"
    worker = load(cfg.WorkerConfig)
    assert worker.coordinator == "tcp://127.0.0.1:8471"
    assert worker.gpus == "all"
    assert worker.max_jobs == 4
    client = load(cfg.ClientConfig)
    assert client.url == "http://127.0.0.1:8470"


def test_parse_address() -> None:
    assert cfg.parse_address("127.0.0.1:8470", "http") == ("127.0.0.1", 8470)
    assert cfg.parse_address(":8470", "http") == ("0.0.0.0", 8470)
    assert cfg.parse_address("[::1]:80", "http") == ("::1", 80)
    assert cfg.parse_address("localhost:0", "http") == ("localhost", 0)
    for bad in ("nohost", "host:", "host:-1", "host:65536", "host:http"):
        with pytest.raises(errors.ConfigError, match="^http:"):
            cfg.parse_address(bad, "http")


def test_configs_are_frozen() -> None:
    config = load(cfg.WorkerConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_jobs = 9  # type: ignore[misc]


# --- the example files in config/ ---------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "config"
EXAMPLE_FILES = {
    cfg.CoordinatorConfig: "coordinator.toml",
    cfg.WorkerConfig: "worker.toml",
    cfg.ClientConfig: "client.toml",
}


def example_keys(text: str) -> tuple[set[str], dict[str, list[str]]]:
    """The settings a example file sets, and the commented `# key = value` lines of each
    (before any commented table like `# [worker.labels]`, whose keys are not settings)."""
    text = text.split("\n# [", 1)[0]
    set_keys = {m.group(1) for m in re.finditer(r"^(\w+) = ", text, re.MULTILINE)}
    commented: dict[str, list[str]] = {}
    for match in re.finditer(r"^# (\w+) = (.*)$", text, re.MULTILINE):
        commented.setdefault(match.group(1), []).append(match.group(2).strip())
    return set_keys, commented


def toml_value(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


@pytest.mark.parametrize("cls", list(EXAMPLE_FILES), ids=lambda c: c.__name__)
def test_every_setting_is_in_its_example_file_with_its_default(cls: Any) -> None:
    path = EXAMPLES / EXAMPLE_FILES[cls]
    set_keys, commented = example_keys(path.read_text())
    names = {field.name for field in dataclasses.fields(cls)}
    assert names - set_keys - set(commented) == set(), f"missing from {path.name}"
    assert (set_keys | set(commented)) - names == set(), f"{path.name} names unknown settings"
    for field in dataclasses.fields(cls):
        if field.name not in set_keys:
            assert toml_value(field.default) in commented[field.name], (
                f"{path.name}: `# {field.name} = {toml_value(field.default)}` (its default)"
            )


@pytest.mark.parametrize("cls", list(EXAMPLE_FILES), ids=lambda c: c.__name__)
def test_every_example_file_loads_as_it_is(cls: Any) -> None:
    config = load(cls, file_data=cfg.read_file(str(EXAMPLES / EXAMPLE_FILES[cls])))
    if hasattr(config, "validate"):
        config.validate()


@pytest.mark.parametrize(
    ("raw", "expected"), [("0", False), ("false", False), ("no", False), ("1", True), ("on", True)]
)
def test_a_yes_no_setting_reads_the_usual_words(raw: str, expected: bool) -> None:
    config = load(cfg.CoordinatorConfig, environ={"GPUBOX_DASHBOARD": raw})
    assert config.dashboard is expected


def test_a_yes_no_setting_refuses_other_words() -> None:
    with pytest.raises(errors.ConfigError, match="dashboard: 'maybe' is not true or false"):
        load(cfg.CoordinatorConfig, environ={"GPUBOX_DASHBOARD": "maybe"})


@pytest.mark.parametrize(
    ("cls", "environ", "said"),
    [
        (cfg.CoordinatorConfig, {"GPUBOX_IDLE_TIMEOUT": "-1"}, "idle_timeout: must not be"),
        (cfg.CoordinatorConfig, {"GPUBOX_IDLE_THRESHOLD": "0"}, "idle_threshold: must be"),
        (cfg.CoordinatorConfig, {"GPUBOX_IDLE_THRESHOLD": "101"}, "idle_threshold: must be"),
        (cfg.CoordinatorConfig, {"GPUBOX_TELEMETRY_MAX_POINTS": "9"}, "at least 10"),
        (
            cfg.CoordinatorConfig,
            {"GPUBOX_FAIR_SHARE_HALF_LIFE": "-1"},
            "fair_share_half_life: must not be negative",
        ),
        (cfg.WorkerConfig, {"GPUBOX_TELEMETRY_INTERVAL": "0"}, "telemetry_interval_s: must be"),
        (
            cfg.WorkerConfig,
            {"GPUBOX_TELEMETRY_INTERVAL": "5", "GPUBOX_TELEMETRY_POINT": "2"},
            "telemetry_point_s: must be at least telemetry_interval_s",
        ),
    ],
)
def test_telemetry_and_idle_settings_are_checked(cls: Any, environ: dict, said: str) -> None:
    with pytest.raises(errors.ConfigError, match=said):
        load(cls, environ=environ)
