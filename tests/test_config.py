"""The config file: typed values, documented defaults, and every mistake reported at its key path."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

import pytest

from gateway import config
from gateway.config import (
    ClientTls,
    Config,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
    resolve_config_path,
    summarize,
)
from gateway.errors import ConfigError
from gateway.model import DuplicatePolicy

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "gateway.toml"


def minimal() -> dict[str, Any]:
    """The smallest valid document, fresh each time so a test may change it."""
    return {
        "gateway": {"node_id": "ct-room-1", "ae_title": "EDGE_GW"},
        "receiver": {"allowed_calling_ae": ["CT_SCANNER_1"]},
    }


def with_destination(**overrides: object) -> dict[str, Any]:
    data = minimal()
    destination = {
        "name": "pacs",
        "host": "pacs.example.org",
        "port": 2762,
        "called_ae": "PACS",
        "tls": False,
    }
    data["destination"] = [destination | overrides]
    return data


def problems(data: dict[str, Any], base_dir: Path | None = None) -> dict[str, str]:
    """The problems parse_config reports, as {key path: message}."""
    with pytest.raises(ConfigError) as info:
        parse_config(data, base_dir)
    return dict(info.value.problems)


def make_files(directory: Path, *names: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_text("x\n")


# --- the unit parsers ---


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (1048576, 1048576),
        ("1048576", 1048576),
        ("512B", 512),
        ("10 kB", 10_000),
        ("500MB", 500_000_000),
        ("3GB", 3_000_000_000),
        ("1TB", 10**12),
        ("64KiB", 65536),
        ("2GiB", 2 * 1024**3),
        ("1.5MiB", 1572864),
        ("1TiB", 1024**4),
    ],
)
def test_parse_size_accepts_bytes_and_units(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["-1MB", -5, "2 gigabytes", "GiB", "", "1.5B", 1.5, True, None, [1]])
def test_parse_size_rejects_nonsense(value):
    with pytest.raises(ValueError, match=r"size|unit"):
        parse_size(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0.0),
        (30, 30.0),
        (2.5, 2.5),
        ("30", 30.0),
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        (" 10 s ", 10.0),
    ],
)
def test_parse_duration_accepts_seconds_and_units(value, expected):
    assert parse_duration(value) == pytest.approx(expected)


@pytest.mark.parametrize("value", ["-1s", -0.5, "5 minutes", "1w", "s", float("inf"), float("nan"), False])
def test_parse_duration_rejects_nonsense(value):
    with pytest.raises(ValueError, match=r"duration"):
        parse_duration(value)


# --- a valid config ---


def test_minimal_config_gets_documented_defaults():
    cfg = parse_config(minimal())
    g, r = cfg.gateway, cfg.receiver
    assert (g.node_id, g.ae_title) == ("ct-room-1", "EDGE_GW")
    assert g.state_dir == Path("/var/lib/dicom-gateway")
    assert g.min_free_bytes == 2 * 1024**3
    assert (g.log_level, g.log_format) == ("info", "text")
    assert (r.host, r.port, r.require_called_ae) == ("0.0.0.0", 11112, True)
    assert r.allowed_calling_ae == ("CT_SCANNER_1",)
    assert r.allowed_networks == ()
    assert r.max_associations == 10
    assert (r.acse_timeout, r.dimse_timeout, r.network_timeout) == (30.0, 60.0, 60.0)
    assert r.duplicate_policy is DuplicatePolicy.REPLACE
    assert r.max_pdu_length == 262144
    assert r.shutdown_timeout == 20.0
    assert r.tls is None
    assert cfg.destinations == ()
    assert cfg.retention.keep_forwarded == 0.0
    assert cfg.metrics == config.MetricsConfig("127.0.0.1", 9707)
    assert cfg.mqtt is None
    assert cfg.serial == ()
    assert cfg.source is None


def test_destination_defaults_and_calling_ae_from_gateway():
    cfg = parse_config(with_destination())
    d = cfg.destinations[0]
    assert (d.name, d.kind, d.host, d.port, d.called_ae) == (
        "pacs",
        "dimse",
        "pacs.example.org",
        2762,
        "PACS",
    )
    assert d.calling_ae == "EDGE_GW"
    assert (d.max_parallel, d.batch_size) == (2, 50)
    assert (d.connect_timeout, d.acse_timeout, d.dimse_timeout, d.network_timeout) == (10.0, 30.0, 60.0, 60.0)
    assert d.retry == config.RetryPolicy(
        initial_delay=5.0, max_delay=600.0, factor=2.0, jitter=0.2, max_attempts=5
    )


def test_ae_title_surrounding_spaces_are_stripped():
    data = minimal()
    data["gateway"]["ae_title"] = "  EDGE_GW "
    assert parse_config(data).gateway.ae_title == "EDGE_GW"


def test_config_is_frozen():
    cfg = parse_config(minimal())
    with pytest.raises(AttributeError):
        cfg.gateway.node_id = "other"  # type: ignore[misc]


def test_tls_false_gives_plain_tcp_and_a_warning():
    cfg = parse_config(with_destination(tls=False))
    assert cfg.destinations[0].tls is None
    assert any("plain TCP" in w and "'pacs'" in w for w in config.warnings(cfg))


def test_tls_true_uses_the_system_ca_store():
    cfg = parse_config(with_destination(tls=True))
    assert cfg.destinations[0].tls == ClientTls(ca=None, cert=None, key=None, server_hostname=None)
    assert not any("plain TCP" in w for w in config.warnings(cfg))


def test_star_admits_any_with_a_warning():
    data = minimal()
    data["receiver"]["allowed_calling_ae"] = ["*"]
    cfg = parse_config(data)
    assert cfg.receiver.allowed_calling_ae == ("*",)
    assert any("any calling AE" in w for w in config.warnings(cfg))


def test_empty_allow_list_admits_nobody_and_is_valid():
    data = minimal()
    data["receiver"]["allowed_calling_ae"] = []
    assert parse_config(data).receiver.allowed_calling_ae == ()


def test_zero_destinations_warns_receive_only():
    assert any("receive-only" in w for w in config.warnings(parse_config(minimal())))
    assert not any("receive-only" in w for w in config.warnings(parse_config(with_destination())))


def test_require_called_ae_false_warns():
    data = minimal()
    data["receiver"]["require_called_ae"] = False
    assert any("require_called_ae" in w for w in config.warnings(parse_config(data)))


def test_networks_accept_cidrs_and_bare_addresses():
    data = minimal()
    data["receiver"]["allowed_networks"] = ["10.1.2.0/24", "192.168.0.7", "fd00::/8"]
    assert parse_config(data).receiver.allowed_networks == (
        ipaddress.ip_network("10.1.2.0/24"),
        ipaddress.ip_network("192.168.0.7/32"),
        ipaddress.ip_network("fd00::/8"),
    )


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [("127.0.0.1:9707", "127.0.0.1", 9707), ("[::1]:9100", "::1", 9100), (":9707", "0.0.0.0", 9707)],
)
def test_metrics_listen_forms(listen, host, port):
    data = minimal()
    data["metrics"] = {"listen": listen}
    assert parse_config(data).metrics == config.MetricsConfig(host, port)


def test_metrics_can_be_turned_off():
    data = minimal()
    data["metrics"] = {"enabled": False}
    assert parse_config(data).metrics is None


def test_mqtt_defaults_depend_on_tls_and_node_id(tmp_path):
    make_files(tmp_path, "ca.crt")
    data = minimal()
    data["mqtt"] = {"host": "broker"}
    plain = parse_config(data).mqtt
    assert plain is not None
    assert (plain.port, plain.topic_prefix, plain.client_id) == (
        1883,
        "dicom-gateway",
        "dicom-gateway-ct-room-1",
    )
    assert (plain.health_interval, plain.keepalive, plain.queue_size, plain.tls) == (30.0, 60.0, 1000, None)
    data["mqtt"]["tls"] = {"ca": "ca.crt"}
    secure = parse_config(data, tmp_path).mqtt
    assert secure is not None
    assert secure.port == 8883
    assert secure.tls == ClientTls(ca=tmp_path / "ca.crt", cert=None, key=None, server_hostname=None)


def test_relative_tls_paths_resolve_against_the_config_directory(tmp_path, monkeypatch):
    conf_dir = tmp_path / "conf"
    make_files(conf_dir / "tls", "gw.crt", "gw.key", "pacs-ca.crt")
    (conf_dir / "gateway.toml").write_text(
        '[gateway]\nnode_id = "n1"\nae_title = "GW"\n'
        '[receiver]\nallowed_calling_ae = ["CT"]\n'
        '[receiver.tls]\ncert = "tls/gw.crt"\nkey = "tls/gw.key"\n'
        '[[destination]]\nname = "pacs"\nhost = "h"\nport = 104\ncalled_ae = "PACS"\n'
        '[destination.tls]\nca = "tls/pacs-ca.crt"\n'
    )
    monkeypatch.chdir(tmp_path)  # somewhere else: the paths must not depend on the working directory
    cfg = load_config(Path("conf/gateway.toml"))
    assert cfg.receiver.tls is not None
    assert cfg.receiver.tls.cert == conf_dir / "tls" / "gw.crt"
    assert cfg.receiver.tls.key == conf_dir / "tls" / "gw.key"
    assert cfg.receiver.tls.ca is None
    assert cfg.destinations[0].tls is not None
    assert cfg.destinations[0].tls.ca == conf_dir / "tls" / "pacs-ca.crt"
    assert cfg.source == Path("conf/gateway.toml")


def test_resolve_config_path_prefers_cli_then_env_then_default(monkeypatch):
    monkeypatch.delenv(config.CONFIG_ENV, raising=False)
    assert resolve_config_path(None) == Path("/etc/dicom-gateway/gateway.toml") == config.DEFAULT_CONFIG_PATH
    monkeypatch.setenv("DICOM_GATEWAY_CONFIG", "/srv/env.toml")
    assert resolve_config_path(None) == Path("/srv/env.toml")
    assert resolve_config_path("/srv/cli.toml") == Path("/srv/cli.toml")


def load_example(tmp_path: Path) -> Config:
    """The example file, with its /etc/dicom-gateway/ files replaced by real ones under tmp_path."""
    text = EXAMPLE.read_text().replace("/etc/dicom-gateway/", f"{tmp_path}/etc/")
    for name in re.findall(rf'"{re.escape(str(tmp_path))}/etc/([^"]+)"', text):
        make_files(tmp_path / "etc" / Path(name).parent, Path(name).name)
    (tmp_path / "gateway.toml").write_text(text)
    return load_config(tmp_path / "gateway.toml")


def test_example_file_is_valid_and_documents_real_values(tmp_path):
    cfg = load_example(tmp_path)
    tls_dir = tmp_path / "etc" / "tls"
    assert cfg.gateway == config.GatewaySection(
        "ct-room-1", "EDGE_GW", Path("/var/lib/dicom-gateway"), 2 * 1024**3, "info", "text"
    )
    assert cfg.receiver.allowed_calling_ae == ("CT_SCANNER_1",)
    assert cfg.receiver.allowed_networks == (ipaddress.ip_network("10.1.2.0/24"),)
    assert cfg.receiver.tls == config.ServerTls(
        tls_dir / "gateway.crt", tls_dir / "gateway.key", tls_dir / "scanners-ca.crt"
    )
    (pacs,) = cfg.destinations
    assert (pacs.name, pacs.host, pacs.port, pacs.called_ae) == (
        "central-pacs",
        "pacs.example.org",
        2762,
        "CENTRAL_PACS",
    )
    assert pacs.tls == ClientTls(
        tls_dir / "pacs-ca.crt",
        tls_dir / "gateway-client.crt",
        tls_dir / "gateway-client.key",
        "pacs.example.org",
    )
    assert pacs.retry.max_attempts == 10
    assert pacs.retry.max_delay == 600.0
    assert cfg.metrics == config.MetricsConfig("127.0.0.1", 9707)
    assert cfg.mqtt is not None
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.username) == ("broker.example.org", 8883, "gw-ct-room-1")
    assert cfg.mqtt.password_file == tmp_path / "etc" / "mqtt.pass"
    (ups,) = cfg.serial
    assert (ups.name, ups.port, ups.baudrate, ups.protocol, ups.stopbits) == (
        "ups",
        "/dev/ttyUSB0",
        2400,
        "megatec-q1",
        1.0,
    )
    assert config.warnings(cfg) == []


def test_summary_shows_the_essentials_and_no_secrets(tmp_path):
    cfg = load_example(tmp_path)
    (tmp_path / "etc" / "mqtt.pass").write_text("hunter2-secret\n")
    text = summarize(cfg)
    for expected in ["ct-room-1", "EDGE_GW", "0.0.0.0:11112", "CT_SCANNER_1", "10.1.2.0/24"]:
        assert expected in text
    assert "central-pacs: CENTRAL_PACS at pacs.example.org:2762, TLS on, mutual" in text
    assert "http://127.0.0.1:9707/metrics" in text
    assert "broker.example.org:8883" in text
    assert "ups" in text
    assert "hunter2" not in text


def test_summary_of_a_minimal_config():
    text = summarize(parse_config(minimal()))
    assert "receive-only" in text
    assert "mqtt:         off" in text
    assert "TLS off" in text


# --- one test per kind of mistake ---


def test_unknown_top_level_key_is_named():
    data = minimal()
    data["recevier"] = {}
    assert problems(data) == {"recevier": "unknown key"}


def test_unknown_nested_keys_are_named_with_their_full_path():
    data = with_destination(retry={"max_attempt": 3}, colour="blue")
    data["gateway"]["nodeid"] = "x"
    assert problems(data) == {
        "gateway.nodeid": "unknown key",
        "destination[0].colour": "unknown key",
        "destination[0].retry.max_attempt": "unknown key",
    }


def test_wrong_type_names_the_expected_type():
    data = minimal()
    data["receiver"]["port"] = "11112"
    data["gateway"]["ae_title"] = 7
    data["receiver"]["allowed_networks"] = "10.0.0.0/8"
    found = problems(data)
    assert found["receiver.port"] == "expected an integer, got string"
    assert found["gateway.ae_title"] == "expected a string, got integer"
    assert found["receiver.allowed_networks"] == "expected an array, got string"


def test_bool_is_not_an_int():
    data = minimal()
    data["receiver"]["max_associations"] = True
    assert problems(data) == {"receiver.max_associations": "expected an integer, got boolean"}


def test_string_is_not_a_bool():
    data = minimal()
    data["receiver"]["require_called_ae"] = "yes"
    assert "expected a boolean" in problems(data)["receiver.require_called_ae"]


@pytest.mark.parametrize(
    ("title", "message"),
    [
        ("A_VERY_LONG_AE_TITLE", "longer than 16"),
        ("EDGE\\GW", "backslash"),
        ("EDGE\tGW", "printable ASCII"),
        ("ÉDGE", "printable ASCII"),
        ("   ", "empty"),
    ],
)
def test_bad_ae_title_is_refused(title, message):
    data = minimal()
    data["gateway"]["ae_title"] = title
    assert message in problems(data)["gateway.ae_title"]


def test_bad_ae_title_in_the_allow_list_names_the_entry():
    data = minimal()
    data["receiver"]["allowed_calling_ae"] = ["CT", "WAY_TOO_LONG_AE_TITLE"]
    assert "longer than 16" in problems(data)["receiver.allowed_calling_ae[1]"]


@pytest.mark.parametrize(
    ("network", "message"),
    [("10.1.2.5/24", "has host bits set"), ("10.1.2.0/33", "10.1.2.0/33"), ("not-a-net", "not-a-net")],
)
def test_bad_network_is_refused_naming_the_entry(network, message):
    data = minimal()
    data["receiver"]["allowed_networks"] = ["10.0.0.0/8", network]
    found = problems(data)
    assert list(found) == ["receiver.allowed_networks[1]"]
    assert message in found["receiver.allowed_networks[1]"]


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_port_out_of_range(port):
    data = with_destination(port=port)
    data["receiver"]["port"] = port
    found = problems(data)
    assert "out of range 1..65535" in found["receiver.port"]
    assert "out of range 1..65535" in found["destination[0].port"]


def test_unreadable_tls_file_is_named(tmp_path):
    make_files(tmp_path, "gw.crt")
    data = with_destination(tls={"ca": "missing-ca.crt"})
    data["receiver"]["tls"] = {"cert": "gw.crt", "key": "gw.key", "ca": str(tmp_path)}
    found = problems(data, tmp_path)
    assert set(found) == {"receiver.tls.key", "receiver.tls.ca", "destination[0].tls.ca"}
    assert found["receiver.tls.key"].startswith("cannot read file: No such file or directory")
    assert found["receiver.tls.ca"].startswith("cannot read file: Is a directory")
    assert str(tmp_path / "missing-ca.crt") in found["destination[0].tls.ca"]


def test_unreadable_mqtt_password_file_is_named(tmp_path):
    data = minimal()
    data["mqtt"] = {"host": "broker", "username": "gw", "password_file": "nope.pass"}
    assert problems(data, tmp_path)["mqtt.password_file"].startswith("cannot read file:")


def test_receiver_tls_cert_without_key(tmp_path):
    make_files(tmp_path, "gw.crt")
    data = minimal()
    data["receiver"]["tls"] = {"cert": "gw.crt"}
    assert problems(data, tmp_path) == {"receiver.tls.key": "required key is missing"}


def test_client_tls_cert_and_key_go_together(tmp_path):
    make_files(tmp_path, "client.crt")
    data = with_destination(tls={"cert": "client.crt"})
    assert problems(data, tmp_path) == {"destination[0].tls.key": "cert and key must be given together"}


def test_missing_required_keys_are_each_named():
    data = {"gateway": {}, "receiver": {"allowed_calling_ae": []}, "destination": [{"tls": False}]}
    data["serial"] = [{"name": "ups"}]
    data["mqtt"] = {}
    found = problems(data)
    for key in [
        "gateway.node_id",
        "gateway.ae_title",
        "destination[0].name",
        "destination[0].host",
        "destination[0].port",
        "destination[0].called_ae",
        "serial[0].port",
        "serial[0].protocol",
        "mqtt.host",
    ]:
        assert found.pop(key) == "required key is missing"
    assert found == {}


def test_missing_gateway_and_receiver_tables():
    assert problems({}) == {"gateway": "required table is missing", "receiver": "required table is missing"}


def test_allowed_calling_ae_absent_is_an_error_that_says_so():
    data = minimal()
    del data["receiver"]["allowed_calling_ae"]
    message = problems(data)["receiver.allowed_calling_ae"]
    assert "required key is missing" in message
    assert "[] admits nobody" in message


def test_star_mixed_with_other_titles_is_refused():
    data = minimal()
    data["receiver"]["allowed_calling_ae"] = ["CT", "*"]
    assert problems(data) == {"receiver.allowed_calling_ae": '"*" must be the only entry when given'}


def test_destination_without_tls_table_or_tls_false_is_refused():
    data = with_destination()
    del data["destination"][0]["tls"]
    message = problems(data)["destination[0].tls"]
    assert "TLS settings are required" in message
    assert "tls = false" in message


def test_destination_tls_of_the_wrong_type():
    assert "expected a table" in problems(with_destination(tls="yes"))["destination[0].tls"]


def test_duplicate_destination_names_are_refused():
    data = with_destination()
    data["destination"].append(dict(data["destination"][0]))
    assert problems(data) == {"destination[1].name": "duplicate name 'pacs' (also destination[0].name)"}


def test_duplicate_serial_names_are_refused():
    data = minimal()
    data["serial"] = [{"name": "ups", "port": f"/dev/ttyUSB{i}", "protocol": "keyvalue"} for i in range(2)]
    assert "duplicate name 'ups'" in problems(data)["serial[1].name"]


def test_destination_written_as_a_single_table_is_explained():
    data = minimal()
    data["destination"] = {"name": "pacs"}
    assert "[[destination]]" in problems(data)["destination"]


def test_bad_names_are_refused():
    data = with_destination(name="central/pacs")
    data["gateway"]["node_id"] = "ct+room"
    found = problems(data)
    assert "is not a name" in found["gateway.node_id"]
    assert "is not a name" in found["destination[0].name"]


def test_stow_rs_is_not_supported_yet():
    assert problems(with_destination(kind="stow-rs")) == {
        "destination[0].kind": "stow-rs is not supported yet"
    }


def test_bad_durations_and_sizes_are_named():
    data = with_destination(connect_timeout="10 parsecs", retry={"initial_delay": "-5s"})
    data["gateway"]["min_free_bytes"] = "2 gigs"
    data["receiver"]["acse_timeout"] = 0
    found = problems(data)
    assert set(found) == {
        "gateway.min_free_bytes",
        "receiver.acse_timeout",
        "destination[0].connect_timeout",
        "destination[0].retry.initial_delay",
    }
    assert "unknown unit 'gigs'" in found["gateway.min_free_bytes"]
    assert found["receiver.acse_timeout"] == "must be longer than zero"
    assert "unknown unit 'parsecs'" in found["destination[0].connect_timeout"]
    assert "must not be negative" in found["destination[0].retry.initial_delay"]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("log_level", "verbose", "expected one of debug | info | warning | error"),
        ("log_format", "xml", "expected one of text | json"),
    ],
)
def test_choices_list_the_valid_options(key, value, message):
    data = minimal()
    data["gateway"][key] = value
    assert message in problems(data)[f"gateway.{key}"]


def test_range_checks_on_numbers():
    data = with_destination(max_parallel=17, batch_size=0, retry={"factor": 0.5, "jitter": 1.5})
    data["receiver"] |= {"max_pdu_length": 1024, "duplicate_policy": "ignore"}
    data["serial"] = [{"name": "ups", "port": "/dev/ttyS0", "protocol": "nut", "stopbits": 3, "parity": "X"}]
    data["mqtt"] = {"host": "b", "topic_prefix": "/gw/#"}
    found = problems(data)
    assert set(found) == {
        "destination[0].max_parallel",
        "destination[0].batch_size",
        "destination[0].retry.factor",
        "destination[0].retry.jitter",
        "receiver.max_pdu_length",
        "receiver.duplicate_policy",
        "serial[0].protocol",
        "serial[0].stopbits",
        "serial[0].parity",
        "mqtt.topic_prefix",
    }
    assert "out of range 1..16" in found["destination[0].max_parallel"]
    assert "at least 1" in found["destination[0].retry.factor"]
    assert "replace | keep-first | reject" in found["receiver.duplicate_policy"]


def test_metrics_listen_must_be_host_and_port():
    data = minimal()
    data["metrics"] = {"listen": "9707"}
    assert "expected host:port" in problems(data)["metrics.listen"]


def test_multiple_problems_are_reported_together():
    data = with_destination(port=0)
    data["gateway"]["ae_title"] = "A_VERY_LONG_AE_TITLE"
    data["receiver"]["allowed_networks"] = ["10.1.2.5/24"]
    data["receiver"]["port"] = True
    data["bogus"] = 1
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    keys = [key for key, _ in info.value.problems]
    assert sorted(keys) == sorted(
        ["gateway.ae_title", "receiver.allowed_networks[0]", "receiver.port", "destination[0].port", "bogus"]
    )
    assert "receiver.allowed_networks[0]: " in str(info.value)


def test_toml_syntax_error_reports_line_and_column(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text('[gateway]\nnode_id = "x\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    ((key, message),) = info.value.problems
    assert key == str(path)
    assert "line 2" in message
    assert "column" in message


def test_missing_config_file_is_one_problem(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [(str(path), "cannot read file: No such file or directory")]
