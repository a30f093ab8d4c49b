"""The processes a benchmark runs: receivers (storescp, Orthanc, the gateway) and the storescu sender.

Every receiver is a context manager around `simulators.harness.ManagedProcess`: it starts on a free
loopback port in a directory of its own, is ready when its port accepts (or, for the gateway, when it
logs its ready line), counts what it stored, and is stopped (SIGTERM, then SIGKILL) when the block ends,
also on an exception or Ctrl-C. storescu runs are killed the same way if interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trustme

from simulators.harness import ManagedProcess, free_port

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
# DCMTK leaves Nagle on unless told: each C-STORE would then wait 40-70 ms for a delayed ACK.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
GATEWAY_AE = "EDGE_GW"
STORESCP_AE = "STORESCP"
ORTHANC_AE = "ORTHANC"
GATEWAY_READY = r"Gateway \S+ ready"


@dataclass(frozen=True)
class Pki:
    """A throwaway CA (trustme) and PEM files: the archive's server pair, the senders' client pair."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_pki(directory: Path) -> Pki:
    """Write a fresh CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("edge-gw.example", common_name=GATEWAY_AE)
    blobs = {
        "ca": ca.cert_pem,
        "server_cert": server.cert_chain_pems[0],
        "server_key": server.private_key_pem,
        "client_cert": client.cert_chain_pems[0],
        "client_key": client.private_key_pem,
    }
    paths = {name: directory / f"{name}.pem" for name in blobs}
    for name, blob in blobs.items():
        blob.write_to_path(str(paths[name]))
    return Pki(**paths)


@dataclass
class Receiver:
    """A started receiver: where to send, whom to measure, and how to count what it stored."""

    name: str
    ae_title: str
    port: int
    process: ManagedProcess
    forks: bool  # one child process per association (storescp --fork)
    directory: Path  # what it stored lives under here

    @property
    def pid(self) -> int:
        pid = self.process.pid
        if pid is None:
            raise RuntimeError(f"{self.name} is not running")
        return pid

    def count(self) -> int:
        """How many objects the receiver holds now."""
        raise NotImplementedError


class StorescpReceiver(Receiver):
    def count(self) -> int:
        return sum(1 for p in self.directory.iterdir() if p.is_file())


@dataclass
class OrthancReceiver(Receiver):
    http_port: int = 0

    def count(self) -> int:
        url = f"http://127.0.0.1:{self.http_port}/statistics"
        with urllib.request.urlopen(url, timeout=30) as response:
            return int(json.load(response)["CountInstances"])


@dataclass
class GatewayReceiver(Receiver):
    state_dir: Path = Path()

    @property
    def index(self) -> Path:
        return self.state_dir / "index.sqlite"

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Read the index beside the running daemon (read-only, as the CLI does)."""
        db = sqlite3.connect(f"file:{self.index}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()

    def count(self) -> int:
        return int(self.query("SELECT count(*) FROM instances")[0][0])


@contextlib.contextmanager
def storescp(directory: Path, *, fork: bool, pki: Pki | None = None, port: int = 0) -> Iterator[Receiver]:
    """DCMTK's storescp writing each object as received (+B, no fsync) into `directory/received`."""
    port = port or free_port()
    out = directory / "received"
    out.mkdir(parents=True, exist_ok=True)
    argv = ["storescp", "--aetitle", STORESCP_AE, "--output-directory", str(out), "+B"]
    if fork:
        argv.append("--fork")
    if pki is not None:  # TLS, and the client must present a certificate our CA signed
        argv += ["+tls", str(pki.server_key), str(pki.server_cert), "-pw", "+cf", str(pki.ca), "-rc"]
    argv.append(str(port))
    with ManagedProcess(argv, ready_port=port, env=DCMTK_ENV, timeout=15) as process:
        yield StorescpReceiver("storescp", STORESCP_AE, port, process, forks=fork, directory=out)


def _orthanc_binary() -> str:
    found = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not Path(found).is_file():
        raise RuntimeError("Orthanc is not installed: `make bench` installs Debian's orthanc package")
    return found


@contextlib.contextmanager
def orthanc(directory: Path) -> Iterator[Receiver]:
    """Debian's Orthanc with its own config: loopback, no plugins, default storage (fsync) settings."""
    dicom_port, http_port = free_port(), free_port()
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "bench",
        "StorageDirectory": str(directory / "storage"),
        "IndexDirectory": str(directory / "index"),
        "DicomAet": ORTHANC_AE,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "Plugins": [],
    }
    config_file = directory / "orthanc.json"
    config_file.write_text(json.dumps(config, indent=2))
    argv = [_orthanc_binary(), str(config_file)]
    # Orthanc's DICOM server is DCMTK's: it honours TCP_NODELAY as storescp does.
    with ManagedProcess(argv, ready_port=dicom_port, env=DCMTK_ENV, timeout=60) as process:
        receiver = OrthancReceiver(
            "orthanc", ORTHANC_AE, dicom_port, process, forks=False, directory=directory, http_port=http_port
        )
        _wait_http(receiver)
        yield receiver


def _wait_http(receiver: OrthancReceiver, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            receiver.count()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
        else:
            return


def write_gateway_config(directory: Path, state_dir: Path, port: int, destination: str = "") -> Path:
    """A receive-only gateway config (plus `destination`, a [[destination]] table, if given)."""
    config = directory / "gateway.toml"
    config.write_text(
        f"""
[gateway]
node_id = "bench"
ae_title = "{GATEWAY_AE}"
state_dir = "{state_dir}"
min_free_bytes = "1GiB"
log_level = "info"
log_format = "json"

[receiver]
host = "127.0.0.1"
port = {port}
allowed_calling_ae = ["*"]

[metrics]
enabled = false
{destination}
""",
        encoding="utf-8",
    )
    return config


def destination_table(
    port: int, pki: Pki | None, *, name: str = "archive", called_ae: str = STORESCP_AE
) -> str:
    """A [[destination]] toward loopback `port` (storescp by default), over mutual TLS when `pki` is given."""
    tls = "tls = false"
    if pki is not None:
        tls = (
            f'[destination.tls]\nca = "{pki.ca}"\ncert = "{pki.client_cert}"\nkey = "{pki.client_key}"\n'
            'server_hostname = "localhost"'
        )
    return f"""
[[destination]]
name = "{name}"
host = "127.0.0.1"
port = {port}
called_ae = "{called_ae}"
{tls}
[destination.retry]
initial_delay = "1s"
max_delay = "2s"
"""


@contextlib.contextmanager
def gateway(
    directory: Path, *, destination: str = "", state_dir: Path | None = None, port: int = 0
) -> Iterator[GatewayReceiver]:
    """The gateway daemon (`python -m gateway -c FILE run`) with its full durability contract."""
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    state_dir = state_dir or directory / "state"
    config = write_gateway_config(directory, state_dir, port, destination)
    argv = [sys.executable, "-m", "gateway", "-c", str(config), "run"]
    process = ManagedProcess(
        argv, ready_line=GATEWAY_READY, timeout=60, env={"PYTHONUNBUFFERED": "1"}, cwd=REPO, tail_lines=2000
    )
    with process:
        yield GatewayReceiver(
            "gateway", GATEWAY_AE, port, process, forks=False, directory=state_dir, state_dir=state_dir
        )


def storescu(
    runs: Sequence[Sequence[Path]],
    port: int,
    called_ae: str,
    *,
    log_dir: Path,
    pki: Pki | None = None,
) -> tuple[float, float]:
    """Send each run of files with its own storescu (one association each), all at once.

    Returns the wall-clock seconds from the first start to the last exit, and the CPU seconds the
    storescu processes used (this process's reaped-children usage before and after: nothing else of
    ours ends meanwhile). Raises if any storescu fails.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    tls: list[str] = []
    if pki is not None:
        tls = ["+tls", str(pki.client_key), str(pki.client_cert), "-pw", "+cf", str(pki.ca)]
    processes: list[tuple[subprocess.Popen[bytes], Path]] = []
    cpu_before = _children_cpu()
    started = time.monotonic()
    try:
        for number, files in enumerate(runs):
            log_file = log_dir / f"storescu-{number}.log"
            argv = ["storescu", *tls, "-aet", "STORESCU", "-aec", called_ae, "127.0.0.1", str(port)]
            with log_file.open("wb") as sink:
                process = subprocess.Popen(
                    [*argv, *map(str, files)], env=DCMTK_ENV, stdout=sink, stderr=subprocess.STDOUT
                )
            processes.append((process, log_file))
        for process, _ in processes:
            process.wait()
        elapsed = time.monotonic() - started
        cpu = _children_cpu() - cpu_before
    finally:
        for process, _ in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, log_file in processes:
        if process.returncode != 0:
            tail = log_file.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"storescu exited {process.returncode}:\n{tail}")
    return elapsed, cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
