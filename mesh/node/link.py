"""A coordinator's calls to one node, sent as frames on a few open Session streams.

A unary gRPC call pays for its setup every time: on loopback a round trip of a 2.4 KB message
takes ~0.55 ms as a unary call and ~0.3 ms as a message on an open bidirectional stream. A
pipeline relays every token through each stage and an ensemble asks every member for every
token, so ``NodeLink`` keeps up to ``MAX_STREAMS`` Session streams to its node and sends each
Step/StepMany/Member/MemberMany/End call on an idle one, one frame at a time per stream
(mesh.proto's ``Frame``). The caller sees what the unary call would have given: the reply
message, or ``grpc.aio.AioRpcError`` with the node's status. Calls beyond the open streams,
and every call to a node from before Session (it answers UNIMPLEMENTED), go as unary calls.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time

import grpc

from mesh.node import mesh_pb2, mesh_pb2_grpc, tls
from mesh.node.auth import HEADER, ForgedReply, acall, frame_mac, sign

# the calls a Session carries: method name -> (request type, reply type)
CALLS = {"Step": (mesh_pb2.StepRequest, mesh_pb2.StepReply),
         "StepMany": (mesh_pb2.StepBatch, mesh_pb2.StepBatchReply),
         "Member": (mesh_pb2.MemberRequest, mesh_pb2.MemberReply),
         "MemberMany": (mesh_pb2.MemberBatch, mesh_pb2.MemberBatchReply),
         "End": (mesh_pb2.EndRequest, mesh_pb2.EndReply)}
MAX_STREAMS = 4  # per node and link: a pipeline stage sees a decode batch and a prompt chunk


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class _Unsent(Exception):
    """The frame never ran: the stream had ended before it was written, or the node refused
    the stream itself (``code``: UNIMPLEMENTED from a node older than Session,
    RESOURCE_EXHAUSTED from one with all its sessions open)."""

    def __init__(self, code: grpc.StatusCode | None = None):
        super().__init__(code.name if code else "the stream had ended")
        self.code = code


class _Refusal(Exception):
    """The node answered the frame with a status; the stream is sound."""

    def __init__(self, error: grpc.aio.AioRpcError):
        super().__init__(error.details())
        self.error = error


IDLE_STREAM = 30.0  # seconds: an idle stream older than this is ended, not trusted


class _Stream:
    def __init__(self, stub, secret: str | None):
        self.secret = secret
        self.nonce = secrets.token_hex(12)
        metadata = ((HEADER, sign(secret, "/mesh.Node/Session", b"", nonce=self.nonce)),) \
            if secret else ()
        self.rpc = stub.Session(metadata=metadata)
        self.seq = 0
        self.answered = False  # a frame came back: the node runs sessions
        self.used = time.monotonic()

    def stale(self) -> bool:
        """Ended (its node restarted, say) or idle so long that its connection may be."""
        return self.rpc.done() or time.monotonic() - self.used > IDLE_STREAM

    async def _started(self) -> None:
        """Until the stream is open, or _Unsent when it ends first (a node that is gone, or
        that refuses it). gRPC's own write waits for the opening without looking at the
        stream's end, so a stream to a dead node would wait there forever."""
        ended = asyncio.ensure_future(self.rpc.code())
        opened = asyncio.ensure_future(self.rpc.wait_for_connection())
        for t in (ended, opened):  # a stream that ends as it opens fails both: the one not
            t.add_done_callback(_retrieved)  # read below must not log an ERROR when freed
        try:
            await asyncio.wait((ended, opened), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (ended, opened):
                if not t.done():
                    t.cancel()
        if ended.done() and not ended.cancelled():
            code = ended.result()
            raise _Unsent(code if self._refused_stream(code) else None)
        if opened.exception() is not None:
            exc = opened.exception()
            code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
            raise _Unsent(code if self._refused_stream(code) else None)

    def _refused_stream(self, code) -> bool:
        return not self.answered and code in (grpc.StatusCode.UNIMPLEMENTED,
                                              grpc.StatusCode.RESOURCE_EXHAUSTED)

    async def call(self, method: str, request, timeout: float):
        self.seq += 1
        body = request.SerializeToString()
        frame = mesh_pb2.Frame(seq=self.seq, method=method, body=body)
        if self.secret:
            frame.mac = frame_mac(self.secret, self.nonce, self.seq, method, body)
        try:
            async with asyncio.timeout(timeout):
                if not self.answered:
                    await self._started()
                try:
                    await self.rpc.write(frame)
                except grpc.aio.AioRpcError as exc:
                    raise _Unsent(exc.code() if self._refused_stream(exc.code())
                                  else None) from exc
                except (asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
                    if self.rpc.cancelled():  # the channel was closed under it
                        raise asyncio.CancelledError() from exc
                    raise _Unsent() from exc
                try:
                    reply = await self.rpc.read()
                except grpc.aio.AioRpcError as exc:
                    if self._refused_stream(exc.code()):
                        raise _Unsent(exc.code()) from exc
                    raise
        except TimeoutError:
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"no answer to {method} within {timeout:g} s") from None
        if reply is grpc.aio.EOF:
            code = await self.rpc.code()
            if self._refused_stream(code):
                raise _Unsent(code)
            raise rpc_error(code if code != grpc.StatusCode.OK else
                            grpc.StatusCode.UNAVAILABLE,
                            await self.rpc.details() or "the node ended the session")
        self.answered = True
        self.used = time.monotonic()
        if self.secret and (reply.seq != self.seq or not hmac.compare_digest(
                reply.mac, frame_mac(self.secret, self.nonce, reply.seq, method, reply.body,
                                     reply.status, reply.message))):
            raise ForgedReply(f"the reply to {method} is not signed with the cluster secret "
                              f"(a node without the secret, or a changed reply)")
        if reply.seq != self.seq:
            raise rpc_error(grpc.StatusCode.DATA_LOSS,
                            f"the reply to frame {self.seq} came as frame {reply.seq}")
        if reply.status:
            raise _Refusal(rpc_error(getattr(grpc.StatusCode, reply.status,
                                             grpc.StatusCode.UNKNOWN), reply.message))
        try:
            return CALLS[method][1].FromString(reply.body)
        except Exception:
            raise rpc_error(grpc.StatusCode.DATA_LOSS,
                            f"the reply to {method} is not a valid message") from None

    def cancel(self) -> None:
        self.rpc.cancel()


async def _closed_with_loop(link: "NodeLink", channel):
    """An async generator that asyncio closes (``shutdown_asyncgens``, concurrently with the
    others) before its loop: the channel is closed there, while the loop still runs, and the
    loop runs a moment more for gRPC's poller thread to hand it the calls' last events. Left
    open, a stream would have them delivered to a closed loop (``Event loop is closed``); a
    test's ``asyncio.run`` calls end loops, a server's loop lives as long as the process."""
    try:
        yield
    finally:
        await channel.close(grace=None)
        await asyncio.sleep(0.02)
        if link._channel is channel:
            link._idle, link._streams = [], set()


def _retrieved(task: asyncio.Future) -> None:
    """Mark ``task``'s exception as seen (asyncio logs those nobody read)."""
    if not task.cancelled():
        task.exception()


class NodeLink:
    """One caller's connection to one node: a grpc.aio channel (remade for each event loop,
    as a test's ``asyncio.run`` calls need; closed with its loop), its stub for other calls,
    and the streams."""

    def __init__(self, address: str, secret: str | None, options: list | tuple = ()):
        self.address, self.secret, self.options = address, secret, list(options)
        self.sessions = True  # False once the node answers that it has no Session
        self.frames = 0  # calls answered on a stream
        self.unary = 0  # calls made as unary calls (every stream busy, or no Session)
        self._channel = self._stub = self._loop = self._guard = None
        self._idle: list[_Stream] = []
        self._streams: set[_Stream] = set()  # open on this loop's channel, idle or busy

    def stub(self) -> mesh_pb2_grpc.NodeStub:
        loop = asyncio.get_running_loop()
        if self._stub is None or self._loop is not loop:
            self._channel = tls.channel(self.address, self.options, aio=True)
            self._stub = mesh_pb2_grpc.NodeStub(self._channel)
            self._loop = loop
            self._idle, self._streams = [], set()
        return self._stub

    def _take(self) -> _Stream | None:
        while self._idle:
            s = self._idle.pop()
            if not s.stale():
                return s
            self._streams.discard(s)
            s.cancel()
        if not self.sessions or len(self._streams) >= MAX_STREAMS:
            return None
        s = _Stream(self._stub, self.secret)
        self._streams.add(s)
        return s

    async def call(self, method: str, request, timeout: float):
        """``method``'s reply from the node; raises grpc.aio.AioRpcError with the node's
        status (or UsageError / CancelledError when the channel is closed under it) and
        ForgedReply when a reply is not signed with the secret."""
        stub = self.stub()
        if self._guard is None or self._guard[0] is not self._channel:
            guard = _closed_with_loop(self, self._channel)
            await guard.__anext__()  # now the loop knows it
            self._guard = (self._channel, guard)
        stream = self._take()
        if stream is not None:
            try:
                reply = await stream.call(method, request, timeout)
            except _Refusal as r:
                self._idle.append(stream)
                self.frames += 1
                raise r.error from None
            except _Unsent as exc:  # the frame never ran: the call goes unary instead
                self._streams.discard(stream)
                stream.cancel()
                if exc.code == grpc.StatusCode.UNIMPLEMENTED:
                    self.sessions = False
            except BaseException:
                self._streams.discard(stream)
                stream.cancel()
                raise
            else:
                self._idle.append(stream)
                self.frames += 1
                return reply
        self.unary += 1
        return await acall(getattr(stub, method), request, self.secret,
                           f"/mesh.Node/{method}", timeout)

    async def close(self) -> None:
        """Close the channel: every stream and call on it ends (calls in flight raise)."""
        if self._channel is not None:
            self._idle, self._streams = [], set()
            await self._channel.close(grace=None)
