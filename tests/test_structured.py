"""Structured outputs, tool calls, n > 1 and best_of through the official openai client, on
the real shipped models; the grammar's mask through a pipeline's wire and an ensemble's merge."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from mesh.engine.local import build_local_engine
from mesh.server.app import build_app
from tests.conftest import ServerThread

pytestmark = pytest.mark.real

_STR, _INT = {"type": "string", "maxLength": 40}, {"type": "integer", "minimum": 0,
                                                   "maximum": 100000}


def _obj(props: dict, required=None) -> dict:
    return {"type": "object", "properties": props,
            "required": list(props) if required is None else required,
            "additionalProperties": False}


# (prompt, schema): nested objects, enums, arrays, optional fields, numbers, booleans, consts
SCHEMAS = [
    ("Describe Paris.", _obj({"city": _STR, "country": _STR})),
    ("Give a person's name and age.", _obj({"name": _STR, "age": _INT})),
    ("Is the sky blue?", _obj({"answer": {"type": "boolean"}})),
    ("Pick a primary color.", _obj({"color": {"enum": ["red", "green", "blue"]}})),
    ("List three fruits.", _obj({"fruits": {"type": "array", "items": _STR, "minItems": 1,
                                            "maxItems": 3}})),
    ("Describe a book.", _obj({"title": _STR, "author": _obj({"first": _STR, "last": _STR})})),
    ("Rate a movie from 1 to 5.", _obj({"movie": _STR, "stars": {"type": "integer",
                                                                "minimum": 1, "maximum": 5}})),
    ("Give a temperature reading.", _obj({"celsius": {"type": "number", "minimum": -50,
                                                      "maximum": 60, "multipleOf": 0.1}})),
    ("Describe a dog.", _obj({"name": _STR, "breed": _STR, "good": {"type": "boolean"}},
                             required=["name"])),
    ("Name two planets.", _obj({"planets": {"type": "array", "maxItems": 2, "items": _obj(
        {"name": _STR, "rings": {"type": "boolean"}})}})),
    ("Classify the sentence 'I love it'.", _obj({"sentiment": {
        "enum": ["positive", "negative", "neutral"]}, "confidence": {"enum": [1, 2, 3]}})),
    ("Give an address.", _obj({"street": _STR, "zip": {"type": "string",
                                                       "pattern": "^[0-9]{5}$"}})),
    ("Say hello.", _obj({"kind": {"const": "greeting"}, "text": _STR})),
    ("Describe a car.", _obj({"make": _STR, "year": {"type": "integer", "minimum": 1900,
                                                     "maximum": 2030}})),
    ("What is 2+2?", _obj({"result": _INT})),
    ("Describe the weather.", _obj({"sky": {"enum": ["clear", "cloudy", "rain"]},
                                    "wind": _obj({"speed": _INT, "dir": {
                                        "enum": ["N", "E", "S", "W"]}})})),
    ("List two colors with hex codes.", _obj({"colors": {"type": "array", "maxItems": 2,
                                                         "items": _obj({"name": _STR, "hex": {
                                                             "type": "string", "pattern":
                                                             "^#[0-9a-f]{6}$"}})}})),
    ("Give a user profile.", _obj({"user": _obj({"id": _INT, "tags": {
        "type": "array", "maxItems": 3, "items": {"enum": ["admin", "dev", "ops"]}}})})),
    ("Translate 'cat' to French.", _obj({"source": _STR, "target": _STR,
                                         "lang": {"const": "fr"}})),
    ("Answer yes or no: is water wet?", {"anyOf": [_obj({"yes": {"type": "boolean"}}),
                                                    _obj({"no": {"type": "boolean"}})]}),
]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Current time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string",
                                                                 "maxLength": 40}},
                       "required": ["zone"]}}}]


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def served(request):
    engine = build_local_engine(request.param, context_length=2048, progress=False)
    with ServerThread(build_app(engine)) as srv:
        yield request.param, openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x",
                                           max_retries=0, timeout=300)


def _ask_json(client, model, prompt, schema, **kw):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt + " Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {
            "name": "answer", "schema": schema, "strict": True}},
        max_tokens=200, temperature=0, **kw).choices[0]


def test_json_schema_outputs_parse_and_validate(served):
    model, client = served
    schemas = SCHEMAS
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        choices = list(pool.map(lambda ps: _ask_json(client, model, *ps), schemas))
    for (prompt, schema), choice in zip(schemas, choices):
        assert choice.finish_reason == "stop", (prompt, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)
    # json_object: any JSON object
    choice = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Describe a cat in JSON."}],
        response_format={"type": "json_object"}, max_tokens=200, temperature=0).choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:  # cut by max_tokens: still a prefix of one object
        assert choice.message.content.startswith("{")


def test_json_schema_streamed_and_sampled(served):
    model, client = served
    prompt, schema = SCHEMAS[9]
    for seed in (1, 2, 3):
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], stream=True,
            response_format={"type": "json_schema", "json_schema": {"name": "x",
                                                                    "schema": schema}},
            max_tokens=200, temperature=1.0, seed=seed)
        text, finish = "", None
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), schema)


def test_openai_parse_with_a_pydantic_model(served):
    model, client = served

    class City(BaseModel):
        name: str
        country: str
        capital: bool

    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    out = parse(model=model, response_format=City, max_tokens=200, temperature=0,
                messages=[{"role": "user", "content": "Describe Paris as JSON."}])
    city = out.choices[0].message.parsed
    assert isinstance(city, City) and city.name


def _validate_call(call):
    spec = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    assert call.function.name in spec
    jsonschema.validate(json.loads(call.function.arguments), spec[call.function.name])


def test_required_and_named_tool_calls_then_a_second_turn(served):
    model, client = served
    ask = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
    r = client.chat.completions.create(model=model, messages=ask, tools=TOOLS,
                                       tool_choice="required", max_tokens=120, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        _validate_call(call)
        assert call.id.startswith("call_")
    # named: only that function, one call
    r = client.chat.completions.create(
        model=model, messages=ask, tools=TOOLS, max_tokens=120, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = r.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"]
    _validate_call(calls[0])
    # streamed: OpenAI's delta.tool_calls (index, id and name first, then argument pieces)
    stream = client.chat.completions.create(
        model=model, messages=ask, tools=TOOLS, tool_choice="required", stream=True,
        parallel_tool_calls=False, max_tokens=120, temperature=0)
    calls, finish = {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        finish = chunk.choices[0].finish_reason or finish
        for d in chunk.choices[0].delta.tool_calls or ():
            if d.id:
                assert d.index not in calls
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            calls[d.index]["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls" and len(calls) == 1
    first = choice.message.tool_calls[0]
    assert calls[0]["name"] == first.function.name
    assert json.loads(calls[0]["arguments"]) == json.loads(first.function.arguments)
    # the tool's result goes back in; the next turn answers in text
    turn2 = ask + [{"role": "assistant", "content": None,
                    "tool_calls": [first.model_dump()]},
                   {"role": "tool", "tool_call_id": first.id,
                    "content": json.dumps({"temperature": 18, "sky": "clear"})}]
    r = client.chat.completions.create(model=model, messages=turn2, tools=TOOLS,
                                       tool_choice="none", max_tokens=60, temperature=0)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


def test_n_choices_are_reproducible_and_all_counted(served):
    model, client = served

    def ask():
        return client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Name a color."}], n=3,
            seed=11, max_tokens=12, temperature=1.0, logprobs=True)

    a, b = ask(), ask()
    assert [c.index for c in a.choices] == [0, 1, 2]
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1  # three samples, not one copied
    one = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Name a color."}],
        seed=11, max_tokens=12, temperature=1.0)
    assert a.usage.completion_tokens == sum(len(c.logprobs.content) for c in a.choices)
    assert a.usage.prompt_tokens == one.usage.prompt_tokens
    # streamed: every index arrives and finishes
    finished = set()
    for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Name a color."}], n=3,
            seed=11, max_tokens=12, temperature=1.0, stream=True):
        for c in chunk.choices:
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1, 2}


def test_best_of_returns_the_most_likely_candidate(served):
    model, client = served
    r = client.completions.create(model=model, prompt="The capital of France is",
                                  max_tokens=6, temperature=1.0, seed=3, best_of=4, n=1,
                                  logprobs=0)
    assert len(r.choices) == 1
    assert r.usage.completion_tokens > len(r.choices[0].logprobs.tokens)  # 4 were generated
    mean = sum(r.choices[0].logprobs.token_logprobs) / len(r.choices[0].logprobs.tokens)
    others = client.completions.create(model=model, prompt="The capital of France is",
                                       max_tokens=6, temperature=1.0, seed=3, n=4, logprobs=0)
    best = max(sum(c.logprobs.token_logprobs) / len(c.logprobs.tokens) for c in others.choices)
    assert mean == pytest.approx(best, abs=1e-4)


def test_constraint_travels_through_a_pipeline_with_logit_bias():
    from mesh.pipeline.coordinator import build_pipeline_engine

    engine = build_pipeline_engine("smollm2-135m", local_nodes=1, secret="s" * 16,
                                   context_length=1024)
    try:
        assert engine.stages[-1].name != "coordinator"  # the last stage samples remotely
        with ServerThread(build_app(engine)) as srv:
            client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0,
                                   timeout=300)
            for prompt, schema in SCHEMAS[:4]:
                choice = _ask_json(client, engine.model_id, prompt, schema)
                assert choice.finish_reason == "stop"
                jsonschema.validate(json.loads(choice.message.content), schema)
            tok = engine.tokenizer
            plain = client.completions.create(model=engine.model_id, prompt="1, 2, 3,",
                                              max_tokens=1, temperature=0)
            first = tok.encode(plain.choices[0].text, add_special_tokens=False)[0]
            banned = client.completions.create(
                model=engine.model_id, prompt="1, 2, 3,", max_tokens=1, temperature=0,
                logit_bias={str(first): -100})
            assert banned.choices[0].text != plain.choices[0].text
    finally:
        asyncio.run(engine.close())


def test_logprob_bytes_rebuild_emoji_text(served):
    model, client = served
    schema = _obj({"e": {"const": "😀🎉 café 東京"}})  # the grammar makes the model write it
    choice = _ask_json(client, model, "Say it.", schema, logprobs=True, top_logprobs=2)
    content = choice.message.content
    assert "😀🎉 café 東京" in content
    tokens = choice.logprobs.content
    if choice.finish_reason == "stop":  # the end-of-turn token is scored, not written
        tokens = tokens[:-1]
    got = b"".join(bytes(t.bytes) for t in tokens)
    assert got == content.encode()
    for t in choice.logprobs.content:
        for alt in t.top_logprobs:
            assert alt.bytes is not None


def test_constraint_masks_an_ensemble_merge_and_pick_refuses_it():
    from mesh.ensemble.coordinator import build_ensemble_engine

    engine = build_ensemble_engine(["smollm2-135m", "smollm2-135m:2"], "merge",
                                   context_length=1024)
    try:
        with ServerThread(build_app(engine)) as srv:
            client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0,
                                   timeout=300)
            for prompt, schema in SCHEMAS[4:7]:
                choice = _ask_json(client, engine.model_id, prompt, schema)
                assert choice.finish_reason == "stop", choice.message.content
                jsonschema.validate(json.loads(choice.message.content), schema)
            r = client.chat.completions.create(
                model=engine.model_id, tools=TOOLS, tool_choice="required", max_tokens=120,
                temperature=0, messages=[{"role": "user", "content": "Time in Tokyo?"}])
            for call in r.choices[0].message.tool_calls:
                _validate_call(call)
    finally:
        asyncio.run(engine.close())
    pick = build_ensemble_engine(["smollm2-135m"], "pick", context_length=1024)
    try:
        with ServerThread(build_app(pick)) as srv:
            client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.BadRequestError) as err:
                _ask_json(client, pick.model_id, *SCHEMAS[0])
            assert err.value.body["param"] == "response_format"
    finally:
        asyncio.run(pick.close())


HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
You may call functions.
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for tc in message.tool_calls %}
<tool_call>{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}</tool_call>
{%- endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_a_template_that_renders_tools_gets_them(tmp_path, smollm2):
    import shutil

    from mesh.models.tokenizer import Tokenizer

    folder = tmp_path / "tok"
    shutil.copytree(smollm2.tokenizer_dir, folder)
    (folder / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    tok = Tokenizer.load(folder, "llama", set(smollm2.tokenizer.eos_token_ids))
    assert tok.renders_tools and not smollm2.tokenizer.renders_tools
    engine = build_local_engine("smollm2-135m", context_length=2048, progress=False)
    engine.tokenizer = tok  # same vocabulary, a template with tools
    with ServerThread(build_app(engine)) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0,
                               timeout=300)
        ask = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
        r = client.chat.completions.create(model=engine.model_id, messages=ask, tools=TOOLS,
                                           tool_choice="required", max_tokens=120,
                                           temperature=0, parallel_tool_calls=False)
        call = r.choices[0].message.tool_calls[0]
        _validate_call(call)
        turn2 = ask + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                       {"role": "tool", "tool_call_id": call.id, "content": "18 C, clear"}]
        r2 = client.chat.completions.create(model=engine.model_id, messages=turn2, tools=TOOLS,
                                            tool_choice="none", max_tokens=30, temperature=0)
        assert r2.choices[0].message.content
    # what the model saw: the template's own tool block and turns, not mesh's system text
    from mesh.server.tools import Tools, render_messages

    tools = Tools.from_request(TOOLS, "auto", None)
    msgs = render_messages(turn2, tools, native=True)
    text = tok.decode(tok.chat_prompt(msgs, tools.for_template()), skip_special_tokens=False)
    assert "<tools>" in text and '"name": "get_time"' in text
    assert "You can call these functions" not in text
    assert f'<tool_call>{{"name": "{call.function.name}", "arguments": {{' in text
    assert "<tool_response>\n18 C, clear\n</tool_response>" in text


def test_litellm_sees_schemas_tool_calls_and_errors(served, monkeypatch):
    """LiteLLM (``pip install -e ".[compat]"``) as an agent framework's client would use it."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch from the internet
    litellm = pytest.importorskip("litellm")
    model, client = served
    base = str(client.base_url).rstrip("/")
    prompt, schema = SCHEMAS[0]
    r = litellm.completion(model=f"openai/{model}", api_base=base, api_key="x", max_tokens=200,
                           temperature=0, messages=[{"role": "user", "content": prompt}],
                           response_format={"type": "json_schema", "json_schema": {
                               "name": "x", "schema": schema}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    stream = litellm.completion(model=f"openai/{model}", api_base=base, api_key="x",
                                max_tokens=120, temperature=0, tools=TOOLS, stream=True,
                                tool_choice="required", parallel_tool_calls=False,
                                messages=[{"role": "user", "content": "Weather in Paris?"}])
    calls = litellm.stream_chunk_builder(list(stream)).choices[0].message.tool_calls
    assert len(calls) == 1
    _validate_call(calls[0])
    with pytest.raises(litellm.BadRequestError):
        litellm.completion(model=f"openai/{model}", api_base=base, api_key="x", temperature=5,
                           messages=[{"role": "user", "content": "x"}])
