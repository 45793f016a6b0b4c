"""Wire codec round trips and the cluster-secret HMAC."""

from __future__ import annotations

import numpy as np
import pytest

from mesh.node import mesh_pb2
from mesh.node.auth import sign, verify
from mesh.node.codec import CodecError, from_tensor, to_tensor


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32])
def test_round_trip_exact(dtype):
    a = (np.random.default_rng(0).standard_normal((7, 576)) * 100).astype(dtype)
    t = to_tensor(a)
    assert t.dtype == np.dtype(dtype).name and list(t.shape) == [7, 576]
    b = from_tensor(mesh_pb2.Tensor.FromString(t.SerializeToString()))
    assert b.dtype == dtype and np.array_equal(a, b)


def test_bfloat16_round_trip_within_bf16_precision():
    a = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    t = to_tensor(a, "bfloat16")
    assert len(t.data) == a.size * 2
    b = from_tensor(t)
    assert b.dtype == np.float32
    np.testing.assert_allclose(b, a, rtol=2 ** -8)
    exact = np.array([1.0, -2.5, 0.0, 3.140625], np.float32)  # representable in bf16
    assert np.array_equal(from_tensor(to_tensor(exact, "bfloat16")), exact)


def test_bad_tensors_are_rejected():
    with pytest.raises(CodecError, match="unknown tensor dtype"):
        from_tensor(mesh_pb2.Tensor(data=b"\0" * 8, shape=[2], dtype="float64"))
    with pytest.raises(CodecError, match="needs 32 bytes"):
        from_tensor(mesh_pb2.Tensor(data=b"\0" * 8, shape=[2, 4], dtype="float32"))
    with pytest.raises(CodecError):
        from_tensor(mesh_pb2.Tensor(data=b"", shape=[1 << 20, 1 << 20], dtype="float32"))
    with pytest.raises(CodecError):  # zero bytes, but no array has this shape
        from_tensor(mesh_pb2.Tensor(data=b"", shape=[0, 1 << 40], dtype="float32"))
    with pytest.raises(CodecError):
        to_tensor(np.zeros(3, np.float64))


def test_hmac_tokens():
    tok = sign("secret", "/mesh.Node/Step", now=1000.0)
    assert verify("secret", "/mesh.Node/Step", tok, now=1001.0)
    assert not verify("other", "/mesh.Node/Step", tok, now=1001.0)
    assert not verify("secret", "/mesh.Node/Load", tok, now=1001.0)  # bound to the method
    assert not verify("secret", "/mesh.Node/Step", tok, now=2000.0)  # too old
    assert not verify("secret", "/mesh.Node/Step", "garbage", now=1000.0)
