"""Separate network hosts for tests: Linux network namespaces joined to the root namespace by veth pairs.

Each `Host` is a namespace ``actmap-<tag>-<n>`` with its loopback up and one interface ``eth0`` carrying
``10.231.<k>.2/24``; the other end of the pair stays in the root namespace as ``am<tag>h<n>`` with
``10.231.<k>.1/24`` (the host's only way out: no default route, no forwarding). A server in the root
namespace bound to ``host.gateway`` is reachable from that host and from nowhere else.

Only addresses in 10.231.0.0/16 on interfaces made here are used; the third octets are chosen among those
not already on any interface. Everything is removed by `close()` (context exit) and, as a safety net, at
interpreter exit; removal never raises.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from types import TracebackType
from typing import Self

SUBNET = ipaddress.ip_network("10.231.0.0/16")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (not root, no `ip`, `ip netns add` refused), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) to make network namespaces"
    probe = f"actmap-probe-{secrets.token_hex(3)}"
    try:
        added = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns add` failed: {exc}"
    if added.returncode != 0:
        return f"`ip netns add` failed: {added.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _octets_in_use() -> set[int]:
    used = set()
    for line in _ip("-o", "-4", "addr", "show").stdout.splitlines():
        for word in line.split():
            with contextlib.suppress(ValueError):
                address = ipaddress.ip_interface(word)
                if address.ip in SUBNET or address.network.overlaps(SUBNET):
                    used.add(int(address.ip.packed[2]))
    return used


@dataclass
class Host:
    """One namespace: run commands in it with ``prefix + argv``; cut it off with `cut_off()`."""

    netns: str
    veth: str  # the root-namespace end of its link
    address: str  # eth0, inside the namespace
    gateway: str  # the root-namespace end: bind servers here

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]

    def cut_off(self) -> None:
        """Take its link down (root-namespace end): processes in it keep running, Redis is out of reach."""
        _ip("link", "set", self.veth, "down")

    def reconnect(self) -> None:
        _ip("link", "set", self.veth, "up")


class Hosts:
    """``count`` hosts; ``hosts.gateways`` are the root-namespace addresses to bind a server to."""

    def __init__(self, count: int) -> None:
        self.tag = secrets.token_hex(2)
        self.hosts: list[Host] = []
        self._made_netns: list[str] = []
        self._made_veths: list[str] = []
        atexit.register(self.close)
        try:
            self._make(count)
        except BaseException:
            self.close()
            raise

    def _make(self, count: int) -> None:
        used = _octets_in_use()
        free = [k for k in range(1, 255) if k not in used]
        if len(free) < count:
            raise RuntimeError(f"fewer than {count} free /24s in {SUBNET}")
        start = secrets.randbelow(len(free))  # two runs side by side rarely race for the same ones
        octets = [free[(start + i) % len(free)] for i in range(count)]
        for n, k in enumerate(octets, 1):
            host = Host(
                netns=f"actmap-{self.tag}-{n}",
                veth=f"am{self.tag}h{n}",
                address=f"10.231.{k}.2",
                gateway=f"10.231.{k}.1",
            )
            peer = f"am{self.tag}p{n}"
            _ip("netns", "add", host.netns)
            self._made_netns.append(host.netns)
            _ip("link", "add", host.veth, "type", "veth", "peer", "name", peer)
            self._made_veths.append(host.veth)
            _ip("link", "set", peer, "netns", host.netns)
            _ip("addr", "add", f"{host.gateway}/24", "dev", host.veth)
            _ip("link", "set", host.veth, "up")
            inside = ["-n", host.netns]
            _ip(*inside, "link", "set", "lo", "up")
            _ip(*inside, "link", "set", peer, "name", "eth0")
            _ip(*inside, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip(*inside, "link", "set", "eth0", "up")
            self.hosts.append(host)

    @property
    def gateways(self) -> list[str]:
        return [h.gateway for h in self.hosts]

    def close(self) -> None:
        """Delete the namespaces (which deletes their veth ends, and so the pairs) and any veth left."""
        while self._made_netns:
            with contextlib.suppress(Exception):
                _ip("netns", "del", self._made_netns.pop(), check=False)
        while self._made_veths:
            veth = self._made_veths.pop()
            with contextlib.suppress(Exception):
                if _ip("link", "show", veth, check=False).returncode == 0:
                    _ip("link", "del", veth, check=False)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
