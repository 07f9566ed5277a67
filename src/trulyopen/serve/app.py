"""An OpenAI-compatible HTTP server over the inference engine.

    GET  /v1/models              the one model this server holds
    POST /v1/completions         text in, text out            (stream: server-sent events)
    POST /v1/chat/completions    messages through the tokenizer's chat template
    GET  /health                 ok, with the engine's load
    GET  /                       the chat page (chat.html)

The engine runs in one background thread; each HTTP request submits an engine request and reads
its events from an asyncio queue. Limits: body size, prompt tokens, max tokens, concurrent
requests (more wait in a bounded queue, then get 429) and time per request. A client that goes
away mid-answer cancels its request, which frees its slot at the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from trulyopen.infer.engine import Engine, Event
from trulyopen.infer.engine import Request as EngineRequest
from trulyopen.infer.sampling import SamplingParams
from trulyopen.serve.protocol import APIError, ChatRequest, CompletionRequest, parse


@dataclass
class Limits:
    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int | None = None  # default: the engine's length less one
    max_tokens: int = 1024  # the most a request may ask for; also the default when it asks none
    max_concurrent: int = 32  # requests decoding at once (the engine's slots)
    max_queue: int = 64  # requests waiting for a slot; one more gets 429 at once
    queue_timeout_s: float = 30.0  # a waiting request gets 429 after this long
    request_timeout_s: float = 300.0


class Admission:
    """At most `running` requests at once, `queue` more waiting (each at most `wait_s`), else 429."""

    def __init__(self, running: int, queue: int, wait_s: float):
        self.free, self.queue, self.wait_s, self.waiting = asyncio.Semaphore(running), queue, wait_s, 0

    async def acquire(self) -> None:
        if not self.free.locked():
            await self.free.acquire()
            return
        if self.waiting >= self.queue:
            raise APIError(429, "too many requests: the queue is full, try again later", "rate_limit_error")
        self.waiting += 1
        try:
            await asyncio.wait_for(self.free.acquire(), self.wait_s)
        except TimeoutError:
            raise APIError(429, "too many requests: no slot freed in time", "rate_limit_error") from None
        finally:
            self.waiting -= 1

    def release(self) -> None:
        self.free.release()


class Mailbox:
    """Events from the engine's thread to the event loop. Waking the loop costs a system call, so
    a step's events for every request go over together, with one wake-up, not one per event."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock, self.items, self.scheduled = loop, threading.Lock(), [], False

    def post(self, queue: asyncio.Queue, event: Event) -> None:
        with self.lock:
            self.items.append((queue, event))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, event in items:
            queue.put_nowait(event)


TIMEOUT = Event("", [], "timeout")  # put in a request's queue when its time is up


class Server:
    def __init__(self, engine: Engine, tokenizer, name: str, limits: Limits, api_key: str | None = None):
        from trulyopen.finetune.render import ChatRenderer, RenderError

        self.engine, self.tok, self.name, self.limits, self.api_key = engine, tokenizer, name, limits, api_key
        self.max_prompt = limits.max_prompt_tokens or engine.max_len - 1
        try:
            self.chat = ChatRenderer(tokenizer)
            self.chat_stops = self.chat.stop_ids()
        except RenderError:
            self.chat, self.chat_stops = None, ()
        self.admission: Admission | None = None
        self.mailbox: Mailbox | None = None
        self.created = int(time.time())

    # ------------------------------------------------------------------ one request
    def check_key(self, authorization: str | None) -> None:
        if self.api_key and authorization != f"Bearer {self.api_key}":
            raise APIError(401, "invalid API key", "invalid_request_error", code="invalid_api_key")

    def params(self, body, stop_ids: tuple[int, ...], prompt_len: int) -> SamplingParams:
        if body.model != self.name:
            raise APIError(
                404,
                f"the model '{body.model}' does not exist; this server has '{self.name}'",
                param="model",
                code="model_not_found",
            )
        if prompt_len > self.max_prompt:
            raise APIError(
                400,
                f"the prompt has {prompt_len} tokens; this server takes at most {self.max_prompt}",
                param="messages" if isinstance(body, ChatRequest) else "prompt",
                code="context_length_exceeded",
            )
        wanted = body.wanted_tokens()
        if wanted is not None and wanted > self.limits.max_tokens:
            raise APIError(
                400,
                f"max_tokens is {wanted}; this server allows at most {self.limits.max_tokens}",
                param="max_tokens",
                code="invalid_value",
            )
        return SamplingParams(
            max_new_tokens=wanted or self.limits.max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            repetition_penalty=body.repetition_penalty,
            stop_ids=() if body.ignore_eos else self._stops(stop_ids),
            stop_strings=body.stops(),
            seed=body.seed,
        )

    def _stops(self, stop_ids: tuple[int, ...]) -> tuple[int, ...]:
        eos = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        return tuple(sorted({*stop_ids, *eos}))

    def prompt_ids(self, body) -> tuple[list[int], tuple[int, ...]]:
        if isinstance(body, ChatRequest):
            if self.chat is None:
                raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions")
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            return self.chat.prompt(messages), self.chat_stops
        if isinstance(body.prompt, list):
            return list(body.prompt), ()
        ids = self.tok(body.prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        return ids, ()

    def submit(self, ids: list[int], params: SamplingParams) -> tuple[EngineRequest, asyncio.Queue]:
        queue, mailbox = asyncio.Queue(), self.mailbox
        req = EngineRequest(ids, params, lambda e: mailbox.post(queue, e))
        self.engine.submit(req)
        return req, queue

    async def events(self, req: EngineRequest, queue: asyncio.Queue, deadline: float):
        """The request's events until its last one; cancels the request if the caller stops early
        (a disconnected client) or the deadline (time.monotonic) passes."""
        # one timer per request (asyncio's clock is time.monotonic), not one per awaited event
        timer = asyncio.get_running_loop().call_at(deadline, queue.put_nowait, TIMEOUT)
        try:
            while True:
                event: Event = await queue.get()
                while event.finish_reason is None and not queue.empty():
                    # the client fell behind the engine: what it is owed goes out as one event
                    more = queue.get_nowait()
                    text, ids = event.text + more.text, event.token_ids + more.token_ids
                    event = Event(text, ids, more.finish_reason, more.error)
                if event.finish_reason == TIMEOUT.finish_reason:
                    raise APIError(504, "the request took longer than this server allows", "timeout")
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            timer.cancel()
            if req.finish_reason is None:
                self.engine.cancel(req)


def _sse(data) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def build_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        lim = server.limits
        server.admission = Admission(lim.max_concurrent, lim.max_queue, lim.queue_timeout_s)
        server.mailbox = Mailbox(asyncio.get_running_loop())
        server.engine.start()
        yield
        server.engine.stop()

    app = FastAPI(title="trulyopen", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/health")
    async def health():
        e = server.engine
        return {"status": "ok", "model": server.name, "running": len(e.running), "waiting": len(e.waiting)}

    @app.get("/")
    async def page():
        return FileResponse(Path(__file__).with_name("chat.html"))

    @app.get("/v1/models")
    async def list_models(request: Request):
        server.check_key(request.headers.get("authorization"))
        model = {"id": server.name, "object": "model", "created": server.created, "owned_by": "trulyopen"}
        return {"object": "list", "data": [model]}

    async def handle(request: Request, cls):
        server.check_key(request.headers.get("authorization"))
        size = int(request.headers.get("content-length") or 0)
        if size > server.limits.max_body_bytes:
            raise APIError(
                413,
                f"the request body has {size} bytes; this server takes at most "
                f"{server.limits.max_body_bytes}",
                code="body_too_large",
            )
        raw = await request.body()
        if len(raw) > server.limits.max_body_bytes:
            raise APIError(413, "the request body is too large", code="body_too_large")
        body = parse(cls, raw)
        ids, stops = server.prompt_ids(body)
        params = server.params(body, stops, len(ids))
        chat = cls is ChatRequest
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        deadline = time.monotonic() + server.limits.request_timeout_s
        await server.admission.acquire()
        try:
            req, queue = server.submit(ids, params)
        except ValueError as e:
            server.admission.release()
            raise APIError(400, str(e), code="context_length_exceeded") from None
        head = {"id": rid, "created": int(time.time()), "model": server.name}

        def usage():
            n = len(req.output)
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        if not body.stream:
            try:
                text, reason = [], None
                async for e in server.events(req, queue, deadline):
                    text.append(e.text)
                    reason = e.finish_reason
                    if await request.is_disconnected():
                        return None
            finally:
                server.admission.release()
            if reason == "error":
                raise APIError(500, f"generation failed: {req.error}", "server_error")
            content = "".join(text)
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": reason}
                if chat
                else {"index": 0, "text": content, "finish_reason": reason, "logprobs": None}
            )
            kind = "chat.completion" if chat else "text_completion"
            return {**head, "object": kind, "choices": [choice], "usage": usage()}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, reason: str | None, first: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
            return {**head, "object": kind, "choices": [choice]}

        async def stream():
            try:
                if chat:
                    yield _sse(chunk(None, None, first=True))
                async for e in server.events(req, queue, deadline):
                    if e.finish_reason == "error":
                        yield _sse(APIError(500, f"generation failed: {e.error}", "server_error").body())
                        break
                    if e.text or e.finish_reason:
                        yield _sse(chunk(e.text, e.finish_reason))
                if include_usage:
                    yield _sse({**head, "object": kind, "choices": [], "usage": usage()})
                yield _sse("[DONE]")
            except APIError as err:
                yield _sse(err.body())
            finally:
                server.admission.release()

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, ChatRequest)

    return app
