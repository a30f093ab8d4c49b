"""The systemd unit, its sandbox, and the sd_notify protocol the gateway speaks to the service manager.

The unit is checked with systemd's own tools (`systemd-analyze security` and `verify`, `systemd-sysusers`,
`systemd-tmpfiles`); the gateway runs as a real process under a fake service manager (an AF_UNIX datagram
socket that records who sent what), and once inside the unit's own seccomp filter.

This module doubles as the sandbox launcher: `python -m tests.test_systemd SPEC PROGRAM ARGS...` loads
the seccomp filters that SPEC describes (made from the unit by `unit_sandbox()`) and then execs PROGRAM,
the way systemd does just before ExecStart.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import functools
import json
import mmap
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from gateway.app import HEARTBEAT_SECONDS
from gateway.config import DEFAULT_CONFIG_PATH, parse_config
from gateway.systemd import Notifier
from simulators.datasets import StudySpec
from simulators.harness import ManagedProcess, free_port
from simulators.pacs import PacsSimulator, server_tls_context
from simulators.scanner import ScanOptions, run_scanner
from tests.conftest import (
    GATEWAY_AE,
    READY_LINE,
    REPO,
    SCANNER_AE,
    destination_section,
    require_tools,
    wait_until,
    write_config,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.conftest import Pki

UNIT = REPO / "systemd" / "dicom-gateway.service"
SYSUSERS = REPO / "systemd" / "dicom-gateway.sysusers"
TMPFILES = REPO / "systemd" / "dicom-gateway.tmpfiles"
MAX_EXPOSURE = 2.0  # systemd-analyze's "OK" band ends here
WATCHDOG_USEC = 2_000_000
PACS_AE = "CENTRAL_PACS"
MINIMAL_CONFIG = {"gateway": {"node_id": "n", "ae_title": "A"}, "receiver": {"allowed_calling_ae": []}}

# What a SIGTERM costs after the receiver's drain (receiver.shutdown_timeout), each bounded and generous:
# cancelling the forwarders (an association in progress is aborted; claims go back to pending in one
# transaction), telemetry's retained `offline` and disconnect (telemetry.STOP_TIMEOUT is 2 s), the last
# group commit and closing the index, and the interpreter's exit (thread pools joined).
FORWARDER_STOP_SECONDS = 5.0
TELEMETRY_STOP_SECONDS = 5.0
INDEX_CLOSE_SECONDS = 5.0
INTERPRETER_EXIT_SECONDS = 2.0


# --- the unit file ---


def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """Every `Key=value` of a unit file, values in order (sections do not matter: no key repeats across)."""
    settings: dict[str, list[str]] = collections.defaultdict(list)
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings[key.strip()].append(value.strip())
    return settings


def timespan_seconds(text: str) -> float:
    """A systemd time span ("45s", "1min 30s", "90") in seconds: the units this unit may use."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise ValueError(f"not a time span this test understands: {text!r}")
    return sum(float(number) * units[unit or "s"] for number, unit in parts)


def systemd_tool(*argv: str) -> subprocess.CompletedProcess[str]:
    require_tools(argv[0])  # fails (never skips): `make test` installs Debian's systemd package
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_unit_exposure_is_ok() -> None:
    result = systemd_tool("systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT))
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert found, result.stdout + result.stderr
    exposed = "\n".join(line for line in result.stdout.splitlines() if line.startswith("✗"))
    assert float(found[1]) <= MAX_EXPOSURE, f"exposure {found[1]}; still exposed:\n{exposed}"
    assert found[2] == "OK"
    assert result.stderr == ""  # e.g. an unknown or misspelt setting would be warned about here


def test_unit_verifies_without_a_word(tmp_path: Path) -> None:
    # `verify` checks that ExecStart's program exists and is executable. /usr/bin/dicom-gateway exists only
    # where the package is installed, so a copy of the unit points at this venv's console script (the
    # venv install the README describes). Nothing else changes. It does not resolve User=: the
    # dicom-gateway user need not exist here (systemd-sysusers makes it at install, tested below).
    program = Path(sys.executable).parent / "dicom-gateway"
    assert os.access(program, os.X_OK), f"{program}: run `make test` (it installs the package in the venv)"
    text = UNIT.read_text(encoding="utf-8")
    assert "ExecStart=/usr/bin/dicom-gateway run" in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace("ExecStart=/usr/bin/", f"ExecStart={program.parent}/"), encoding="utf-8")
    result = systemd_tool("systemd-analyze", "verify", str(copy))
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_unit_names_match_the_gateways_defaults() -> None:
    unit = unit_settings()
    defaults = parse_config(MINIMAL_CONFIG)
    assert unit["Environment"] == [f"DICOM_GATEWAY_CONFIG={DEFAULT_CONFIG_PATH}"]
    assert unit["ConfigurationDirectory"] == [DEFAULT_CONFIG_PATH.parent.name]
    assert Path("/var/lib", *unit["StateDirectory"]) == defaults.gateway.state_dir
    assert unit["User"] == unit["Group"] == ["dicom-gateway"]
    # READY/STOPPING/WATCHDOG come from the main process; a ping or two lost (or late) is no restart.
    assert (unit["Type"], unit["NotifyAccess"]) == (["notify"], ["main"])
    assert timespan_seconds(unit["WatchdogSec"][0]) >= 10 * HEARTBEAT_SECONDS


def user_database(path: Path) -> dict[str, list[str]]:
    """/etc/passwd or /etc/group as {name: fields}."""
    return {line.split(":")[0]: line.split(":") for line in path.read_text(encoding="utf-8").splitlines()}


def test_sysusers_and_tmpfiles_make_the_user_and_the_secret_directory(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n", encoding="utf-8")
    (root / "etc" / "group").write_text("root:x:0:\ndialout:x:20:\n", encoding="utf-8")  # as on Debian

    result = systemd_tool("systemd-sysusers", f"--root={root}", str(SYSUSERS))
    assert result.returncode == 0, result.stderr
    users, groups = user_database(root / "etc" / "passwd"), user_database(root / "etc" / "group")
    user = users["dicom-gateway"]
    assert user[5:] == [f"/var/lib/{unit_settings()['StateDirectory'][0]}", "/usr/sbin/nologin"]
    assert user[3] == groups["dicom-gateway"][2]
    assert groups["dialout"] == ["dialout", "x", "20", "dicom-gateway"]

    config_dir = root / "etc" / "dicom-gateway"  # the unit's ConfigurationDirectory=
    config_dir.mkdir()
    (config_dir / "mqtt.pass").write_text("secret\n", encoding="utf-8")
    result = systemd_tool("systemd-tmpfiles", "--create", f"--root={root}", str(TMPFILES))
    secrets = [(config_dir / "tls", 0o750), (config_dir / "mqtt.pass", 0o640)]
    assert [path.stat().st_mode & 0o7777 for path, _ in secrets] == [mode for _, mode in secrets]
    if os.geteuid() == 0:
        assert result.returncode == 0, result.stderr
        owners = {(path.stat().st_uid, path.stat().st_gid) for path, _ in secrets}
        assert owners == {(0, int(groups["dicom-gateway"][2]))}
    else:  # giving them to root and the new group takes root; everything else was done
        assert all("Operation not permitted" in line for line in result.stderr.splitlines()), result.stderr


def test_shutdown_budget_fits_in_timeout_stop_sec() -> None:
    timeout_stop = timespan_seconds(unit_settings()["TimeoutStopSec"][0])
    defaults = parse_config(MINIMAL_CONFIG)
    budget = (
        defaults.receiver.shutdown_timeout
        + FORWARDER_STOP_SECONDS
        + TELEMETRY_STOP_SECONDS
        + INDEX_CLOSE_SECONDS
        + INTERPRETER_EXIT_SECONDS
    )
    # systemd SIGKILLs at TimeoutStopSec: a kill mid-commit would turn a clean stop into a recovery.
    assert budget < timeout_stop, f"shutdown may take {budget:g} s; TimeoutStopSec is {timeout_stop:g} s"


# --- sd_notify ---


class FakeManager:
    """The service manager's end of `$NOTIFY_SOCKET`: a datagram socket that records who sent what."""

    def __init__(self, address: str) -> None:
        self.address = address  # a path, or "@name" in the abstract namespace
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # as systemd: the sender's pid
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)

    def receive(self, timeout: float = 5.0) -> tuple[int, str]:
        """The next datagram's sender pid and text; TimeoutError when none comes."""
        self.sock.settimeout(timeout)
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        pids = [
            struct.unpack("3i", payload)[0]
            for level, kind, payload in ancillary
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
        ]
        return pids[0], data.decode()

    def texts_until(self, wanted: str, timeout: float) -> list[str]:
        """Datagrams up to and including the first that has the assignment `wanted`."""
        texts: list[str] = []
        while wanted not in (texts[-1].split("\n") if texts else []):
            try:
                texts.append(self.receive(timeout)[1])
            except TimeoutError:
                pytest.fail(f"no {wanted} within {timeout:g} s; got {texts}")
        return texts

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("@"):
            Path(self.address).unlink(missing_ok=True)


@pytest.fixture(params=["path", "abstract"])
def manager(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FakeManager]:
    address = str(tmp_path / "notify") if request.param == "path" else f"@dicom-gateway-test/{os.getpid()}"
    fake = FakeManager(address)
    yield fake
    fake.close()


def test_ready_stopping_watchdog_and_status_send_the_documented_datagrams(manager: FakeManager) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": manager.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    sent = [
        notifier.ready("receiving on port 104"),
        notifier.ready(),
        notifier.watchdog(),
        notifier.status("3 pending"),
        notifier.status("two\nlines"),  # a newline would start another assignment: READY=1, say
        notifier.stopping(),
    ]
    assert sent == [True] * 6
    received = [manager.receive() for _ in sent]
    assert {pid for pid, _ in received} == {os.getpid()}
    assert [text for _, text in received] == [
        "READY=1\nSTATUS=receiving on port 104",
        "READY=1",
        "WATCHDOG=1",
        "STATUS=3 pending",
        "STATUS=two lines",
        "STOPPING=1",
    ]


def test_notifier_reads_the_process_environment_by_default(
    manager: FakeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert Notifier().ready()
    assert manager.receive()[1] == "READY=1"


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier({"WATCHDOG_USEC": str(WATCHDOG_USEC)})
    assert not notifier.enabled
    assert not notifier.watchdog_enabled
    sent = [notifier.ready("x"), notifier.stopping(), notifier.watchdog(), notifier.status("x")]
    assert sent == [False] * 4


def test_a_manager_that_went_away_costs_a_datagram_never_an_exception(tmp_path: Path) -> None:
    gone = [FakeManager(str(tmp_path / "gone")), FakeManager(f"@dicom-gateway-test/gone/{os.getpid()}")]
    for fake in gone:
        fake.close()
    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("")
    addresses = [fake.address for fake in gone] + [str(not_a_socket), "relative/notify", "vsock:2:1234"]
    for address in addresses:
        notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
        assert [notifier.ready(), notifier.watchdog(), notifier.stopping()] == [False] * 3, address


def test_a_manager_that_does_not_keep_up_never_blocks_the_caller(tmp_path: Path) -> None:
    """A full receive queue drops pings; a blocking send would freeze the event loop (and the watchdog)."""
    fake = FakeManager(str(tmp_path / "slow"))
    notifier = Notifier({"NOTIFY_SOCKET": fake.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    results: list[bool] = []
    # A thread, so that a send that blocks fails this test instead of hanging it (closing the socket
    # below ends such a send).
    pinging = threading.Thread(target=lambda: results.extend(notifier.watchdog() for _ in range(2000)))
    pinging.start()
    pinging.join(10)
    fake.close()
    assert not pinging.is_alive(), "sd_notify blocked on a full queue"
    assert True in results
    assert False in results


@pytest.mark.parametrize(
    ("environ", "pings"),
    [
        ({}, False),
        ({"WATCHDOG_USEC": str(WATCHDOG_USEC)}, True),
        ({"WATCHDOG_USEC": str(WATCHDOG_USEC), "WATCHDOG_PID": "{pid}"}, True),
        ({"WATCHDOG_USEC": str(WATCHDOG_USEC), "WATCHDOG_PID": ""}, True),
        ({"WATCHDOG_USEC": str(WATCHDOG_USEC), "WATCHDOG_PID": "{other}"}, False),  # meant for another
        ({"WATCHDOG_USEC": "0"}, False),
        ({"WATCHDOG_USEC": "soon"}, False),
        ({"WATCHDOG_USEC": str(WATCHDOG_USEC), "WATCHDOG_PID": "me"}, False),
    ],
)
def test_watchdog_pings_only_when_the_manager_asks_this_process(
    manager: FakeManager, environ: dict[str, str], pings: bool
) -> None:
    values = {key: value.format(pid=os.getpid(), other=os.getpid() + 1) for key, value in environ.items()}
    notifier = Notifier({"NOTIFY_SOCKET": manager.address, **values})
    assert notifier.watchdog_enabled is pings
    assert notifier.watchdog() is pings
    assert notifier.status("marker")  # datagrams keep their order: whatever precedes the marker was sent
    expected = ["WATCHDOG=1", "STATUS=marker"] if pings else ["STATUS=marker"]
    assert [manager.receive()[1] for _ in expected] == expected


# --- the gateway process under a service manager ---


def gateway_argv(config: Path, *, sandbox: Path | None = None) -> list[str]:
    argv = [sys.executable, "-m", "gateway", "-c", str(config), "run"]
    return [sys.executable, "-m", "tests.test_systemd", str(sandbox), *argv] if sandbox else argv


@pytest.fixture
def service_manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeManager]:
    """A fake manager for a child process; the test's own watchdog variables (if any) are not passed on."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    fake = FakeManager(str(tmp_path / "notify"))
    yield fake
    fake.close()


def test_gateway_under_a_service_manager_is_ready_pings_and_stops(
    tmp_path: Path, service_manager: FakeManager
) -> None:
    setup = write_config(tmp_path)
    process = ManagedProcess(  # no ready line: READY=1 is what this test waits for
        gateway_argv(setup.config),
        env={
            "NOTIFY_SOCKET": service_manager.address,
            "WATCHDOG_USEC": str(WATCHDOG_USEC),
            "PYTHONUNBUFFERED": "1",
        },
        cwd=REPO,
    )
    with process:
        before = service_manager.texts_until("READY=1", timeout=20)
        # The receiver listened before READY=1 was sent: the DICOM port accepts at once.
        with socket.create_connection(("127.0.0.1", setup.port), timeout=2):
            pass
        assert set(before[:-1]) <= {"WATCHDOG=1"}, before  # pings may start before READY, nothing else
        assert before[-1] == f"READY=1\nSTATUS=receiving on port {setup.port}"
        pings = [service_manager.receive(timeout=3) for _ in range(3)]
        assert pings == [(process.pid, "WATCHDOG=1")] * 3  # from the main process: NotifyAccess=main
        returncode = process.stop(grace=30)
    assert returncode == 0, process.output()
    after = service_manager.texts_until("STOPPING=1", timeout=1)
    assert set(after[:-1]) <= {"WATCHDOG=1"}, after


def test_gateway_works_inside_the_units_sandbox(
    tmp_path: Path, pki: Pki, service_manager: FakeManager
) -> None:
    """Receive over TLS, store, forward over mutual TLS, serve metrics, reload, stop: all under the unit's
    SystemCallFilter, RestrictAddressFamilies and MemoryDenyWriteExecute (a call outside them kills it)."""
    spec = tmp_path / "sandbox.json"
    spec.write_text(json.dumps(unit_sandbox()), encoding="utf-8")
    study = StudySpec(modality="CT", images_per_series=6, rows=32, columns=32, seed=61)
    context = server_tls_context(pki.pacs_cert, pki.pacs_key, pki.ca)
    metrics_port = free_port()
    receiver_tls = f'[receiver.tls]\ncert = "{pki.server_cert}"\nkey = "{pki.server_key}"\nca = "{pki.ca}"\n'
    with PacsSimulator(tmp_path / "archive", port=free_port(), ae_title=PACS_AE, ssl_context=context) as pacs:
        destination = destination_section(
            "pacs",
            pacs.port,
            called_ae=PACS_AE,
            tls=f'[destination.tls]\nca = "{pki.ca}"\ncert = "{pki.gateway_client_cert}"\n'
            f'key = "{pki.gateway_client_key}"\nserver_hostname = "localhost"\n',
        )
        setup = write_config(
            tmp_path,
            receiver_extra=receiver_tls,
            sections=destination,
            metrics_port=metrics_port,
        )
        process = ManagedProcess(
            gateway_argv(setup.config, sandbox=spec),
            ready_line=READY_LINE,
            timeout=30,
            env={"NOTIFY_SOCKET": service_manager.address, "PYTHONUNBUFFERED": "1"},
            cwd=REPO,
        )
        with process:
            # No WATCHDOG_USEC here: READY=1 is the first datagram, and no ping ever follows.
            ready = f"READY=1\nSTATUS=receiving on port {setup.port}"
            assert service_manager.texts_until("READY=1", timeout=5) == [ready]
            options = ScanOptions(
                port=setup.port, calling_ae=SCANNER_AE, called_ae=GATEWAY_AE, study=study, tls=pki.scanner()
            )
            assert run_scanner(options).statuses == {0x0000: 6}
            assert pacs.wait_for(6, 30)
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
                assert b"dicom_gateway_" in response.read()
            os.kill(process.pid or 0, signal.SIGHUP)  # ExecReload=
            wait_until(lambda: "Configuration reloaded" in process.output(), 10, "the reload")
            returncode = process.stop(grace=30)
    sigsys = f"-{signal.SIGSYS.value}: SIGSYS, a call outside the filter"
    assert returncode == 0, f"exit {returncode} ({sigsys})\n{process.output()}"
    assert service_manager.texts_until("STOPPING=1", timeout=1) == ["STOPPING=1"]


# --- the sandbox: the unit's seccomp settings, as systemd applies them before ExecStart ---


@functools.cache
def syscall_group(name: str) -> frozenset[str]:
    """The system calls a SystemCallFilter= name stands for, as systemd resolves them (groups nest)."""
    if not name.startswith("@"):
        return frozenset({name})
    listing = systemd_tool("systemd-analyze", "syscall-filter", "--no-pager", name)
    assert listing.returncode == 0, listing.stderr
    members: set[str] = set()
    for raw in listing.stdout.splitlines():
        entry = raw.strip()
        if entry and not entry.startswith("#") and entry != name:
            members |= syscall_group(entry)
    return frozenset(members)


def unit_sandbox() -> dict[str, Any]:
    """The unit's system call allow list, socket families and W^X rule, for `_exec_in_sandbox`."""
    unit = unit_settings()
    allowed: set[str] = set()
    denied: set[str] = set()
    for value in unit["SystemCallFilter"]:  # the first is an allow list; "~" entries take from it
        names = value.removeprefix("~").split()
        (denied if value.startswith("~") else allowed).update(*(syscall_group(n) for n in names))
    syscalls = allowed - denied
    if os.geteuid() == 0:
        # SQLite gives a new -wal/-journal file to the database's owner, with fchown(), only when it
        # runs as root (robustFchown). The unit never does (User=); a test run as root does.
        syscalls.add("fchown")
    (families,) = unit["RestrictAddressFamilies"]
    return {
        "syscalls": sorted(syscalls),
        "families": [int(getattr(socket, name)) for name in families.split()],
        "deny_write_execute": unit["MemoryDenyWriteExecute"] == ["yes"],
    }


class _ArgCmp(ctypes.Structure):
    """libseccomp's `struct scmp_arg_cmp`."""

    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


_SCMP_ACT_KILL_PROCESS = 0x80000000
_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_ACT_ERRNO = 0x00050000
_SCMP_CMP_EQ, _SCMP_CMP_GE, _SCMP_CMP_MASKED_EQ = 4, 5, 7
_SHM_EXEC = 0o100000
_AF_LIMIT = 64  # above every address family Linux knows


def _exec_in_sandbox(argv: list[str]) -> NoReturn:
    """Load the seccomp filters that the spec file argv[0] describes, then exec argv[1:].

    Stricter than systemd where that shows more: a call outside the allow list or a W+X mapping kills
    the process (SIGSYS) instead of failing with EPERM. Socket families outside the list fail with
    EAFNOSUPPORT, as under systemd (glibc probes AF_NETLINK and copes).
    """
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]

    def rule(ctx: int, action: int, name: str, *cmp: tuple[int, int, int, int]) -> int:
        args = (_ArgCmp * max(len(cmp), 1))(*(_ArgCmp(*c) for c in cmp))
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        return int(lib.seccomp_rule_add_array(ctx, action, nr, len(cmp), args)) if nr >= 0 else 0

    # Filter 1 (default allow): socket families, and W^X as systemd 252 writes it in seccomp.
    extra = lib.seccomp_init(_SCMP_ACT_ALLOW)
    refuse = _SCMP_ACT_ERRNO | errno.EAFNOSUPPORT
    for family in set(range(_AF_LIMIT)) - set(spec["families"]):
        assert rule(extra, refuse, "socket", (0, _SCMP_CMP_EQ, family, 0)) == 0
    assert rule(extra, refuse, "socket", (0, _SCMP_CMP_GE, _AF_LIMIT, 0)) == 0
    if spec["deny_write_execute"]:  # the third argument (prot, shmflg) masked: W and X together, or X
        write_exec = mmap.PROT_WRITE | mmap.PROT_EXEC
        for name, mask in [
            ("mmap", write_exec),
            ("mprotect", mmap.PROT_EXEC),
            ("pkey_mprotect", mmap.PROT_EXEC),
            ("shmat", _SHM_EXEC),
        ]:
            assert rule(extra, _SCMP_ACT_KILL_PROCESS, name, (2, _SCMP_CMP_MASKED_EQ, mask, mask)) == 0
    assert lib.seccomp_load(extra) == 0
    # Filter 2 (default kill): the allow list. Loaded last, so that loading filter 1 was still allowed.
    # Names of other architectures' calls do not resolve here and are skipped, as systemd does.
    allow_list = lib.seccomp_init(_SCMP_ACT_KILL_PROCESS)
    for name in spec["syscalls"]:
        rule(allow_list, _SCMP_ACT_ALLOW, name)
    assert lib.seccomp_load(allow_list) == 0  # also sets no_new_privs, as NoNewPrivileges=yes
    os.execv(argv[1], argv[1:])  # noqa: S606 - argv comes from the test that started us


if __name__ == "__main__":
    _exec_in_sandbox(sys.argv[1:])
