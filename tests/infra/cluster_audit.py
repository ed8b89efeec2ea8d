"""What the cluster tests check about the processes they start: every listening socket on
loopback, and their own processes only."""

from __future__ import annotations

import ipaddress

import psutil


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, and IPv4-mapped loopback (::ffff:127.0.0.1) as dual-stack sockets report it."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def listening_addresses(processes: list[psutil.Process]) -> set[tuple[str, int, str]]:
    """(ip, port, process name) of every listening TCP socket of ``processes``."""
    pids = {p.pid: p for p in processes}
    out = set()
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            try:
                name = pids[c.pid].name()
            except psutil.Error:
                name = "?"
            out.add((c.laddr.ip, c.laddr.port, name))
    return out
