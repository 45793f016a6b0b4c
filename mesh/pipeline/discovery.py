"""Zeroconf discovery of ``mesh node``s (``_mesh._tcp.local.``) on chosen interfaces only.

mesh never announces or browses on an interface it was not given: nodes and coordinators pass
the interface IPs (or names) to zeroconf explicitly. ``resolve_interfaces`` turns names like
``eth0`` into their IPv4 addresses.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass

from mesh import __version__

log = logging.getLogger(__name__)

SERVICE = "_mesh._tcp.local."


@dataclass(frozen=True)
class Peer:
    node_id: str
    host: str
    port: int
    props: dict

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def resolve_interfaces(names: list[str]) -> list[str]:
    """Interface names or IPv4 addresses -> IPv4 addresses."""
    import ipaddress

    import psutil

    addrs = psutil.net_if_addrs()
    out = []
    for n in names:
        try:
            ipaddress.IPv4Address(n)
            out.append(n)
            continue
        except ValueError:
            pass
        if n not in addrs:
            raise ValueError(f"no network interface named {n!r} (have: {', '.join(addrs)})")
        ips = [a.address for a in addrs[n] if a.family == socket.AF_INET]
        if not ips:
            raise ValueError(f"interface {n!r} has no IPv4 address")
        out.append(ips[0])
    return out


class Advertiser:
    """Announce one node on the given interface addresses until ``close``."""

    def __init__(self, node_id: str, port: int, interfaces: list[str], props: dict):
        from zeroconf import IPVersion, ServiceInfo, Zeroconf

        self.zc = Zeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        txt = {k: str(v) for k, v in {**props, "node_id": node_id,
                                      "version": __version__}.items()}
        self.info = ServiceInfo(SERVICE, f"mesh-{node_id}.{SERVICE}",
                                addresses=[socket.inet_aton(ip) for ip in interfaces],
                                port=port, properties=txt, server=f"mesh-{node_id}.local.")
        self.zc.register_service(self.info)
        log.info("announcing node %s on %s port %d", node_id, ", ".join(interfaces), port)

    def close(self) -> None:
        try:
            self.zc.unregister_service(self.info)
        finally:
            self.zc.close()


def browse(interfaces: list[str], seconds: float = 3.0, want: int | None = None) -> list[Peer]:
    """Collect nodes announced on ``interfaces`` for up to ``seconds`` (or until ``want``)."""
    from zeroconf import IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf

    zc = Zeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
    found: dict[str, Peer] = {}
    lock = threading.Lock()

    def on_change(zeroconf, service_type, name, state_change):
        if state_change is not ServiceStateChange.Added:
            return
        info = zeroconf.get_service_info(service_type, name, timeout=2000)
        if info is None or not info.parsed_addresses():
            return
        props = {k.decode(): (v.decode() if v is not None else "")
                 for k, v in info.properties.items()}
        peer = Peer(props.get("node_id", name), info.parsed_addresses()[0], info.port, props)
        with lock:
            found[peer.node_id] = peer

    browser = ServiceBrowser(zc, SERVICE, handlers=[on_change])
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            with lock:
                if want is not None and len(found) >= want:
                    break
            time.sleep(0.05)
    finally:
        browser.cancel()
        zc.close()
    return sorted(found.values(), key=lambda p: p.node_id)
