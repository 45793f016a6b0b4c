"""The logic behind /v1/chat/completions and /v1/completions, on any ``Engine``."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from mesh.engine.base import Engine, GenerationRequest, TokenStep
from mesh.engine.constraint import Constraint, response_format_grammar
from mesh.engine.sampling import SamplingParams
from mesh.engine.text import TextDelta, stream_text
from mesh.errors import (ContextLengthExceeded, EngineUnavailable, InvalidRequest, MeshError,
                         ModelNotFound)
from mesh.server import protocol as p
from mesh.server.tools import ToolCallParser, Tools, render_messages

log = logging.getLogger(__name__)

# Tokenizers rarely give a token more than a few characters; 64 per token of context is a
# bound no real prompt reaches, and refusing past it costs no tokenization at all.
MAX_CHARS_PER_TOKEN = 64
INLINE_CHARS = 16_384  # shorter texts tokenize in well under a millisecond: no thread hop


def error_body(exc: MeshError) -> dict:
    return p.ErrorResponse(error=p.ErrorBody(
        message=exc.message, type=exc.error_type, param=exc.param, code=exc.code)).model_dump()


# a stream whose next token takes longer than this sends an SSE comment meanwhile, and one
# whose first token takes longer starts anyway (its status is then 200 and a later error is
# an error event): a client's read timeout never fires on a request that is only waiting
# (behind long prompts, on a re-plan)
KEEPALIVE = 10.0


class OpenAIServing:
    def __init__(self, engine: Engine, metrics=None, keepalive: float = KEEPALIVE):
        self.engine = engine
        self.metrics = metrics  # mesh.server.metrics.Metrics, or None
        self.keepalive = keepalive  # seconds; 0: never (a stream waits for its first token)
        self.draining = False
        self._stop = asyncio.Event()  # set when a drain's grace is over: streams end now

    def begin_drain(self, grace: float) -> None:
        """Shutdown, first half: refuse new requests (503 + Retry-After) and give running ones
        ``grace`` seconds to finish; whatever still runs then ends with an error event."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: %.0f s for running requests to finish", grace)
        asyncio.get_running_loop().call_later(grace, self._stop.set)

    def _deltas(self, gen: GenerationRequest, stop: list[str], raw: Request
                ) -> AsyncIterator[TextDelta]:
        deltas = _stoppable(stream_text(self.engine, gen, stop), self._stop)
        if self.metrics is None:
            return deltas
        started = time.perf_counter()
        rid = getattr(raw.state, "request_id", gen.request_id)
        endpoint = raw.url.path

        def log_line(tokens: int, finish: str) -> None:  # one line per request
            log.info("request %s %s prompt=%d completion=%d %.2fs %s", rid, endpoint,
                     len(gen.prompt_ids), tokens, time.perf_counter() - started, finish)

        return self.metrics.observe(deltas, endpoint, started, len(gen.prompt_ids), log_line)

    # ---- request -> GenerationRequest -------------------------------------------------------

    def _check_common(self, req: p._SamplingFields) -> None:
        if self.draining:
            raise EngineUnavailable("the server is shutting down", code="shutting_down",
                                    retry_after=10.0)
        if req.model != self.engine.model_id:
            raise ModelNotFound(f"model {req.model!r} does not exist; this server serves "
                                f"{self.engine.model_id!r}", param="model")
        if len(req.stop_list()) > 4:
            raise InvalidRequest("at most 4 stop sequences", param="stop")
        self._refuse_unsupported(req)

    def _refuse_unsupported(self, req: p._SamplingFields) -> None:
        """What OpenAI defines and mesh cannot do is a 400 naming the field: a client must
        never get an answer that quietly ignored part of its request."""
        if req.functions or req.function_call not in (None, "none"):
            raise InvalidRequest("the deprecated functions/function_call are not supported; "
                                 "use tools and tool_choice",
                                 param="functions" if req.functions else "function_call")
        if req.modalities and set(req.modalities) != {"text"}:
            raise InvalidRequest("only text output is supported", param="modalities")
        if req.audio:
            raise InvalidRequest("audio output is not supported", param="audio")
        if req.prediction:
            raise InvalidRequest("predicted outputs are not supported", param="prediction")
        for i, m in enumerate(getattr(req, "messages", None) or ()):
            if isinstance(m.content, list):
                for part in m.content:
                    if part.type != "text":
                        raise InvalidRequest(
                            f"content part type {part.type!r} is not supported: this model "
                            f"reads text only", param=f"messages[{i}].content")
        constrained = req.tools and req.tool_choice != "none" or \
            (req.response_format or {}).get("type", "text") != "text"
        if constrained and not self.engine.supports_constraints:
            raise InvalidRequest("structured outputs and tool calls need one vocabulary to "
                                 "constrain; this ensemble's members tokenize differently "
                                 "(use --strategy merge)",
                                 param="tools" if req.tools else "response_format")

    def _logit_bias(self, req: p._SamplingFields) -> tuple[tuple[int, float], ...]:
        out = []
        vocab = self.engine.tokenizer.vocab_size
        for key, bias in (req.logit_bias or {}).items():
            try:
                tid = int(key)
            except ValueError:
                raise InvalidRequest(f"logit_bias keys are token ids; got {key!r}",
                                     param="logit_bias") from None
            if not 0 <= tid < vocab:
                raise InvalidRequest(f"logit_bias token id {tid} is outside [0, {vocab})",
                                     param="logit_bias")
            if not -100 <= bias <= 100:
                raise InvalidRequest("logit_bias values must be in [-100, 100]",
                                     param="logit_bias")
            out.append((tid, float(bias)))
        return tuple(out)

    async def _tokenize(self, chars: int, param: str, fn, *args) -> list[int]:
        """Tokenize without stalling the event loop: a text that cannot fit the context at
        any plausible token length is refused untokenized; a long one is tokenized on a
        worker thread, so /health and other streams keep being served."""
        ctx = self.engine.context_length
        if chars > ctx * MAX_CHARS_PER_TOKEN:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {ctx} tokens; the prompt has "
                f"{chars} characters, more than {MAX_CHARS_PER_TOKEN} per token of context",
                param=param)
        if chars <= INLINE_CHARS:
            return fn(*args)
        return await asyncio.to_thread(fn, *args)

    def _generation(self, req: p._SamplingFields, prompt_ids: list[int], max_tokens: int | None,
                    logprobs: int | None, prompt_param: str) -> GenerationRequest:
        ctx = self.engine.context_length
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty", param=prompt_param)
        if len(prompt_ids) >= ctx:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {ctx} tokens; the prompt has "
                f"{len(prompt_ids)} tokens", param=prompt_param)
        room = ctx - len(prompt_ids)
        if max_tokens is not None and max_tokens > room:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {ctx} tokens; you requested "
                f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, "
                f"{max_tokens} for the completion)", param="max_tokens")
        sampling = SamplingParams(
            temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
            seed=req.seed if req.seed is None or req.seed >= 0 else None,  # < 0: random
            repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            logprobs=logprobs, logit_bias=self._logit_bias(req))
        return GenerationRequest(
            request_id=uuid.uuid4().hex, prompt_ids=prompt_ids,
            max_tokens=max_tokens if max_tokens is not None else room, sampling=sampling,
            stop_token_ids=frozenset(self.engine.tokenizer.eos_token_ids))

    # ---- logprobs formatting -------------------------------------------------------------

    def _token(self, tid: int) -> str:
        return self.engine.tokenizer.token_text(tid)

    def _top_dict(self, top: list[tuple[int, float]]) -> dict[str, float]:
        """The legacy shape keys alternatives by text: where two tokens share a text (byte
        tokens, duplicates), the likelier one's value is kept."""
        out: dict[str, float] = {}
        for t, v in top:
            key = self._token(t)
            out[key] = max(out.get(key, -1e30), _finite(v))
        return out

    def _bytes(self, tid: int) -> list[int]:
        """A token's own bytes (part of a UTF-8 character stays those bytes, not U+FFFD)."""
        return list(self.engine.tokenizer.token_bytes(tid))

    def _chat_logprobs(self, steps: list[TokenStep]) -> p.ChoiceLogprobs:
        out = []
        for s in steps:
            if s.logprob is None:
                continue
            tok = self._token(s.token_id)
            out.append(p.TokenLogprob(
                token=tok, logprob=_finite(s.logprob), bytes=self._bytes(s.token_id),
                top_logprobs=[p.TopLogprob(token=self._token(t), logprob=_finite(lp),
                                           bytes=self._bytes(t))
                              for t, lp in (s.top_logprobs or [])]))
        return p.ChoiceLogprobs(content=out)

    def _completion_logprobs(self, steps: list[TokenStep], offset: int) -> p.CompletionLogprobs:
        lp = p.CompletionLogprobs()
        for s in steps:
            if s.logprob is None:
                continue
            tok = self._token(s.token_id)
            lp.tokens.append(tok)
            lp.token_logprobs.append(_finite(s.logprob))
            lp.top_logprobs.append(self._top_dict(s.top_logprobs or []))
            lp.text_offset.append(offset)
            offset += len(tok)
        return lp

    # ---- endpoints -------------------------------------------------------------------------

    async def _choices(self, base: GenerationRequest, count: int,
                       grammar: str | None, param: str) -> list[GenerationRequest]:
        """``count`` requests for one prompt: seeds ``seed, seed + 1, ...`` (so n > 1 with a
        seed is reproducible), each with its own grammar state."""
        gens = []
        for i in range(count):
            seed = base.sampling.seed
            g = dataclasses.replace(
                base, request_id=uuid.uuid4().hex if i else base.request_id,
                sampling=dataclasses.replace(base.sampling, seed=None if seed is None
                                             else (seed + i) % 2 ** 64))
            if grammar is not None:  # the first one builds llguidance's vocabulary view: seconds
                g.constraint = await asyncio.to_thread(
                    Constraint, self.engine.tokenizer, grammar, param)
            gens.append(g)
        return gens

    async def _run(self, gens: list[GenerationRequest], stop: list[str], stream: bool,
                   raw: Request):
        """Start every choice; a stream waits for each one's first delta so that what fails
        before any token still gets its own HTTP status."""
        streams = [self._deltas(g, stop, raw) for g in gens]
        if not stream:
            return streams
        # all at once: each choice's prefill joins the same scheduler ticks
        primed = await asyncio.gather(*(_primed(d, self.keepalive) for d in streams),
                                      return_exceptions=True)
        failed = next((x for x in primed if isinstance(x, BaseException)), None)
        if failed is not None:
            for d, x in zip(streams, primed):
                if not isinstance(x, BaseException):
                    await d.aclose()  # the started generator (its unstarted wrapper cannot)
            raise failed
        return primed

    async def chat(self, req: p.ChatCompletionRequest, raw: Request):
        self._check_common(req)
        tools = Tools.from_request(req.tools, req.tool_choice, req.parallel_tool_calls)
        if tools is not None and (req.response_format or {}).get("type", "text") != "text":
            raise InvalidRequest("response_format cannot be combined with tools (the tool "
                                 "format is already constrained)", param="response_format")
        # a template that renders tools gets them (its model's own prompt format); any other
        # gets them described in the system message. The reply format is the same for both.
        native = tools is not None and self.engine.tokenizer.renders_tools
        messages = render_messages(
            [{"role": "system" if m.role == "developer" else m.role, "content": m.text(),
              "tool_calls": m.tool_calls, "tool_call_id": m.tool_call_id}
             for m in req.messages], tools, native)
        try:
            prompt_ids = await self._tokenize(
                sum(len(m.get("content") or "") for m in messages), "messages",
                self.engine.tokenizer.chat_prompt, messages,
                tools.for_template() if native else None)
        except MeshError:
            raise
        except Exception as exc:  # a template that rejects the conversation (roles, order)
            raise InvalidRequest(f"the chat template rejected these messages: {exc}",
                                 param="messages") from exc
        max_tokens = req.max_completion_tokens or req.max_tokens
        want_lp = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs=true", param="top_logprobs")
        base = self._generation(req, prompt_ids, max_tokens, want_lp, "messages")
        base.messages = messages
        grammar = tools.grammar() if tools else response_format_grammar(req.response_format)
        gens = await self._choices(base, req.n, grammar, "tools" if tools else "response_format")
        streams = await self._run(gens, req.stop_list(), req.stream, raw)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(self._chat_chunks(req, gens, streams, include_usage,
                                          want_lp is not None, tools), raw, self.keepalive)
        parsers = [ToolCallParser() if tools else None for _ in gens]
        results = await _collect_all(streams, raw, parsers)
        choices = []
        for i, (text, steps, finish) in enumerate(results):
            message = p.AssistantMessage(content=text)
            calls = parsers[i].complete_calls() if parsers[i] is not None else []
            if calls:
                message = p.AssistantMessage(content=None, tool_calls=[
                    p.ToolCall(id=c["id"], function=p.FunctionCall(
                        name=c["name"], arguments=c["arguments"])) for c in calls])
                finish = "tool_calls" if finish in ("stop", None) else finish
            choices.append(p.ChatChoice(
                index=i, message=message, finish_reason=finish,
                logprobs=self._chat_logprobs(steps) if want_lp is not None else None))
        return p.ChatCompletion(model=req.model, choices=choices,
                                usage=_usage(gens, [r[1] for r in results])
                                ).model_dump(exclude_none=False)

    async def _chat_chunks(self, req, gens, streams, include_usage: bool, want_lp: bool,
                           tools: Tools | None):
        cid, created = f"chatcmpl-{gens[0].request_id[:24]}", int(time.time())

        def chunk(i: int, delta: p.Delta, finish=None, logprobs=None, usage=None,
                  choices=True):
            return p.ChatCompletionChunk(
                id=cid, created=created, model=req.model, usage=usage,
                choices=[p.ChatChunkChoice(index=i, delta=delta, finish_reason=finish,
                                           logprobs=logprobs)]
                if choices else []).model_dump(exclude_none=True)

        for i in range(len(gens)):
            yield chunk(i, p.Delta(role="assistant", content=""))
        all_steps: list[list[TokenStep]] = [[] for _ in gens]
        parsers = [ToolCallParser() if tools else None for _ in gens]
        async for i, d in _merged(streams):
            all_steps[i].extend(d.steps)
            if not (d.text or d.finish_reason):
                continue
            content, calls, finish = d.text, None, d.finish_reason
            parser = parsers[i]
            if parser is not None:
                if parser.done:
                    continue  # this choice already ended (a repeated call)
                content, calls = parser.feed(d.text, final=finish is not None)
                if parser.done or (finish == "stop" and parser.calls):
                    finish = "tool_calls"
            yield chunk(i, p.Delta(content=content or None, tool_calls=calls or None), finish,
                        self._chat_logprobs(d.steps) if want_lp else None)
            if parsers[0] is not None and all(x.done for x in parsers):
                return  # closing the streams stops the generation
        if include_usage:
            yield chunk(0, p.Delta(), usage=_usage(gens, all_steps), choices=False)

    async def completion(self, req: p.CompletionRequest, raw: Request):
        self._check_common(req)
        if req.echo and req.stream:
            raise InvalidRequest("echo cannot be combined with stream", param="echo")
        if req.max_tokens == 0 and not req.echo:
            raise InvalidRequest("max_tokens 0 generates nothing: it needs echo (to score the "
                                 "prompt)", param="max_tokens")
        if req.echo and req.logprobs is not None and not self.engine.supports_scoring:
            raise InvalidRequest("scoring the prompt (echo with logprobs) is not supported "
                                 "by this engine's mode", param="echo")
        if req.suffix:
            raise InvalidRequest("suffix is not supported", param="suffix")
        if req.tools or req.tool_choice not in (None, "none"):
            raise InvalidRequest("tools are a chat feature: use /v1/chat/completions",
                                 param="tools" if req.tools else "tool_choice")
        best_of = req.best_of or req.n
        if best_of < req.n:
            raise InvalidRequest("best_of must be at least n", param="best_of")
        if best_of > req.n and req.stream:
            raise InvalidRequest("best_of > n cannot be streamed (the best are known at the "
                                 "end)", param="best_of")
        prompt = req.prompt
        batch = isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list))
        if batch and len(prompt) > 1:
            return await self._completion_batch(req, raw)
        if batch:
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = await self._tokenize(len(prompt), "prompt",
                                              self.engine.tokenizer.encode, prompt)
        else:
            vocab = self.engine.tokenizer.vocab_size
            if any(t < 0 or t >= vocab for t in prompt):
                raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
            prompt_ids = list(prompt)
        # best_of ranks candidates by their tokens' log-probabilities: ask for them
        lp = req.logprobs if best_of == req.n else max(req.logprobs or 0, 0)
        if req.echo and req.max_tokens == 0 and req.logprobs is None:  # nothing to compute
            return p.Completion(model=req.model, choices=[
                p.CompletionChoice(index=i, text=self._echo_text(prompt, prompt_ids),
                                   finish_reason="length") for i in range(req.n)],
                usage=p.Usage(prompt_tokens=len(prompt_ids), completion_tokens=0,
                              total_tokens=len(prompt_ids))).model_dump()
        # max_tokens 0 with echo: one token is generated (the prompt's scores come with it)
        # and dropped
        base = self._generation(req, prompt_ids, req.max_tokens or 1, lp, "prompt")
        base.prompt_text = prompt if isinstance(prompt, str) else None
        if req.echo and req.logprobs is not None:
            base.score_prompt = req.logprobs
        gens = await self._choices(base, best_of, response_format_grammar(req.response_format),
                                   "response_format")
        streams = await self._run(gens, req.stop_list(), req.stream, raw)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(self._completion_chunks(req, gens, streams, include_usage), raw,
                        self.keepalive)
        results = await _collect_all(streams, raw)
        order = list(range(len(results)))
        if best_of > req.n:  # OpenAI's "best": the highest log probability per token
            order.sort(key=lambda k: -sum(s.logprob or 0.0 for s in results[k][1])
                       / max(1, len(results[k][1])))
        choices = []
        if req.max_tokens == 0:  # scored only: the token that carried the scores is dropped
            results = [("", steps[:1], "length") for _, steps, _ in results]
        for i, k in enumerate(order[:req.n]):
            text, steps, finish = results[k]
            echoed = self._echo_text(prompt, prompt_ids) if req.echo else ""
            logprobs = None
            if req.logprobs is not None and req.echo:
                logprobs = self._echo_logprobs(prompt_ids, steps[0].prompt_scores if steps
                                               else None)
                more = self._completion_logprobs(steps if req.max_tokens else [],
                                                 len(echoed))
                for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    getattr(logprobs, field).extend(getattr(more, field))
            elif req.logprobs is not None:
                logprobs = self._completion_logprobs(steps, 0)
            choices.append(p.CompletionChoice(index=i, text=echoed + text,
                                              finish_reason=finish, logprobs=logprobs))
        usage = _usage(gens, [r[1] if req.max_tokens else [] for r in results])
        return p.Completion(model=req.model, choices=choices, usage=usage).model_dump()

    # ---- the tokenizer, over HTTP (vLLM's shapes; lm-evaluation-harness uses them) ------

    async def tokenize(self, req: p.TokenizeRequest) -> dict:
        self._check_model(req.model)
        tok = self.engine.tokenizer
        if req.messages is not None:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            try:
                ids = await self._tokenize(sum(len(m["content"] or "") for m in messages),
                                           "messages", tok.chat_prompt, messages)
            except MeshError:
                raise
            except Exception as exc:
                raise InvalidRequest(f"the chat template rejected these messages: {exc}",
                                     param="messages") from exc
        else:
            text = req.prompt if req.prompt is not None else req.content
            if text is None:
                raise InvalidRequest("give a prompt (or content, or messages)", param="prompt")
            ids = await self._tokenize(len(text), "prompt", lambda t: tok.encode(
                t, add_special_tokens=req.add_special_tokens), text)
        return {"count": len(ids), "max_model_len": self.engine.context_length, "tokens": ids}

    def detokenize(self, req: p.DetokenizeRequest) -> dict:
        self._check_model(req.model)
        vocab = self.engine.tokenizer.vocab_size
        if any(t < 0 or t >= vocab for t in req.tokens):
            raise InvalidRequest(f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": self.engine.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    def tokenizer_info(self) -> dict:
        return {**self.engine.tokenizer.info(), "model": self.engine.model_id,
                "model_max_length": self.engine.context_length}

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.engine.model_id:
            raise ModelNotFound(f"model {model!r} does not exist", param="model")

    def _echo_text(self, prompt, prompt_ids: list[int]) -> str:
        if isinstance(prompt, str):
            return prompt
        return self.engine.tokenizer.decode(prompt_ids, skip_special_tokens=False)

    def _echo_logprobs(self, prompt_ids: list[int], scores) -> p.CompletionLogprobs:
        """The prompt's tokens with their log-probs (None for the first, as OpenAI)."""
        if scores is None or len(scores) != len(prompt_ids) - 1:
            raise MeshError("the engine did not return the prompt's scores")
        lp, offset = p.CompletionLogprobs(), 0
        for i, tid in enumerate(prompt_ids):
            tok = self._token(tid)
            lp.tokens.append(tok)
            lp.text_offset.append(offset)
            offset += len(tok)
            if i == 0:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
                continue
            s = scores[i - 1]
            lp.token_logprobs.append(_finite(s.logprob))
            lp.top_logprobs.append(self._top_dict(s.top))
        return lp

    async def _completion_batch(self, req: p.CompletionRequest, raw: Request) -> dict:
        """Several prompts in one request (OpenAI's batch form): each runs as its own request,
        all at once; choices are numbered prompt by prompt."""
        if req.stream:
            raise InvalidRequest("a batch of prompts cannot be streamed", param="prompt")
        if len(req.prompt) > 64:
            raise InvalidRequest("at most 64 prompts per request", param="prompt")
        parts = await asyncio.gather(*(
            self.completion(req.model_copy(update={"prompt": one}), raw)
            for one in req.prompt))
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for part in parts:
            for c in part["choices"]:
                choices.append({**c, "index": len(choices)})
            for k in usage:
                usage[k] += part["usage"][k]
        return {**parts[0], "choices": choices, "usage": usage}

    async def _completion_chunks(self, req, gens, streams, include_usage: bool):
        cid, created = f"cmpl-{gens[0].request_id[:24]}", int(time.time())
        all_steps: list[list[TokenStep]] = [[] for _ in gens]
        offsets = [0] * len(gens)
        async for i, d in _merged(streams):
            all_steps[i].extend(d.steps)
            if d.text or d.finish_reason:
                lp = (self._completion_logprobs(d.steps, offsets[i])
                      if req.logprobs is not None else None)
                yield p.Completion(id=cid, created=created, model=req.model, choices=[
                    p.CompletionChoice(index=i, text=d.text, finish_reason=d.finish_reason,
                                       logprobs=lp)]).model_dump(exclude_none=True)
                offsets[i] += len(d.text)
        if include_usage:
            yield p.Completion(id=cid, created=created, model=req.model, choices=[],
                               usage=_usage(gens, all_steps)).model_dump(exclude_none=True)


def _finite(x: float) -> float:
    """JSON has no -inf or NaN: OpenAI reports an impossible token at -9999."""
    return x if x == x and x > -9999.0 else -9999.0


def _usage(gens: list[GenerationRequest], steps: list[list[TokenStep]]) -> p.Usage:
    """Every choice's tokens count (best_of candidates too), the prompt once."""
    n = sum(len(s) for s in steps)
    return p.Usage(prompt_tokens=len(gens[0].prompt_ids), completion_tokens=n,
                   total_tokens=len(gens[0].prompt_ids) + n,
                   prompt_tokens_details=p.PromptTokensDetails(
                       cached_tokens=max(g.cached_tokens for g in gens)))


async def _stoppable(deltas: AsyncIterator[TextDelta],
                     stop: asyncio.Event) -> AsyncIterator[TextDelta]:
    """``deltas`` until ``stop`` is set; then a 503-class error (an error event in a stream)."""
    stopped = asyncio.ensure_future(stop.wait())
    nxt = None
    try:
        while True:
            nxt = asyncio.ensure_future(deltas.__anext__())
            await asyncio.wait((nxt, stopped), return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                raise EngineUnavailable("the server shut down before this request finished",
                                        code="shutting_down", retry_after=10.0)
            try:
                d = nxt.result()
            except StopAsyncIteration:
                return
            yield d
    finally:
        stopped.cancel()
        await _cancel(nxt)  # cancelled mid-step (client gone, shutdown): the step's task
        await deltas.aclose()  # must end before the generator can be closed


async def _primed(deltas: AsyncIterator[TextDelta], patience: float = 0.0
                  ) -> AsyncIterator[TextDelta]:
    """Wait for the first delta before the response starts, so what fails before any token
    (a full queue: 429, a re-plan: 503, a bad request) gets its own HTTP status rather than
    an error event inside a 200 stream. With ``patience`` > 0, wait that long at most: a
    first token that takes longer (a request behind long prompts) is waited for inside the
    stream, which keeps the connection alive meanwhile (``_sse``)."""
    first = asyncio.ensure_future(deltas.__anext__())
    try:
        await asyncio.wait([first], timeout=patience or None)
    except BaseException:  # cancelled: the client went away
        await _cancel(first)
        await deltas.aclose()
        raise
    if first.done() and (first.cancelled() or not isinstance(
            first.exception(), (StopAsyncIteration, type(None)))):
        await deltas.aclose()
        first.result()  # raises what failed

    async def rest():
        try:
            try:
                yield await first  # done already, or still coming (past the patience)
            except StopAsyncIteration:
                return
            async for d in deltas:
                yield d
        finally:
            await _cancel(first)
            await deltas.aclose()

    return rest()


async def _cancel(task: asyncio.Future | None) -> None:
    """Cancel ``task`` and wait for it to end (a generator it runs can then be closed)."""
    if task is not None and not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _kept_alive(chunks: AsyncIterator[dict], every: float) -> AsyncIterator[dict | None]:
    """``chunks``, with None each time ``every`` seconds pass without one. (A task per
    chunk: ~30 us, under 0.5% of a core at 8 streams' ~160 tokens a second here.)"""
    nxt = None
    try:
        while True:
            nxt = asyncio.ensure_future(chunks.__anext__())
            while not (await asyncio.wait([nxt], timeout=every))[0]:
                yield None
            try:
                c = nxt.result()
            except StopAsyncIteration:
                return
            nxt = None
            yield c
    finally:
        await _cancel(nxt)


async def _collect(deltas: AsyncIterator[TextDelta], raw: Request,
                   parser: ToolCallParser | None = None):
    parts, steps, finish = [], [], None
    try:
        async for d in deltas:
            parts.append(d.text)
            steps.extend(d.steps)
            finish = d.finish_reason or finish
            if parser is not None:
                parser.feed(d.text, final=d.finish_reason is not None)
                if parser.done:  # a repeated call: the model loops, stop it
                    break
            if await raw.is_disconnected():
                log.info("client went away; stopping generation")
                break
    finally:
        await deltas.aclose()
    return "".join(parts), steps, finish


async def _collect_all(streams: list[AsyncIterator[TextDelta]], raw: Request,
                       parsers: list | None = None):
    """Every choice to its end; if one fails, the others are stopped and the error raised."""
    parsers = parsers or [None] * len(streams)
    tasks = [asyncio.ensure_future(_collect(d, raw, x)) for d, x in zip(streams, parsers)]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _merged(streams: list[AsyncIterator[TextDelta]]):
    """(choice index, delta) from several streams as they come; the first failure ends all."""
    if len(streams) == 1:  # the common case, without a task per token
        async for d in streams[0]:
            yield 0, d
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, deltas):
        try:
            async for d in deltas:
                await queue.put((i, d, None))
            await queue.put((i, None, None))
        except BaseException as exc:  # cancellation from below included: the caller decides
            await queue.put((i, None, exc))

    tasks = [asyncio.ensure_future(pump(i, d)) for i, d in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, d, exc = await queue.get()
            if exc is not None:
                raise exc
            if d is None:
                left -= 1
                continue
            yield i, d
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for d in streams:
            await d.aclose()


def _sse(chunks: AsyncIterator[dict], raw: Request, keepalive: float = 0.0
         ) -> StreamingResponse:
    """The chunks as server-sent events; with ``keepalive`` > 0, an SSE comment (which
    clients skip) whenever that many seconds pass without a chunk."""
    async def body():
        error = None
        try:
            async for c in (_kept_alive(chunks, keepalive) if keepalive > 0 else chunks):
                yield ": keep-alive\n\n" if c is None else f"data: {json.dumps(c)}\n\n"
        except MeshError as exc:  # after the first byte the status is sent: report in-band
            log.warning("stream ended with an error: %s", exc.message)
            error = exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the client went away: nobody to tell
            # a cancellation from below (a closed executor, a dropped call) is a failure of
            # this stream, not of the client: never cut the stream without saying so
            log.error("stream cancelled from below")
            error = MeshError("the stream was interrupted", code="stream_interrupted")
        except Exception:  # never truncate silently
            log.exception("stream failed")
            error = MeshError("internal error", code="internal_error")
        finally:
            try:
                await chunks.aclose()
            except Exception:
                log.exception("closing a stream failed")
        if error is not None:
            if error.code is None:
                error.code = error.error_type
            yield f"data: {json.dumps(error_body(error))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
