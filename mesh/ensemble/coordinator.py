"""Assemble an ensemble from ``--member MODEL[@HOST:PORT][:WEIGHT]`` specs."""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from mesh.backends.base import default_backend
from mesh.ensemble.engine import EnsembleEngine
from mesh.ensemble.member import LocalMember, RemoteMember
from mesh.errors import InvalidRequest, MeshError
from mesh.models.source import resolve
from mesh.node import mesh_pb2
from mesh.node.auth import ForgedReply, call, check_secret
from mesh.node.runner import StageRunner
from mesh.node.service import NodeUnreachable, kv_terms, node_info, node_stub

log = logging.getLogger(__name__)

_SPEC = re.compile(r"^(?P<model>[^@]+?)(?:@(?P<node>[^:@]+:\d+))?(?::(?P<weight>\d+(?:\.\d*)?))?$")


@dataclass(frozen=True)
class MemberSpec:
    model: str
    node: str | None
    weight: float


def parse_member(spec: str) -> MemberSpec:
    m = _SPEC.match(spec)
    if not m:
        raise InvalidRequest(f"--member wants MODEL[@HOST:PORT][:WEIGHT], got {spec!r}",
                             param="member")
    weight = float(m.group("weight")) if m.group("weight") else 1.0
    if weight <= 0:
        raise InvalidRequest(f"member weight must be positive in {spec!r}", param="member")
    return MemberSpec(m.group("model"), m.group("node"), weight)


def build_ensemble_engine(specs: list[str], strategy: str = "merge", *,
                          model_id: str = "mesh-ensemble", backend: str | None = None,
                          dtype: str = "auto", secret: str | None = None,
                          weighting: str = "fixed", mix_mode: str = "prob", top_k: int = 0,
                          chunk_tokens: int = 8, context_length: int | None = None,
                          kv_memory: int | str | None = None) -> EnsembleEngine:
    """``kv_memory``: the KV budget of the members in this process (bytes, "auto" or None);
    a member on a node has its node's."""
    if not specs:
        raise InvalidRequest("an ensemble needs at least one --member", param="member")
    check_secret(secret)
    parsed = [parse_member(s) for s in specs]
    sources = {p.model: resolve(p.model) for p in parsed}
    # members in this process compute at the same time on the same cores
    local = sum(p.node is None for p in parsed)
    shares_cores = local > 1
    if shares_cores:  # nor torch's (libgomp) threads: they spin after a forward by default
        os.environ.setdefault("GOMP_SPINCOUNT", "0")
    # merge: every member computes every token, in step with the others, so each gets its
    # share of the cores instead of all of them each (SmolLM2 twice on 2 cores: one stream
    # 21.4 -> 30.7 tok/s, 8 streams 57 -> 69-77; pick and words, whose members wait on one
    # another, were as fast or slower with it; docs/ensemble.md)
    threads = max(1, (os.cpu_count() or 1) // local) if strategy == "merge" and shares_cores \
        else None

    def name_of(i, spec):
        return f"{i + 1}:{spec.model}" + (f"@{spec.node}" if spec.node else "")

    def build(i_spec, probe: bool = False):
        """Member ``i`` loaded; with ``probe``, a node is asked first, in a second, whether
        it answers (a Load waits up to 10 minutes for a node that is loading a model)."""
        i, spec = i_spec
        source = sources[spec.model]
        name = name_of(i, spec)
        if spec.node is None:
            chosen = backend or default_backend(source.model_type)
            runner = StageRunner(chosen, shares_cores=shares_cores, threads=threads,
                                 kv_memory=kv_memory)
            runner._sources[spec.model] = source
            runner.load(spec.model, 0, source.num_layers, chosen, dtype)
            return LocalMember(name, spec.model, spec.weight, runner, source.tokenizer)
        if probe:
            node_info(spec.node, secret, timeout=1.0)
        try:
            loaded = call(node_stub(spec.node).Load,
                 mesh_pb2.LoadRequest(model=spec.model, start=0, end=source.num_layers,
                                      dtype=dtype, words=strategy == "words"),
                 secret, "/mesh.Node/Load", 600)
        except ForgedReply as exc:
            raise MeshError(f"member {name}: node {spec.node}: {exc.message}") from exc
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise NodeUnreachable(f"member {name}: node {spec.node} does not answer: "
                                      f"{exc.details()}") from exc
            raise MeshError(f"member {name}: node {spec.node} could not load the model: "
                            f"{exc.details()}") from exc
        return RemoteMember(name, spec.model, spec.weight, spec.node, secret, source.tokenizer,
                            source.vocab_size,
                            # an older node would copy a finished request's random draws too
                            split_invariant=loaded.split_invariant and loaded.fresh_copies,
                            word_lead=loaded.word_lead,
                            **kv_terms(loaded))

    with ThreadPoolExecutor(max_workers=len(parsed)) as pool:
        futures = [pool.submit(build, i_spec) for i_spec in enumerate(parsed)]
    members, late = [], []
    for i, (spec, f) in enumerate(zip(parsed, futures)):
        try:
            members.append(f.result())
        except NodeUnreachable as exc:  # a node not up yet: it joins once it answers
            if i == 0:  # (the first member's tokens are the API's: it must be there)
                raise
            log.warning("%s; serving without it until it answers", exc.message)
            late.append(name_of(i, spec))
    ctx = min(s.context_length for s in sources.values())
    ctx = min(context_length or ctx, ctx)
    log.info("ensemble %s (%s): %s", model_id, strategy,
             ", ".join(f"{m.name} w={m.weight}" for m in members))
    engine = EnsembleEngine(model_id, members, strategy, context_length=ctx,
                            weighting=weighting, mix_mode=mix_mode, top_k=top_k,
                            chunk_tokens=chunk_tokens)
    # members on nodes come back when their nodes answer again (EnsembleEngine.rejoin)
    engine.order = [name_of(i, spec) for i, spec in enumerate(parsed)]
    engine.rebuild = {name_of(i, spec): functools.partial(build, (i, spec), probe=True)
                      for i, spec in enumerate(parsed) if spec.node is not None}
    for name in late:
        engine.lost.append(name)
        engine.events.append(f"{time.strftime('%H:%M:%S')} waiting for member {name}")
    return engine
