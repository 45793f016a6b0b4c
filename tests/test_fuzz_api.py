"""schemathesis against the served OpenAPI schema (the model pinned, bounded examples): no
5xx from any generated request, and every 4xx in OpenAI's error shape."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

schemathesis = pytest.importorskip("schemathesis")

from mesh.backends import load_shard  # noqa: E402
from mesh.engine.local import LocalEngine  # noqa: E402
from mesh.layers import LayerRange  # noqa: E402
from mesh.models.source import resolve  # noqa: E402
from mesh.server.app import build_app  # noqa: E402
from tests.conftest import ServerThread  # noqa: E402

KEY = "sk-fuzz"


@pytest.fixture(scope="module")
def api_schema(tiny_models):
    source = resolve(str(tiny_models["llama"]))
    shard = load_shard("onnxruntime", source, LayerRange.full(source.num_layers), "float32")
    engine = LocalEngine("tiny", [shard], source.tokenizer, 256)
    with ServerThread(build_app(engine, api_keys=[KEY])) as srv:
        yield schemathesis.openapi.from_url(srv.base_url + "/openapi.json",
                                            headers={"Authorization": f"Bearer {KEY}"})


def _check(case):
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = "tiny"  # pinned: a random model id is only ever a 404
        for field in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(field), int):
                case.body[field] = min(case.body[field], 8)
    response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert response.status_code < 500, (case.body, response.text[:500])
    if 400 <= response.status_code < 500:
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, response.text
    return response.status_code


def test_generated_requests_get_no_5xx_and_openai_errors(api_schema):
    seen = {}
    for result in api_schema.get_all_operations():
        op = result.ok()
        codes = seen.setdefault(op.label, set())

        @given(case=op.as_strategy())
        @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def run(case):
            codes.add(_check(case))

        run()
    # the generator reached the generation endpoints and got past validation at times
    assert {"POST /v1/chat/completions", "POST /v1/completions"} <= set(seen), seen
    assert any(c == 200 for c in seen["POST /v1/completions"]), seen
    print({k: sorted(v) for k, v in seen.items()})
