"""Ensemble mode: mixing math, one-member and identical-member identities, an offline check
of the mixture on tiny models, vocabulary refusal, member loss, and pick across SmolLM2 and
Gemma 3 through the openai client."""

from __future__ import annotations

import asyncio
import contextlib
import math

import numpy as np
import openai
import pytest

from mesh.backends import load_shard
from mesh.engine.base import GenerationRequest
from mesh.engine.local import LocalEngine
from mesh.engine.sampling import SamplingParams, log_softmax
from mesh.ensemble.coordinator import build_ensemble_engine, parse_member
from mesh.ensemble.engine import EnsembleEngine, check_shared_vocabulary
from mesh.ensemble.mixing import (compress, cut_at_word_boundary, mix, nll_per_byte,
                                  perplexity_weights)
from mesh.errors import EngineUnavailable, InvalidRequest
from mesh.layers import LayerRange
from mesh.models.source import resolve
from mesh.node.codec import from_tensor
from mesh.server.app import build_app
from tests.conftest import BACKENDS, ServerThread, make_tiny_model
import grpc

from tests.test_pipeline import load_remote, node_servers

GREEDY = SamplingParams(temperature=0.0)


def run(engine, prompt, n, sampling=GREEDY, messages=None):
    async def go():
        req = GenerationRequest("r", prompt, n, sampling,
                                frozenset(engine.tokenizer.eos_token_ids), messages=messages)
        gen = engine.generate(req)
        out = [s async for s in gen]
        await gen.aclose()
        return out

    return asyncio.run(go())


# ---- pure math ------------------------------------------------------------------------


def test_mix_matches_direct_formulas():
    rng = np.random.default_rng(0)
    a, b = log_softmax(rng.standard_normal(50)), log_softmax(rng.standard_normal(50))
    got = mix([a, b], [0.2, 0.8], "prob")
    np.testing.assert_allclose(np.exp(got), 0.2 * np.exp(a) + 0.8 * np.exp(b), rtol=1e-5)
    geo = mix([a, b], [1, 3], "logprob")
    s = 0.25 * a + 0.75 * b
    np.testing.assert_allclose(geo, s - np.log(np.exp(s).sum()), atol=1e-5)
    np.testing.assert_allclose(mix([a, a], [1, 5]), a, atol=1e-6)  # identical members


def test_mix_in_float32_agrees_with_float64():
    """The mixture, computed in float32 (the members' precision), is the float64 formula's
    within 1e-5 nats, tokens that one or both members rule out included, for both modes."""
    rng = np.random.default_rng(3)
    a = log_softmax(rng.standard_normal(5000).astype(np.float32) * 4)
    b = log_softmax(rng.standard_normal(5000).astype(np.float32) * 0.7)
    a[:40], b[20:60] = -np.inf, -np.inf  # 20..39: ruled out by both
    w = np.array([0.3, 1.1]) / 1.4
    stack = np.stack([a.astype(np.float64), b.astype(np.float64)])
    m = np.max(stack, axis=0)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        want = m + np.log(np.einsum("m,mv->v", w, np.exp(stack - m)))
    got = mix([a, b], [0.3, 1.1])
    assert got.dtype == np.float32
    assert np.isneginf(got[20:40]).all() and np.isfinite(got[40:]).all()
    np.testing.assert_allclose(got[40:], want[40:], rtol=0, atol=1e-5)
    c = log_softmax(rng.standard_normal(5000).astype(np.float32))
    three = mix([a, b, c], [1, 1, 1])
    np.testing.assert_allclose(np.exp(three[60:].astype(np.float64)),
                               (np.exp(a[60:]) + np.exp(b[60:]) + np.exp(c[60:])) / 3, rtol=1e-5)
    # a product of experts: a token either member rules out is ruled out
    s = np.einsum("m,mv->v", w, np.where(np.isfinite(stack), stack, -1e30))
    poe = mix([a, b], [0.3, 1.1], "logprob")
    np.testing.assert_allclose(poe[60:], (s - np.logaddexp.reduce(s))[60:], rtol=0, atol=1e-5)
    assert (poe[:60] < -1e29).all()


def test_topk_compression_keeps_mass():
    lp = log_softmax(np.random.default_rng(1).standard_normal(1000) * 3)
    d = compress(lp, 64)
    assert len(d.top_ids) == 64 and d.full is None
    dense = d.dense(1000)
    assert math.isclose(np.exp(dense.astype(np.float64)).sum(), 1.0, rel_tol=1e-4)
    top = np.argsort(-lp)[:64]
    np.testing.assert_allclose(dense[top], lp[top])
    assert compress(lp, 0).full is lp or np.array_equal(compress(lp, 0).full, lp)


def test_perplexity_weights_favour_the_better_member():
    w = perplexity_weights([2.0, 3.0])
    assert w[0] > w[1] and math.isclose(sum(w), 1.0)
    assert math.isclose(w[0] / w[1], math.e)  # 1 / perplexity at temperature 1
    assert perplexity_weights([2.0, 2.0]) == [0.5, 0.5]


def test_chunks_and_scores():
    assert cut_at_word_boundary("The cat sa", complete=False) == "The cat"
    assert cut_at_word_boundary("The cat sa", complete=True) == "The cat sa"
    assert cut_at_word_boundary("Supercalifragilistic", complete=False) == \
        "Supercalifragilistic"
    assert nll_per_byte([-1.0, -2.0], "héllo") == pytest.approx(3.0 / 6)


def test_member_specs():
    assert parse_member("smollm2-135m") == parse_member("smollm2-135m:1")
    s = parse_member("smollm2-135m@10.0.0.2:50051:0.2")
    assert (s.model, s.node, s.weight) == ("smollm2-135m", "10.0.0.2:50051", 0.2)
    s = parse_member("hf:org/name@host:1")
    assert (s.model, s.node, s.weight) == ("hf:org/name", "host:1", 1.0)
    with pytest.raises(InvalidRequest):
        parse_member("m:0")


# ---- tiny models -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def twin(tmp_path_factory, tiny_models):
    """A second tiny llama with other weights and the same tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("twin") / "llama", "llama", seed=1)


def _local(ref):
    src = resolve(ref)
    return LocalEngine("m", [load_shard(BACKENDS[0], src, LayerRange.full(src.num_layers))],
                       src.tokenizer, 256)


PROMPT = list(range(5, 25))


def test_one_member_merge_is_that_member(tiny_models):
    ref = str(tiny_models["llama"])
    want = run(_local(ref), PROMPT, 16)
    got = run(build_ensemble_engine([ref], "merge", backend=BACKENDS[0]), PROMPT, 16)
    assert [s.token_id for s in got] == [s.token_id for s in want]


@pytest.mark.real
def test_one_member_pick_is_that_members_text(smollm2):
    """Pick moves text, not tokens, between rounds: with one member it follows the member's
    own greedy text until a re-tokenized chunk boundary tips a near-tie (measured on ONNX
    Runtime: the first 172 of 180 characters agree on this prompt on an AVX2 CPU, 59 of 179
    on an AVX-512 one, whose int8 kernels round otherwise)."""
    msgs = [{"role": "user", "content": "Name three famous rivers."}]
    prompt = smollm2.tokenizer.chat_prompt(msgs)
    local = LocalEngine("m", [load_shard("onnxruntime", smollm2,
                                         LayerRange.full(smollm2.num_layers))],
                        smollm2.tokenizer, 2048)
    want = smollm2.tokenizer.decode([s.token_id for s in run(local, prompt, 40)])
    ens = build_ensemble_engine(["smollm2-135m"], "pick", backend="onnxruntime")
    got = ens.tokenizer.decode([s.token_id for s in run(ens, prompt, 40, messages=msgs)])
    from mesh.ensemble.mixing import common_prefix

    print(f"pick of one member follows its greedy text for "
          f"{common_prefix(list(got), list(want))} of {len(want)} characters")
    assert len(got) > 40 and common_prefix(list(got), list(want)) >= 40


def test_merge_of_identical_members_equals_one(tiny_models):
    ref = str(tiny_models["llama"])
    want = run(_local(ref), PROMPT, 16, SamplingParams(temperature=0.0, logprobs=3))
    ens = build_ensemble_engine([ref, f"{ref}:3"], "merge", backend=BACKENDS[0])
    got = run(ens, PROMPT, 16, SamplingParams(temperature=0.0, logprobs=3))
    assert [s.token_id for s in got] == [s.token_id for s in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.logprob, w.logprob, atol=1e-4)


def test_members_in_one_process_do_not_spin(tiny_models):
    """Members in one process compute at once on its cores: ONNX Runtime's threads must not
    spin there (they steal the other member's cores); a lone member keeps spinning."""
    ref = str(tiny_models["llama"])

    def spinning(ens):
        out = []
        for m in ens.members:
            opts = m.runner.shard.session.get_session_options()
            try:
                out.append(opts.get_session_config_entry("session.intra_op.allow_spinning"))
            except Exception:  # not set: ONNX Runtime's default, spinning
                out.append("default")
        return out

    assert spinning(build_ensemble_engine([ref, ref], "merge", backend="onnxruntime")) == \
        ["0", "0"]
    assert spinning(build_ensemble_engine([ref], "merge", backend="onnxruntime")) == \
        ["default"]


def test_merge_matches_offline_mixture(tiny_models, twin):
    a_ref, b_ref = str(tiny_models["llama"]), str(twin)
    ens = build_ensemble_engine([f"{a_ref}:1", f"{b_ref}:3"], "merge", backend=BACKENDS[0])
    steps = run(ens, PROMPT, 8, SamplingParams(temperature=0.0, logprobs=5))
    # offline: whole-sequence logits from each model, mixed by hand
    from tests.test_real_models import all_logits

    seq = np.array(PROMPT + [s.token_id for s in steps[:-1]], dtype=np.int32)
    outs = []
    for ref in (a_ref, b_ref):
        src = resolve(ref)
        outs.append(log_softmax(all_logits(
            [load_shard(BACKENDS[0], src, LayerRange.full(src.num_layers))], seq)))
    for i, s in enumerate(steps):
        pos = len(PROMPT) - 1 + i
        p = 0.25 * np.exp(outs[0][pos]) + 0.75 * np.exp(outs[1][pos])
        assert s.token_id == int(np.argmax(p))
        assert s.logprob == pytest.approx(float(np.log(p.max())), abs=1e-4)
        assert [t for t, _ in s.top_logprobs] == np.argsort(-p)[:5].tolist()


def test_perplexity_weighting_runs_and_topk_transport(tiny_models, twin):
    a_ref, b_ref = str(tiny_models["llama"]), str(twin)
    full = build_ensemble_engine([a_ref, b_ref], "merge", backend=BACKENDS[0],
                                 weighting="perplexity")
    topk = build_ensemble_engine([a_ref, b_ref], "merge", backend=BACKENDS[0],
                                 weighting="perplexity", top_k=100)
    a = [s.token_id for s in run(full, PROMPT, 12)]
    b = [s.token_id for s in run(topk, PROMPT, 12)]
    assert len(a) == 12 and a[:4] == b[:4]  # top-100 of a 320-token vocabulary


@pytest.mark.parametrize("strategy,sampling", [
    ("merge", GREEDY),
    # sampled words asks one member, drawn by weight, for each word: drawn after it is
    # lost, the request goes on with the other (it once ended with a 503)
    ("words", SamplingParams(temperature=0.8, seed=3)),
    ("pick", SamplingParams(temperature=0.8, seed=3))])
def test_member_lost_mid_request_continues_then_503(tiny_models, twin, strategy, sampling):
    with node_servers(2, BACKENDS[0], secret="s" * 16) as nodes:
        (addr_a, _), (addr_b, _) = nodes
        ens = build_ensemble_engine([f"{tiny_models['llama']}@{addr_a}",
                                     f"{twin}@{addr_b}:9"],  # b drawn for 9 words of 10
                                    strategy, backend=BACKENDS[0], secret="s" * 16)

        async def go():
            out = []
            gen = ens.generate(GenerationRequest("r", PROMPT, 30, sampling))
            async for step in gen:
                out.append(step)
                if len(out) == 5:
                    _SERVERS[addr_b].stop(grace=None)  # member b's node goes away
            await gen.aclose()
            return out

        steps = asyncio.run(go())
        assert len(steps) == 30  # the request finished on the remaining member
        info = ens.info()
        assert [m["model"] for m in info["members"]] == [str(tiny_models["llama"])]
        assert len(info["lost"]) == 1 and "lost member" in info["events"][0]
        from mesh.server.dashboard import Dashboard
        from mesh.server.metrics import Metrics

        metrics = Metrics(ens)
        state = Dashboard(ens, metrics).state("ok")  # what the dashboard page draws
        assert state["mode"] == "ensemble"
        from prometheus_client import generate_latest
        from prometheus_client.parser import text_string_to_metric_families

        wire = {(x.labels["member"], x.labels["direction"]): x.value
                for f in text_string_to_metric_families(generate_latest(metrics.registry)
                                                        .decode())
                if f.name == "mesh_member_wire_bytes" for x in f.samples}
        alive = ens.members[0].name  # its calls crossed the wire, both ways
        assert wire[(alive, "sent")] > 0 and wire[(alive, "received")] > 0
        assert [(m["up"], m["name"] in info["lost"]) for m in state["members"]] == [
            (True, False), (False, True)]
        _SERVERS[addr_a].stop(grace=None)
        with pytest.raises(EngineUnavailable):
            run(ens, PROMPT, 4)


@pytest.mark.parametrize("where", ["here", "nodes"])
def test_concurrent_requests_share_each_members_forwards(tiny_models, twin, where):
    """Requests running together send each member their steps as one call, run as one
    forward (ONNX Runtime batches decode steps): each request's greedy tokens and log-probs
    are those it gets alone."""
    pytest.importorskip("onnxruntime")
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 40, 8, 25)]
    sampling = SamplingParams(temperature=0.0, logprobs=0)

    async def collect(ens, i, prompt, delay=0.0):
        await asyncio.sleep(delay)  # join at a different step: not a wait for a condition
        req = GenerationRequest(f"r{i}", prompt, 12, sampling)
        return [(s.token_id, s.logprob) async for s in ens.generate(req)]

    def check(ens, runners):
        async def go():
            alone = [await collect(ens, i, p) for i, p in enumerate(prompts)]
            before = [r.batched_steps for r in runners]
            together = await asyncio.gather(*(collect(ens, 10 + i, p, 0.002 * i)
                                              for i, p in enumerate(prompts)))
            return alone, together, before

        alone, together, before = asyncio.run(go())
        for a, b in zip(alone, together):
            assert [t for t, _ in a] == [t for t, _ in b]
            np.testing.assert_allclose([lp for _, lp in a], [lp for _, lp in b], atol=1e-4)
        assert before == [0, 0], "requests run one at a time shared a forward"
        assert all(r.batched_steps > 0 for r in runners), "no member ran steps together"
        assert all(m.batched_steps > 0 for m in ens.members)

    specs = [str(tiny_models["llama"]), str(twin)]
    if where == "here":
        ens = build_ensemble_engine([specs[0], f"{specs[1]}:3"], "merge",
                                    backend="onnxruntime", dtype="float32")
        check(ens, [m.runner for m in ens.members])
        return
    with node_servers(2, "onnxruntime", secret="s" * 16) as nodes:
        ens = build_ensemble_engine([f"{specs[0]}@{nodes[0][0]}", f"{specs[1]}@{nodes[1][0]}:3"],
                                    "merge", backend="onnxruntime", dtype="float32",
                                    secret="s" * 16)
        check(ens, [runner for _, runner in nodes])
        # a lone greedy request's members fed their own top tokens ahead (speculate), and
        # the mixture often chose them: the texts above are those with the guesses used
        assert all(runner.guesses_right > 0 for _, runner in nodes)


def test_a_member_batch_answers_each_item_with_its_own_status(tiny_models):
    """MemberMany: a refused item carries its status and the others run; a malformed batch
    is refused whole with a status."""
    from mesh.node import mesh_pb2

    with member_node(tiny_models) as (runner, _, rpc):
        def many(items):
            return rpc("MemberMany", mesh_pb2.MemberBatch(items=items))

        good = mesh_pb2.MemberRequest(request_id="a", position=0, tokens=[5, 6, 7], top_k=4)
        bad = mesh_pb2.MemberRequest(request_id="b", position=0, tokens=[10 ** 6])
        behind = mesh_pb2.MemberRequest(request_id="c", position=3, tokens=[5])
        reply = many([good, bad, behind])
        assert [r.status for r in reply.replies] == ["", "INVALID_ARGUMENT", "NOT_FOUND"]
        assert len(reply.replies[0].top_ids) == 4 and reply.replies[0].position == 3
        assert "token ids" in reply.replies[1].message
        nxt = mesh_pb2.MemberRequest(request_id="a", position=3, tokens=[8], top_k=4)
        assert many([nxt]).replies[0].position == 4  # the good item's cache went on
        for items, why in (([], "empty"), ([nxt, nxt], "twice")):
            with pytest.raises(grpc.RpcError) as exc:
                many(items)
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert why in exc.value.details()
        assert runner.active() == 1  # only "a" holds a cache


@contextlib.contextmanager
def member_node(tiny_models):
    """A node holding the tiny llama: (its runner, ``item(**MemberRequest fields)`` -> the
    reply of a one-item MemberMany call, ``rpc(method, request)`` for its other calls)."""
    from mesh.node import mesh_pb2
    from mesh.node.auth import call

    secret, ref = "s" * 16, str(tiny_models["llama"])
    with node_servers(1, "onnxruntime", secret=secret) as [(addr, runner)]:
        stub = load_remote(addr, ref, LayerRange.full(resolve(ref).num_layers), secret)

        def rpc(method, request):
            return call(getattr(stub, method), request, secret, f"/mesh.Node/{method}", 30)

        def item(**kw):
            return rpc("MemberMany", mesh_pb2.MemberBatch(
                items=[mesh_pb2.MemberRequest(**kw)])).replies[0]

        yield runner, item, rpc


def test_a_words_member_node_loads_its_tokenizer_with_the_model(tiny_models):
    """A words ensemble's member node (LoadRequest.words) loads its tokenizer beside the
    weights: its word proposals decode text on the node, and the first one must not wait
    for it. Other nodes are spared the memory (Gemma 3's takes ~100 MB)."""
    from mesh.node import mesh_pb2

    with member_node(tiny_models) as (runner, _, rpc):
        source = runner._sources[runner.model]
        assert source._tokenizer is None
        n = source.num_layers
        rpc("Load", mesh_pb2.LoadRequest(model=runner.model, start=0, end=n, words=True))
        assert source._tokenizer is not None


def test_a_speculating_member_answers_as_one_that_does_not(tiny_models):
    """MemberRequest.speculate: after replying, the node feeds its own top token; a next
    step that brings that token takes the forward already done, one that brings another
    token rewinds it. Either way each reply is the one a member that does not speculate
    gives, and a request ended while its guess is queued leaves no cache behind."""
    from mesh.node import mesh_pb2

    with member_node(tiny_models) as (runner, item, rpc):
        def one(**kw):
            reply = item(**kw)
            assert not reply.status, reply.message
            return from_tensor(reply.logprobs)

        plain = one(request_id="p", position=0, tokens=PROMPT)
        guessing = one(request_id="g", position=0, tokens=PROMPT, speculate=True)
        pos, right = len(PROMPT), 0
        for i in range(9):
            np.testing.assert_array_equal(plain, guessing)
            order = np.argsort(-plain)
            token = int(order[1] if i % 3 == 0 else order[0])  # every third: not the top
            right += i % 3 != 0
            plain = one(request_id="p", position=pos, tokens=[token])
            guessing = one(request_id="g", position=pos, tokens=[token], speculate=True)
            pos += 1
        np.testing.assert_array_equal(plain, guessing)
        assert runner.guesses_right == right == 6
        rpc("End", mesh_pb2.EndRequest(request_id="g"))
        one(request_id="p", position=pos, tokens=[5])  # runs after the ended one's guess
        assert runner.active() == 1  # only "p" holds a cache


def test_a_sampled_merge_with_members_on_nodes_writes_what_it_writes_in_process(tiny_models,
                                                                               twin):
    """A seeded sampled merge: the same text whether its members are in this process or on
    nodes (where greedy steps are guessed ahead; sampled ones are not)."""
    a, b = str(tiny_models["llama"]), str(twin)
    sampling = SamplingParams(temperature=0.9, top_p=0.95, seed=11)
    here = build_ensemble_engine([a, f"{b}:3"], "merge", backend="onnxruntime",
                                 dtype="float32")
    want = [s.token_id for s in run(here, PROMPT, 24, sampling)]
    with node_servers(2, "onnxruntime", secret="s" * 16) as nodes:
        ens = build_ensemble_engine([f"{a}@{nodes[0][0]}", f"{b}@{nodes[1][0]}:3"], "merge",
                                    backend="onnxruntime", dtype="float32", secret="s" * 16)
        assert [s.token_id for s in run(ens, PROMPT, 24, sampling)] == want
        assert [r.guesses for _, r in nodes] == [0, 0]


def test_a_member_writes_its_proposal_itself(tiny_models):
    """MemberRequest.propose: the node writes the tokens itself in one call. Greedy, they
    are the argmax of steps fed one at a time, with those steps' log-probs; the last token
    is not fed; a stop id ends the proposal (not fed, its log-prob reported); a seeded
    proposal repeats, and a copy of a request (copy_from) goes on with its RNG."""
    from mesh.node.service import sampling_to_proto

    with member_node(tiny_models) as (_, one, _rpc):
        greedy = sampling_to_proto(GREEDY)
        p = one(request_id="a", position=0, tokens=PROMPT, propose=6, sampling=greedy)
        assert not p.status and not p.ended and len(p.proposed) == 6
        assert p.position == len(PROMPT) + 5
        # the same, one step at a time
        want, lps, toks, pos = [], [], PROMPT, 0
        for _ in range(6):
            r = one(request_id="b", position=pos, tokens=toks)
            dist = log_softmax(from_tensor(r.logprobs))
            want.append(int(np.argmax(dist)))
            lps.append(float(dist[want[-1]]))
            pos, toks = r.position, [want[-1]]
        assert list(p.proposed) == want
        np.testing.assert_allclose(list(p.proposed_logprobs), lps, atol=1e-4)
        stop = one(request_id="a", position=0, tokens=PROMPT, propose=6, sampling=greedy,
                   stop_ids=[want[2], 10 ** 6])
        assert stop.ended and list(stop.proposed) == want[:2]
        assert stop.position == len(PROMPT) + 2
        assert stop.end_logprob == pytest.approx(lps[2], abs=1e-4)
        seeded = sampling_to_proto(SamplingParams(temperature=1.5, seed=7))
        x = one(request_id="x", position=0, tokens=PROMPT, propose=5, sampling=seeded)
        y = one(request_id="y", position=0, tokens=PROMPT, propose=5, sampling=seeded)
        assert list(x.proposed) == list(y.proposed)
        # a copy of x from where x stands goes on exactly as x does
        last = [x.proposed[-1]]
        c = one(request_id="x2", position=x.position, tokens=last, propose=5,
                sampling=seeded, copy_from="x")
        x = one(request_id="x", position=x.position, tokens=last, propose=5, sampling=seeded)
        assert list(c.proposed) == list(x.proposed) and not c.status
        too_many = one(request_id="z", position=0, tokens=PROMPT, propose=10 ** 6,
                       sampling=greedy)
        assert too_many.status == "INVALID_ARGUMENT" and "propose" in too_many.message
        many_words = one(request_id="w", position=0, tokens=PROMPT, propose=5,
                         sampling=greedy, until_word=True, words=10 ** 6)
        assert many_words.status == "INVALID_ARGUMENT" and "words" in many_words.message


def test_pick_with_members_on_nodes_writes_what_it_writes_in_process(tiny_models, twin,
                                                                     monkeypatch):
    """Pick over the wire (proposals written by the nodes, candidates scored on copies of
    their caches, a member's passes over the others' candidates in one call) gives the text
    it gives with the same three members in this process, and leaves no copy behind on the
    nodes."""
    taken = []
    real = EnsembleEngine._keep_winner

    async def spy(self, alive, ids, fed, copies, win, mine):
        taken.extend(m.name for m in alive if win in copies[m.name] and mine.get(m.name) != win)
        await real(self, alive, ids, fed, copies, win, mine)

    monkeypatch.setattr(EnsembleEngine, "_keep_winner", spy)
    models = [str(tiny_models["llama"]), str(twin), str(tiny_models["mistral"])]
    here = build_ensemble_engine([models[0], f"{models[1]}:2", models[2]], "pick",
                                 backend="onnxruntime", chunk_tokens=4)
    want = [s.token_id for s in run(here, PROMPT, 24)]
    asyncio.run(here.close())
    with node_servers(3, "onnxruntime", secret="s" * 16) as nodes:
        ens = build_ensemble_engine([f"{models[0]}@{nodes[0][0]}", f"{models[1]}@{nodes[1][0]}:2",
                                     f"{models[2]}@{nodes[2][0]}"], "pick",
                                    backend="onnxruntime", secret="s" * 16, chunk_tokens=4)
        got = [s.token_id for s in run(ens, PROMPT, 24)]
        assert got == want and len(got) == 24
        # no scoring copy is left: each node holds the finished request's cache, kept for
        # a prompt that starts the same way
        assert [runner.active() for _, runner in nodes] == [1, 1, 1]
        assert [len(k) for k in ens._kept.values()] == [1, 1, 1]
        assert any(m.batched_steps for m in ens.members), "no member scored in one call"
    assert taken, "no member went on from the copy it scored the winner on"


def test_words_with_members_on_nodes_writes_what_it_writes_in_process(tiny_models, twin):
    """Words over the wire (each word written by the member in one call, the next one
    started from the logits the member kept) gives the text it gives with the same members
    in this process, greedy and seeded."""
    models = [str(tiny_models["llama"]), f"{twin}:2"]
    seeded = SamplingParams(temperature=0.9, seed=5)
    here = build_ensemble_engine(models, "words", backend="onnxruntime")
    want = [[s.token_id for s in run(here, PROMPT, 24, p)] for p in (GREEDY, seeded)]
    asyncio.run(here.close())
    with node_servers(2, "onnxruntime", secret="s" * 16) as nodes:
        ens = build_ensemble_engine([f"{models[0]}@{nodes[0][0]}", f"{twin}@{nodes[1][0]}:2"],
                                    "words", backend="onnxruntime", secret="s" * 16)
        got = [[s.token_id for s in run(ens, PROMPT, 24, p)] for p in (GREEDY, seeded)]
        assert got == want and all(len(g) == 24 for g in got)
        # the second request's cache replaced the first's (the same prompt), kept for reuse
        assert [runner.active() for _, runner in nodes] == [1, 1]


def test_past_its_limits_an_ensemble_answers_429_and_keeps_its_members(tiny_models, twin):
    """A node at its cache limit refuses a request's first step: that request gets a 429
    and the member stays (busy is not lost). The ensemble's own limits queue requests and
    answer 429 past the queue."""
    from mesh.engine.admission import Admission
    from mesh.errors import Overloaded

    async def collect(ens, i):
        req = GenerationRequest(f"q{i}", PROMPT, 6, GREEDY)
        return [s.token_id async for s in ens.generate(req)]

    async def together(ens, n):
        return await asyncio.gather(*(collect(ens, i) for i in range(n)),
                                    return_exceptions=True)

    secret = "s" * 16
    with node_servers(1, "onnxruntime", secret=secret) as [(addr, runner)]:
        runner.max_requests = 1
        ens = build_ensemble_engine([f"{tiny_models['llama']}@{addr}", str(twin)], "merge",
                                    backend="onnxruntime", dtype="float32", secret=secret)
        out = asyncio.run(together(ens, 2))
        assert sorted(type(x).__name__ for x in out) == ["Overloaded", "list"]
        assert len(ens.members) == 2 and not ens.info()["lost"]
        # still serves: the cache kept from the first request gives way to a new one
        assert [len(x) for x in asyncio.run(together(ens, 1))] == [6]
        assert runner.active() == 1 and ens._kept
    ens = build_ensemble_engine([str(tiny_models["llama"]), str(twin)], "merge",
                                backend="onnxruntime", dtype="float32")
    ens.admission = Admission(max_running=1, max_queued=1)
    out = asyncio.run(together(ens, 3))
    assert [isinstance(x, Overloaded) for x in out].count(True) == 1
    assert [len(x) for x in out if isinstance(x, list)] == [6, 6]
    assert all(m.runner.active() == 0 for m in ens.members)


_SERVERS: dict = {}


@pytest.fixture(autouse=True)
def _track_servers(monkeypatch):
    import tests.test_pipeline as tp

    real = tp.create_server

    def tracking(service, host, port, secret, **kw):
        server, bound = real(service, host, port, secret, **kw)
        _SERVERS[f"{host}:{bound}"] = server
        return server, bound

    monkeypatch.setattr(tp, "create_server", tracking)


# ---- real models -------------------------------------------------------------------------


@pytest.mark.real
def test_merge_refuses_different_vocabularies():
    ens = build_ensemble_engine(["smollm2-135m", "gemma3-270m"], "pick")
    with pytest.raises(InvalidRequest, match="smollm2-135m.*gemma3-270m.*pick"):
        check_shared_vocabulary(ens.members)
    with pytest.raises(InvalidRequest) as info:
        EnsembleEngine("x", ens.members, "merge", context_length=512)
    assert info.value.code == "vocabulary_mismatch"


@pytest.mark.real
def test_pick_across_smollm2_and_gemma3_through_openai():
    ens = build_ensemble_engine(["smollm2-135m", "gemma3-270m"], "pick",
                                model_id="duo", context_length=2048)
    with ServerThread(build_app(ens)) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0,
                               timeout=180)
        ask = dict(model="duo", temperature=0, max_tokens=40,
                   messages=[{"role": "user",
                       "content": "What is the capital of France? Answer in one word."}])
        r = client.chat.completions.create(**ask)
        assert "Paris" in r.choices[0].message.content
        chunks = list(client.chat.completions.create(stream=True, **ask))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == r.choices[0].message.content
        meta = client.models.list().data[0].model_extra["meta"]
        assert meta["strategy"] == "pick" and len(meta["members"]) == 2
        s = client.chat.completions.create(stop=["Paris"], **ask)
        assert "Paris" not in s.choices[0].message.content
        # PackLLM weights from each member's NLL per byte of the prompt (as --weighting
        # perplexity sets them): the prompt is scored first, the answer still right
        ens.weighting = "perplexity"
        p = client.chat.completions.create(**ask)
        assert "Paris" in p.choices[0].message.content
        assert client.models.list().data[0].model_extra["meta"]["weighting"] == "perplexity"


@pytest.mark.real
def test_pick_scores_a_members_own_candidate_from_its_proposal(monkeypatch):
    """A member's own candidate is scored from the log-probs it sampled from, not by another
    pass: those equal a scoring pass's within rounding (one token at a time vs together), and
    the ensemble writes the same greedy text as with every candidate scored by a pass."""
    import mesh.ensemble.engine as ee

    real = ee._own_logprobs
    used, passes = [], []

    def spy(own, text, complete, base, tokens, start):
        lps = real(own, text, complete, base, tokens, start)
        if lps is not None:
            used.append((list(tokens), start, lps))
        return lps

    monkeypatch.setattr(ee, "_own_logprobs", spy)
    ens = build_ensemble_engine(["smollm2-135m", "gemma3-270m"], "pick", backend="onnxruntime",
                                context_length=1024)
    msgs = [{"role": "user", "content": "Name three famous rivers."}]
    prompt = ens.tokenizer.chat_prompt(msgs)
    fast = ens.tokenizer.decode([s.token_id for s in run(ens, prompt, 32, messages=msgs)])
    assert used, "no member's own candidate took the shortcut"
    # the same log-probs from a scoring pass on SmolLM2 (the first member, its tokenizer)
    member = ens.members[0]
    for tokens, start, lps in [u for u in used if u[0][:2] == prompt[:2]][:4]:
        _, want = asyncio.run(member.step("check", 0, tokens, 0, True, False))
        want = want[start - 1:]
        n_bytes = len(ens.tokenizer.decode(tokens[start:]).encode())
        passes.append((np.abs(np.asarray(want) - np.asarray(lps)).max(),
                       abs(sum(want) - sum(lps)), max(n_bytes, 1)))
        asyncio.run(member.end("check"))
    per_byte = sum(p[1] for p in passes) / sum(p[2] for p in passes)
    print(f"own candidates scored from proposals: {len(used)}; vs a pass: max |dlogprob| "
          f"{max(p[0] for p in passes):.3f} per token, {per_byte:.4f} nats per byte of the "
          f"candidates' scores")
    # (ONNX Runtime's int8 activations round a one-row product otherwise than a many-row
    # one: up to 0.15 nats on a token, measured on AVX2 and AVX-512 CPUs; a one-byte
    # candidate can so differ by 0.05 nats a byte on its own)
    assert passes and max(p[0] for p in passes) < 0.15 and per_byte < 0.02
    monkeypatch.setattr(ee, "_own_logprobs", lambda *a: None)
    slow = ens.tokenizer.decode([s.token_id for s in run(ens, prompt, 32, messages=msgs)])
    asyncio.run(ens.close())
    assert fast == slow


def test_a_candidate_that_starts_as_a_members_own_is_scored_from_where_they_part(
        monkeypatch):
    """The tokens another member's candidate shares with a member's own proposal take their
    log-probs from the proposal; the pass starts where they part (at most where the cache
    holds the proposal, and never past the candidate's last token). The greedy text is the
    one written with every candidate scored by a whole pass. (Both runs feed each chunk's
    first token again instead of starting from the logits a pass left: ONNX Runtime's int8
    activations round a pass's last row by where the pass began, which would carry into the
    text; ``test_pick_member_that_scored_the_winner_starts_its_chunk_without_a_forward``
    covers that start.)"""
    import mesh.ensemble.engine as ee

    base, out, lps = [1, 2, 3], [10, 11, 12, 13], [-0.1, -0.2, -0.3, -0.4]
    own = ("t", False, base, out, lps, None)
    held = base + out[:3]  # the last token written is not fed
    assert ee._shared_with_own(own, base, base + [10, 11, 99, 98], 3, held) == [-0.1, -0.2]
    assert ee._shared_with_own(own, base, base + [10, 11, 12, 13, 14], 3, held) == lps[:3]
    assert ee._shared_with_own(own, base, base + [10, 11], 3, held) == [-0.1]
    assert ee._shared_with_own(own, base, base + [99, 10], 3, held) == []
    assert ee._shared_with_own(own, [1, 2], base + [10, 11], 3, held) == []
    assert ee._shared_with_own(None, base, base + [10, 11], 3, held) == []

    real, shared = ee._shared_with_own, []
    monkeypatch.setattr(ee, "_shared_with_own",
                        lambda *a: shared.append(len(x := real(*a))) or x)
    monkeypatch.setattr(ee, "_chunk_start", lambda held, full: min(
        ee.common_prefix(held, full), len(full) - 1))
    ens = build_ensemble_engine(["smollm2-135m", "gemma3-270m"], "pick", backend="onnxruntime",
                                context_length=1024)
    msgs = [{"role": "user", "content": "Name three famous rivers."}]
    prompt = ens.tokenizer.chat_prompt(msgs)
    fast = ens.tokenizer.decode([s.token_id for s in run(ens, prompt, 32, messages=msgs)])
    assert any(shared), "no candidate started as the scoring member's own"
    monkeypatch.setattr(ee, "_shared_with_own", lambda *a: [])
    slow = ens.tokenizer.decode([s.token_id for s in run(ens, prompt, 32, messages=msgs)])
    asyncio.run(ens.close())
    assert fast == slow


def test_past_cut_is_what_a_proposal_wrote_after_its_candidate():
    import mesh.ensemble.engine as ee

    class Chars:  # one character a token
        def decode(self, ids):
            return "".join(map(chr, ids))

    tokens = [ord(c) for c in " the lightho"]
    lps = [-float(i) for i in range(len(tokens))]
    own = (" the", False, [1], tokens, lps, None)
    assert ee._past_cut(own, Chars()) == (tokens[4:], lps[4:])
    assert ee._past_cut((" the", True, [1], tokens[:4], lps[:4], -1.0), Chars()) is None
    whole = [ord(c) for c in " lighthouse"]  # one word: no cut, nothing past it
    assert ee._past_cut((" lighthouse", False, [1], whole, lps, None), Chars()) is None
    assert ee._past_cut((" other", False, [1], tokens, lps, None), Chars()) is None


@pytest.mark.real
def test_pick_carries_a_winners_tokens_past_the_cut_into_its_next_chunk(monkeypatch):
    """A member whose candidate won opens its next chunk with the tokens it wrote past the
    candidate's cut (its cache holds them) and writes only the rest: the members write
    fewer tokens for the same greedy text as writing them again."""
    import mesh.ensemble.engine as ee

    ens = build_ensemble_engine(["smollm2-135m", "gemma3-270m"], "pick", backend="onnxruntime",
                                context_length=1024)
    asked = []
    for m in ens.members:
        async def spy(rid, position, tokens, n, *a, _real=m.propose, **k):
            asked.append(n)
            return await _real(rid, position, tokens, n, *a, **k)
        monkeypatch.setattr(m, "propose", spy)
    ids = ens.tokenizer.encode("The lighthouse stood at the end of a long spit of rock, and")

    def text():
        asked.clear()
        out = ens.tokenizer.decode([s.token_id for s in run(ens, ids, 48)])
        return out, sum(asked), len(asked)

    carried, n_carried, calls = text()
    monkeypatch.setattr(ee, "_past_cut", lambda *a: None)
    again, n_again, calls_again = text()
    asyncio.run(ens.close())
    print(f"tokens asked of the members: {n_carried} carrying, {n_again} writing again")
    assert carried == again and calls == calls_again
    assert n_carried < n_again


@pytest.mark.real
def test_pick_member_that_scored_the_winner_starts_its_chunk_without_a_forward(monkeypatch):
    """A member whose candidate lost goes on from the copy of its cache that scored the
    winner, which holds the logits after it: its next chunk starts from those, where it fed
    the winner's last token again before. Fewer rows computed, a text as good: greedy, the
    same words (the logits came from a pass rather than one row: they may round apart)."""
    import mesh.ensemble.engine as ee

    ens = build_ensemble_engine(["smollm2-135m", "gemma3-270m"], "pick", backend="onnxruntime",
                                context_length=1024)
    rows, starts = [0], []
    for m in ens.members:
        real = m.runner.shard.forward

        def counted(items, _real=real):
            rows[0] += sum(len(it.data) for it in items)
            return _real(items)
        monkeypatch.setattr(m.runner.shard, "forward", counted)
    real_start = ee._chunk_start
    monkeypatch.setattr(ee, "_chunk_start",
                        lambda held, full: starts.append(held == full) or
                        real_start(held, full))
    ids = ens.tokenizer.encode("The lighthouse stood at the end of a long spit of rock, and")

    def text():
        rows[0] = 0
        return ens.tokenizer.decode([s.token_id for s in run(ens, ids, 48)]), rows[0]

    text()  # the prompt: later requests take it from the cache this one leaves
    starts.clear()
    kept, n_kept = text()
    assert any(starts), "no member went on from a copy that scored the winner"
    monkeypatch.setattr(ee, "_chunk_start", lambda held, full: min(
        ee.common_prefix(held, full), len(full) - 1))
    again, n_again = text()
    asyncio.run(ens.close())
    print(f"rows computed: {n_kept} from kept logits, {n_again} feeding the last token again")
    assert n_kept < n_again
    cut = min(kept.rfind(" ", 0, 60), again.rfind(" ", 0, 60))
    assert kept[:cut] == again[:cut], (kept, again)


def test_words_ensemble_of_one_member_writes_its_text():
    """A words ensemble of one member takes that member's word every step: the same greedy
    text as the member alone."""
    ens = build_ensemble_engine(["smollm2-135m"], "words", backend="onnxruntime",
                                context_length=512)
    src = resolve("smollm2-135m")
    ids = src.tokenizer.encode("The capital of France is")
    alone = run(LocalEngine("m", [load_shard("onnxruntime", src, LayerRange.full(
        src.num_layers))], src.tokenizer, 512), ids, 16)
    words = run(ens, ids, 24)
    want = src.tokenizer.decode([s.token_id for s in alone])
    got = src.tokenizer.decode([s.token_id for s in words])
    cut = want.rfind(" ")  # whole words only: the member's 16 tokens may end mid-word
    assert got.startswith(want[:cut]), (got, want)


def test_words_ensemble_across_vocabularies_through_openai():
    ens = build_ensemble_engine(["smollm2-135m", "gemma3-270m"], "words", context_length=512)
    assert ens.supports_scoring and not ens.supports_constraints
    with ServerThread(build_app(ens)) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0,
                               timeout=300)
        ask = [{"role": "user", "content": "What is the capital of France?"}]
        greedy = client.chat.completions.create(model=ens.model_id, messages=ask,
                                                max_tokens=24, temperature=0)
        again = client.chat.completions.create(model=ens.model_id, messages=ask,
                                               max_tokens=24, temperature=0)
        assert greedy.choices[0].message.content == again.choices[0].message.content
        assert "Paris" in greedy.choices[0].message.content
        # the repeat took each member's prompt from the cache the first request left, but
        # its last two tokens, and wrote the same text
        assert again.usage.prompt_tokens_details.cached_tokens == \
            again.usage.prompt_tokens - 2
        seeded = [client.chat.completions.create(model=ens.model_id, messages=ask,
                                                 max_tokens=16, temperature=0.8, seed=7)
                  .choices[0].message.content for _ in range(2)]
        assert seeded[0] == seeded[1] and seeded[0].strip()


def test_first_words_matches_whole_words_once_the_next_has_begun():
    from mesh.ensemble.mixing import first_words

    assert first_words(1).match(" the light").group(0) == " the"
    assert first_words(2).match(" the light") is None  # the second word may go on
    assert first_words(2).match(" the lighthouse keeper").group(0) == " the lighthouse"
    assert first_words(3).match("a  b\nc d").group(0) == "a  b\nc"
    assert first_words(2).match("ab ") is None  # one word, not two halves of one


def test_a_words_proposal_counts_the_whole_words_it_got():
    """A member asked for several words may write fewer (a node from before runs writes one;
    an ending, the token cap): the words taken are the whole ones it wrote, each one draw."""
    from types import SimpleNamespace

    import mesh.ensemble.engine as ee
    from mesh.node.runner import Proposal

    class Chars:
        eos_token_ids = {0}

        def decode(self, ids):
            return "".join(map(chr, ids))

    class Writer:
        name, tokenizer = "m", Chars()

        def __init__(self, text, ended=False):
            self.text, self.ended = text, ended

        async def propose(self, rid, position, tokens, n, *a, **k):
            asked.append(n)
            ids = [ord(c) for c in self.text]
            return Proposal(ids, [-1.0] * len(ids), self.ended, None, position + len(ids) - 1)

    class Req:
        sampling = SamplingParams(temperature=0.8)

    def words(text, n_words, ended=False, context=1000):
        engine = SimpleNamespace(context_length=context)
        engine._open_run = lambda *a, **k: EnsembleEngine._open_run(engine, *a, **k)
        out = asyncio.run(EnsembleEngine._propose_word(
            engine, Writer(text, ended), "r", {}, [1, 2], Req(), n_words))
        return out[0], out[4]

    asked = []

    assert words(" a b c d", 3) == (" a b c", 3)
    assert words(" a b", 3) == (" a", 1)  # one word whole, the next begun
    assert words(" a b", 1) == (" a", 1)
    assert words(" a b", 3, ended=True) == (" a b", 2)
    assert words(" abcdefgh", 2) == (" abcdefgh", 1)  # the cap, mid-word
    assert asked[-1] == 2 * ee.WORD_TOKENS
    words(" a b", 8, context=10)  # never past the context: 2 tokens of it are held
    assert asked[-1] == 8


@pytest.mark.real
def test_sampled_words_run_of_one_member_is_one_call_and_keeps_the_draws(monkeypatch):
    """A sampled words ensemble draws each word's member ahead; a member drawn for several
    words in a row writes them in one call. Each word still takes one draw, in order: the
    members that wrote the words are the seeded draws. (Members in this process do not hand
    over: a run is one call.)"""
    import mesh.ensemble.engine as ee

    calls, asked = [], []
    real_run, real_open = ee.EnsembleEngine._sampled_run, ee.EnsembleEngine._open_run

    async def open_run(self, m, rid, held, base, req, words, split, copy_from=""):
        assert not split and not copy_from
        asked.append(words)
        return await real_open(self, m, rid, held, base, req, words, split, copy_from)

    async def sampled_run(self, *a):
        before = len(asked)
        m, out = await real_run(self, *a)
        assert len(asked) == before + 1  # one call
        calls.append((m.name, asked[-1], out[4]))
        return m, out

    monkeypatch.setattr(ee.EnsembleEngine, "_sampled_run", sampled_run)
    monkeypatch.setattr(ee.EnsembleEngine, "_open_run", open_run)
    ens = build_ensemble_engine(["smollm2-135m", "gemma3-270m"], "words", backend="onnxruntime",
                                context_length=1024)
    ids = ens.tokenizer.encode("The lighthouse stood at the end of a long spit of rock, and")
    steps = run(ens, ids, 64, SamplingParams(temperature=0.8, seed=5))
    asyncio.run(ens.close())
    assert len(steps) == 64
    assert any(n > 1 for _, _, n in calls), calls
    assert all(1 <= n <= words for _, words, n in calls)
    wrote = [name for name, _, n in calls for _ in range(n)]
    draws = np.random.default_rng(5).choice(2, size=len(wrote) + ee.RUN_WORDS, p=[0.5, 0.5])
    names = [m.name for m in ens.members]
    assert wrote == [names[d] for d in draws[:len(wrote)]]
    # a call's run is the member's draws in a row, up to the next other member's
    for i, (name, words, _) in enumerate(calls):
        at = sum(c[2] for c in calls[:i])
        run_of = next(j for j in range(at, len(draws)) if names[draws[j]] != name) - at
        assert words == min(run_of, ee.RUN_WORDS) or i == len(calls) - 1


# ---- prompts reused across requests ---------------------------------------------------------

TURN1 = [{"role": "system", "content": "You answer in one word."},
         {"role": "user", "content": "Name a colour."}]


def _ask(ens, messages, sampling, n=10):
    """(the first member's prompt tokens the request took from a kept cache, its steps)"""
    tok = ens.tokenizer

    async def go():
        req = GenerationRequest("r", tok.chat_prompt(messages), n, sampling,
                                frozenset(tok.eos_token_ids), messages=messages)
        steps = [(s.token_id, s.logprob, s.top_logprobs) async for s in ens.generate(req)]
        return req.cached_tokens, steps

    return asyncio.run(go())


def _next_turn(ens, steps):
    answer = ens.tokenizer.decode([t for t, _, _ in steps], skip_special_tokens=True)
    return TURN1 + [{"role": "assistant", "content": answer},
                    {"role": "user", "content": "And another?"}]


def _forget_kept(ens):
    async def go():
        for m in ens.members:
            await ens._end_kept(m)

    asyncio.run(go())


@pytest.mark.parametrize("strategy", ["merge", "pick", "words"])
def test_a_chats_next_turn_takes_each_members_prompt_with_the_numbers_of_a_fresh_run(
        tiny_models, twin, strategy):
    """Each member keeps a finished request's prompt; the chat's next turn starts from a copy
    (ONNX Runtime: split-invariant) and gets the tokens and log-probs of a fresh run, greedy
    and seeded (a copy takes the cache, not the finished request's random draws)."""
    ens = build_ensemble_engine([str(tiny_models["llama"]), f"{twin}:2"], strategy,
                                backend="onnxruntime", chunk_tokens=4)
    assert all(m.split_invariant for m in ens.members)
    first_prompt = ens.tokenizer.chat_prompt(TURN1)

    def reused():
        return sum(m.reused_tokens for m in ens.members)

    try:
        for sampling in (SamplingParams(temperature=0.0, logprobs=2),
                         SamplingParams(temperature=0.9, seed=7, logprobs=2)):
            _forget_kept(ens)
            cached1, steps1 = _ask(ens, TURN1, sampling)
            turn2 = _next_turn(ens, steps1)
            before = reused()
            cached2, got = _ask(ens, turn2, sampling)
            taken = reused() - before
            _forget_kept(ens)
            fresh, want = _ask(ens, turn2, sampling)
            assert reused() - before == taken and got == want, sampling
            assert (cached1, fresh) == (0, 0)
            # every member that fed its prompt took its first turn's (a sampled words
            # ensemble may not call on the first member, which the usage reports, at all)
            assert cached2 == len(first_prompt) or (strategy, cached2) == ("words", 0)
            assert taken in (len(first_prompt), 2 * len(first_prompt)), taken
            # the same prompt again: all but its last two tokens come from the kept cache
            again, same = _ask(ens, turn2, sampling)
            assert same == want
            assert again == len(ens.tokenizer.chat_prompt(turn2)) - 2 or \
                (strategy, again) == ("words", 0)
    finally:
        asyncio.run(ens.close())


def test_members_on_nodes_take_kept_prompts_and_feed_them_when_they_are_gone(tiny_models,
                                                                            twin):
    """Over the wire: a seeded pick's next turn copies the nodes' kept caches and writes what
    a fresh run writes; where the nodes dropped them (evicted), the prompt is fed instead,
    with the same text, and nothing is left behind but the caches kept last."""
    seeded = SamplingParams(temperature=0.9, seed=3)
    models = [str(tiny_models["llama"]), str(twin)]
    with node_servers(2, "onnxruntime", secret="s" * 16) as nodes:
        ens = build_ensemble_engine([f"{models[0]}@{nodes[0][0]}", f"{models[1]}@{nodes[1][0]}:2"],
                                    "pick", backend="onnxruntime", secret="s" * 16,
                                    chunk_tokens=4)
        assert all(m.split_invariant for m in ens.members)  # from the nodes' Load replies
        _, steps1 = _ask(ens, TURN1, seeded)
        turn2 = _next_turn(ens, steps1)
        cached, got = _ask(ens, turn2, seeded)
        _forget_kept(ens)
        fresh, want = _ask(ens, turn2, seeded)
        assert cached == len(ens.tokenizer.chat_prompt(TURN1)) and fresh == 0
        assert got == want
        for (_, runner), m in zip(nodes, ens.members):  # the nodes drop what they kept
            for rid in ens._kept[m.name].values():
                assert runner.end(rid)
        gone, again = _ask(ens, turn2, seeded)
        assert gone == 0 and again == want
        assert [runner.active() for _, runner in nodes] == [1, 1]
        asyncio.run(ens.close())


def test_merge_members_in_one_process_share_the_cores_between_them(tiny_models, twin,
                                                                  monkeypatch):
    """Merge members compute every token in step: in one process each gets its share of
    the cores (not all of them each, fighting over them); pick's members keep them all."""
    import os

    monkeypatch.delenv("MESH_ORT_THREADS", raising=False)
    share = max(1, (os.cpu_count() or 1) // 2)
    for strategy, want in (("merge", share), ("pick", None)):
        ens = build_ensemble_engine([str(tiny_models["llama"]), str(twin)], strategy,
                                    backend="onnxruntime")
        try:
            for m in ens.members:
                assert m.runner.threads == want, strategy
                threads = m.runner.shard.session.get_session_options().intra_op_num_threads
                assert threads == (want or 0), strategy  # 0: ONNX Runtime's default, all
        finally:
            asyncio.run(ens.close())


def test_members_whose_backend_is_not_split_invariant_compute_every_prompt(tiny_models, twin):
    """torch rounds a prompt row differently when the prompt is cut elsewhere (~3e-5): its
    members keep nothing and take nothing, so no number depends on an earlier request."""
    pytest.importorskip("torch")
    ens = build_ensemble_engine([str(tiny_models["llama"]), str(twin)], "merge",
                                backend="torch")
    try:
        assert not any(m.split_invariant for m in ens.members)
        _, steps1 = _ask(ens, TURN1, GREEDY)
        cached, _ = _ask(ens, _next_turn(ens, steps1), GREEDY)
        assert cached == 0 and not any(ens._kept.values())
        assert all(m.reused_tokens == 0 and m.runner.active() == 0 for m in ens.members)
    finally:
        asyncio.run(ens.close())


OTHER = [TURN1[0], {"role": "user", "content": "Name a number."}]  # TURN1's system prompt


def _two_users(tiny_models, twin, strategy):
    """An ensemble on ONNX Runtime (split-invariant), greedy sampling with log-probs, and
    two chats with one system prompt: (ens, sampling, OTHER's prompt, TURN1's, how many
    tokens they share)."""
    ens = build_ensemble_engine([str(tiny_models["llama"]), f"{twin}:2"], strategy,
                                backend="onnxruntime")
    mine, theirs = ens.tokenizer.chat_prompt(OTHER), ens.tokenizer.chat_prompt(TURN1)
    common = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
    return ens, SamplingParams(temperature=0.0, logprobs=2), mine, theirs, common


def test_a_request_takes_the_prompt_start_a_running_request_has_fed(tiny_models, twin):
    """A user arriving while another, with the same system prompt, is being answered copies
    that request's prompt start on each member (no finished request kept one yet), and gets
    the tokens and log-probs of a fresh run."""
    ens, sampling, mine, theirs, common = _two_users(tiny_models, twin, "merge")
    tok, other = ens.tokenizer, OTHER

    async def beside_a_running_request():
        first = GenerationRequest("a", theirs, 12, sampling, frozenset(tok.eos_token_ids),
                                  messages=TURN1)
        running = ens.generate(first)
        await running.__anext__()  # its prompt is in, on every member
        assert not any(ens._kept.values())  # nothing finished yet: no kept prompt to take
        req = GenerationRequest("b", mine, 10, sampling, frozenset(tok.eos_token_ids),
                                messages=other)
        steps = [(s.token_id, s.logprob, s.top_logprobs) async for s in ens.generate(req)]
        async for _ in running:
            pass
        return req.cached_tokens, steps

    try:
        cached, got = asyncio.run(beside_a_running_request())
        _forget_kept(ens)
        fresh, want = _ask(ens, other, sampling)
        assert cached == common > 2 and fresh == 0
        assert got == want
    finally:
        asyncio.run(ens.close())


@pytest.mark.parametrize("strategy", ["merge", "pick"])
def test_requests_arriving_together_feed_their_shared_prompt_start_once(
        tiny_models, twin, strategy):
    """Users of one system prompt arriving together: the later request waits while the
    earlier one feeds its prompt, then copies the start they share on each member (nothing
    was kept or fed when it arrived), and both get the tokens and log-probs of fresh runs."""
    ens, sampling, mine, theirs, common = _two_users(tiny_models, twin, strategy)
    tok, other = ens.tokenizer, OTHER

    async def together():
        first = GenerationRequest("a", theirs, 8, sampling, frozenset(tok.eos_token_ids),
                                  messages=TURN1)
        second = GenerationRequest("b", mine, 8, sampling, frozenset(tok.eos_token_ids),
                                   messages=other)

        async def run(req):
            return [(s.token_id, s.logprob, s.top_logprobs) async for s in ens.generate(req)]

        got = await asyncio.gather(run(first), run(second))  # the first starts first
        return first.cached_tokens, second.cached_tokens, got

    try:
        cached_first, cached_second, got = asyncio.run(together())
        assert cached_first == 0 and cached_second == common > 2
        for messages, steps in zip([TURN1, other], got):
            _forget_kept(ens)
            fresh, want = _ask(ens, messages, sampling, 8)
            assert fresh == 0 and steps == want
    finally:
        asyncio.run(ens.close())


def test_sampled_words_runs_stop_at_the_context(tiny_models, twin):
    """A run of words asks its member for no more tokens than the context has left (the
    tiny models hold 256 positions; seed 5 draws long runs near the end)."""
    ens = build_ensemble_engine([str(tiny_models["llama"]), str(twin)], "words",
                                backend=BACKENDS[0])
    steps = run(ens, PROMPT, 200, SamplingParams(temperature=0.8, seed=5))
    asyncio.run(ens.close())
    assert steps and steps[-1].finish_reason in ("length", "stop")


@pytest.mark.parametrize("strategy", ["merge", "words", "pick"])
def test_abandoned_streams_leave_no_cache_on_the_members(tiny_models, twin, strategy):
    """Clients that go away after 1 to 4 chunks of a sampled stream (pick's scoring copies,
    words' drawn member, merge's guesses in flight): once they are gone, the member nodes
    hold only the caches the ensemble keeps for prefix reuse, and it serves on."""
    import concurrent.futures
    import time

    import httpx

    from mesh.server.app import build_app
    from tests.conftest import ServerThread

    with node_servers(2, BACKENDS[0], secret="s" * 16) as nodes:
        (addr_a, node_a), (addr_b, node_b) = nodes
        ens = build_ensemble_engine([f"{tiny_models['llama']}@{addr_a}", f"{twin}@{addr_b}"],
                                    strategy, backend=BACKENDS[0], secret="s" * 16)
        body = {"model": "mesh-ensemble", "max_tokens": 60, "stream": True,
                "temperature": 0.8}

        def open_and_abandon(i):
            prompt = "one two three four five six" + f" {i}" * (i % 5)
            with httpx.stream("POST", srv.base_url + "/v1/completions",
                              json={**body, "prompt": prompt}, timeout=120) as r:
                seen = 0
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        seen += 1
                        if seen > i % 4:  # leave at different steps
                            break

        def held():
            return node_a.active() + node_b.active()

        def kept():
            return sum(len(k) for k in ens._kept.values())

        with ServerThread(build_app(ens)) as srv:
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                list(pool.map(open_and_abandon, range(24)))
            deadline = time.monotonic() + 30
            while ens.admission.running or held() > kept():
                assert time.monotonic() < deadline, (
                    f"left behind: {ens.admission.running} running, {held()} caches on "
                    f"the nodes, {kept()} kept")
                time.sleep(0.05)
            r = httpx.post(srv.base_url + "/v1/completions", timeout=120,
                           json={**body, "prompt": "seven", "stream": False, "max_tokens": 5})
            assert r.status_code == 200 and 0 < r.json()["usage"]["completion_tokens"] <= 5


@pytest.mark.real
@pytest.mark.parametrize("strategy", ["words", "pick"])
def test_an_ensemble_that_lost_its_first_member_still_speaks_its_tokens(strategy):
    """The API speaks the first member's tokens (the request's prompt, the tokens streamed
    back). Once it is lost, a words ensemble fed the other member the first one's token ids
    as its prompt and streamed that member's ids back as if they were the first's: garbage
    text. The others now get the prompt in their own tokens, and the text comes back in the
    first member's tokens: with Gemma 3 left alone, Gemma 3's own greedy text."""
    ens = build_ensemble_engine(["smollm2-135m", "gemma3-270m"], strategy,
                                context_length=2048)
    gemma = ens.members[1]
    ens._drop(ens.members[0], "lost in a test")
    text = "The capital of France is Paris. The capital of Germany is"
    req = GenerationRequest("r", ens.tokenizer.encode(text), 12, GREEDY,
                            frozenset(ens.tokenizer.eos_token_ids), prompt_text=text)

    async def go():
        return [s.token_id async for s in ens.generate(req)]

    said = ens.tokenizer.decode(asyncio.run(go()))
    own = run(_local("gemma3-270m"), gemma.tokenizer.encode(text), 20)
    alone = gemma.tokenizer.decode([s.token_id for s in own])
    assert said.strip() and alone.startswith(said.rstrip()), (said, alone)


@pytest.mark.real
def test_a_member_node_started_late_or_again_joins_the_ensemble(tmp_path):
    """Members on nodes that are not up when the ensemble starts, or that are lost and start
    again at their address (a rebooted machine), are loaded once they answer: new requests
    use them again instead of the survivors for good."""
    import time

    from tests.test_resilience import SECRET, _free_port, _start_node

    port = _free_port()
    remote = f"2:smollm2-135m@127.0.0.1:{port}"
    ens = build_ensemble_engine(["smollm2-135m", f"smollm2-135m@127.0.0.1:{port}:0.5"],
                                "merge", secret=SECRET, context_length=2048)
    node = None

    def members():
        return [m["name"] for m in client.models.list().data[0].model_extra["meta"]["members"]]

    def wait_for(n):
        deadline = time.monotonic() + 60
        while len(ens.members) != n:
            assert time.monotonic() < deadline, ens.events
            time.sleep(0.1)

    ask = dict(model="mesh-ensemble", temperature=0, max_tokens=12,
               messages=[{"role": "user", "content": "Name a colour."}])
    try:
        assert ens.lost == [remote] and "waiting for member" in ens.events[-1]
        with ServerThread(build_app(ens)) as srv:
            client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0,
                                   timeout=120)
            assert client.chat.completions.create(**ask).choices[0].message.content
            node = _start_node(port, tmp_path / "node.log")
            wait_for(2)
            assert members() == ["1:smollm2-135m", remote] and ens.lost == []
            both = client.chat.completions.create(**ask).choices[0].message.content
            node.kill()
            node.wait()
            assert client.chat.completions.create(**ask).choices[0].message.content
            assert ens.lost == [remote]
            node = _start_node(port, tmp_path / "node.log")
            wait_for(2)
            assert client.chat.completions.create(**ask).choices[0].message.content == both
            assert any(f"member {remote} answers again" in e for e in ens.events)
    finally:
        asyncio.run(ens.close())
        if node is not None:
            node.kill()
            node.wait()


def test_greedy_words_scores_a_one_token_word_from_the_proposals_opening(tiny_models, twin,
                                                                         monkeypatch):
    """Greedy words: each proposal also brings the most likely tokens of the distribution it
    opened with, so another member's word that is one of them, as one token, is scored from
    it without a pass (the member's cache stays on its own word; the next proposal feeds the
    winner in its first forward). In float32, where a row's numbers do not depend on the
    rows beside it, the text is the one that scoring every candidate by a pass gives, with
    fewer passes; members on nodes bring the same openings."""
    import mesh.ensemble.engine as ee

    passes = []
    real = ee.EnsembleEngine._sync

    async def spy(self, m, *a, **k):
        passes.append(m.name)
        return await real(self, m, *a, **k)

    monkeypatch.setattr(ee.EnsembleEngine, "_sync", spy)
    models = [str(tiny_models["llama"]), f"{twin}:2"]
    top, got = ee.OPEN_TOP, {}
    for n in (0, top):  # 0: the proposals bring no opening, every candidate takes a pass
        monkeypatch.setattr(ee, "OPEN_TOP", n)
        passes.clear()
        ens = build_ensemble_engine(models, "words", backend="onnxruntime", dtype="float32")
        got[n] = [s.token_id for s in run(ens, PROMPT, 32)], len(passes)
        asyncio.run(ens.close())
    assert got[top][0] == got[0][0] and len(got[0][0]) == 32
    assert got[0][1] > 0, "the members never disagreed: nothing was scored"
    assert got[top][1] < got[0][1]
    passes.clear()
    with node_servers(2, "onnxruntime", secret="s" * 16) as nodes:
        ens = build_ensemble_engine([f"{models[0]}@{nodes[0][0]}", f"{twin}@{nodes[1][0]}:2"],
                                    "words", backend="onnxruntime", dtype="float32",
                                    secret="s" * 16)
        assert [s.token_id for s in run(ens, PROMPT, 32)] == got[top][0]
        assert len(passes) == got[top][1]


def _spied_runs(monkeypatch):
    """Record every greedy words round: (words asked, each member's words), in order."""
    import mesh.ensemble.engine as ee

    calls = []
    real = ee.EnsembleEngine._propose_run

    async def spy(self, m, rid, fed, base, req, words, openings):
        units = await real(self, m, rid, fed, base, req, words, openings)
        calls.append((words, m.name, units))
        return units

    monkeypatch.setattr(ee.EnsembleEngine, "_propose_run", spy)
    return calls


def _rounds(calls, members: int) -> list[tuple[int, int]]:
    """(words asked, words every member wrote the same) for each round of ``calls``."""
    out = []
    for i in range(0, len(calls), members):
        words = {w for w, _, _ in calls[i:i + members]}
        assert len(words) == 1
        units = [u for _, _, u in calls[i:i + members]]
        same = 0
        while all(len(u) > same for u in units) and len({u[same][:2] for u in units}) == 1:
            same += 1
        out.append((words.pop(), same))
    return out


@pytest.mark.real
def test_greedy_words_members_propose_runs_and_write_the_same_text(smollm2, gemma3,
                                                                   monkeypatch):
    """Greedy words: members that agreed on every word of a round propose twice as many in
    the next, in one call each (up to ``GREEDY_RUN``), and the words they all wrote the same
    are taken at once; where they part, that word is proposed again on its own and scored.
    Greedy, a run's words are the ones one call a word writes, so the text is the one a word
    a round gives (SmolLM2 + Gemma 3, where they both agree and part), with fewer calls."""
    import mesh.ensemble.engine as ee

    calls = _spied_runs(monkeypatch)
    members = ["smollm2-135m", "gemma3-270m"]
    prompt = ("The lighthouse stood at the end of a long spit of rock, and for thirty years "
              "the same keeper had climbed its stairs every evening. On the night the storm came,")
    got = {}
    for most in (1, ee.GREEDY_RUN):
        monkeypatch.setattr(ee, "GREEDY_RUN", most)
        calls.clear()
        ens = build_ensemble_engine(members, "words")
        try:
            ids = ens.tokenizer.encode(prompt, add_special_tokens=False)
            got[most] = [s.token_id for s in run(ens, ids, 96)], _rounds(calls, 2)
        finally:
            asyncio.run(ens.close())
    (one, one_rounds), (runs, run_rounds) = got[1], got[ee.GREEDY_RUN]
    assert runs == one and len(one) == 96
    assert all(w == 1 for w, _ in one_rounds)
    assert len(run_rounds) < len(one_rounds) / 2
    assert max(w for w, _ in run_rounds) == ee.GREEDY_RUN
    assert any(same == 0 for _, same in run_rounds), "the members never parted"
    assert any(0 < same < w for w, same in run_rounds), "no run was cut where members parted"
    # a round asks for twice the last one's words when all of it was taken, else for one
    # (fewer near max_tokens)
    pairs = list(zip(run_rounds, run_rounds[1:]))
    for i, ((w0, same0), (w1, _)) in enumerate(pairs):
        want = min(2 * w0, ee.GREEDY_RUN) if same0 >= w0 else 1
        assert w1 == want if i < len(pairs) // 2 else w1 <= want


def test_greedy_words_runs_on_nodes_are_one_word_a_rounds_text(tiny_models, monkeypatch):
    """Members on nodes write a greedy run in one call (``words``) and the text is the one
    of a word a round in this process (float32; one model twice, as members that agree)."""
    import mesh.ensemble.engine as ee

    calls = _spied_runs(monkeypatch)
    model = str(tiny_models["llama"])
    prompt = resolve(model).tokenizer.encode("The quick brown fox jumps over the lazy dog and",
                                             add_special_tokens=False)
    monkeypatch.setattr(ee, "GREEDY_RUN", 1)
    ens = build_ensemble_engine([model, model], "words", backend="onnxruntime",
                                dtype="float32")
    want = [s.token_id for s in run(ens, prompt, 48)]
    asyncio.run(ens.close())
    monkeypatch.setattr(ee, "GREEDY_RUN", 8)
    calls.clear()
    with node_servers(2, "onnxruntime", secret="s" * 16) as nodes:
        ens = build_ensemble_engine([f"{model}@{nodes[0][0]}", f"{model}@{nodes[1][0]}"],
                                    "words", backend="onnxruntime", dtype="float32",
                                    secret="s" * 16)
        try:
            assert [s.token_id for s in run(ens, prompt, 48)] == want
        finally:
            asyncio.run(ens.close())
    rounds = _rounds(calls, 2)
    assert [w for w, _ in rounds][:3] == [1, 2, 4] and all(s >= 1 for _, s in rounds)


def test_a_proposals_opening_is_the_top_of_its_first_distribution(tiny_models):
    """``open_top``: a proposal's opening tokens are the most likely ones, most likely
    first, with the log-probs a step from the same history gives (float32); a node refuses
    more than it allows, and a ``lead`` past the tokens fed or without ``until_word``."""
    from mesh.node.runner import MAX_OPEN_TOP, StageError, StageRunner

    runner = StageRunner("onnxruntime")
    runner.load(str(tiny_models["llama"]), 0, resolve(str(tiny_models["llama"])).num_layers,
                "onnxruntime", "float32")
    stops = dict(sampling=GREEDY, stop_ids=[0])
    prop, = runner.member_step_many([dict(request_id="a", position=0, tokens=PROMPT,
                                          propose=3, open_top=5, **stops)])
    (dist, _), = runner.member_step_many([dict(request_id="b", position=0, tokens=PROMPT)])
    lp = log_softmax(dist.full)
    want = np.argsort(-lp, kind="stable")[:5]
    assert [t for t, _ in prop.opening] == want.tolist()
    assert np.allclose([v for _, v in prop.opening], lp[want], atol=1e-4)
    assert prop.tokens[0] == want[0]  # greedy: the first token written is the top one
    bad, = runner.member_step_many([dict(request_id="c", position=0, tokens=PROMPT, propose=1,
                                         open_top=MAX_OPEN_TOP + 1, **stops)])
    assert isinstance(bad, StageError) and bad.status == "INVALID_ARGUMENT" and \
        "open_top" in bad.message
    # ``lead`` (the fed tokens that begin a word) is at most the tokens fed, and only for a
    # proposal written until a word ends
    for rid, bad_lead in (("d", dict(lead=len(PROMPT) + 1, until_word=True)),
                          ("e", dict(lead=1)), ("f", dict(lead=-1, until_word=True))):
        bad, = runner.member_step_many([dict(request_id=rid, position=0, tokens=PROMPT,
                                             propose=1, **bad_lead, **stops)])
        assert isinstance(bad, StageError) and bad.status == "INVALID_ARGUMENT" and \
            "lead" in bad.message, bad_lead
    assert runner.active() == 2  # "a" and "b": the refused ones left nothing behind


@pytest.mark.real
def test_sampled_words_hand_over_writes_the_same_text(monkeypatch):
    """Sampled words on nodes: a run that another member's follows hands over (the next
    writer begins, on a copy of its cache, while the last word is finished). Whether it was
    taken or dropped (the word went on), a seeded answer is the text written without
    hand-overs, and no copy is left on the nodes."""
    import time

    import mesh.ensemble.engine as ee
    from mesh.ensemble.member import Member

    launched, finishing, dropped = [], [], []
    real_open, real_propose, real_drop = ee.EnsembleEngine._open_run, Member.propose, \
        ee._drop_ahead

    def drop(ahead):
        if ahead.get("next") is not None:
            dropped.append(ahead["next"]["name"])
        return real_drop(ahead)

    async def open_run(self, m, rid, held, base, req, words, split, copy_from=""):
        if copy_from:
            launched.append(m.name)
        return await real_open(self, m, rid, held, base, req, words, split, copy_from)

    async def propose(self, *a, lead=0, **k):
        if lead:
            finishing.append(self.name)
        return await real_propose(self, *a, lead=lead, **k)

    monkeypatch.setattr(ee.EnsembleEngine, "_open_run", open_run)
    monkeypatch.setattr(Member, "propose", propose)
    monkeypatch.setattr(ee, "_drop_ahead", drop)
    got = {}
    with node_servers(2, "onnxruntime", secret="s" * 16) as nodes:
        for hand_over in (False, True):
            monkeypatch.setattr(ee, "HAND_OVER", hand_over)
            ens = build_ensemble_engine([f"smollm2-135m@{nodes[0][0]}",
                                         f"gemma3-270m@{nodes[1][0]}"], "words",
                                        backend="onnxruntime", secret="s" * 16,
                                        context_length=1024)
            ids = ens.tokenizer.encode("The lighthouse stood at the end of a long spit of "
                                       "rock, and")
            got[hand_over] = [[s.token_id for s in run(
                ens, ids, 48, SamplingParams(temperature=0.8, seed=seed))]
                for seed in (3, 4)]
            if not hand_over:
                assert not launched and not finishing
            deadline = time.monotonic() + 10
            while [r.active() for _, r in nodes] != [1, 1] and time.monotonic() < deadline:
                time.sleep(0.05)  # copies dropped at the end go once their call is back
            assert [r.active() for _, r in nodes] == [1, 1]  # the cache kept for reuse
    assert got[True] == got[False] and all(len(g) == 48 for g in got[True])
    # (most words are one token: most next runs begun early are taken)
    assert finishing and launched, "no run handed over"
    assert len(dropped) < len(launched), "every next run begun early was dropped"


def test_sampled_words_that_may_hand_over_count_a_copy_per_member():
    """The KV an ensemble request reserves: sampled words whose members may hand over (not
    all in this process) count a copy beside each member's cache; greedy words, and
    members all in this process, one cache."""
    from types import SimpleNamespace

    def need(temperature, in_process):
        ens = SimpleNamespace(strategy="words", context_length=1000, chunk_tokens=8,
                              members=[SimpleNamespace(in_process=in_process)] * 2)
        req = GenerationRequest("r", [1, 2, 3, 4], 20, SamplingParams(temperature=temperature))
        return EnsembleEngine._need(ens, req, {"a": [1, 2, 3, 4], "b": [1] * 8})

    assert need(0.8, False) == {"a": [24, 24], "b": [48, 48]}
    assert need(0.0, False) == {"a": [24], "b": [48]}
    assert need(0.8, True) == {"a": [24], "b": [48]}
