"""The logic behind /v1/chat/completions and /v1/completions, on any ``Engine``."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from mesh.engine.base import Engine, GenerationRequest, TokenStep
from mesh.engine.sampling import SamplingParams
from mesh.engine.text import TextDelta, stream_text
from mesh.errors import (ContextLengthExceeded, EngineUnavailable, InvalidRequest, MeshError,
                         ModelNotFound)
from mesh.server import protocol as p

log = logging.getLogger(__name__)


def error_body(exc: MeshError) -> dict:
    return p.ErrorResponse(error=p.ErrorBody(
        message=exc.message, type=exc.error_type, param=exc.param, code=exc.code)).model_dump()


class OpenAIServing:
    def __init__(self, engine: Engine):
        self.engine = engine
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

    def _deltas(self, gen: GenerationRequest, stop: list[str]) -> AsyncIterator[TextDelta]:
        return _stoppable(stream_text(self.engine, gen, stop), self._stop)

    # ---- request -> GenerationRequest -------------------------------------------------------

    def _check_common(self, req: p._SamplingFields) -> None:
        if self.draining:
            raise EngineUnavailable("the server is shutting down", code="shutting_down",
                                    retry_after=10.0)
        if req.model != self.engine.model_id:
            raise ModelNotFound(f"model {req.model!r} does not exist; this server serves "
                                f"{self.engine.model_id!r}", param="model")
        if req.n != 1:
            raise InvalidRequest("only n=1 is supported", param="n")
        if len(req.stop_list()) > 4:
            raise InvalidRequest("at most 4 stop sequences", param="stop")
        self._refuse_unsupported(req)

    def _refuse_unsupported(self, req: p._SamplingFields) -> None:
        """What OpenAI defines and mesh cannot do yet is a 400 naming the field: a client
        must never get an answer that quietly ignored its tools or its JSON schema."""
        if req.tools:
            raise InvalidRequest("tool calling is not supported yet", param="tools")
        if req.tool_choice not in (None, "none"):
            raise InvalidRequest("tool_choice needs tools, which are not supported yet",
                                 param="tool_choice")
        if req.functions or req.function_call not in (None, "none"):
            raise InvalidRequest("function calling is not supported",
                                 param="functions" if req.functions else "function_call")
        fmt = (req.response_format or {}).get("type", "text")
        if fmt != "text":
            raise InvalidRequest(f"response_format {fmt!r} is not supported yet (only 'text')",
                                 param="response_format")
        if req.modalities and set(req.modalities) != {"text"}:
            raise InvalidRequest("only text output is supported", param="modalities")
        if req.audio:
            raise InvalidRequest("audio output is not supported", param="audio")
        if req.prediction:
            raise InvalidRequest("predicted outputs are not supported", param="prediction")
        if req.logit_bias and not self.engine.supports_logit_bias:
            raise InvalidRequest("logit_bias is not supported in this mode yet",
                                 param="logit_bias")
        if getattr(req, "best_of", None) not in (None, 1):
            raise InvalidRequest("best_of > 1 is not supported yet", param="best_of")
        for i, m in enumerate(getattr(req, "messages", None) or ()):
            if isinstance(m.content, list):
                for part in m.content:
                    if part.type != "text":
                        raise InvalidRequest(
                            f"content part type {part.type!r} is not supported: this model "
                            f"reads text only", param=f"messages[{i}].content")

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
            lp.top_logprobs.append({self._token(t): _finite(v) for t, v in (s.top_logprobs or [])})
            lp.text_offset.append(offset)
            offset += len(tok)
        return lp

    # ---- endpoints -------------------------------------------------------------------------

    async def chat(self, req: p.ChatCompletionRequest, raw: Request):
        self._check_common(req)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            prompt_ids = self.engine.tokenizer.chat_prompt(messages)
        except Exception as exc:  # a template that rejects the conversation (roles, order)
            raise InvalidRequest(f"the chat template rejected these messages: {exc}",
                                 param="messages") from exc
        max_tokens = req.max_completion_tokens or req.max_tokens
        want_lp = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs=true", param="top_logprobs")
        gen = self._generation(req, prompt_ids, max_tokens, want_lp, "messages")
        gen.messages = messages
        deltas = self._deltas(gen, req.stop_list())
        if req.stream:
            deltas = await _primed(deltas)
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(self._chat_chunks(req, gen, deltas, include_usage, want_lp is not None),
                        raw)
        text, steps, finish = await _collect(deltas, raw)
        return p.ChatCompletion(
            model=req.model,
            choices=[p.ChatChoice(message=p.AssistantMessage(content=text), finish_reason=finish,
                                  logprobs=self._chat_logprobs(steps) if want_lp is not None
                                  else None)],
            usage=_usage(gen, steps)).model_dump(exclude_none=False)

    async def _chat_chunks(self, req, gen, deltas: AsyncIterator[TextDelta], include_usage: bool,
                           want_lp: bool):
        cid, created = f"chatcmpl-{gen.request_id[:24]}", int(time.time())

        def chunk(delta: p.Delta, finish=None, logprobs=None, usage=None, choices=True):
            return p.ChatCompletionChunk(
                id=cid, created=created, model=req.model, usage=usage,
                choices=[p.ChatChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)]
                if choices else []).model_dump(exclude_none=True)

        yield chunk(p.Delta(role="assistant", content=""))
        all_steps: list[TokenStep] = []
        async for d in deltas:
            all_steps.extend(d.steps)
            if d.text or d.finish_reason:
                yield chunk(p.Delta(content=d.text or None), d.finish_reason,
                            self._chat_logprobs(d.steps) if want_lp else None)
        if include_usage:
            yield chunk(p.Delta(), usage=_usage(gen, all_steps), choices=False)

    async def completion(self, req: p.CompletionRequest, raw: Request):
        self._check_common(req)
        if req.echo:
            raise InvalidRequest("echo is not supported", param="echo")
        if req.suffix:
            raise InvalidRequest("suffix is not supported", param="suffix")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise InvalidRequest("only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = self.engine.tokenizer.encode(prompt)
        else:
            vocab = self.engine.tokenizer.vocab_size
            if any(t < 0 or t >= vocab for t in prompt):
                raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
            prompt_ids = list(prompt)
        gen = self._generation(req, prompt_ids, req.max_tokens, req.logprobs, "prompt")
        gen.prompt_text = prompt if isinstance(prompt, str) else None
        deltas = self._deltas(gen, req.stop_list())
        if req.stream:
            deltas = await _primed(deltas)
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(self._completion_chunks(req, gen, deltas, include_usage), raw)
        text, steps, finish = await _collect(deltas, raw)
        return p.Completion(
            model=req.model,
            choices=[p.CompletionChoice(
                text=text, finish_reason=finish,
                logprobs=self._completion_logprobs(steps, 0) if req.logprobs is not None
                else None)],
            usage=_usage(gen, steps)).model_dump()

    async def _completion_chunks(self, req, gen, deltas, include_usage: bool):
        cid, created = f"cmpl-{gen.request_id[:24]}", int(time.time())
        all_steps: list[TokenStep] = []
        offset = 0
        async for d in deltas:
            all_steps.extend(d.steps)
            if d.text or d.finish_reason:
                lp = (self._completion_logprobs(d.steps, offset)
                      if req.logprobs is not None else None)
                yield p.Completion(id=cid, created=created, model=req.model, choices=[
                    p.CompletionChoice(text=d.text, finish_reason=d.finish_reason, logprobs=lp)
                ]).model_dump(exclude_none=True)
                offset += len(d.text)
        if include_usage:
            yield p.Completion(id=cid, created=created, model=req.model, choices=[],
                               usage=_usage(gen, all_steps)).model_dump(exclude_none=True)


def _finite(x: float) -> float:
    """JSON has no -inf or NaN: OpenAI reports an impossible token at -9999."""
    return x if x == x and x > -9999.0 else -9999.0


def _usage(gen: GenerationRequest, steps: list[TokenStep]) -> p.Usage:
    n = len(steps)
    return p.Usage(prompt_tokens=len(gen.prompt_ids), completion_tokens=n,
                   total_tokens=len(gen.prompt_ids) + n)


async def _stoppable(deltas: AsyncIterator[TextDelta],
                     stop: asyncio.Event) -> AsyncIterator[TextDelta]:
    """``deltas`` until ``stop`` is set; then a 503-class error (an error event in a stream)."""
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while True:
            nxt = asyncio.ensure_future(deltas.__anext__())
            await asyncio.wait((nxt, stopped), return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                nxt.cancel()
                await asyncio.gather(nxt, return_exceptions=True)
                raise EngineUnavailable("the server shut down before this request finished",
                                        code="shutting_down", retry_after=10.0)
            try:
                d = nxt.result()
            except StopAsyncIteration:
                return
            yield d
    finally:
        stopped.cancel()
        await deltas.aclose()


async def _primed(deltas: AsyncIterator[TextDelta]) -> AsyncIterator[TextDelta]:
    """Wait for the first delta before the response starts, so what fails before any token
    (a full queue: 429, a re-plan: 503, a bad request) gets its own HTTP status rather than
    an error event inside a 200 stream."""
    try:
        first = await deltas.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        await deltas.aclose()
        raise

    async def rest():
        try:
            if first is not None:
                yield first
                async for d in deltas:
                    yield d
        finally:
            await deltas.aclose()

    return rest()


async def _collect(deltas: AsyncIterator[TextDelta], raw: Request):
    parts, steps, finish = [], [], None
    try:
        async for d in deltas:
            parts.append(d.text)
            steps.extend(d.steps)
            finish = d.finish_reason or finish
            if await raw.is_disconnected():
                log.info("client went away; stopping generation")
                break
    finally:
        await deltas.aclose()
    return "".join(parts), steps, finish


def _sse(chunks: AsyncIterator[dict], raw: Request) -> StreamingResponse:
    async def body():
        error = None
        try:
            async for c in chunks:
                yield f"data: {json.dumps(c)}\n\n"
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
