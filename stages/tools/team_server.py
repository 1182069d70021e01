"""A throwaway team MLflow server on loopback ports, to try the team set-up on one machine.

It is the set-up MLflow documents for teams, made small: a PostgreSQL cluster (the system's
`initdb` and `postgres`) holds runs, registered models and basic-auth's users; `mlflow server`
proxies artifacts to `--artifacts-destination` and asks for a login (`--app-name basic-auth`).
Everything lives in one temporary folder, removed on exit (when a process fails, its logs are
copied out first and the error names the copy); passwords are generated per start.
`python -m stages server` runs one until Ctrl-C; the tests start one per module.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from stages.core.common import StageError
from stages.core.ports import check_port_free, free_port
from stages.core.processes import Command, OwnedProcess, Readiness, as_user, owned
from stages.deploy.serving import answers

DATABASE_USER = "mlflow"  # the cluster's only role, owner of both databases
TRACKING_DATABASE = "mlflow"  # runs, experiments, registered models
AUTH_DATABASE = "mlflow_auth"  # basic-auth's users and permissions
ADMIN_USERNAME = "admin"
STOP_GRACE_SECONDS = 20.0  # from the stop signal to SIGKILL, for PostgreSQL and mlflow server
LOG_TAIL_LINES = 15  # of a process that stopped by itself, in the error
POSTGRES_OWNERS = ("postgres", "nobody")  # who runs PostgreSQL when we are root, first found
# A throwaway cluster: loopback TCP only, no Unix socket, no durability.
POSTGRES_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "max_connections": "200",  # server workers' pools, for both databases
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}
# Team members log into one shared experiment and register versions of shared models, so a
# logged-in user may edit what another created (basic-auth's default is READ).
AUTH_CONFIG = """\
[mlflow]
default_permission = EDIT
database_uri = {database_uri}
admin_username = {admin_username}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


@dataclass(frozen=True)
class TeamServer:
    url: str  # http://127.0.0.1:<port>
    admin: Credentials
    artifacts_destination: str
    folder: Path  # everything the server stores, removed on exit
    cluster: PostgresCluster
    server: MlflowServer

    def alive(self) -> bool:
        """Return whether PostgreSQL and the MLflow server are both still running."""
        return self.cluster.process.alive() and self.server.process.alive()

    def failure(self) -> StageError:
        """Return an error naming the process that stopped by itself, with its log's last lines."""
        stopped = [p for p in (self.cluster.process, self.server.process) if not p.alive()]
        if not stopped:
            return StageError("the team server is still running")
        return StageError(
            "; ".join(
                f"{p.role} stopped by itself (exit code {p.returncode}); "
                f"its log ends:\n{p.log_tail(LOG_TAIL_LINES)}"
                for p in stopped
            )
        )

    def client_env(self) -> dict[str, str]:
        """Return the environment variables a stage needs to log to this server as the admin."""
        return {
            "MLFLOW_TRACKING_URI": self.url,
            "MLFLOW_TRACKING_USERNAME": self.admin.username,
            "MLFLOW_TRACKING_PASSWORD": self.admin.password,
        }


def new_password() -> str:
    """Return a fresh random password (URL-safe, so it also fits in a connection URI)."""
    return secrets.token_urlsafe(24)


def keep_logs(folder: Path) -> Path:
    """Copy every log under `folder` to a new temporary folder that is not removed; return it."""
    kept = Path(tempfile.mkdtemp(prefix="mlflow-team-logs-"))
    for log in folder.rglob("*.log"):
        with suppress(OSError):  # PostgreSQL's log belongs to its user: readable, not always
            shutil.copy2(log, kept / log.name)
    return kept


def postgres_bin_dir(
    path: str | None = None, installed: Path = Path("/usr/lib/postgresql")
) -> Path:
    """Return the folder holding `initdb` and `postgres`: on PATH, else Debian's newest version."""
    found = shutil.which("initdb", path=path)
    if found:
        return Path(found).resolve().parent  # a link on PATH: `postgres` sits beside its target
    versions = sorted(
        (folder for folder in installed.glob("*/bin") if (folder / "initdb").exists()),
        key=lambda folder: int(folder.parent.name) if folder.parent.name.isdigit() else 0,
    )
    if not versions:
        raise StageError(
            "PostgreSQL is not installed (no initdb on PATH or under /usr/lib/postgresql/*/bin): "
            "install it, e.g. `apt-get install -y postgresql`"
        )
    return versions[-1]


def _flags(options: Mapping[str, str]) -> list[str]:
    return [part for option in options.items() for part in option]


def initdb_options(data: Path, password_file: Path) -> dict[str, str]:
    """Return initdb's options for a cluster in `data` whose one role's password is in a file."""
    return {
        "--pgdata": str(data),
        "--username": DATABASE_USER,
        "--pwfile": str(password_file),
        "--auth": "scram-sha-256",
        "--encoding": "UTF8",
    }


def _unprivileged_user(names: tuple[str, ...] = POSTGRES_OWNERS) -> pwd.struct_passwd | None:
    # PostgreSQL refuses to run as root; as root we run it as a system user instead.
    if os.geteuid() != 0:
        return None
    for name in names:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise StageError(
        f"running as root, and none of the users {', '.join(names)} exists to run PostgreSQL"
    )


def _connect(port: int, password: str, database: str = "postgres"):
    import psycopg

    return psycopg.connect(
        host="127.0.0.1",
        port=port,
        user=DATABASE_USER,
        password=password,
        dbname=database,
        connect_timeout=3,
        autocommit=True,
    )


def _accepts_connections(port: int, password: str) -> bool:
    import psycopg

    try:
        _connect(port, password).close()
    except psycopg.OperationalError:
        return False
    return True


@dataclass(frozen=True)
class PostgresCluster:
    port: int
    password: str  # of DATABASE_USER; handed to clients as PGPASSWORD, never in a URI or argv
    process: OwnedProcess

    def uri(self, database: str) -> str:
        """Return the SQLAlchemy URI of `database` on this cluster, without the password."""
        return f"postgresql://{DATABASE_USER}@127.0.0.1:{self.port}/{database}"


@dataclass(frozen=True)
class _PostgresSetUp:
    """Where a new cluster's programs and data are, who runs them, and in which environment."""

    bin_dir: Path
    data: Path
    user: pwd.struct_passwd | None  # None: this process's user
    env: dict[str, str]


def _set_up_postgres(folder: Path) -> _PostgresSetUp:
    """Find PostgreSQL and its user; make its data folder in `folder`, reachable by that user."""
    bin_dir = postgres_bin_dir()
    user = _unprivileged_user()
    data = folder / "postgres"
    data.mkdir(mode=0o700)
    if user is not None:
        folder.chmod(0o711)  # the PostgreSQL user must reach its data folder, not list ours
        os.chown(data, user.pw_uid, user.pw_gid)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    return _PostgresSetUp(bin_dir, data, user, env)


def _initdb(setup: _PostgresSetUp, folder: Path) -> str:
    """Create the cluster with a new password for its one role (in a file only initdb reads, in
    `folder`, removed at once); return the password."""
    password = new_password()
    password_file = folder / "initdb-password"
    password_file.touch(mode=0o600)
    try:
        if setup.user is not None:
            os.chown(password_file, setup.user.pw_uid, setup.user.pw_gid)
        password_file.write_text(password)
        initdb = subprocess.run(
            [str(setup.bin_dir / "initdb"), *_flags(initdb_options(setup.data, password_file))],
            capture_output=True,
            text=True,
            env=setup.env,
            cwd=setup.data,
            timeout=120,
            **as_user(setup.user),
        )
    finally:
        password_file.unlink()
    if initdb.returncode != 0:
        raise StageError(f"initdb failed in {setup.data}: {initdb.stderr.strip()[-1500:]}")
    return password


def _postgres_command(setup: _PostgresSetUp, port: int, log: Path) -> Command:
    """Return the owned `postgres` process serving the cluster on `port`."""
    argv = [str(setup.bin_dir / "postgres"), "-D", str(setup.data), "-p", str(port)]
    for name, value in POSTGRES_SETTINGS.items():
        argv += ["-c", f"{name}={value}"]
    return Command(
        "PostgreSQL",
        argv,
        log,
        setup.env,
        setup.data,
        setup.user,
        stop_signal=signal.SIGINT,  # PostgreSQL's fast shutdown
        grace_seconds=STOP_GRACE_SECONDS,
    )


@contextmanager
def postgres_cluster(folder: Path, seconds: float = 60.0) -> Iterator[PostgresCluster]:
    """Create a PostgreSQL cluster in `folder`, serve it on a loopback port, stop it on exit.

    Throwaway by design: durability is off (fsync, synchronous commit) and only TCP on
    127.0.0.1 is served, with a generated password for the one role.
    """
    setup = _set_up_postgres(folder)
    password = _initdb(setup, folder)
    port = free_port()
    with owned(_postgres_command(setup, port, folder / "postgres.log")) as server:
        server.wait_until_ready(
            Readiness(
                lambda: _accepts_connections(port, password),
                seconds,
                awaited="accepting connections",
                missed=f"accept connections on 127.0.0.1:{port}",
            )
        )
        with _connect(port, password) as connection:
            for database in (TRACKING_DATABASE, AUTH_DATABASE):
                connection.execute(f"CREATE DATABASE {database}")
        yield PostgresCluster(port, password, server)


@dataclass(frozen=True)
class MlflowServer:
    url: str
    process: OwnedProcess


@dataclass(frozen=True)
class ServerSettings:
    """How `mlflow server` listens and starts: its port (None: a free one), its worker
    processes, and how long it may take to answer GET /health."""

    port: int | None = None
    workers: int = 2
    start_seconds: float = 120.0


def _server_env(cluster: PostgresCluster, admin: Credentials, auth_config: Path) -> dict[str, str]:
    """Return `mlflow server`'s environment: this one's without MLflow's settings, plus its own."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
        "PGPASSWORD": cluster.password,  # libpq reads it: no password in argv or files
        "MLFLOW_AUTH_CONFIG_PATH": str(auth_config),
        "MLFLOW_AUTH_ADMIN_USERNAME": admin.username,
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin.password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),  # signs the UI's CSRF tokens
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # No GenAI job runner: it starts seven more processes that training runs never use.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }


def _server_argv(
    cluster: PostgresCluster, artifacts_destination: str, port: int, workers: int
) -> list[str]:
    options = {
        "--backend-store-uri": cluster.uri(TRACKING_DATABASE),
        "--artifacts-destination": artifacts_destination,
        "--app-name": "basic-auth",
        "--host": "127.0.0.1",
        "--port": str(port),
        "--workers": str(workers),
    }
    return [str(Path(sys.executable).parent / "mlflow"), "server", *_flags(options)]


@contextmanager
def mlflow_server(
    cluster: PostgresCluster,
    folder: Path,
    admin: Credentials,
    artifacts_destination: str,
    settings: ServerSettings = ServerSettings(),
) -> Iterator[MlflowServer]:
    """Run `mlflow server` on the cluster's databases with basic auth until the block ends."""
    folder.mkdir(parents=True, exist_ok=True)
    port = settings.port or free_port()
    auth_config = folder / "basic_auth.ini"
    auth_config.write_text(
        AUTH_CONFIG.format(database_uri=cluster.uri(AUTH_DATABASE), admin_username=admin.username)
    )
    command = Command(
        "mlflow server",
        _server_argv(cluster, artifacts_destination, port, settings.workers),
        folder / "mlflow-server.log",
        _server_env(cluster, admin, auth_config),
        folder,
        grace_seconds=STOP_GRACE_SECONDS,
    )
    url = f"http://127.0.0.1:{port}"
    with owned(command) as server:
        server.wait_until_ready(
            Readiness(
                lambda: answers(port, "/health"),
                settings.start_seconds,
                awaited="answering GET /health",
                missed=f"answer GET /health on {url}",
            )
        )
        yield MlflowServer(url, server)


@contextmanager
def team_server(
    port: int | None = None, artifacts_destination: str | None = None, workers: int = 2
) -> Iterator[TeamServer]:
    """Start PostgreSQL and `mlflow server` in a new temporary folder; stop both and remove it.

    A port that is taken fails at once, before PostgreSQL starts. On a StageError (a process
    that did not start, or stopped by itself) the logs are copied out first, and the error
    names the copy: the folder itself is removed like on every exit.
    """
    if port:
        check_port_free(port)
    # In the system's temp folder, which a dropped-privileges PostgreSQL can reach.
    folder = Path(tempfile.mkdtemp(prefix="mlflow-team-"))
    kept: list[Path] = []

    def keep_logs_on_failure(exc_type: type | None, exc: object, traceback: object) -> None:
        if exc_type is not None and issubclass(exc_type, StageError):
            kept.append(keep_logs(folder))

    try:
        with ExitStack() as stack:
            stack.callback(shutil.rmtree, folder, ignore_errors=True)
            stack.push(keep_logs_on_failure)  # unwinds after both processes stop, before rmtree
            cluster = stack.enter_context(postgres_cluster(folder))
            admin = Credentials(ADMIN_USERNAME, new_password())
            destination = artifacts_destination or str(folder / "artifacts")
            server = stack.enter_context(
                mlflow_server(
                    cluster, folder / "server", admin, destination, ServerSettings(port, workers)
                )
            )
            yield TeamServer(server.url, admin, destination, folder, cluster, server)
    except StageError as exc:
        if not kept:
            raise
        raise StageError(f"{exc}\nThe full logs are kept in {kept[0]}") from None
