"""The ONNX Runtime backend: parity with torch, the file's own quantization with stated
tolerances, provider choice, backend auto-selection, and mixed-backend pipelines."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import openai
import pytest

from mesh.backends import StepItem, load_shard
from mesh.backends.base import choose_backend
from mesh.engine.local import LocalEngine
from mesh.errors import BackendUnavailable
from mesh.layers import LayerRange
from mesh.models.source import resolve
from mesh.server.app import build_app
from tests.conftest import HAS_MLX, HAS_TORCH, ServerThread, resident_kb_under
from tests.test_backends_tiny import reference_logits, run_steps
from tests.test_real_models import all_logits, ids_of

# torch writes the tiny models and is the reference the graphs are checked against
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and HAS_TORCH
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="onnxruntime (and torch) not installed")


def test_provider_choice():
    from mesh.backends.onnxruntime import choose_providers

    jetson = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(jetson) == jetson
    assert choose_providers(["CPUExecutionProvider", "CUDAExecutionProvider"]) == \
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(jetson, "cuda") == ["CUDAExecutionProvider",
                                                "CPUExecutionProvider"]
    assert choose_providers(["CPUExecutionProvider"], "cpu") == ["CPUExecutionProvider"]
    with pytest.raises(BackendUnavailable, match="TensorrtExecutionProvider"):
        choose_providers(["CPUExecutionProvider"], "tensorrt")


def test_backend_auto_selection():
    every = ["mlx", "torch", "onnxruntime"]
    assert choose_backend("apple", every, "llama") == "mlx"
    assert choose_backend("jetson", every, "llama") == "onnxruntime"
    assert choose_backend("nvidia", every, "llama") == "torch"
    assert choose_backend("cpu", every, "llama") == "onnxruntime"
    assert choose_backend("cpu", every, "gemma3_text") == "onnxruntime"
    assert choose_backend("cpu", every, "llama", whole_model=False) == "onnxruntime"
    assert choose_backend("cpu", every, "phi3") == "torch"  # no ONNX graph for it
    assert choose_backend("apple", ["torch"], "llama") == "torch"
    with pytest.raises(BackendUnavailable):
        choose_backend("cpu", [], "llama")


@needs_ort
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"])
def test_ort_shard_matches_transformers(tiny_models, model_type, tmp_path):
    source = resolve(str(tiny_models[model_type]))
    ref = reference_logits(source)
    n = source.num_layers
    shard = load_shard("onnxruntime", source, LayerRange.full(n), "float32",
                       cache_dir=tmp_path)
    if sys.platform.startswith("linux"):  # the session's mapped weight file: pages dropped
        assert resident_kb_under(str(tmp_path)) == 0
    got = run_steps([shard])  # (and those it reads come back from the file, unchanged)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-3)
    mixed = run_steps([load_shard("onnxruntime", source, LayerRange(0, 2, n), "float32",
                                  cache_dir=tmp_path),
                       load_shard("torch", source, LayerRange(2, n, n), "float32")])
    np.testing.assert_allclose(mixed, ref, atol=1e-4, rtol=1e-3)


@needs_ort
def test_a_stopped_forward_leaves_the_cache_as_it_was(tiny_models, tmp_path):
    """``stop(handle)`` ends a forward run with that handle (the node stops a guessed step
    that the next step does not want): it raises, the cache keeps its offset, and the next
    step gives the numbers it gives when nothing was stopped."""
    source = resolve(str(tiny_models["llama"]))
    shard = load_shard("onnxruntime", source, LayerRange.full(source.num_layers), "float32",
                       cache_dir=tmp_path)
    caches = [shard.new_cache() for _ in range(2)]
    for c in caches:
        shard.forward([StepItem("p", np.arange(5, 12, dtype=np.int32), c)])
    handle = shard.stoppable()
    shard.stop(handle)  # before it starts: ONNX Runtime ends it at its first operator
    with pytest.raises(Exception):
        shard.forward([StepItem("a", np.array([40], np.int32), caches[0])], stop=handle)
    assert caches[0].offset == 7
    want = shard.forward([StepItem("b", np.array([41], np.int32), caches[1])])[0]
    got = shard.forward([StepItem("a", np.array([41], np.int32), caches[0])],
                        stop=shard.stoppable())[0]
    np.testing.assert_array_equal(got, want)
    assert caches[0].offset == 8


@needs_ort
def test_unsupported_architecture_is_a_clear_error(tiny_models, tmp_path):
    from mesh.errors import UnsupportedModel

    source = resolve(str(tiny_models["llama"]))
    source.config = dict(source.config, model_type="phi3")
    with pytest.raises(UnsupportedModel, match="phi3"):
        load_shard("onnxruntime", source, LayerRange(0, 4, 4))


def _log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@needs_ort
@pytest.mark.real
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_ort_in_the_files_own_precision(request, model):
    """float32 matches torch (measured max |dlogit| 1e-4 / 2e-4, top-1 100%; asserted on
    SmolLM2, and on the tiny Gemma 3 in ``test_ort_shard_matches_transformers``). dtype auto
    keeps the GGUF blocks (MatMulNBits from Q4_1/Q8_0, Q5_0/Q4_K/Q6_K/Q8_0) with int8
    activations (accuracy_level 4, as llama.cpp's CPU dot products): measured on 256 WikiText
    tokens, top-1 agreement with the fp32-dequantized reference 96.9% / 98.4%, mean KL
    3.1e-3 / 2.1e-3. Asserted: >= 95% and KL < 1e-2. int4 re-quantizes the 5/6/8-bit
    tensors (round to nearest, group 32): measured 81.6% / 73.4%, asserted >= 70%. (int8 keeps
    these files' tensors as they are, the same graph as auto; a tiny pipeline tests it.)"""
    source = request.getfixturevalue(model)
    n = source.num_layers
    ids = ids_of(source, 256)
    ref = request.getfixturevalue("fp32_logits")(model)
    if model == "smollm2":  # Gemma 3's fp32 graph is checked exactly on the tiny model; its
        # 1 GB of fp32 initializers cost ~45 s to build here
        fp32 = all_logits([load_shard("onnxruntime", source, LayerRange.full(n), "float32")],
                          ids)
        np.testing.assert_allclose(fp32, ref, atol=2e-3, rtol=1e-3)
    f = _log_softmax(ref)
    for precision, floor in (("auto", 0.95), ("int4", 0.70)):
        shard = load_shard("onnxruntime", source, LayerRange.full(n), precision)
        q = _log_softmax(all_logits([shard], ids))
        agree = (q.argmax(-1) == f.argmax(-1)).mean()
        kl = (np.exp(f) * (f - q)).sum(-1).mean()
        print(f"{model} onnxruntime {precision}: top-1 agreement {agree:.3f}, mean KL {kl:.2e}, "
              f"re-quantized: {shard.requantized or 'nothing'}")
        assert agree >= floor, (precision, agree)
        if precision == "auto":
            assert kl < 1e-2


@needs_ort
@pytest.mark.real
@pytest.mark.skipif(not HAS_MLX, reason="mlx not installed")
def test_mixed_backend_pipeline_through_the_api(smollm2):
    """MLX, ONNX Runtime and torch stages in one pipeline give the torch-only greedy text."""
    n = smollm2.num_layers
    single = LocalEngine("smollm2-135m", [load_shard("torch", smollm2, LayerRange.full(n))],
                         smollm2.tokenizer, 2048)
    mixed = LocalEngine("smollm2-135m", [
        load_shard("mlx", smollm2, LayerRange(0, 10, n), "float32"),
        load_shard("onnxruntime", smollm2, LayerRange(10, 20, n), "float32"),
        load_shard("torch", smollm2, LayerRange(20, n, n))], smollm2.tokenizer, 2048)
    ask = dict(model="smollm2-135m", temperature=0, max_tokens=48,
               messages=[{"role": "user", "content": "Tell me about the moon."}])
    texts = []
    for engine in (single, mixed):
        with ServerThread(build_app(engine)) as srv:
            client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
            r = client.chat.completions.create(**ask)
            texts.append((r.choices[0].message.content, r.usage.completion_tokens))
    assert texts[1][1] >= 32 and texts[0] == texts[1]


def _greedy(shards, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens through a chain of shards, with each step's logits."""
    caches = [s.new_cache() for s in shards]
    data, tokens, logits = np.array(prompt, np.int32), [], []
    for _ in range(steps):
        x = data
        for s, c in zip(shards, caches):
            x = s.forward([StepItem("g", x, c)])[0]
        logits.append(x)
        tokens.append(int(x.argmax()))
        data = np.array([tokens[-1]], np.int32)
    return tokens, logits


@needs_ort
@pytest.mark.real
@pytest.mark.skipif(not HAS_MLX, reason="mlx not installed")
def test_three_backend_pipeline_in_the_files_own_precision(smollm2):
    """MLX and ONNX Runtime stages holding the file's own blocks and a torch stage (torch
    keeps float32 on a CPU: its int4/int8 CPU kernels ran 10-30x slower than its fp32 matmul
    on this AVX2 machine) give ONNX Runtime's greedy text for 32 tokens, or diverge only where
    the single backend's top two were a near tie. Each backend rounds differently (MLX keeps
    fp32 activations, ONNX Runtime's int8 ones), so a tie may break the other way; the
    first divergence and its margin are printed."""
    n = smollm2.num_layers
    prompt = smollm2.tokenizer.chat_prompt([{"role": "user", "content": "Tell me about the moon."}])
    one, ref_logits = _greedy([load_shard("onnxruntime", smollm2, LayerRange.full(n))], prompt,
                              32)
    three, _ = _greedy([load_shard("mlx", smollm2, LayerRange(0, 10, n), "auto"),
                        load_shard("onnxruntime", smollm2, LayerRange(10, 20, n), "auto"),
                        load_shard("torch", smollm2, LayerRange(20, n, n))], prompt, 32)
    first = next((i for i, (a, b) in enumerate(zip(one, three)) if a != b), None)
    if first is None:
        print("three backends: the same 32 greedy tokens as onnxruntime alone")
        return
    row = ref_logits[first]
    margin = float(row[one[first]] - row[three[first]])
    print(f"three backends diverge at token {first}: {one[first]} vs {three[first]}, "
          f"margin {margin:.3f} in the single backend's logits")
    assert margin < 0.5, (first, margin)


@needs_ort
def test_mixed_quantization_across_nodes(tiny_models, tmp_path, monkeypatch):
    """One node holds int4 layers, another int8 (each node's --dtype), in one pipeline."""
    import asyncio

    from mesh.devices import detect_local
    from mesh.engine.base import GenerationRequest
    from mesh.engine.sampling import SamplingParams
    from mesh.pipeline.engine import PipelineEngine, RemoteStage
    from mesh.node.service import NodeService, create_server
    from mesh.node.runner import StageRunner
    from tests.test_pipeline import load_remote

    monkeypatch.setenv("MESH_HOME", str(tmp_path))
    ref = str(tiny_models["llama"])
    servers, stages, runners = [], [], []
    try:
        for dtype, rng in (("int4", LayerRange(0, 2, 4)), ("int8", LayerRange(2, 4, 4))):
            runner = StageRunner("onnxruntime", default_dtype=dtype)
            server, port = create_server(NodeService(runner, detect_local("onnxruntime")),
                                         "127.0.0.1", 0, "s" * 16)
            servers.append(server)
            runners.append(runner)
            load_remote(f"127.0.0.1:{port}", ref, rng, secret="s" * 16)
            stages.append(RemoteStage(dtype, f"127.0.0.1:{port}", "s" * 16, rng))
        assert [r.shard.precision for r in runners] == ["int4", "int8"]
        source = resolve(ref)
        engine = PipelineEngine("m", stages, source.tokenizer, 256)

        async def go():
            gen = engine.generate(GenerationRequest("q", list(range(5, 25)), 8,
                                                    SamplingParams(temperature=0.0)))
            out = [s.token_id async for s in gen]
            await gen.aclose()
            await engine.close()
            return out

        assert len(asyncio.run(go())) == 8
    finally:
        for s in servers:
            s.stop(grace=None)


@needs_ort
def test_provider_flag_reaches_the_session(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("MESH_ORT_PROVIDER", "cpu")
    shard = load_shard("onnxruntime", resolve(str(tiny_models["llama"])), LayerRange(0, 4, 4),
                       cache_dir=tmp_path)
    assert shard.session.get_providers() == ["CPUExecutionProvider"]
    monkeypatch.setenv("MESH_ORT_PROVIDER", "tensorrt")
    with pytest.raises(BackendUnavailable, match="TensorrtExecutionProvider"):
        load_shard("onnxruntime", resolve(str(tiny_models["llama"])), LayerRange(0, 4, 4),
                   cache_dir=tmp_path)
