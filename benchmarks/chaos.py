"""Chaos: faults injected into a running pipeline while greedy streams run through the API.

For each fault, N concurrent greedy streams (real node processes on loopback, the real HTTP
server, httpx clients) are compared with an undisturbed run of the same prompts on the same
topology. Every stream must end one of two ways: the undisturbed text, or an OpenAI error
event followed by ``[DONE]``. A stream that ends any other way (closed without ``[DONE]``,
a missing error code, a read that hangs) is counted as cut. After the fault, a new request is
sent in a loop until it succeeds: the time that takes is the "new request" column, and any
5xx other than 503 + Retry-After on the way is counted.

    python benchmarks/chaos.py                    # every fault in the table
    python benchmarks/chaos.py --fault middle     # one of them
    python benchmarks/chaos.py --streams 16 --tokens 48
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.pipeline.coordinator import build_pipeline_engine  # noqa: E402
from mesh.server.app import build_app  # noqa: E402
from tests.conftest import ServerThread  # noqa: E402

MODEL = "smollm2-135m"
PROMPTS = ["Explain why the sky is blue.", "Write a short poem about rain.",
           "What is a prime number?", "Give three tips for learning to cook.",
           "Describe a cat to someone who has never seen one.", "Why do we sleep?",
           "What is the capital of Italy and why is it famous?", "How do plants grow?"]
READ_TIMEOUT = 90.0  # a client that hears nothing for this long counts the stream as hung


def long_text(facts: int) -> str:
    return " ".join(f"Fact {i}: the number {i} squared is {i * i}." for i in range(facts))


@dataclass
class Fault:
    what: str
    nodes: int  # local node processes
    coordinator_stage: bool  # does the coordinator hold a stage itself
    kill: list[str] = field(default_factory=list)  # SIGKILL these, all at once
    then_kill: list[str] = field(default_factory=list)  # after the first re-plan
    stop_for: float = 0.0  # SIGSTOP kill[0] for this long instead, then SIGCONT
    prefill: bool = False  # long prompts, fault during their prefill
    facts: int = 120  # how long: 120 facts are ~2,150 of SmolLM2's tokens
    hog: int = 0  # CPU hogs started with the fault (a loaded coordinator machine)
    slow_readers: bool = False  # half the clients read one event per 50 ms
    tokens: int = 0  # override --tokens
    restart: bool = False  # start the killed node again at its address after the re-plan


FAULTS = {
    "first": Fault("kill -9 of the first stage (all stages remote)", 3, False, ["local-1"]),
    "middle": Fault("kill -9 of a middle stage (all stages remote)", 3, False, ["local-2"]),
    "last": Fault("kill -9 of the last stage (all stages remote)", 3, False, ["local-3"]),
    "neighbour": Fault("kill -9 of the node after the coordinator's own stage", 2, True,
                       ["local-1"]),
    "two": Fault("kill -9 of two nodes at once", 4, False, ["local-2", "local-3"]),
    "prefill": Fault("kill -9 during prefill of long prompts, coordinator holds a stage", 2,
                     True, ["local-1"], prefill=True),
    "prefill-remote": Fault("kill -9 during prefill, all stages remote", 3, False,
                            ["local-2"], prefill=True),
    "sigstop": Fault("SIGSTOP of a middle node for 8 s, then SIGCONT", 3, False, ["local-2"],
                     stop_for=8.0),
    "twice": Fault("a second kill -9 after the first re-plan", 4, False, ["local-2"],
                   then_kill=["local-3"], tokens=96),
    "loaded": Fault("kill -9 next to the coordinator's stage, machine loaded by 2 CPU hogs", 2,
                    True, ["local-1"], hog=2),
    "slow-reader": Fault("kill -9 of a middle stage, half the clients read slowly", 3, True,
                         ["local-2"], slow_readers=True),
    "restart": Fault("kill -9 of a middle stage, started again at its address after the "
                     "re-plan (a rebooted machine)", 3, False, ["local-2"], restart=True),
}


def stream(url: str, prompt: str, tokens: int, slow: bool, progress: list) -> tuple:
    """-> (outcome, text): outcome is completed / error / cut."""
    body = {"model": MODEL, "stream": True, "temperature": 0, "max_tokens": tokens,
            "messages": [{"role": "user", "content": prompt}]}
    text, events = [], []
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body,
                          timeout=httpx.Timeout(10.0, read=READ_TIMEOUT)) as r:
            if r.status_code != 200:  # failed before its first token: a status, not an event
                r.read()
                clean = r.status_code in (429, 503) and r.headers.get("retry-after")
                return ("error" if clean else f"http {r.status_code}"), ""
            for line in r.iter_lines():
                if slow:
                    time.sleep(0.05)
                if line.startswith("data: "):
                    events.append(line[6:])
                    if events[-1] != "[DONE]":
                        event = json.loads(events[-1])
                        for c in event.get("choices") or ():
                            if c.get("delta", {}).get("content"):
                                text.append(c["delta"]["content"])
                                progress.append(time.monotonic())
    except httpx.ReadTimeout:
        return "cut (hung)", "".join(text)
    except httpx.HTTPError as exc:
        return f"cut ({type(exc).__name__})", "".join(text)
    if not events or events[-1] != "[DONE]":
        return "cut", "".join(text)
    last = json.loads(events[-2]) if len(events) > 1 else {}
    if "error" in last:
        return ("error" if last["error"].get("code") else "cut (no code)"), "".join(text)
    return "completed", "".join(text)


def new_request_after(url: str, since: float, deadline: float) -> tuple[float | None, int]:
    """Seconds from ``since`` until a new request succeeds; count of bad statuses seen."""
    bad = 0
    while time.monotonic() - since < deadline:
        try:
            r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "model": MODEL, "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": "Hi"}]})
            if r.status_code == 200:
                return time.monotonic() - since, bad
            if r.status_code >= 500 and not (r.status_code == 503 and
                                              r.headers.get("retry-after")):
                bad += 1
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    return None, bad


def _restart(victims: list[tuple]) -> list[subprocess.Popen]:
    """Start each killed node again, as it was (its command line and environment), at the
    address it had: a machine that rebooted and ran ``mesh node`` again."""
    out = []
    for _, v, env, address in victims:
        cmd = list(v.args)
        cmd[cmd.index("--port") + 1] = address.rsplit(":", 1)[1]
        out.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL))
    return out


def _load(url, prompts, fault: Fault, tokens: int, engine):
    """Run the streams; at the fault's moment inject it (no engine: inject nothing) and time
    a new request. -> (results, new request seconds, bad 5xx count, second loss seconds,
    seconds from a restart until the node is back in the plan, the restarted processes)."""
    progress = [[] for _ in prompts]
    second_detect = rejoin = None
    restarted, killed = [], []
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(stream, url, p, tokens, fault.slow_readers and i % 2 == 1,
                               progress[i]) for i, p in enumerate(prompts)]
        deadline = time.monotonic() + 300
        if fault.prefill:
            time.sleep(0.5)  # the prompts are being prefilled
        else:  # mid-way: every stream has some tokens
            while (min(len(x) for x in progress) < 6 and time.monotonic() < deadline
                   and not all(f.done() for f in futures)):
                time.sleep(0.02)
        t0 = time.monotonic()
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(fault.hog)]
        if engine is not None:
            victims = [engine.node_processes[n] for n in fault.kill]
            if fault.restart:  # what it takes to start them again, read before they die
                where = {st.name: st.address for st in engine.stages}
                killed = [(n, v, _environ(v.pid), where[n]) for n, v in
                          zip(fault.kill, victims)]
            for v in victims:
                os.kill(v.pid, signal.SIGSTOP if fault.stop_for else signal.SIGKILL)
            if fault.stop_for:
                threading.Timer(fault.stop_for,
                                lambda: [os.kill(v.pid, signal.SIGCONT) for v in victims]
                                ).start()
            if fault.then_kill:
                while engine.epoch == 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
                t1 = time.monotonic()
                for n in fault.then_kill:
                    os.kill(engine.node_processes[n].pid, signal.SIGKILL)
                while (not all(any(f"lost {n}" in e for e in engine.events)
                               for n in fault.then_kill)
                       and time.monotonic() < deadline):
                    time.sleep(0.05)
                second_detect = time.monotonic() - t1
            if fault.restart:
                while engine.epoch == 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
                t_back = time.monotonic()
                restarted = _restart(killed)
        try:
            new_ok, bad = new_request_after(url, t0, max(120.0, READ_TIMEOUT))
            results = [f.result() for f in futures]
            # back in the plan: no longer lost (the coordinator asks every 5 s once no
            # request runs, and re-plans onto it)
            while restarted and any(n in engine.lost for n in fault.kill) and \
                    time.monotonic() < deadline:
                time.sleep(0.05)
            if restarted and not any(n in engine.lost for n in fault.kill):
                rejoin = time.monotonic() - t_back
        except BaseException:  # the caller never gets the restarted nodes to stop
            for p in restarted:
                p.kill()
            raise
        finally:
            for h in hogs:
                h.kill()
    return results, new_ok, bad, second_detect, rejoin, restarted


def _environ(pid: int) -> dict:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv]
    return {k.decode(): v.decode() for k, v in pairs}


def run(name: str, fault: Fault, streams: int, tokens: int, baseline: bool = True) -> dict:
    tokens = fault.tokens or tokens
    # batch-invariant: a stream's greedy text is the same alone and among the others, so
    # "same text" compares a rescued stream with the request run alone, and any difference
    # is the rescue's (the nodes spawned here inherit the setting). Set for the whole run, as
    # `mesh serve --batch-invariant` sets it for its process: the coordinator's stage built by
    # a re-plan reads it too (until 2026-12-02 it was unset by then, and a stream rescued
    # onto that stage could write another text)
    invariant = os.environ.get("MESH_BATCH_INVARIANT")
    os.environ["MESH_BATCH_INVARIANT"] = "1"
    try:
        return _run(name, fault, streams, tokens, baseline)
    finally:
        if invariant is None:
            del os.environ["MESH_BATCH_INVARIANT"]
        else:
            os.environ["MESH_BATCH_INVARIANT"] = invariant


def _run(name: str, fault: Fault, streams: int, tokens: int, baseline: bool) -> dict:
    engine = build_pipeline_engine(MODEL, local_nodes=fault.nodes,
                                   include_self=fault.coordinator_stage,
                                   secret="chaos-secret-of-the-mesh", context_length=4096,
                                   lost_after=3.0)
    prompts = [(long_text(fault.facts) + " " if fault.prefill else "")
               + PROMPTS[i % len(PROMPTS)]
               for i in range(streams)]
    restarted, back_same = [], False
    try:
        with ServerThread(build_app(engine)) as srv:
            url = srv.base_url
            # the undisturbed texts, all at once (batch-invariant: the same as each alone);
            # long prompts one by one, each reusing the cached prefix they share (faster)
            unique = list(dict.fromkeys(prompts))
            with ThreadPoolExecutor(1 if fault.prefill else len(unique)) as pool:
                texts = pool.map(lambda p: stream(url, p, tokens, False, [])[1], unique)
            clean = dict(zip(unique, texts))
            # the same load without a fault: how long a new request waits behind it anyway
            # (long prompts queue a new request for a while, with or without a loss)
            baseline = _load(url, prompts, fault, tokens, None)[1] if baseline else None
            results, new_ok, bad, second_detect, rejoin, restarted = _load(
                url, prompts, fault, tokens, engine)
            if restarted:  # and the pipeline with it in the plan serves the same text
                after = stream(url, prompts[0], tokens, False, [])
                back_same = after[0] == "completed" and after[1] == clean[prompts[0]]
    finally:
        asyncio.run(engine.close())
        for p in restarted:
            p.kill()
            p.wait()
    outcomes = [o for o, _ in results]
    same = sum(o == "completed" and t == clean[p] for (o, t), p in zip(results, prompts))
    return {"name": name, "what": fault.what, "streams": streams, "same": same,
            "differ": sum(o == "completed" for o in outcomes) - same,
            "error": outcomes.count("error"),
            "cut": sum(o.startswith("cut") or o.startswith("http") for o in outcomes),
            "new": new_ok, "baseline": baseline, "bad5xx": bad, "second": second_detect,
            "rejoin": rejoin if fault.restart else False,
            "back_same": back_same,
            "events": list(engine.events), "outcomes": outcomes}


def main() -> None:
    global READ_TIMEOUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--fault", action="append", choices=sorted(FAULTS),
                    help="run only these (repeatable); default: all")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--verbose", action="store_true", help="print each run's pipeline events")
    ap.add_argument("--read-timeout", type=float, default=READ_TIMEOUT,
                    help="seconds a client waits for a byte before counting a stream hung")
    args = ap.parse_args()
    READ_TIMEOUT = args.read_timeout
    rows = []
    for name in args.fault or list(FAULTS):
        row = run(name, FAULTS[name], args.streams, args.tokens)
        rows.append(row)
        kinds = {o: row["outcomes"].count(o) for o in sorted(set(row["outcomes"]))}
        print(f"{name}: {row['same']}/{row['streams']} same text, {row['error']} error events, "
              f"{row['cut']} cut; outcomes {kinds}", flush=True)
        if args.verbose:
            print(f"    outcomes: {row['outcomes']}")
            for e in row["events"]:
                print(f"    {e}")
    print()
    print("| fault | streams | same text | other text | clean error (event, or 503/429 + Retry-After) | **cut** | "
          "new request served after (same load, no fault) | 5xx other than 503 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        new = "never (120 s)" if r["new"] is None else f"{r['new']:.1f} s"
        new += f" ({r['baseline']:.1f} s)" if r["baseline"] is not None else ""
        if r["second"] is not None:
            new += f" (second loss noticed in {r['second']:.1f} s)"
        if r["rejoin"] is not False:
            new += (" (never back in the plan)" if r["rejoin"] is None else
                    f" (back in the plan {r['rejoin']:.1f} s after its restart; then "
                    f"{'the same' if r['back_same'] else 'ANOTHER'} text)")
        print(f"| {r['what']} | {r['streams']} | {r['same']} | {r['differ']} | {r['error']} | "
              f"**{r['cut']}** | {new} | {r['bad5xx']} |")
    total = sum(r["streams"] for r in rows)
    print(f"\n{total} streams, {sum(r['cut'] for r in rows)} cut")


if __name__ == "__main__":
    main()
