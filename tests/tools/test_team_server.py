"""The try-out team server's parts that need no PostgreSQL: finding it, owning processes, waiting."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.core.common import StageError
from stages.core.ports import PortInUse, check_port_free, free_port
from stages.tools.team_server import OwnedProcess, postgres_bin_dir, wait_until
from tests.conftest import ROOT, stage_env


def test_postgres_is_found_on_path_first_then_debians_newest(tmp_path):
    for version in ("9", "15", "13"):
        (tmp_path / "lib" / version / "bin").mkdir(parents=True)
        (tmp_path / "lib" / version / "bin" / "initdb").touch()
    assert postgres_bin_dir(path="", installed=tmp_path / "lib") == tmp_path / "lib/15/bin"
    on_path = tmp_path / "bin"
    on_path.mkdir()
    (on_path / "initdb").touch(mode=0o755)
    assert postgres_bin_dir(path=str(on_path), installed=tmp_path / "lib") == on_path


def test_missing_postgres_says_how_to_install_it(tmp_path):
    with pytest.raises(StageError, match="apt-get install -y postgresql"):
        postgres_bin_dir(path="", installed=tmp_path)


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


def test_an_owned_process_and_its_children_stop_even_when_it_ignores_sigterm(tmp_path):
    # The leader ignores SIGTERM and leaves a grandchild running: both must still go.
    script = "import signal, subprocess, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    script += "subprocess.Popen(['sleep', '300']); print('ready', flush=True); time.sleep(300)"
    owned = OwnedProcess(
        "stubborn", [sys.executable, "-c", script], tmp_path / "log", os.environ, tmp_path
    )
    wait_until(lambda: "ready" in owned.log_tail(), 30, "stubborn", owned.alive)
    started = time.monotonic()
    owned.stop(signal.SIGTERM, seconds=1)
    assert time.monotonic() - started < 15
    assert not owned.alive()
    deadline = time.monotonic() + 10
    while _live_members(owned.process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _live_members(owned.process.pid)


def test_waiting_stops_when_the_process_dies_or_time_runs_out(tmp_path):
    with pytest.raises(StageError, match="exited while starting"):
        wait_until(lambda: False, 10, "server", alive=lambda: False)
    started = time.monotonic()
    with pytest.raises(StageError, match="did not become ready within 1 s"):
        wait_until(lambda: False, 1, "server", alive=lambda: True)
    assert time.monotonic() - started < 5


def test_free_port_is_a_loopback_port_nothing_listens_on():
    port = free_port()
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", port))


def test_the_readme_shows_the_team_commands_and_no_credentials():
    section = (ROOT / "docs/team.md").read_text()  # the README links it
    for command in (
        "python -m stages server",
        "--backend-store-uri postgresql://",
        "--artifacts-destination s3://",
        "--app-name basic-auth --host 0.0.0.0",
        "dvc remote add -d storage s3://",
        "dvc push --run-cache",
        "dvc pull --run-cache",
        "dvc exp push origin",
        "dvc exp pull origin",
        "export MLFLOW_TRACKING_USERNAME=",
    ):
        assert command in section, command
    # Credentials come from the environment: no password in any URI or assignment.
    assert not re.search(r"://[^/\s:@]+:[^/\s@$]+@", section)
    assert not re.search(r"(PASSWORD|SECRET\w*)=(?![\"']?\$)\S", section)


def _taken_port() -> socket.socket:
    """Return a socket listening on a loopback port, as another server would."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    return taken


def test_a_taken_port_is_found_before_anything_starts():
    taken = _taken_port()
    with taken, pytest.raises(PortInUse, match=f"port {taken.getsockname()[1]} on 127.0.0.1"):
        check_port_free(taken.getsockname()[1])
    check_port_free(free_port())


def test_the_server_command_on_a_taken_port_fails_at_once_with_a_port_hint(tmp_path):
    with _taken_port() as taken:
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "stages", "server", "--port", str(port)],
            cwd=ROOT,
            env=stage_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert time.monotonic() - started < 10, done.stderr
    assert done.returncode == 1 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: port {port} on 127.0.0.1 is already in use"), last
    assert "choose another with --port, e.g. --port " in last
    assert "kept in" not in done.stderr  # nothing started, so there are no logs to point at
