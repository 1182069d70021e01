"""Owned child processes: stopped with their whole group on every path, waited for a bounded
time, and their failure the caller's, naming the role, the exit code and the log's tail."""

import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from stages.core.common import StageError
from stages.core.processes import Command, Readiness, owned, owned_processes


def _live_members(group: int) -> list[int]:
    # From /proc: zombies (killed, not yet reaped by init) do not count.
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == group:
            members.append(int(stat.parent.name))
    return members


def _ready(process, text: str = "ready") -> Readiness:
    return Readiness(lambda: text in process.log.read_text(), 30, "saying ready", "say ready")


STUBBORN = (
    "import signal, subprocess, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "subprocess.Popen(['sleep', '300']); print('ready', flush=True); time.sleep(300)"
)


def test_an_owned_process_and_its_children_stop_even_when_it_ignores_sigterm(tmp_path):
    # The leader ignores SIGTERM and leaves a grandchild running: both must still go.
    command = Command("stubborn", [sys.executable, "-c", STUBBORN], tmp_path / "log")
    with owned(replace(command, grace_seconds=1)) as process:
        process.wait_until_ready(_ready(process))
        assert len(_live_members(process.pid)) == 2
        started = time.monotonic()
    assert time.monotonic() - started < 15
    assert process.returncode == -signal.SIGKILL and not process.alive()
    assert not _live_members(process.pid)  # stop() returns once the group is gone


def test_a_process_that_exits_while_starting_is_the_callers_error_with_its_log(tmp_path):
    script = "print('no such model: mnist-mlp-x'); raise SystemExit(3)"
    command = Command("the thing", [sys.executable, "-c", script], tmp_path / "log")
    with pytest.raises(StageError) as error, owned(command) as process:
        process.wait_until_ready(Readiness(lambda: False, 30, "answering GET /ping", "answer"))
    message = str(error.value)
    assert message.startswith("the thing exited with code 3 before answering GET /ping; its last")
    assert message.endswith("output:\n    no such model: mnist-mlp-x")


def test_waiting_is_bounded_and_names_the_setting_and_the_log(tmp_path):
    script = "print('still loading', flush=True); import time; time.sleep(300)"
    command = Command("the thing", [sys.executable, "-c", script], tmp_path / "log")
    started = time.monotonic()
    with pytest.raises(StageError) as error, owned(command) as process:
        process.wait_until_ready(
            Readiness(lambda: False, 1, "answering", "answer on 127.0.0.1:1", setting="a.b")
        )
    assert time.monotonic() - started < 15
    message = str(error.value)
    assert message.startswith("the thing did not answer on 127.0.0.1:1 within 1 s (a.b); it was ")
    assert "stopped. Its last output:\n    still loading" in message
    assert not process.alive()


def test_several_owned_processes_stop_together_within_one_grace_period(tmp_path):
    started = []
    with owned_processes() as start:
        for number in range(3):
            log = tmp_path / f"log-{number}"
            command = Command(f"stubborn {number}", [sys.executable, "-c", STUBBORN], log)
            started.append(start(replace(command, grace_seconds=2)))
        for process in started:
            process.wait_until_ready(_ready(process))
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 2 * 3  # one grace period, not one each
    for process in started:
        assert process.returncode == -signal.SIGKILL
        assert not _live_members(process.pid)


def test_a_process_without_a_log_writes_to_the_callers_output(capfd):
    command = Command("echo", [sys.executable, "-c", "print('hello from the child')"])
    with owned(command) as process:
        process.process.wait(timeout=30)
    assert "hello from the child" in capfd.readouterr().out
    assert process.log_tail() == "    (no output)"
