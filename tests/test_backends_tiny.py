"""Shards of tiny random models: every backend against transformers' own forward, and a split
at every layer boundary against the whole model."""

from __future__ import annotations

import numpy as np
import pytest

from mesh.backends import StepItem, load_shard
from mesh.layers import LayerRange
from mesh.models.source import resolve
from tests.conftest import BACKENDS, TINY_CONFIGS

TOKENS = np.array([5, 17, 42, 99, 3, 250, 61, 7, 8, 9, 120, 33, 34, 35, 200, 11, 12, 13, 14, 15],
                  dtype=np.int32)


def reference_logits(source) -> np.ndarray:
    """All-position logits from transformers' AutoModelForCausalLM on the same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from mesh.backends.torch import hf_config

    model = AutoModelForCausalLM.from_config(hf_config(source.config), dtype=torch.float32)
    state = {name: torch.from_numpy(source.reader.read(name)) for name in source.reader.names()}
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(TOKENS.astype(np.int64))[None]).logits[0].numpy()


def run_steps(shards, prefill: int = 12) -> np.ndarray:
    """Prefill ``prefill`` tokens, then decode the rest one at a time; logits per position."""
    caches = [s.new_cache() for s in shards]
    out = []

    def fwd(tokens, all_logits):
        x = tokens
        for s, c in zip(shards, caches):
            x = s.forward([StepItem("r", x, c, all_logits)])[0]
        return x

    out.append(fwd(TOKENS[:prefill], True))
    for t in TOKENS[prefill:]:
        out.append(fwd(np.array([t], np.int32), False)[None])
    return np.concatenate(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model_type", list(TINY_CONFIGS))
def test_shard_matches_transformers(tiny_models, model_type, backend):
    source = resolve(str(tiny_models[model_type]))
    ref = reference_logits(source)
    full = load_shard(backend, source, LayerRange.full(source.num_layers), "float32")
    got = run_steps([full])
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-3)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "qwen3"])
def test_split_at_every_layer_composes(tiny_models, model_type, backend):
    source = resolve(str(tiny_models[model_type]))
    n = source.num_layers
    whole = run_steps([load_shard(backend, source, LayerRange.full(n), "float32")])
    for cut in range(1, n):
        parts = [load_shard(backend, source, LayerRange(0, cut, n), "float32"),
                 load_shard(backend, source, LayerRange(cut, n, n), "float32")]
        np.testing.assert_allclose(run_steps(parts), whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_middle_shard_holds_no_embedding_or_head(tiny_models, backend):
    source = resolve(str(tiny_models["llama"]))
    names = source.tensor_names(LayerRange(1, 3, 4))
    assert names and all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in names)
    shard = load_shard(backend, source, LayerRange(1, 3, 4), "float32")
    h = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    out = shard.forward([StepItem("r", h, shard.new_cache())])[0]
    assert out.shape == (3, 64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_trim_rewinds(tiny_models, backend):
    source = resolve(str(tiny_models["llama"]))
    shard = load_shard(backend, source, LayerRange.full(4), "float32")
    cache = shard.new_cache()
    first = shard.forward([StepItem("r", TOKENS[:10], cache)])[0]
    shard.forward([StepItem("r", TOKENS[10:14], cache)])
    assert cache.offset == 14
    assert cache.trim(4) == 4 and cache.offset == 10
    again = shard.forward([StepItem("r", TOKENS[9:10], shard.new_cache())])[0]
    cache.trim(1)
    redo = shard.forward([StepItem("r", TOKENS[9:10], cache)])[0]
    np.testing.assert_allclose(redo, first, atol=1e-5)
    assert not np.allclose(again, first)  # without the context the answer differs


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both mlx and torch")
def test_mixed_backends_compose(tiny_models):
    source = resolve(str(tiny_models["gemma3_text"]))
    n = source.num_layers
    whole = run_steps([load_shard("torch", source, LayerRange.full(n), "float32")])
    mixed = run_steps([load_shard("mlx", source, LayerRange(0, 3, n), "float32"),
                       load_shard("torch", source, LayerRange(3, n, n), "float32")])
    np.testing.assert_allclose(mixed, whole, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("backend", ["torch", "mlx", "onnxruntime"])
@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_a_forked_cache_goes_on_like_a_cache_of_its_own(tiny_models, model_type, backend):
    """``fork`` copies a cache (one prompt, several completions): the copy and the original
    then take different tokens, and each gives what a fresh cache fed the same gives."""
    pytest.importorskip({"torch": "torch", "mlx": "mlx.core",
                         "onnxruntime": "onnxruntime"}[backend])
    source = resolve(str(tiny_models[model_type]))
    shard = load_shard(backend, source, LayerRange.full(source.num_layers), "float32")
    cache = shard.new_cache()
    shard.forward([StepItem("a", TOKENS[:10], cache)])
    fork = cache.fork()
    assert fork.offset == 10 and fork is not cache
    a = shard.forward([StepItem("a", TOKENS[10:13], cache)])[0]
    b = shard.forward([StepItem("b", TOKENS[15:18], fork)])[0]
    assert cache.offset == fork.offset == 13
    for got, tail in ((a, TOKENS[10:13]), (b, TOKENS[15:18])):
        fresh = shard.new_cache()
        shard.forward([StepItem("c", TOKENS[:10], fresh)])
        want = shard.forward([StepItem("c", tail, fresh)])[0]
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert not np.allclose(a, b)


@pytest.mark.parametrize("backend", ["torch", "mlx", "onnxruntime"])
@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_rows_decoded_together_through_two_shards_are_those_decoded_alone(
        tiny_models, model_type, backend):
    """Three requests at different depths (Gemma 3's sliding window of 8 passed by two of
    them) decode 6 steps as one forward per shard, a fourth request's prompt in the same
    call; every row's logits and hidden states are those of the request run alone."""
    pytest.importorskip({"mlx": "mlx.core"}.get(backend, backend))
    source = resolve(str(tiny_models[model_type]))
    n = source.num_layers
    shards = [load_shard(backend, source, LayerRange(0, 2, n), "float32"),
              load_shard(backend, source, LayerRange(2, n, n), "float32")]

    def step(items):  # items: (rid, data, [cache per shard]) -> last shard's outputs
        xs = [d for _, d, _ in items]
        for si, shard in enumerate(shards):
            xs = shard.forward([StepItem(r, x, cs[si]) for (r, _, cs), x in zip(items, xs)])
        return xs

    depths = (3, 11, 17)
    alone, together = ([[s.new_cache() for s in shards] for _ in depths] for _ in range(2))
    for k, d in enumerate(depths):
        step([(f"a{k}", TOKENS[:d], alone[k])])
        step([(f"b{k}", TOKENS[:d], together[k])])
    late = [s.new_cache() for s in shards]
    for t in range(6):
        tokens = [TOKENS[(d + t) % len(TOKENS):][:1] for d in depths]
        want = [step([(f"a{k}", tok, alone[k])])[0] for k, tok in enumerate(tokens)]
        items = [(f"b{k}", tok, together[k]) for k, tok in enumerate(tokens)]
        got = step(items + [("late", TOKENS[:5 + t], late)] if t == 2 else items)
        for w, g in zip(want, got):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
        if t == 2:  # the prompt that rode along got what it gets alone
            fresh = [s.new_cache() for s in shards]
            np.testing.assert_allclose(got[3], step([("f", TOKENS[:7], fresh)])[0], atol=1e-4)
    assert [c[0].offset for c in together] == [d + 6 for d in depths]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_batch_invariant_shards_give_each_row_its_numbers_alone(tiny_models, backend,
                                                                monkeypatch):
    """A row's sums depend on how many rows share the matmul; with MESH_BATCH_INVARIANT the
    torch and MLX shards run every decode step alone, so its numbers are bit for bit those
    of the request alone."""
    pytest.importorskip({"mlx": "mlx.core"}.get(backend, backend))
    monkeypatch.setenv("MESH_BATCH_INVARIANT", "1")
    source = resolve(str(tiny_models["llama"]))
    shard = load_shard(backend, source, LayerRange.full(source.num_layers), "float32")
    assert shard.batch_invariant
    shard._forward_rows = lambda items: pytest.fail("decode steps were batched")
    caches = [shard.new_cache() for _ in range(3)]
    alone = [shard.new_cache() for _ in range(3)]
    for k in range(3):
        for c in (caches[k], alone[k]):
            shard.forward([StepItem("r", TOKENS[:4 + 5 * k], c)])
    got = shard.forward([StepItem(f"r{k}", TOKENS[k:k + 1], c) for k, c in enumerate(caches)])
    for k, c in enumerate(alone):
        assert np.array_equal(got[k], shard.forward([StepItem("r", TOKENS[k:k + 1], c)])[0])
