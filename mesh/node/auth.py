"""Cluster-secret authentication for every node RPC, in both directions.

A call carries ``x-mesh-auth: <unix time>.<nonce>.<hex HMAC-SHA256>`` over the time, the nonce,
the method and the SHA-256 of the request's serialized bytes: the secret never crosses the
network, and a captured header is useless for another body, another method, a second time
(nonces are remembered for ``MAX_SKEW``) or after ``MAX_SKEW`` seconds. The node answers with a
trailer ``x-mesh-reply: HMAC(secret, "reply", nonce, SHA-256 of the reply's bytes)``, so the
coordinator knows the reply came from a holder of the secret, for this call, unaltered: a node
that does not know the secret never joins, and a relay that changes activations in transit is
caught. The interceptor also deserializes requests itself, so malformed bytes get
INVALID_ARGUMENT instead of gRPC's INTERNAL.

A Session stream (calls as frames on one open stream, see mesh.proto's ``Frame``) is opened
with the same header over an empty body; each frame then carries its own ``mac`` keyed by the
secret over that header's nonce, the frame's rising ``seq``, its method and body, and each
reply frame one over the same nonce, seq and method, its status, message and body
(``frame_mac``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets as _secrets
import threading
import time

import grpc

from mesh.errors import MeshError

HEADER = "x-mesh-auth"
REPLY_HEADER = "x-mesh-reply"
MAX_SKEW = 120.0
MIN_SECRET = 16  # characters; shorter cluster secrets are refused where they are given
MAX_NONCES = 1_000_000  # remembered nonces; past it, the oldest half is forgotten early


class ForgedReply(MeshError):
    """A node's reply is not signed with the cluster secret for this call."""


def check_secret(secret: str | None) -> None:
    if secret is not None and len(secret) < MIN_SECRET:
        raise MeshError(f"the cluster secret must be at least {MIN_SECRET} characters "
                         f"(got {len(secret)}); e.g. python -c 'import secrets; "
                         f"print(secrets.token_urlsafe(24))'")


def _mac(secret: str, *parts: bytes) -> str:
    return hmac.new(secret.encode(), b"\x00".join(parts), hashlib.sha256).hexdigest()


def sign(secret: str, method: str, body: bytes = b"", now: float | None = None,
         nonce: str | None = None) -> str:
    ts = f"{now if now is not None else time.time():.3f}"
    nonce = nonce or _secrets.token_hex(12)
    mac = _mac(secret, ts.encode(), nonce.encode(), method.encode(),
               hashlib.sha256(body).digest())
    return f"{ts}.{nonce}.{mac}"


def verify(secret: str, method: str, token: str, body: bytes = b"",
           now: float | None = None) -> str | None:
    """The token's nonce when it is valid for this method and body now, else None."""
    parts = token.split(".")  # time (with its own dot), nonce, mac
    if len(parts) != 4:
        return None
    whole, frac, nonce, mac = parts
    try:
        t = float(f"{whole}.{frac}")
    except ValueError:
        return None
    if abs((now if now is not None else time.time()) - t) > MAX_SKEW or not nonce:
        return None
    good = _mac(secret, f"{whole}.{frac}".encode(), nonce.encode(), method.encode(),
                hashlib.sha256(body).digest())
    return nonce if hmac.compare_digest(good, mac) else None


def reply_mac(secret: str, nonce: str, body: bytes) -> str:
    return _mac(secret, b"reply", nonce.encode(), hashlib.sha256(body).digest())


def frame_mac(secret: str, nonce: str, seq: int, method: str, body: bytes,
              status: str | None = None, message: str = "") -> str:
    """A Session frame's MAC: a request's (``status`` None) or a reply's."""
    head = (b"frame", nonce.encode(), str(seq).encode(), method.encode())
    if status is not None:
        head = (b"frame-reply", *head[1:], status.encode(), message.encode())
    return _mac(secret, *head, hashlib.sha256(body).digest())


class _Nonces:
    """Nonces seen within ``MAX_SKEW``: a replayed call is refused."""

    def __init__(self):
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._next_sweep = 0.0

    def fresh(self, nonce: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if now >= self._next_sweep or len(self._seen) >= MAX_NONCES:
                cutoff = now - 2 * MAX_SKEW
                self._seen = {n: t for n, t in self._seen.items() if t > cutoff}
                if len(self._seen) >= MAX_NONCES:  # a flood: keep the newest half
                    keep = sorted(self._seen.items(), key=lambda kv: kv[1])[MAX_NONCES // 2:]
                    self._seen = dict(keep)
                self._next_sweep = now + MAX_SKEW
            if nonce in self._seen:
                return False
            self._seen[nonce] = now
            return True


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks each call's signature over its raw bytes, refuses replays, signs each reply.
    With ``secret=None`` it only turns undecodable requests into INVALID_ARGUMENT."""

    def __init__(self, secret: str | None):
        self.secret = secret
        self.nonces = _Nonces()

    def _opened(self, method: str, token: str, raw: bytes, context) -> str | None:
        """The call's nonce (None without a secret); aborts an unsigned or replayed call."""
        if self.secret is None:
            return None
        nonce = verify(self.secret, method, token, raw)
        if nonce is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or wrong cluster secret (x-mesh-auth)")
        if not self.nonces.fresh(nonce):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "this call's x-mesh-auth was already used (a replay)")
        return nonce

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        token = dict(handler_call_details.invocation_metadata or ()).get(HEADER, "")
        if handler.stream_stream is not None:
            return self._frames(handler, method, token)
        if handler.unary_unary is None:
            return handler
        inner, decode = handler.unary_unary, handler.request_deserializer
        encode = handler.response_serializer
        secret = self.secret

        def run(raw: bytes, context):
            nonce = self._opened(method, token, raw, context)
            try:
                request = decode(raw) if decode else raw
            except Exception:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"the request is not a valid {method} message")
            reply = inner(request, context)
            body = encode(reply) if encode else reply
            if nonce is not None:
                context.set_trailing_metadata(((REPLY_HEADER, reply_mac(secret, nonce, body)),))
            return body

        return grpc.unary_unary_rpc_method_handler(run)

    def _frames(self, handler, method: str, token: str):
        """A Session stream: the opening header checked once, then every frame's MAC and
        rising seq on the way in, and every reply frame signed on the way out."""
        inner, decode = handler.stream_stream, handler.request_deserializer
        encode = handler.response_serializer
        secret = self.secret

        def run(raws, context):
            nonce = self._opened(method, token, b"", context)

            def frames():
                last = -1
                for raw in raws:
                    try:
                        frame = decode(raw)
                    except Exception:
                        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                      f"a frame on {method} is not a valid Frame message")
                    if nonce is not None:
                        good = frame_mac(secret, nonce, frame.seq, frame.method, frame.body)
                        if frame.seq <= last or not hmac.compare_digest(good, frame.mac):
                            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                          "a frame without the cluster secret's MAC, or "
                                          "replayed (its seq did not rise)")
                    last = frame.seq
                    yield frame

            for reply in inner(frames(), context):
                if nonce is not None:
                    reply.mac = frame_mac(secret, nonce, reply.seq, reply.method, reply.body,
                                          reply.status, reply.message)
                yield encode(reply)

        return grpc.stream_stream_rpc_method_handler(run)


def _signed(secret: str | None, method: str, request) -> tuple[tuple, str | None]:
    if not secret:
        return (), None
    nonce = _secrets.token_hex(12)
    return ((HEADER, sign(secret, method, request.SerializeToString(), nonce=nonce)),), nonce


def _check_reply(secret: str | None, nonce: str | None, method: str, reply, trailers) -> None:
    if not secret:
        return
    got = dict(trailers or ()).get(REPLY_HEADER, "")
    if not hmac.compare_digest(got, reply_mac(secret, nonce, reply.SerializeToString())):
        raise ForgedReply(f"the reply to {method} is not signed with the cluster secret "
                          f"(a node without the secret, or a changed reply)")


def call(rpc, request, secret: str | None, method: str, timeout: float):
    """A signed blocking call whose reply is checked; raises ForgedReply or grpc.RpcError."""
    metadata, nonce = _signed(secret, method, request)
    reply, c = rpc.with_call(request, timeout=timeout, metadata=metadata)
    _check_reply(secret, nonce, method, reply, c.trailing_metadata())
    return reply


async def acall(rpc, request, secret: str | None, method: str, timeout: float):
    """``call`` for grpc.aio stubs."""
    metadata, nonce = _signed(secret, method, request)
    c = rpc(request, timeout=timeout, metadata=metadata)
    reply = await c
    if secret:
        _check_reply(secret, nonce, method, reply, await c.trailing_metadata())
    return reply
