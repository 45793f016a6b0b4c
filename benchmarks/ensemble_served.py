"""Ensembles as served: quality and speed measured through running servers' APIs.

Quality: bits per byte of WikiText-2 (tests/data) from `/v1/completions` with `echo`,
`logprobs` and `max_tokens: 0`, the same windows for every server: SmolLM2 alone, Gemma 3
alone, and `--strategy words` ensembles of the two (the word-level mixture across their
vocabularies) at equal weights and at 0.2 / 0.8. Each window starts with a blank line (the
first token has no context and no score); the bytes counted are those after it.

Speed: decode tokens/s and bytes of text/s of a streamed answer through the API (what
follows the first step's output over the time from it to the last: the prompt's time left
out), on a chat request and on a text continuation (Gemma 3 270M is a base model: asked to
chat, it repeats the question), each member alone and the ensembles (merge: SmolLM2 twice;
words and pick: SmolLM2 and Gemma 3) with each member in its own `mesh node` process (all
on this machine's cores). An ensemble's tokens are its first member's, and tokenizers cut
text differently, so bytes of text are the unit that compares a cross-vocabulary ensemble
with its members; both ratios are printed. Each member alone is measured greedy and sampled
(temperature 0.8, seed 1, or seeds 1..N with `--seeds N`), and an ensemble is compared with
its slowest member at its own temperature: a sampled text's bytes a token differ from a
greedy text's.
With `--pin`, each member gets a core of its own, as if each were on a machine of its own:
a member alone is served on core 0 with one compute thread, and each member node is pinned
to a core (0, 1, ...) with one compute thread; the ensemble's coordinator and the client are
not pinned.
With `--checkout DIR` (speed only) the members alone are not measured: each ensemble is
served twice on the same member nodes, by this checkout's coordinator and by DIR's (an
older commit's `git worktree`, say), and the two alternate answers, `--rounds` each (at
least 2): a change's effect measured side by side, with the box's drift shared by both.
With `--share F` (implies `--pin`; root and a cgroup `cpu` controller), each "machine" is F
of its core, enforced by a CPU quota (cgroups): the member alone's server, and each member
node, get F of their core; the rest of the cores is left to the client and, with
`--coordinator own` (the default), to the ensemble's coordinator, as if they ran on machines
of their own; with `--coordinator member`, the coordinator shares the first member's machine
(core 0 and its quota), as when `mesh serve` runs on one of the members' boxes beside a
`mesh node`; with `--coordinator here`, the first member runs in the coordinator's process
there (`--member smollm2-135m --member gemma3-270m@HOST:PORT`, the way docs/ensemble.md
starts an ensemble of two boxes; the first node is started but idle). Unlike
`--pin` alone, a member then never computes on a core the coordinator is working on, and a
member alone and in an ensemble get the same machine.
With `--rtt MS`, the coordinator reaches each node through `benchmarks/link.py`, a relay
that adds that round-trip time (a LAN's; loopback's hides what waiting on one costs).

    python benchmarks/ensemble_served.py [--kb 6] [--window 1200] [--tokens 48] [--pin]
        [--share 0.6] [--coordinator own|member|here] [--seeds 3]
        [--speed-only] [--strategies merge words pick] [--merge-top-k 0 64]
        [--pick-chunks 8 16 32] [--prompt chat text] [--rounds 3] [--checkout DIR]
        [--rtt 1.0]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.concurrency import _port, checkouts, start  # noqa: E402
from benchmarks.ensemble import windows  # noqa: E402

TEXT = ROOT / "tests" / "data" / "wikitext2-slice.txt"
LN2 = math.log(2)
TEMPERATURES = (("greedy", 0.0), ("sampled 0.8", 0.8))


def serve(args: list[str], core: int | None = None, root: Path = ROOT,
          machines: Machines | None = None) -> tuple[subprocess.Popen, str]:
    """A server of the checkout at ``root``; with ``core``, pinned to that core with one
    compute thread, and with ``machines`` too, on machine ``core`` (once it has loaded)."""
    port = _port()
    url = f"http://127.0.0.1:{port}"
    pin = ["taskset", "-c", str(core)] if core is not None else []
    there = [] if root == ROOT else ["env", "-C", str(root)]
    with one_thread(core is not None):
        proc = start([*pin, *there, sys.executable, "-m", "mesh", "--log-level", "warning",
                      "serve", "--port", str(port), "--context-length", "2048", *args], url)
    if machines and core is not None:
        machines.put(core, proc.pid)
    return proc, url


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=60)


def coordinator(args) -> dict:
    """Where an ensemble's server runs: with ``--share`` and ``--coordinator member`` or
    ``here``, on the first member's machine; otherwise unpinned."""
    if args.machines and args.coordinator != "own":
        return {"core": 0, "machines": args.machines}
    return {}


class Machines:
    """Emulated machines of ``share`` of a core each: a CPU quota per machine (a cgroup under
    the ``cpu`` controller, v1 or v2), every process put on machine i limited together."""

    # the shortest period a quota of half a core allows (a quota is at least 1 ms): a
    # machine that runs at full speed for its quota and then stops hides a wait shorter than
    # the rest of the period, which a slower machine would not; short periods keep it small
    PERIOD_US = 2_000

    def __init__(self, n: int, share: float):
        v1 = Path("/sys/fs/cgroup/cpu")
        self.v2 = not (v1 / "cgroup.procs").exists()
        root = Path("/sys/fs/cgroup") if self.v2 else v1
        self.dirs = [root / f"mesh-bench-{os.getpid()}-{i}" for i in range(n)]
        quota = int(share * self.PERIOD_US)
        try:
            if self.v2:
                (root / "cgroup.subtree_control").write_text("+cpu")
            for d in self.dirs:
                d.mkdir(exist_ok=True)
                if self.v2:
                    (d / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
                else:
                    (d / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
                    (d / "cpu.cfs_quota_us").write_text(str(quota))
        except OSError as e:
            self.close()
            raise SystemExit(f"--share needs root and a cgroup cpu controller: {e}") from None

    def put(self, i: int, pid: int) -> None:
        """Machine ``i`` runs process ``pid`` (all its threads) and its children."""
        import psutil

        for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
            (self.dirs[i] / "cgroup.procs").write_text(str(p.pid))

    def close(self) -> None:
        for d in self.dirs:
            with contextlib.suppress(OSError):
                d.rmdir()  # its processes have ended (a group with any left stays)


@contextlib.contextmanager
def one_thread(on: bool):
    """Children started inside compute on one thread (ONNX Runtime, torch, MLX's BLAS)."""
    keys = ("MESH_ORT_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    old = {k: os.environ.get(k) for k in keys}
    if on:
        os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def bits_per_byte(url: str, model: str, pieces: list[str]) -> tuple[float, float]:
    nll, nbytes, t0 = 0.0, 0, time.perf_counter()
    for piece in pieces:
        text = "\n\n" + piece
        r = httpx.post(url + "/v1/completions", timeout=600, json={
            "model": model, "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0})
        r.raise_for_status()
        lp = r.json()["choices"][0]["logprobs"]
        nll -= sum(lp["token_logprobs"][1:])
        nbytes += len(text.encode()) - len(lp["tokens"][0].encode())
    return nll / LN2 / nbytes, time.perf_counter() - t0


def wire_bytes(url: str) -> float:
    """Bytes to and from the ensemble's members so far (``mesh_member_wire_bytes``)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text)
               if f.name == "mesh_member_wire_bytes" for s in f.samples
               if s.name.endswith("_total"))


STORY = "Write a short story about a lighthouse keeper."
# a text to continue, for base models as for chat ones (Gemma 3 270M is a base model: asked
# to chat, it repeats the question)
OPENING = ("The lighthouse stood at the end of a long spit of rock, and for thirty years the "
           "same keeper had climbed its stairs every evening. On the night the storm came,")
BURST = 0.005  # s: chunks closer than this came out of one step


def decode_speed(url: str, model: str, tokens: int, temperature: float = 0.0,
                 prompt: str = "chat", seeds: int = 1) -> tuple[float, float]:
    """Decode speed of a streamed answer, (tokens/s, bytes of text/s): the tokens (or the
    text's UTF-8 bytes) after the first step's over the time from that step to the last, so
    the prompt's computation (and whether a server reuses an earlier one) is left out. A
    step is a token, or a pick round's chunk (its tokens are sent together: counting them
    from the first would count a round's tokens for no time). Tokens of different
    tokenizers are not the same length (an ensemble's are its first member's), so text
    bytes are the unit that compares a cross-vocabulary ensemble with its members.
    ``prompt``: ``chat`` (a chat request asking for a story) or ``text`` (a completion
    continuing a story's opening). A warm-up with another request goes first. Sampled
    (``temperature`` > 0), the answers of ``seeds`` seeds (1, 2, ...) together: one sampled
    text's bytes a token vary (a 150-token answer of the words ensemble read 3.55 bytes a
    token with seed 1, 3.95 over seeds 1-5)."""

    chat = prompt == "chat"
    path = "/v1/chat/completions" if chat else "/v1/completions"

    def body(text, n):
        ask = {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
        return {"model": model, "max_tokens": n, "temperature": temperature, "seed": 1, **ask}

    httpx.post(url + path, json=body("Say hello." if chat else "Hello,", 4),
               timeout=600).raise_for_status()
    done = [0, 0, 0.0]  # tokens, bytes, seconds
    for seed in range(1, 1 + (seeds if temperature > 0 else 1)):
        got = _decoded(url, path, {**body(STORY if chat else OPENING, tokens), "seed": seed},
                       chat)
        done = [a + b for a, b in zip(done, got)]
    return done[0] / done[2], done[1] / done[2]


def _decoded(url: str, path: str, body: dict, chat: bool) -> tuple[int, int, float]:
    """One streamed answer's decode: (tokens, bytes of text, seconds) after its first step."""
    import json

    first = last = None
    n, nbytes, burst, in_burst = 0, 0, 0, True
    with httpx.stream("POST", url + path, timeout=600, json={
            **body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                c = chunk["choices"][0]
                text = c["delta"].get("content") if chat else c.get("text")
                if text:
                    now = time.perf_counter()
                    # the first burst (a token; a pick round's chunk, sent at once) ends the
                    # prompt's time: what follows it is decode
                    in_burst = first is None or (in_burst and now - last < BURST)
                    if in_burst:
                        first, burst = now, burst + 1
                    else:
                        nbytes += len(text.encode())
                    last = now
            n = (chunk.get("usage") or {}).get("completion_tokens", n)
    return n - burst, nbytes, last - first


def nodes(n: int, pin: bool = False, machines: Machines | None = None
          ) -> tuple[list[subprocess.Popen], list[str]]:
    """``n`` member nodes; with ``pin``, node i on core i (every thread it has or will
    start: it loads its model later, on a thread it already has) with one compute thread;
    with ``machines``, node i on machine i too."""
    from mesh.pipeline.coordinator import spawn_local_nodes

    secret = os.environ.setdefault("MESH_SECRET", "bench-ensemble-secret-123")
    with one_thread(pin):
        spawned = spawn_local_nodes(n, secret, None)
    if pin:
        for i, (p, _) in enumerate(spawned):
            subprocess.run(["taskset", "-a", "-p", "-c", str(i % os.cpu_count()), str(p.pid)],
                           check=True, stdout=subprocess.DEVNULL)
            if machines:
                machines.put(i, p.pid)
    return [p for p, _ in spawned], [a for _, a in spawned]


def link(addrs: list[str], rtt: float) -> tuple[subprocess.Popen, list[str]]:
    """A relay (``benchmarks/link.py``) that delays the way to each of ``addrs`` by ``rtt``
    ms, and the addresses that go through it."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "link.py"), "--rtt",
                             str(rtt), *addrs], stdout=subprocess.PIPE, text=True)
    relayed = [proc.stdout.readline().strip() for _ in addrs]
    if not all(relayed):
        proc.kill()
        raise SystemExit("benchmarks/link.py did not start")
    return proc, relayed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kb", type=int, default=6)
    ap.add_argument("--window", type=int, default=1200, help="characters per window")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--speed-only", action="store_true")
    ap.add_argument("--pin", action="store_true",
                    help="a core for each member (as if on machines of their own)")
    ap.add_argument("--strategies", nargs="*", default=["merge", "words", "pick"],
                    choices=["merge", "words", "pick"])
    ap.add_argument("--rounds", type=int, default=1,
                    help="speed rounds (members alone, then the ensembles); with more than "
                         "one, the median of each round's ratios")
    ap.add_argument("--pick-chunks", type=int, nargs="*", default=[8],
                    help="pick runs, each with this --chunk-tokens (quality: "
                         "benchmarks/pick_quality.py)")
    ap.add_argument("--prompt", nargs="*", default=["chat", "text"], choices=["chat", "text"],
                    help="speed on a chat answer, on a text continuation, or both")
    ap.add_argument("--checkout", default=None,
                    help="serve each ensemble from this checkout too, on the same nodes, "
                         "alternating answers with this one's")
    ap.add_argument("--merge-top-k", type=int, nargs="*", default=[0],
                    help="merge runs, each with members sending their top-k (0: all)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="a sampled speed over this many answers (seeds 1..N) together")
    ap.add_argument("--share", type=float, default=None,
                    help="each member's machine is this share of its core (a CPU quota); "
                         "implies --pin")
    ap.add_argument("--coordinator", choices=["own", "member", "here"], default="own",
                    help="with --share: the coordinator on a machine of its own (the cores' "
                         "rest), on the first member's (member: beside its node; here: the "
                         "first member in the coordinator's process)")
    ap.add_argument("--rtt", type=float, default=0.0,
                    help="add this round-trip time (ms) to the coordinator's link to each "
                         "node (benchmarks/link.py: this kernel has no tc netem)")
    args = ap.parse_args()
    if args.share is not None and not 0.5 <= args.share <= 1:
        ap.error("--share is a share of one core, between 0.5 and 1")
    args.pin = args.pin or args.share is not None
    args.machines = Machines(2, args.share) if args.share is not None else None
    try:
        run(args)
    finally:
        if args.machines:
            args.machines.close()


def run(args) -> None:
    pieces = windows(TEXT.read_text()[: args.kb * 1024], args.window)
    configs = [
        ("SmolLM2-135M alone", ["--model", "smollm2-135m"], "smollm2-135m"),
        ("Gemma 3 270M alone", ["--model", "gemma3-270m"], "gemma3-270m"),
        ("words, equal weights", ["--mode", "ensemble", "--strategy", "words",
                                  "--member", "smollm2-135m", "--member", "gemma3-270m"],
         "mesh-ensemble"),
        ("words, 0.2 SmolLM2 / 0.8 Gemma", ["--mode", "ensemble", "--strategy", "words",
                                            "--member", "smollm2-135m:0.2",
                                            "--member", "gemma3-270m:0.8"], "mesh-ensemble"),
    ]
    print(f"bits per byte through the API, {sum(len(p.encode()) for p in pieces) / 1024:.1f} "
          f"KB of WikiText-2 in {len(pieces)} windows of ~{args.window} characters")
    for name, cli, model in ([] if args.speed_only else configs):
        proc, url = serve(cli)
        try:
            bpb, took = bits_per_byte(url, model, pieces)
            print(f"  {name:<34} {bpb:.4f}   ({took:.0f} s)")
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    if args.machines:
        print(f"\ndecode through the API, {args.tokens} tokens; each member on a machine of "
              f"{args.share:g} core (a CPU quota on its core, one compute thread; alone: core "
              f"0; in the ensemble: node i on core i); the client on the cores' rest; the "
              f"coordinator " + {"own": "on the cores' rest",
                                  "member": "on the first member's machine",
                                  "here": "on the first member's machine, that member in its "
                                          "process (one compute thread)"}[args.coordinator])
    elif args.pin:
        print(f"\ndecode through the API, {args.tokens} tokens; each member on a core of its "
              f"own with one compute thread (alone: core 0; in the ensemble: node i on core i), "
              f"the coordinator and the client unpinned")
    else:
        print(f"\ndecode through the API, {args.tokens} tokens, {os.cpu_count()} cores "
              f"shared by the client, the server and (for the ensemble) two node processes")
    procs, addrs = nodes(2, args.pin, args.machines)
    if args.rtt:  # the coordinator reaches the nodes through a delaying relay
        relay, addrs = link(addrs, args.rtt)
        procs.append(relay)
        print(f"  the coordinator's link to each node: {args.rtt:g} ms round trip added "
              f"(benchmarks/link.py)")
    if args.checkout:
        try:
            side_by_side(args, addrs)
        finally:
            stop(procs)
        return
    ratios: dict = {}  # (run, prompt) -> [(x tokens, x bytes) per round]
    try:
        for r in range(args.rounds):
            if args.rounds > 1:
                print(f"  round {r + 1} of {args.rounds}")
            for key, x in speed_round(args, configs, addrs).items():
                ratios.setdefault(key, []).append(x)
    finally:
        stop(procs)
    if args.rounds > 1:
        print(f"\nmedians over {args.rounds} rounds, each ensemble over the slowest member "
              f"measured in its round (tokens / bytes of text):")
        for (name, prompt), xs in ratios.items():
            print(f"  {name:<38} {prompt:<4} {statistics.median(t for t, _ in xs):.2f}x / "
                  f"{statistics.median(b for _, b in xs):.2f}x   (bytes: "
                  + ", ".join(f"{b:.2f}" for _, b in xs) + ")")


def speed_round(args, configs, addrs: list[str]) -> dict:
    """Each member alone, then each ensemble on the member nodes at ``addrs``; prints each
    speed and returns each ensemble run's (x tokens, x bytes) over its slowest member's."""
    speeds = {}  # (member, prompt, temperature) -> (tokens/s, bytes/s)
    for name, cli, model in configs[:2]:
        proc, url = serve(cli, 0 if args.pin else None, machines=args.machines)
        try:
            for prompt in args.prompt:
                for label, temp in TEMPERATURES:
                    speeds[name, prompt, temp] = decode_speed(url, model, args.tokens, temp,
                                                              prompt, args.seeds)
                    tps, bps = speeds[name, prompt, temp]
                    print(f"  {name + ', ' + label:<38} {prompt:<4} {tps:5.1f} tok/s "
                          f"{bps:6.0f} B/s")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print("  (an ensemble's tokens are its first member's; x: its speed over the slowest "
          "member's at the same temperature, in tokens and in bytes of text: a sampled "
          "text's bytes a token differ from a greedy one's)")
    out = {}
    for strategy, k in ensemble_runs(args):
        top_k = k if strategy == "merge" else 0
        chunk = k if strategy == "pick" else 0
        proc, url = serve(ensemble_cli(strategy, k, addrs, args.coordinator == "here"),
                          **coordinator(args))
        try:
            for prompt in args.prompt:
                for label, temp in TEMPERATURES:
                    alone = [speeds[configs[0][0], prompt, temp]] if strategy == "merge" else \
                        [v for (_, p, t), v in speeds.items() if p == prompt and t == temp]
                    slow_t, slow_b = min(t for t, _ in alone), min(b for _, b in alone)
                    before = wire_bytes(url)
                    tps, bps = decode_speed(url, "mesh-ensemble", args.tokens, temp, prompt,
                                            args.seeds)
                    # decode_speed sends a 4-token warm-up, then the measured requests
                    asked = args.tokens * (args.seeds if temp > 0 else 1) + 4
                    per_token = (wire_bytes(url) - before) / asked
                    several = len(args.pick_chunks) > 1
                    tag = f" --top-k {top_k}" if top_k else \
                        f" --chunk-tokens {chunk}" if chunk and several else ""
                    name = f"{strategy}{tag}, {label}"
                    out[name, prompt] = (tps / slow_t, bps / slow_b)
                    print(f"  {name:<38} {prompt:<4} {tps:5.1f} tok/s {bps:6.0f} B/s "
                          f"({tps / slow_t:.2f}x / {bps / slow_b:.2f}x), "
                          f"{per_token / 1e3:.1f} KB on the wire a token (prompts included)")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return out


def ensemble_runs(args) -> list[tuple[str, int]]:
    """(strategy, its --top-k or --chunk-tokens, 0 for none) of each ensemble to serve."""
    return [(s, k) for s in args.strategies for k in (
        args.merge_top_k if s == "merge" else args.pick_chunks if s == "pick" else [0])]


def ensemble_cli(strategy: str, k: int, addrs: list[str], here: bool = False) -> list[str]:
    """``mesh serve`` arguments of an ensemble on the member nodes at ``addrs``: merge needs
    one vocabulary, SmolLM2 twice (weights 1 and 0.5); words and pick SmolLM2 and Gemma 3.
    With ``here``, the first member runs in the server's process instead of on a node."""
    second = "smollm2-135m" if strategy == "merge" else "gemma3-270m"
    weight = ":0.5" if strategy == "merge" else ""
    first = "smollm2-135m" if here else f"smollm2-135m@{addrs[0]}"
    return ["--mode", "ensemble", "--strategy", strategy,
            "--member", first, "--member", f"{second}@{addrs[1]}{weight}",
            *(["--top-k", str(k)] if strategy == "merge" and k else []),
            *(["--chunk-tokens", str(k)] if strategy == "pick" and k else [])]


def side_by_side(args, addrs: list[str]) -> None:
    """Each ensemble served by this checkout and by ``args.checkout`` on the same nodes, the
    two alternating answers (the first of each pair alternates too); prints each one's
    median bytes of text a second and how many pairs this checkout won."""
    trees = checkouts(args.checkout)
    rounds = max(args.rounds, 2)
    print(f"  {rounds} answers each, alternating; bytes of text a second, median (range)")
    for strategy, k in ensemble_runs(args):
        servers = []
        try:
            for _, root in trees:
                servers.append(serve(ensemble_cli(strategy, k, addrs,
                                                  args.coordinator == "here"), root=root,
                                     **coordinator(args)))
            for prompt in args.prompt:
                for label, temp in TEMPERATURES:
                    got: list[list[float]] = [[] for _ in trees]
                    for r in range(rounds):
                        for i in (range(len(trees)) if r % 2 == 0
                                  else reversed(range(len(trees)))):
                            got[i].append(decode_speed(servers[i][1], "mesh-ensemble",
                                                       args.tokens, temp, prompt,
                                                       args.seeds)[1])
                    won = sum(a > b for a, b in zip(got[0], got[1]))
                    name = f"{strategy}{f' {k}' if k else ''}, {label}"
                    print(f"  {name:<30} {prompt:<4} " + "   ".join(
                        f"{tree}: {statistics.median(g):.0f} ({min(g):.0f}-{max(g):.0f})"
                        for (tree, _), g in zip(trees, got)) +
                        f"   this checkout faster in {won} of {rounds}")
        finally:
            for proc, _ in servers:
                proc.terminate()
                proc.wait(timeout=60)


if __name__ == "__main__":
    main()
