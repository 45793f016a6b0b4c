"""A TLS mesh: `mesh serve --mode pipeline --local-nodes 1` with a cluster CA serves a request
over mutual TLS; a client without the CA, or without a certificate, is refused by the node."""

from __future__ import annotations

import datetime
import subprocess

import grpc
import httpx
import pytest

from mesh.node import mesh_pb2, mesh_pb2_grpc
from mesh.node.auth import call
from tests.test_rescue import serve_process

pytestmark = pytest.mark.real
SECRET = "tls-test-secret-of-the-mesh"


def _certs(folder):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def make(name, issuer_key=None, issuer_name=None, ca=False, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        b = (x509.CertificateBuilder().subject_name(subject)
             .issuer_name(issuer_name or subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]),
                                critical=False)
        cert = b.sign(issuer_key or key, hashes.SHA256())
        return key, cert

    ca_key, ca_cert = make("mesh test CA", ca=True)
    key, cert = make("mesh-node", ca_key, ca_cert.subject, san="mesh-node")
    paths = {}
    for name, data in (
            ("ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM)),
            ("node.pem", cert.public_bytes(serialization.Encoding.PEM)),
            ("node.key", key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))):
        (folder / name).write_bytes(data)
        paths[name] = folder / name
    return paths


def test_tls_mesh_serves_and_refuses_clients_without_the_ca(tmp_path):
    pytest.importorskip("cryptography")

    certs = _certs(tmp_path)
    proc, base = serve_process([
        "--context-length", "512", "--secret", SECRET,
        "--tls-cert", str(certs["node.pem"]), "--tls-key", str(certs["node.key"]),
        "--tls-ca", str(certs["ca.pem"])])
    try:
        r = httpx.post(base + "/v1/completions", timeout=120, json={
            "model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 5,
            "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"].strip()
        node = next(s["address"] for s in httpx.get(base + "/health").json()["stages"]
                    if s["address"] != "local")

        def info(channel):
            stub = mesh_pb2_grpc.NodeStub(channel)
            return call(stub.Info, mesh_pb2.InfoRequest(), SECRET, "/mesh.Node/Info", 10)

        ca = certs["ca.pem"].read_bytes()
        name = [("grpc.ssl_target_name_override", "mesh-node")]
        # a plain-text client, a TLS client that does not trust the CA, one with no cert
        for channel in (
                grpc.insecure_channel(node),
                grpc.secure_channel(node, grpc.ssl_channel_credentials(
                    root_certificates=certs["node.pem"].read_bytes()), options=name),
                grpc.secure_channel(node, grpc.ssl_channel_credentials(root_certificates=ca),
                                    options=name)):
            with pytest.raises(grpc.RpcError) as refused:
                info(channel)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # the positive control: the CA, a certificate it signed, and the secret
        good = grpc.secure_channel(node, grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=certs["node.key"].read_bytes(),
            certificate_chain=certs["node.pem"].read_bytes()), options=name)
        assert info(good).end == 30
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
