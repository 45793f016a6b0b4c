"""lm-evaluation-harness against a running mesh server: its `local-completions` model with
the server's own tokenizer endpoints (no hub), a multiple-choice task built from local files,
for a local server and a merge ensemble; the log-likelihoods it reports equal those computed
from the models directly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mesh.backends import load_shard
from mesh.backends.base import StepItem
from mesh.engine.local import LocalEngine
from mesh.engine.sampling import log_softmax
from mesh.layers import LayerRange
from mesh.models.source import resolve
from mesh.server.app import build_app
from tests.conftest import ServerThread, make_tiny_model

lm_eval = pytest.importorskip("lm_eval")
pytestmark = pytest.mark.real

DOCS = [
    {"question": "The capital of France is", "choices": [" Paris", " Rome", " a fish"],
     "answer": 0},
    {"question": "Two plus two equals", "choices": [" four", " seven", " blue"], "answer": 0},
    {"question": "The sun rises in the", "choices": [" west", " east", " kitchen"],
     "answer": 1},
    {"question": "Water freezes at zero degrees", "choices": [" Celsius", " Kelvin"],
     "answer": 0},
]


def _task(folder):
    data = folder / "capitals.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "mesh_capitals.yaml").write_text(f"""task: mesh_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return folder


def _evaluate(base_url, model, task_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model="local-completions",
        model_args={"base_url": base_url + "/v1/completions", "model": model,
                    "tokenizer_backend": "remote", "num_concurrent": 1, "max_retries": 1},
        tasks=["mesh_capitals"], task_manager=TaskManager(include_path=str(task_dir)),
        batch_size=1, log_samples=True)


def _direct(score, tokenizer, context, continuation):
    """The continuation's log-likelihood as lm-eval splits it: the context's tokens, then
    what the whole text adds."""
    ctx = tokenizer.encode(context, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    lp = score(whole)
    return sum(float(lp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def _check(results, score, tokenizer):
    samples = results["samples"]["mesh_capitals"]
    assert len(samples) == len(DOCS)
    correct = 0
    for s in samples:
        got = [r[0][0] for r in s["resps"]]  # (loglikelihood, is_greedy) per choice
        want = [_direct(score, tokenizer, *a) for a in s["arguments"]]
        np.testing.assert_allclose(got, want, atol=2e-3)
        correct += int(np.argmax(want) == s["target"])
    acc = results["results"]["mesh_capitals"]["acc,none"]
    assert acc == pytest.approx(correct / len(DOCS))
    return acc


def _scorer(source, backend="onnxruntime", dtype="auto"):
    shard = load_shard(backend, source, LayerRange.full(source.num_layers), dtype)

    def score(ids):
        logits = shard.forward([StepItem("ref", np.asarray(ids, np.int32), shard.new_cache(),
                                         all_logits=True)])[0]
        return log_softmax(logits)
    return score


def test_lm_eval_on_a_local_server(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shard = load_shard("onnxruntime", smollm2, LayerRange.full(smollm2.num_layers))
    engine = LocalEngine("smollm2-135m", [shard], smollm2.tokenizer, 2048)
    with ServerThread(build_app(engine)) as srv:
        results = _evaluate(srv.base_url, "smollm2-135m", _task(tmp_path))
    acc = _check(results, _scorer(smollm2), smollm2.tokenizer)
    assert acc >= 0.5  # SmolLM2 knows most of these


def test_lm_eval_on_a_merge_ensemble(tiny_models, tmp_path, monkeypatch):
    from mesh.ensemble.coordinator import build_ensemble_engine

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a = str(tiny_models["llama"])
    b = str(make_tiny_model(tmp_path / "twin", "llama", seed=1))
    ens = build_ensemble_engine([f"{a}:1", f"{b}:3"], "merge", backend="torch",
                                dtype="float32")
    with ServerThread(build_app(ens)) as srv:
        results = _evaluate(srv.base_url, ens.model_id, _task(tmp_path))
    sa, sb = _scorer(resolve(a), "torch", "float32"), _scorer(resolve(b), "torch", "float32")

    def mixture(ids):
        return np.logaddexp(np.log(0.25) + sa(ids), np.log(0.75) + sb(ids))
    _check(results, mixture, resolve(a).tokenizer)
