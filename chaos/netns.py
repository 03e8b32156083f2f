"""Real network partitions with Linux network namespaces and a veth pair, where allowed.

:func:`netns_supported` probes (root, ``ip``, creating and deleting a namespace); drills use
:class:`NetnsLink` for real partitions when it says yes, and fall back to the fault proxy
(``chaos.faultproxy``) with a notice otherwise. Blocking subprocess calls: call them from
trio through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Self

_TIMEOUT = 10.0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=_TIMEOUT, check=check
    )


def netns_supported() -> tuple[bool, str]:
    """Whether namespaces and veth pairs can be created here, and why not if they cannot."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False, "needs root (CAP_NET_ADMIN) to create network namespaces"
    if shutil.which("ip") is None:
        return False, "the 'ip' command (iproute2) is not installed"
    name = f"meshfed-probe-{os.getpid()}"
    try:
        added = _ip("netns", "add", name, check=False)
        if added.returncode != 0:
            return False, f"ip netns add failed: {added.stderr.strip() or added.returncode}"
        veth = _ip(
            "link", "add", f"mfp{os.getpid() % 100000}a", "type", "veth",
            "peer", "name", f"mfp{os.getpid() % 100000}b", "netns", name,
            check=False,
        )  # fmt: skip
        if veth.returncode != 0:
            return False, f"veth pairs are not available: {veth.stderr.strip()}"
        _ip("link", "del", f"mfp{os.getpid() % 100000}a", check=False)
        return True, "network namespaces and veth pairs work"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"probe failed: {exc}"
    finally:
        _ip("netns", "del", name, check=False)


def tc_netem_available() -> bool:
    """Whether ``tc`` with the netem qdisc can be used (for latency on a veth link)."""
    return shutil.which("tc") is not None


@dataclass(frozen=True, slots=True)
class NetnsLink:
    """Two namespaces joined by a veth pair: ``a`` (``address_a``) <-> ``b`` (``address_b``)."""

    a: str
    """Namespace name of one end."""
    b: str
    """Namespace name of the other end."""
    address_a: str = "10.213.0.1"
    """IPv4 address of the ``a`` end (a /30 is used)."""
    address_b: str = "10.213.0.2"
    """IPv4 address of the ``b`` end."""

    @property
    def _veth_a(self) -> str:
        return f"{self.a[:10]}-v"

    @property
    def _veth_b(self) -> str:
        return f"{self.b[:10]}-v"

    def create(self) -> Self:
        """Create both namespaces and the link, up; raise CalledProcessError on failure."""
        for ns in (self.a, self.b):
            _ip("netns", "add", ns)
        _ip("link", "add", self._veth_a, "netns", self.a, "type", "veth",
            "peer", "name", self._veth_b, "netns", self.b)  # fmt: skip
        for ns, dev, addr in ((self.a, self._veth_a, self.address_a),
                              (self.b, self._veth_b, self.address_b)):  # fmt: skip
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        return self

    def cut(self) -> None:
        """Partition: take the ``a`` end down (packets are dropped, not refused)."""
        _ip("-n", self.a, "link", "set", self._veth_a, "down")

    def restore(self) -> None:
        """Heal the partition."""
        _ip("-n", self.a, "link", "set", self._veth_a, "up")

    def is_up(self) -> bool:
        """Whether the ``a`` end is administratively up (used to verify cut/restore)."""
        shown = _ip("-n", self.a, "-o", "link", "show", self._veth_a)
        flags = shown.stdout.split("<", 1)[-1].split(">", 1)[0].split(",")
        return "UP" in flags

    def delete(self) -> None:
        """Remove both namespaces (and with them the veth pair); never raises."""
        for ns in (self.a, self.b):
            _ip("netns", "del", ns, check=False)
