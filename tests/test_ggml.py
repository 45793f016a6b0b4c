"""GGML blocks -> affine form, checked block by block against the gguf package's own
dequantization, on random blocks of every type and on the shipped models' tensors."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from mesh.models.ggml import (FORMATS, SYMMETRIC, dequantize, pack_bitstream, quantize_affine,
                              to_affine)

# where each block keeps its fp16 fields (random bytes there could be NaN or inf)
_F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
               "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    _, _, size, per = FORMATS[qtype]
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, size=(rows, cols // per, size), dtype=np.uint8)
    for at in _F16_FIELDS[qtype]:
        vals = rng.uniform(-0.05, 0.05, size=(rows, cols // per)).astype(np.float16)
        b[..., at:at + 2] = vals[..., None].view(np.uint8).reshape(rows, cols // per, 2)
    return b.reshape(rows, -1)


@pytest.mark.parametrize("qtype", sorted(FORMATS))
def test_affine_form_equals_gguf_dequantization(qtype):
    rows, cols = 6, 512
    blocks = random_blocks(qtype, rows, cols)
    ref = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype]).reshape(rows, cols)
    aff = to_affine(qtype, blocks, cols)
    bits, group = FORMATS[qtype][:2]
    assert aff.bits == bits and aff.group == group
    assert aff.q.max() < 2 ** bits
    assert aff.scales.shape == (rows, cols // group)
    np.testing.assert_allclose(aff.dequantize(), ref, rtol=1e-6, atol=1e-7)
    # a big tensor converts a chunk of rows at a time, and the pieces fit together; so does
    # the chunked float32 read
    parts = to_affine(qtype, blocks, cols, chunk=4)
    for a, b in ((parts.q, aff.q), (parts.scales, aff.scales), (parts.biases, aff.biases)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(dequantize(qtype, blocks, cols, chunk=4), aff.dequantize())


@pytest.mark.real
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_shipped_models_tensors_convert_exactly(model, request):
    source = request.getfixturevalue(model)
    reader = source.reader
    seen = set()
    for name in reader.names():
        q = reader.read_quantized(name)
        if q is None or q.qtype in seen:
            continue
        seen.add(q.qtype)
        rows = slice(0, 64)  # a slice of rows keeps the test quick on 262k-row embeddings
        aff = to_affine(q.qtype, q.blocks[rows], q.shape[1])
        ref = gguf.quants.dequantize(np.ascontiguousarray(q.blocks[rows]),
                                     gguf.GGMLQuantizationType[q.qtype]).reshape(64, -1)
        np.testing.assert_allclose(aff.dequantize(), ref, rtol=1e-6, atol=1e-7)
    assert seen, "no quantized tensors found"


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_bitstream_packing_is_mlx_layout(bits):
    mx = pytest.importorskip("mlx.core")
    rng = np.random.default_rng(bits)
    aff = quantize_affine(rng.normal(size=(8, 128)).astype(np.float32), bits, 32)
    packed = pack_bitstream(aff.q, bits)
    out = mx.dequantize(mx.array(packed), mx.array(aff.scales), mx.array(aff.biases),
                        group_size=32, bits=bits)
    np.testing.assert_allclose(np.array(out), aff.dequantize(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [4, 40_000])  # 40,000 x 64: three chunks of rows
def test_requantize_keeps_error_within_half_a_step(rows):
    w = np.random.default_rng(1).normal(size=(rows, 64)).astype(np.float32)
    aff = quantize_affine(w, 8, 32)
    step = aff.scales.repeat(32, axis=1)
    assert np.all(np.abs(aff.dequantize() - w) <= step / 2 + 1e-6)
    assert np.allclose(aff.biases, w.reshape(rows, 2, 32).min(-1))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_torch_int4_matmul_equals_the_gguf_dequantized_matmul(qtype):
    """The torch backend's ``--dtype int4`` holds a 4-bit type's blocks in torch's int4
    layout: its matmul equals ``gguf``'s dequantized weights' within float rounding, for one
    row (torch's int4 kernel) and for a batch (the weight unpacked from torch's layout)."""
    torch = pytest.importorskip("torch")
    from mesh.backends.torch import Int4Linear

    rows, cols = 64, 512
    blocks = random_blocks(qtype, rows, cols, seed=3)
    ref = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype]).reshape(rows, cols)
    lin = Int4Linear(to_affine(qtype, blocks, cols), torch.device("cpu"), torch.float32)
    assert lin.nbytes < 0.3 * ref.nbytes  # 4 bits and two fp32 numbers a group of 32
    x = torch.randn(8, cols, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(lin.dequantized().numpy(), ref, atol=1e-6, rtol=1e-6)
    want = (x.double() @ torch.from_numpy(ref).double().T).numpy()
    with torch.inference_mode():
        for got in (lin(x), torch.cat([lin(x[i:i + 1]) for i in range(8)])):
            # fp32 sums of 512 products: rounding relative to the largest output
            np.testing.assert_allclose(got.numpy(), want, atol=1e-5 * np.abs(want).max())


def test_torch_int4_on_cuda_takes_only_the_shapes_tinygemm_packs():
    """tinygemm packs k in tiles of 16 columns, 8, 4 or 2 tiles deep, and n in 8s: SmolLM2's
    576 columns take 4-deep tiles (8 fails to pack), a shape that packs no way stays in the
    8-bit container on CUDA, and the CPU's layout takes any shape."""
    torch = pytest.importorskip("torch")
    from mesh.backends.torch import Int4Linear

    assert [Int4Linear.k_tiles(k) for k in (2048, 576, 1536, 96, 48)] == [8, 4, 8, 2, None]
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert Int4Linear.fits((1536, 576), cuda) and Int4Linear.fits((49152, 2048), cuda)
    assert not Int4Linear.fits((1532, 576), cuda) and not Int4Linear.fits((64, 48), cuda)
    assert Int4Linear.fits((1532, 48), cpu)


def test_torch_auto_is_gguf_computed_in_the_devices_float():
    """auto holds the file's blocks like gguf on every device, and computes as gguf does:
    fp32 on a CPU, bf16 on CUDA (tinygemm's dtype); a float dtype is itself."""
    pytest.importorskip("torch")
    from mesh.backends.torch import resolve_dtype

    for device, float_dtype in (("cpu", "float32"), ("cuda", "bfloat16")):
        for dtype in ("auto", "gguf"):
            assert resolve_dtype(dtype, device) == ("gguf", float_dtype)
        assert resolve_dtype("int4", device) == ("int4", float_dtype)
        assert resolve_dtype("float16", device) == ("float16", "float16")


@pytest.mark.parametrize("qtype", sorted(FORMATS))
def test_torch_int8_container_matmul_equals_the_gguf_dequantized_matmul(qtype):
    """torch's ``--dtype gguf`` holds every type's blocks in 8-bit containers, the
    symmetric types (w = d * (q - 2^(bits-1))) without a bias: the weight it unpacks is
    ``gguf``'s dequantization exactly, and its matmul equals that weight's."""
    torch = pytest.importorskip("torch")
    from mesh.backends.torch import Int8Linear

    rows, cols = 64, 512
    blocks = random_blocks(qtype, rows, cols, seed=4)
    ref = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype]).reshape(rows, cols)
    lin = Int8Linear(to_affine(qtype, blocks, cols), torch.device("cpu"), torch.float32)
    group = FORMATS[qtype][1]
    symmetric = qtype in SYMMETRIC
    assert (lin.biases is None) == symmetric
    assert lin.nbytes == rows * cols * (1 + (4 if symmetric else 8) / group)
    np.testing.assert_array_equal(lin.dequantized().numpy(), ref)
    x = torch.randn(8, cols, generator=torch.Generator().manual_seed(0))
    want = (x.double() @ torch.from_numpy(ref).double().T).numpy()
    with torch.inference_mode():
        for got in (lin(x), torch.cat([lin(x[i:i + 1]) for i in range(8)])):
            # fp32 sums of 512 products: rounding relative to the largest output
            np.testing.assert_allclose(got.numpy(), want, atol=1e-5 * np.abs(want).max())
