"""Prefix reuse to the token on the real quantized model: ONNX Runtime's prompt rows come out
bit for bit the same however a prompt is cut (pieces of two rows or more), so a chat's next
turn and users sharing a system prompt take over any prefix without changing a number."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from mesh.backends import StepItem, load_shard
from mesh.engine.base import GenerationRequest
from mesh.engine.local import LocalEngine
from mesh.engine.sampling import SamplingParams
from mesh.layers import LayerRange


@pytest.fixture(scope="module")
def shard(smollm2):
    return load_shard("onnxruntime", smollm2, LayerRange.full(smollm2.num_layers))


def _prompt(smollm2, text: str) -> list[int]:
    return smollm2.tokenizer.chat_prompt([{"role": "user", "content": text}])


def test_prompt_rows_are_the_same_however_the_prompt_is_cut(shard, smollm2):
    ids = np.array(smollm2.tokenizer.encode("The history of bridges is long. " * 30)[:150],
                   np.int32)
    assert shard.split_invariant

    def run(pieces):
        cache, pos, out = shard.new_cache(), 0, None
        for k in pieces:
            out = shard.forward([StepItem("a", ids[pos:pos + k], cache)])[0]
            pos += k
        cache.release()
        return out

    whole = run([150])
    for pieces in ([148, 2], [7, 141, 2], [2, 100, 48], [29, 121]):
        np.testing.assert_array_equal(run(pieces), whole, err_msg=str(pieces))
    # a one-row piece is what the scheduler never cuts: its matmul rounds otherwise
    assert not np.array_equal(run([149, 1]), whole)


def _req(prompt, n=8):
    return GenerationRequest(request_id=f"r{time.monotonic_ns()}", prompt_ids=list(prompt),
                             max_tokens=n, sampling=SamplingParams(temperature=0.0, logprobs=2))


def test_a_shared_system_prompt_is_taken_to_the_token_with_the_numbers_of_a_fresh_run(
        shard, smollm2):
    engine = LocalEngine("smollm2", [shard], smollm2.tokenizer, 2048)
    first = _prompt(smollm2, "Write a long essay about bridges.")
    second = _prompt(smollm2, "Write a long essay about tea.")
    common = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert 20 < common < 256  # the chat template's system prompt: less than one chunk

    async def run(prompt):
        req = _req(prompt)
        steps = [(s.token_id, s.logprob, s.top_logprobs) async for s in engine.generate(req)]
        return req, steps

    async def fresh(prompt):
        engine._kept.clear()  # nothing to reuse
        return await run(prompt)

    try:
        asyncio.run(run(first))
        req, reused = asyncio.run(run(second))
        want_req, want = asyncio.run(fresh(second))
        # a chat's next turn: the whole first exchange, reused to the token
        turn2 = second + [t for t, _, _ in want] + smollm2.tokenizer.encode(
            "<|im_end|>\n<|im_start|>user\nSay more.<|im_end|>\n<|im_start|>assistant\n",
            add_special_tokens=False)
        req2, reused2 = asyncio.run(run(turn2))
        want_req2, want2 = asyncio.run(fresh(turn2))
    finally:
        asyncio.run(engine.close())
    assert req.cached_tokens == common and want_req.cached_tokens == 0
    assert reused == want  # token ids, log-probs and alternatives, bit for bit
    assert req2.cached_tokens == len(second) and want_req2.cached_tokens == 0
    assert reused2 == want2
