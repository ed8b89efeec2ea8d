"""Ports on loopback: one way to find free ones and to ask whether one is taken.

Every service wavray starts itself (a local Ray instance, the object store, the
process group of a single-process run, MLflow in the tests) listens on 127.0.0.1 on
ports chosen here. Nothing in this module imports torch, so the data path may use it.
"""

from __future__ import annotations

import socket
from collections.abc import Collection

HOST = "127.0.0.1"


def free_ports(n: int, exclude: Collection[int] = ()) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that are free now.

    All ``n`` sockets are held open until every port is chosen, so the ports differ from
    each other; another process may still take one before the caller binds it.
    """
    ports: list[int] = []
    held = []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind((HOST, 0))
            held.append(s)
            port = int(s.getsockname()[1])
            if port not in exclude and port not in ports:
                ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


def free_port() -> int:
    """One free TCP port on 127.0.0.1."""
    return free_ports(1)[0]


def port_in_use(port: int) -> bool:
    """Whether a process listens on (or holds) ``port`` on 127.0.0.1.

    ``SO_REUSEADDR`` lets the test bind succeed over connections lingering in TIME_WAIT
    from a process that just stopped: those do not stop a new server from listening.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False
