"""Pipeline throughput: LocalEngine vs 2 and 4 stages, side by side in one run.

Loopback: stages are real ``mesh node`` processes on 127.0.0.1, the coordinator relays
hidden states. With root, the same again between network namespaces whose links carry
``tc netem`` (1 Gbit, 0.5 ms each way = 1 ms RTT), checked against
compute + hops x RTT + 10%, and llama.cpp's own two stages there (``llama-server --rpc`` with
half the layers on a ``ggml-rpc-server``) when llama.cpp is built.

    python benchmarks/pipeline.py [--tokens 64] [--rounds 2] [--no-netem] [--dtype auto]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.engine.base import GenerationRequest  # noqa: E402
from mesh.engine.sampling import SamplingParams  # noqa: E402

MODEL = "smollm2-135m"
SECRET = "bench-pipeline-secret"  # nodes refuse a secret under 16 characters


def prompt_ids(tokenizer, salt: int = 0) -> list[int]:
    """The benchmark's prompt; another ``salt`` makes it new to every cache (the servers keep
    finished prompts for reuse: the same prompt again is not computed)."""
    text = (ROOT / "tests" / "data" / "wikitext2-slice.txt").read_text()[:1100]
    return tokenizer.chat_prompt([{"role": "user", "content": f"Summarise ({salt}):\n{text}"}])


def measure(engine, ids, n) -> tuple[float, float]:
    async def go():
        req = GenerationRequest(uuid.uuid4().hex, ids, n, SamplingParams(temperature=0.0))
        t0 = time.perf_counter()
        first, count = None, 0
        gen = engine.generate(req)
        async for _ in gen:
            count += 1
            if first is None:
                first = time.perf_counter()
        await gen.aclose()
        end = time.perf_counter()
        return len(ids) / (first - t0), (count - 1) / (end - first)

    return asyncio.run(go())


def wire_bytes(engine) -> tuple[int, int]:
    sent = sum(getattr(s, "bytes_sent", 0) for s in engine.stages)
    recv = sum(getattr(s, "bytes_received", 0) for s in engine.stages)
    return sent, recv


def per_token_costs(engine, ids, n) -> tuple[float, float, float]:
    """Per decoded token (prompt excluded, by differencing runs of 8 and 8 + n tokens):
    wire bytes, ms of node-side compute, and ms of everything else (relay, RPC, network)."""
    def snap():
        t = time.perf_counter()
        return (sum(wire_bytes(engine)), sum(getattr(s, "compute_ms", 0.0)
                                             for s in engine.stages), t)

    a = snap()
    measure(engine, ids, 8)
    b = snap()
    measure(engine, ids, 8 + n)
    c = snap()
    d = [((c[i] - b[i]) - (b[i] - a[i])) / n for i in range(3)]
    return d[0], d[1], d[2] * 1e3 - d[1]


DTYPE = "auto"  # the file's own quantization, what `mesh serve` runs (--dtype changes it)


def build(peers, secret, backend):
    from mesh.pipeline.coordinator import build_pipeline_engine

    return build_pipeline_engine(MODEL, peers=peers, include_self=False, secret=secret,
                                 backend=backend, dtype=DTYPE)


def loopback(args) -> None:
    from mesh.backends.base import default_backend
    from mesh.engine.local import build_local_engine
    from mesh.pipeline.coordinator import spawn_local_nodes

    backend = args.backend or default_backend()
    local = build_local_engine(MODEL, backend, DTYPE, progress=False)
    ids = prompt_ids(local.tokenizer)
    procs = spawn_local_nodes(6, SECRET, backend)  # a node holds one shard: 2 + 4
    try:
        addrs = [a for _, a in procs]
        engines = {"local": local, "2 stages": build(addrs[:2], SECRET, backend),
                   "4 stages": build(addrs[2:], SECRET, backend)}
        for e in engines.values():
            measure(e, ids, 4)  # warm-up
        results = {k: [] for k in engines}
        for r in range(args.rounds):
            for i, (k, e) in enumerate(engines.items()):
                fresh = prompt_ids(local.tokenizer, 1 + r * len(engines) + i)
                results[k].append(measure(e, fresh, args.tokens))
        print(f"loopback, {backend} {DTYPE}, prompt {len(ids)} tokens, {args.tokens} greedy "
              f"tokens, best of {args.rounds} interleaved rounds")
        print(f"{'setup':<10} {'prompt tok/s':>12} {'decode tok/s':>12} {'vs local':>16} "
              f"{'wire B/token':>12} {'node ms/tok':>11} {'relay ms/tok':>12}")
        lp = max(r[0] for r in results["local"])
        ld = max(r[1] for r in results["local"])
        for k, e in engines.items():
            p = max(r[0] for r in results[k])
            d = max(r[1] for r in results[k])
            b, node_ms, relay_ms = per_token_costs(e, ids, 16) if k != "local" else (0, 0, 0)
            print(f"{k:<10} {p:>12.1f} {d:>12.1f} {p / lp:>7.3f} / {d / ld:<6.3f} {b:>12.0f} "
                  f"{node_ms:>11.2f} {relay_ms:>12.2f}")
        print(f"(local decode: {1000 / ld:.2f} ms/token; node ms = forward time reported by "
              "the nodes, relay ms = the rest: coordinator, gRPC, loopback)")
        for e in engines.values():
            asyncio.run(e.close())
    finally:
        for p, _ in procs:
            p.terminate()


def netem(args) -> None:
    from tests.netns import Hosts, netem_available, netns_unavailable_reason

    reason = netns_unavailable_reason()
    if reason:
        print(f"\nnetem: skipped ({reason})")
        return
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MESH_SECRET": SECRET,
           "GOMP_SPINCOUNT": "30000"}
    if netem_available():
        qdisc, env["BENCH_LINK"] = "netem delay 0.5ms rate 1gbit", "netem 1 Gbit, 1 ms RTT"
    else:  # no sch_netem in this kernel: rate-limit only, RTT as measured
        qdisc, env["BENCH_LINK"] = ("tbf rate 1gbit burst 256kb latency 50ms",
                                    "tbf 1 Gbit (this kernel has no sch_netem: no added delay)")
    with Hosts(5, netem=qdisc, net=78) as hosts:
        procs = []
        try:
            for i in range(1, 5):
                p = subprocess.Popen(
                    hosts.exec_args(i) + [sys.executable, "-m", "mesh", "node", "--host",
                                          hosts.ips[i], "--port", "50051", "--no-discovery"],
                    stdout=subprocess.PIPE, text=True, env=env)
                procs.append(p)
            for p in procs:
                while "MESH_NODE_READY" not in (p.stdout.readline() or "MESH_NODE_READY"):
                    pass
            peers = [f"{ip}:50051" for ip in hosts.ips[1:]]
            r = subprocess.run(hosts.exec_args(0) + [sys.executable, __file__, "--inner",
                                                     json.dumps(peers), "--tokens",
                                                     str(args.tokens), "--dtype", DTYPE],
                               capture_output=True, text=True, env=env, timeout=1200)
            print(r.stdout, end="")
            if r.returncode:
                print(r.stderr[-3000:])
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait()
        llama_rpc(hosts, args.tokens)


LLAMA_CLIENT = """
import json, sys, time, urllib.request
url, text, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
deadline = time.monotonic() + 300
while True:
    try:
        urllib.request.urlopen(url + "/health", timeout=2).read()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
def ask(content, tokens):
    body = json.dumps({"messages": [{"role": "user", "content": content}], "temperature": 0,
                       "max_tokens": tokens, "ignore_eos": True}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", body,
                                 {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=600))["timings"]
ask("Hello", 4)
t = ask(text, n)
print(json.dumps({"decode_ms": t["predicted_per_token_ms"],
                  "prompt_tps": t["prompt_per_second"]}))
"""


def llama_rpc(hosts, tokens: int) -> None:
    """llama.cpp's own two stages across the same namespaces: ``ggml-rpc-server`` on host 1
    holding half the layers and the output layer, ``llama-server --rpc`` on host 0, and
    llama-server alone on host 0 for its local figure; decode ms/token from its timings."""
    from benchmarks.backends import gguf_path, llama_cpp_bin
    from mesh.models.source import resolve

    bin_dir = llama_cpp_bin()
    if bin_dir is None or not (bin_dir / "ggml-rpc-server").exists():
        print("llama.cpp's RPC mode: skipped (not built)")
        return
    text = f"Summarise:\n{(ROOT / 'tests' / 'data' / 'wikitext2-slice.txt').read_text()[:1100]}"
    layers = resolve(MODEL, progress=False).num_layers
    threads = str(os.cpu_count())
    rpc = subprocess.Popen(hosts.exec_args(1) + [str(bin_dir / "ggml-rpc-server"), "-H",
                                                 hosts.ips[1], "-p", "50052", "-t", threads],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        for name, extra in (("llama.cpp local", []),
                            ("llama.cpp RPC, 2 stages", ["--rpc", f"{hosts.ips[1]}:50052",
                                                         "-ngl", str(layers - layers // 2)])):
            server = subprocess.Popen(
                hosts.exec_args(0) + [str(bin_dir / "llama-server"), "-m", gguf_path(MODEL),
                                      "--host", "127.0.0.1", "--port", "8089", "-np", "1",
                                      "-t", threads, *extra],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                r = subprocess.run(hosts.exec_args(0) + [sys.executable, "-c", LLAMA_CLIENT,
                                                         "http://127.0.0.1:8089", text,
                                                         str(tokens)],
                                   capture_output=True, text=True, timeout=900)
                if r.returncode:
                    print(f"{name}: failed: {r.stderr.strip().splitlines()[-1:]}")
                    continue
                rows.append((name, json.loads(r.stdout.strip().splitlines()[-1])))
            finally:
                server.terminate()
                server.wait(timeout=30)
    finally:
        rpc.terminate()
        rpc.wait(timeout=30)
    print(f"\nllama.cpp (llama-server, the same GGUF, its own timings), {tokens} tokens:")
    for name, t in rows:
        print(f"{name:<24} decode {t['decode_ms']:6.2f} ms/token, prompt "
              f"{t['prompt_tps']:7.1f} tok/s")


def inner(args) -> None:
    """Runs inside the coordinator's namespace: local vs 2 / 4 remote stages with netem."""
    from mesh.engine.local import build_local_engine

    from mesh.pipeline.coordinator import node_info

    peers = json.loads(args.inner)
    local = build_local_engine(MODEL, None, DTYPE, progress=False)
    ids = prompt_ids(local.tokenizer)
    node_info(peers[0], SECRET)
    t0 = time.perf_counter()
    for _ in range(20):
        node_info(peers[0], SECRET)
    rtt_ms = (time.perf_counter() - t0) / 20 * 1e3  # an Info RPC: RTT plus gRPC's own cost
    print(f"\nbetween namespaces: {os.environ.get('BENCH_LINK')}; measured RPC round trip "
          f"{rtt_ms:.2f} ms")
    print(f"{'setup':<10} {'decode ms/token':>15} {'bound ms':>9} {'within':>7}")
    measure(local, ids, 4)
    compute = 1000 / measure(local, ids, args.tokens)[1]
    print(f"{'local':<10} {compute:>15.2f}")
    for k in (2, 4):
        e = build(peers[:k], SECRET, None)
        measure(e, ids, 4)
        ms = 1000 / measure(e, ids, args.tokens)[1]
        bound = (compute + k * rtt_ms) * 1.10
        print(f"{k} stages  {ms:>15.2f} {bound:>9.2f} {'yes' if ms <= bound else 'NO':>7}")
        asyncio.run(e.close())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--no-netem", action="store_true")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--inner", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global DTYPE
    DTYPE = args.dtype
    if args.inner:
        inner(args)
        return
    loopback(args)
    if not args.no_netem:
        netem(args)


if __name__ == "__main__":
    main()
