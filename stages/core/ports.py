"""Loopback ports, the one implementation: a free port, and a port a user asked for, checked
before anything starts."""

from __future__ import annotations

import socket

from stages.core.common import StageError

LOOPBACK = "127.0.0.1"


class PortInUse(StageError):
    """The port asked for is taken; the message names it and a free one to use instead."""


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port free on `host` ('' = every interface) now; it may be taken before use."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def check_port_free(port: int, host: str = LOOPBACK) -> None:
    """Raise PortInUse, with a free port to use instead, if a server could not listen on `port`."""
    with socket.socket() as probe:
        # As servers bind: SO_REUSEADDR, so only a listener (not TIME_WAIT) blocks it.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise PortInUse(
                f"port {port} on {host} is already in use ({exc.strerror}); choose another with "
                f"--port, e.g. --port {free_port(host)}"
            ) from None
