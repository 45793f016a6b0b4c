"""Ensemble members: a whole model in this process or on a ``mesh node``, one interface."""

from __future__ import annotations

import abc
import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from mesh.engine.base import PromptScore
from mesh.ensemble.mixing import Dist
from mesh.errors import MeshError
from mesh.node import mesh_pb2, mesh_pb2_grpc, tls
from mesh.node.auth import ForgedReply, acall
from mesh.node.codec import from_tensor
from mesh.node.runner import StageError, StageRunner
from mesh.node.service import CHANNEL_OPTIONS
from mesh.pipeline.engine import STEP_TIMEOUT, StageLost


class RewindUnsupported(MeshError):
    """The member's cache cannot go back (a rotated sliding window): replay from 0."""


class Member(abc.ABC):
    name: str
    model: str
    weight: float
    tokenizer: object
    vocab_size: int
    bytes_received: int = 0  # on the wire, for a member on a node
    bytes_sent: int = 0

    @abc.abstractmethod
    async def step(self, rid: str, position: int, tokens: list[int], top_k: int = 0,
                   score: bool = False, want_dist: bool = True, score_top: int = 0
                   ) -> tuple[Dist | None, list | None]:
        """The next-token distribution and, with ``score``, the log-probs of ``tokens[1:]``
        (PromptScores with their top alternatives when ``score_top`` > 0)."""

    @abc.abstractmethod
    async def end(self, rid: str) -> None: ...

    async def close(self) -> None:
        return None


class LocalMember(Member):
    def __init__(self, name: str, model: str, weight: float, runner: StageRunner, tokenizer):
        self.name, self.model, self.weight = name, model, weight
        self.runner, self.tokenizer = runner, tokenizer
        self.vocab_size = runner.shard.vocab_size
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-member")

    async def step(self, rid, position, tokens, top_k=0, score=False, want_dist=True,
                   score_top=0):
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self.runner.member_step, rid,
                                              position, tokens, top_k, score, want_dist,
                                              score_top)
        except StageError as err:
            if "cannot rewind" in err.message:
                raise RewindUnsupported(err.message) from err
            raise MeshError(f"member {self.name}: {err.message}") from err

    async def end(self, rid):
        self.runner.end(rid)

    async def close(self):
        self._executor.shutdown(wait=False, cancel_futures=True)


class RemoteMember(Member):
    def __init__(self, name: str, model: str, weight: float, address: str, secret, tokenizer,
                 vocab_size: int):
        self.name, self.model, self.weight = name, model, weight
        self.address, self.secret, self.tokenizer = address, secret, tokenizer
        self.vocab_size = vocab_size
        self.bytes_received = self.bytes_sent = 0
        self._stub = None
        self._loop = None
        self._channel = None

    def _aio(self):
        loop = asyncio.get_running_loop()
        if self._stub is None or self._loop is not loop:
            self._channel = tls.channel(self.address, CHANNEL_OPTIONS, aio=True)
            self._stub, self._loop = mesh_pb2_grpc.NodeStub(self._channel), loop
        return self._stub

    async def step(self, rid, position, tokens, top_k=0, score=False, want_dist=True,
                   score_top=0):
        req = mesh_pb2.MemberRequest(request_id=rid, position=position, tokens=tokens,
                                     top_k=top_k, score=score, no_distribution=not want_dist,
                                     score_top=score_top)
        self.bytes_sent += req.ByteSize()
        try:
            reply = await acall(self._aio().Member, req, self.secret, "/mesh.Node/Member",
                                STEP_TIMEOUT)
        except ForgedReply as exc:
            raise StageLost(f"member {self.name} ({self.address}): {exc.message}",
                            self.name) from exc
        except grpc.aio.AioRpcError as exc:
            if "cannot rewind" in (exc.details() or ""):
                raise RewindUnsupported(exc.details()) from exc
            if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT,):
                raise MeshError(f"member {self.name}: {exc.details()}") from exc
            raise StageLost(f"member {self.name} ({self.address}): {exc.code().name}: "
                            f"{exc.details()}", self.name) from exc
        self.bytes_received += reply.ByteSize()
        dist = None
        if reply.HasField("logprobs"):
            dist = Dist(full=from_tensor(reply.logprobs))
        elif len(reply.top_ids):
            dist = Dist(top_ids=np.asarray(reply.top_ids, np.int32),
                        top_logprobs=np.asarray(reply.top_logprobs, np.float32),
                        rest_logprob=reply.rest_logprob)
        if score and score_top:
            lps, n = list(reply.token_logprobs), score_top
            ids, tops = list(reply.score_top_ids), list(reply.score_top_logprobs)
            if len(ids) != len(lps) * n or len(tops) != len(lps) * n:
                raise StageLost(f"member {self.name} ({self.address}) sent prompt scores of "
                                f"the wrong length", self.name)
            return dist, [PromptScore(lp, list(zip(ids[i * n:(i + 1) * n],
                                                   tops[i * n:(i + 1) * n])))
                          for i, lp in enumerate(lps)]
        return dist, (list(reply.token_logprobs) if score else None)

    async def end(self, rid):
        try:
            await acall(self._aio().End, mesh_pb2.EndRequest(request_id=rid), self.secret,
                        "/mesh.Node/End", 5.0)
        except (grpc.aio.AioRpcError, ForgedReply):
            pass

    async def close(self):
        if self._channel is not None:
            await self._channel.close()
