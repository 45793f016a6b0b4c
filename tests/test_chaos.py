"""The chaos benchmark's faults as tests: 8 concurrent greedy streams through the HTTP API,
a fault injected into real node processes, every stream ends with the undisturbed text or a
clean error (an error event then [DONE], or 503 + Retry-After before its first token), never
cut, and no request meanwhile gets a 5xx other than 503 + Retry-After. (The coordinator's
neighbour, a second fault, 100 streams under load and SIGTERM/SIGKILL are in test_rescue.)"""

from __future__ import annotations

from dataclasses import replace

import pytest

from benchmarks.chaos import FAULTS, run


@pytest.mark.real
# ("last" is in the benchmark; "two" kills the last stage with a middle one)
@pytest.mark.parametrize("fault", ["first", "two", "prefill-remote", "sigstop"])
def test_fault_cuts_no_stream(fault):
    # prompts of ~480 tokens, not the benchmark's ~2,150: still mid-prefill at the fault (8
    # of them take several seconds); with ~1,000 the test took 74-112 s and once, in CI,
    # failed (a slow replay, the known cost of this fault on 2 loaded cores)
    row = run(fault, replace(FAULTS[fault], facts=30), streams=8, tokens=32, baseline=False)
    assert row["cut"] == 0, row["outcomes"]
    assert row["bad5xx"] == 0
    assert row["same"] + row["error"] + row["differ"] == 8
    assert row["same"] >= 7, row["outcomes"]  # a rescue replays the same computations
    assert row["new"] is not None, "no new request was served within 120 s of the fault"
