"""Several machines' workers find each other: node 0 collects and hands out every worker's address."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

from stages.core.common import StageError
from stages.launcher.plan import (
    RENDEZVOUS_TIMEOUT_SECONDS,
    Launch,
)


def split_address(address: str) -> tuple[str, int]:
    """Return (host, port) of 'host:port'."""
    host, _, port = address.rpartition(":")
    return host, int(port)


def exchange_addresses(launch: Launch, pick: Callable[[str], list[str]]) -> list[str]:
    """Return every worker's host:port across all machines, in rank order.

    Node 0 listens at train.rendezvous; every other node connects, sends its workers'
    addresses (`pick(host)`, host being its own address as node 0 sees it) and receives the
    whole list once all nodes have reported. Bounded by RENDEZVOUS_TIMEOUT_SECONDS."""
    deadline = time.monotonic() + RENDEZVOUS_TIMEOUT_SECONDS
    if launch.node_rank == 0:
        return _collect_addresses(launch, pick, deadline)
    return _report_addresses(launch, pick, deadline)


def _collect_addresses(
    launch: Launch, pick: Callable[[str], list[str]], deadline: float
) -> list[str]:
    """On node 0: listen, take every other node's addresses, and send each the whole list."""
    host, port = split_address(launch.rendezvous)
    try:
        server = socket.create_server((host, port))
    except OSError as exc:
        raise StageError(
            f"train.rendezvous {launch.rendezvous}: node 0 cannot listen there ({exc}); "
            "pick a free port on this machine's address and give it to every node"
        ) from None
    by_node = {0: pick(host)}
    peers = []
    with server:
        while len(by_node) < launch.nodes:
            server.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                peer, _ = server.accept()
            except TimeoutError:
                missing = sorted(set(range(launch.nodes)) - set(by_node))
                raise StageError(
                    f"nodes {missing} did not reach {launch.rendezvous} within "
                    f"{RENDEZVOUS_TIMEOUT_SECONDS} s; start the stage on every machine "
                    "with the same train.nodes and train.rendezvous"
                ) from None
            message = json.loads(_read_line(peer, deadline))
            by_node[message["node_rank"]] = message["addresses"]
            peers.append(peer)
        everyone = [a for node in sorted(by_node) for a in by_node[node]]
        for peer in peers:
            with peer:
                peer.sendall((json.dumps(everyone) + "\n").encode())
    return everyone


def _report_addresses(
    launch: Launch, pick: Callable[[str], list[str]], deadline: float
) -> list[str]:
    """On any other node: connect to node 0 (retrying until it listens), send this node's
    addresses, and return the whole list it sends back."""
    host, port = split_address(launch.rendezvous)
    while True:
        try:
            connection = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise StageError(
                    f"node 0 did not open {launch.rendezvous} within "
                    f"{RENDEZVOUS_TIMEOUT_SECONDS} s; start the stage there too"
                ) from None
            time.sleep(1)
    with connection:
        own = pick(connection.getsockname()[0])
        message = {"node_rank": launch.node_rank, "addresses": own}
        connection.sendall((json.dumps(message) + "\n").encode())
        return json.loads(_read_line(connection, deadline))


def _read_line(connection: socket.socket, deadline: float) -> str:
    connection.settimeout(max(0.1, deadline - time.monotonic()))
    received = b""
    while not received.endswith(b"\n"):
        chunk = connection.recv(65536)
        if not chunk:
            raise StageError("a node closed the rendezvous connection early")
        received += chunk
    return received.decode()
