"""Optional TLS for node RPCs: encrypted traffic and, with a CA, mutual authentication.

One process-wide setting (``configure``, from ``--tls-cert/--tls-key/--tls-ca`` or
``MESH_TLS_CERT/KEY/CA``), read wherever a channel or a node port is made, so every coordinator,
member and node connection follows it. Nodes present a certificate for the name ``mesh-node``
(``MESH_TLS_NAME`` to change it) signed by the cluster's CA, whatever their address: a home
lab's DHCP addresses need no certificate per IP. With a CA given, a node also requires the
coordinator's certificate (mutual TLS), and the cluster secret becomes a second factor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import grpc

from mesh.errors import MeshError

SERVER_NAME = "mesh-node"
_ENV = {"cert": "MESH_TLS_CERT", "key": "MESH_TLS_KEY", "ca": "MESH_TLS_CA"}


@dataclass(frozen=True)
class TLSConfig:
    cert: bytes | None
    key: bytes | None
    ca: bytes | None
    server_name: str = SERVER_NAME


_config: TLSConfig | None = None


def configure(cert: str | None = None, key: str | None = None, ca: str | None = None) -> None:
    """Set (or, with nothing given, clear) TLS for this process and the nodes it spawns."""
    global _config
    if not (cert or key or ca):
        _config = None
        for var in _ENV.values():
            os.environ.pop(var, None)
        return
    if bool(cert) != bool(key):
        raise MeshError("--tls-cert and --tls-key go together")

    def read(path, what):
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise MeshError(f"cannot read the TLS {what} {path}: {exc.strerror}") from exc

    _config = TLSConfig(read(cert, "certificate") if cert else None,
                        read(key, "key") if key else None, read(ca, "CA") if ca else None,
                        os.environ.get("MESH_TLS_NAME", SERVER_NAME))
    for name, path in (("cert", cert), ("key", key), ("ca", ca)):  # for spawned nodes
        if path:
            os.environ[_ENV[name]] = os.path.abspath(path)


def configure_from_env() -> None:
    configure(*(os.environ.get(_ENV[k]) for k in ("cert", "key", "ca")))


def enabled() -> bool:
    return _config is not None


def channel(address: str, options: list | tuple = (), aio: bool = False):
    """A channel to a node: TLS when configured (the CA checks the node), else plain."""
    mod = grpc.aio if aio else grpc
    if _config is None:
        return mod.insecure_channel(address, options=list(options))
    if _config.ca is None:
        raise MeshError("TLS to nodes needs --tls-ca (the CA that signed the nodes' "
                        "certificates)")
    creds = grpc.ssl_channel_credentials(root_certificates=_config.ca,
                                         private_key=_config.key,
                                         certificate_chain=_config.cert)
    opts = list(options) + [("grpc.ssl_target_name_override", _config.server_name)]
    return mod.secure_channel(address, creds, options=opts)


def add_port(server, address: str) -> int:
    """Bind ``address`` on a node server, with TLS when configured."""
    if _config is None:
        return server.add_insecure_port(address)
    if _config.cert is None:
        raise MeshError("a node with TLS needs --tls-cert and --tls-key")
    creds = grpc.ssl_server_credentials([(_config.key, _config.cert)],
                                        root_certificates=_config.ca,
                                        require_client_auth=_config.ca is not None)
    return server.add_secure_port(address, creds)
