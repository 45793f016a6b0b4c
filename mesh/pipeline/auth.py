"""Cluster-secret authentication for every node RPC.

The caller sends ``x-mesh-auth: <unix time>.<hex HMAC-SHA256(secret, time + method)>``: the
secret itself never crosses the network, and a captured header is useless for another method
or after ``MAX_SKEW`` seconds. A server interceptor rejects anything else with UNAUTHENTICATED.
"""

from __future__ import annotations

import hashlib
import hmac
import time

import grpc

HEADER = "x-mesh-auth"
MAX_SKEW = 120.0


def sign(secret: str, method: str, now: float | None = None) -> str:
    ts = f"{now if now is not None else time.time():.3f}"
    mac = hmac.new(secret.encode(), f"{ts}{method}".encode(), hashlib.sha256).hexdigest()
    return f"{ts}.{mac}"


def verify(secret: str, method: str, token: str, now: float | None = None) -> bool:
    try:
        ts, mac = token.rsplit(".", 1)
        t = float(ts)
    except ValueError:
        return False
    if abs((now if now is not None else time.time()) - t) > MAX_SKEW:
        return False
    good = hmac.new(secret.encode(), f"{ts}{method}".encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(good, mac)


class AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, secret: str):
        self.secret = secret

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or wrong cluster secret (x-mesh-auth)")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        meta = dict(handler_call_details.invocation_metadata or ())
        token = meta.get(HEADER, "")
        if verify(self.secret, handler_call_details.method, token):
            return continuation(handler_call_details)
        return self._deny


def call_metadata(secret: str | None, method: str) -> tuple[tuple[str, str], ...]:
    return ((HEADER, sign(secret, method)),) if secret else ()
