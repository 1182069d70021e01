"""The try-out team server's parts that need no PostgreSQL: finding it, ports, the command.
(Owning its processes and waiting for them: tests/core/test_processes.py.)"""

import re
import socket
import subprocess
import sys
import time

import pytest

from stages.core.common import StageError
from stages.core.ports import PortInUse, check_port_free, free_port
from stages.tools.team_server import postgres_bin_dir
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
