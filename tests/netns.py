"""Network namespaces as test hosts: a bridge in its own namespace and one veth per host.

Only namespaces created here carry traffic; the machine's real interfaces are never touched.
Used by the discovery test and the pipeline benchmark (with ``tc netem`` on the links).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid


def netns_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    probe = f"meshprobe{uuid.uuid4().hex[:6]}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def netem_available() -> bool:
    """Whether the kernel has sch_netem (delay emulation); some VMs ship without it."""
    probe = f"meshq{uuid.uuid4().hex[:6]}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode:
        return False
    try:
        return subprocess.run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo",
                               "root", "netem", "delay", "1ms"],
                              capture_output=True).returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Hosts:
    """``n`` hosts 10.<net>.0.1..n on one bridge; ``exec_args(i)`` prefixes a command."""

    def __init__(self, n: int, netem: str | None = None, net: int = 77):
        self.tag = uuid.uuid4().hex[:5]
        self.switch = f"msw{self.tag}"
        self.names = [f"mh{self.tag}{i}" for i in range(n)]
        self.ips = [f"10.{net}.0.{i + 1}" for i in range(n)]
        self.netem = netem

    def __enter__(self) -> "Hosts":
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, (ns, ip) in enumerate(zip(self.names, self.ips)):
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}",
                    "netns", self.switch)
                _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0")
                _ip("-n", self.switch, "link", "set", f"p{i}", "up")
                _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                # multicast (mDNS) must route out of eth0 inside the namespace
                _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
                if self.netem:  # a tc qdisc spec, e.g. "netem delay 0.5ms rate 1gbit"
                    subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev",
                                    "eth0", "root", *self.netem.split()],
                                   check=True, capture_output=True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def exec_args(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[i]]

    def link(self, i: int, up: bool) -> None:
        _ip("-n", self.names[i], "link", "set", "eth0", "up" if up else "down")

    def __exit__(self, *exc) -> None:
        for ns in [*self.names, self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
