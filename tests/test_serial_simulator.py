"""The serial simulators alone, with pyserial (or a bare descriptor) as the client, and their CLI."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import serial

from simulators import cli
from simulators.harness import ManagedProcess
from simulators.serialdev import KeyValueSimulator, UpsSimulator, UpsState, parse_script
from tests.conftest import REPO

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

HEALTHY = b"(230.0 230.0 230.0 021 50.0 2.27 30.0 00001000\r"
READY = r"serial simulator on (/dev/\S+)"


@pytest.fixture
def ups() -> Iterator[UpsSimulator]:
    with UpsSimulator() as simulator:
        yield simulator


@contextlib.contextmanager
def client(path: str, timeout: float = 2.0) -> Iterator[serial.Serial]:
    with serial.Serial(path, 2400, timeout=timeout) as port:
        yield port


def ask(port: serial.Serial, command: bytes = b"Q1\r") -> bytes:
    port.write(command)
    return port.read_until(b"\r")


def eventually(condition: Callable[[], object], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def open_descriptors() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


def test_ups_answers_q1_with_its_state(ups):
    with client(ups.path) as port:
        assert ask(port) == HEALTHY
        ups.set_state(UpsState(load_percent=85, temperature_celsius=41.5, standby_type=False))
        assert ask(port) == b"(230.0 230.0 230.0 085 50.0 2.27 41.5 00000000\r"
    assert ups.polls == 2


def test_ups_power_fail_battery_low_and_restore_change_the_status_bits(ups):
    with client(ups.path) as port:
        ups.power_fail()
        assert ask(port) == b"(000.0 230.0 230.0 021 50.0 2.27 30.0 10001001\r"
        ups.battery_low()
        assert ask(port) == b"(000.0 230.0 230.0 021 50.0 1.85 30.0 11001001\r"
        ups.power_restore()
        assert ask(port) == HEALTHY
    assert ups.state == UpsState()


def test_ups_echoes_other_commands_and_counts_only_q1(ups):
    with client(ups.path) as port:
        assert ask(port, b"F\r") == b"F\r"
        assert ask(port, b"\nQ1\r") == HEALTHY  # a stray LF before the command is ignored
    assert ups.polls == 1


def test_silenced_ups_counts_polls_but_answers_only_after_resume(ups):
    with client(ups.path, timeout=0.3) as port:
        ups.silence()
        assert ask(port) == b""
        assert ups.polls == 1
        ups.resume()
        port.reset_input_buffer()
        assert ask(port) == HEALTHY


def test_pty_is_raw_so_a_client_that_sets_no_mode_sees_cr_unchanged(ups):
    fd = os.open(ups.path, os.O_RDWR | os.O_NOCTTY)
    try:
        os.write(fd, b"Q1\r")
        answer = b""
        while not answer.endswith(b"\r"):
            answer += os.read(fd, 100)
    finally:
        os.close(fd)
    assert answer == HEALTHY


def test_keyvalue_device_sends_a_line_every_interval():
    with KeyValueSimulator(interval=0.1) as sim, client(sim.path) as port:
        first = port.readline()
        started = time.monotonic()
        second = port.readline()
        elapsed = time.monotonic() - started
        sim.set_values(temp=22.75, door="open")
        eventually(lambda: b"22.75" in port.readline())

    assert first == second == b"temp=21.5 humidity=40.2 door=0\r\n"
    assert 0.05 < elapsed < 0.5
    assert sim.line() == b"temp=22.75 humidity=40.2 door=open\r\n"
    assert sim.polls >= 3


def test_silenced_keyvalue_device_sends_nothing_until_resumed():
    with KeyValueSimulator(interval=0.05) as sim, client(sim.path, timeout=0.3) as port:
        port.readline()
        sim.silence()
        polls = sim.polls
        eventually(lambda: port.read(100) == b"")  # a line already under way may still arrive
        assert sim.polls > polls  # the beats go on, unsent
        sim.resume()
        assert port.readline() == b"temp=21.5 humidity=40.2 door=0\r\n"


def test_nobody_reading_never_blocks_the_simulator():
    with KeyValueSimulator(interval=0.001) as sim:
        started = time.monotonic()
        for _ in range(64):
            sim.write(b"x" * 4096)  # far beyond the pty's buffer: the rest is dropped
        eventually(lambda: sim.polls > 200)
        assert time.monotonic() - started < 5
    # stop() (leaving the block) returned: the thread was never stuck in a write


def test_run_script_runs_each_action_at_its_time(ups):
    started = time.monotonic()
    ups.run_script([(0.3, "battery_low"), (0.1, "power_fail"), (0.5, "power_restore")])

    eventually(lambda: ups.state.utility_fail)
    assert not ups.state.battery_low
    eventually(lambda: ups.state.battery_low)
    assert time.monotonic() - started >= 0.3
    eventually(lambda: not ups.state.utility_fail)
    assert ups.state == UpsState()


def test_run_script_silences_and_resumes():
    with KeyValueSimulator(interval=0.05) as sim, client(sim.path, timeout=0.3) as port:
        sim.run_script([(0.0, "silence"), (1.0, "resume")])
        eventually(lambda: sim.silent)
        port.reset_input_buffer()  # the serving thread itself went silent: nothing is under way
        assert port.read(1000) == b""
        port.timeout = 3.0
        assert port.readline() == b"temp=21.5 humidity=40.2 door=0\r\n"
        assert not sim.silent


def test_run_script_rejects_unknown_actions(ups):
    with pytest.raises(ValueError, match="unknown action"):
        ups.run_script([(1, "explode")])
    with KeyValueSimulator() as sim, pytest.raises(ValueError, match="power_fail"):
        sim.run_script([(1, "power_fail")])  # a sensor has no mains to lose


@pytest.mark.parametrize(
    ("text", "steps"),
    [
        (
            "10:power_fail,20:battery_low,40:power_restore",
            [(10, "power_fail"), (20, "battery_low"), (40, "power_restore")],
        ),
        (" 0.5 : silence , 2:resume ,", [(0.5, "silence"), (2, "resume")]),
        ("", []),
    ],
)
def test_parse_script(text, steps):
    assert parse_script(text) == steps


@pytest.mark.parametrize("text", ["power_fail", "x:power_fail", "-1:silence", "10:", "10;silence"])
def test_parse_script_rejects_malformed_steps(text):
    with pytest.raises(ValueError, match="SECONDS:ACTION"):
        parse_script(text)


def test_stop_is_idempotent_and_closes_every_descriptor():
    before = open_descriptors()
    sim = UpsSimulator().start()
    path = sim.path
    assert Path(path).exists()

    sim.stop()
    sim.stop()

    assert open_descriptors() == before
    with pytest.raises(RuntimeError, match="not running"):
        sim.run_script([(0, "silence")])
    with pytest.raises(RuntimeError, match="not running"):
        sim.write(b"Q1\r")


def test_path_before_start_is_an_error():
    with pytest.raises(RuntimeError, match="not started"):
        _ = UpsSimulator().path


def test_cli_prints_the_pty_path_and_runs_the_script():
    argv = [
        sys.executable,
        "-m",
        "simulators",
        "serial",
        "--protocol",
        "megatec-q1",
        "--script",
        "0.3:power_fail",
    ]
    with ManagedProcess(argv, ready_line=READY, cwd=REPO) as process:
        match = re.search(READY, process.output())
        assert match is not None
        with client(match.group(1)) as port:
            assert ask(port) == HEALTHY
            eventually(lambda: ask(port).endswith(b" 10001001\r"))
        returncode = process.stop()

    assert returncode == 0, process.output()
    assert re.search(r"serial simulator: \d+ polls", process.output())


def test_cli_keyvalue_device_sends_at_the_given_interval():
    argv = [sys.executable, "-m", "simulators", "serial", "--protocol", "keyvalue", "--interval", "0.1"]
    with ManagedProcess(argv, ready_line=READY, cwd=REPO) as process:
        match = re.search(READY, process.output())
        assert match is not None
        with client(match.group(1)) as port:
            assert port.readline() == b"temp=21.5 humidity=40.2 door=0\r\n"


def test_cli_rejects_an_unknown_script_action_before_ready():
    result = subprocess.run(
        [sys.executable, "-m", "simulators", "serial", "--protocol", "keyvalue", "--script", "1:power_fail"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        check=False,
    )

    assert result.returncode == 2
    assert "unknown action(s) power_fail" in result.stderr
    assert "serial simulator on" not in result.stdout


def test_cli_parser_knows_the_serial_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serial", "--protocol", "modbus"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'modbus'" in capsys.readouterr().err
