"""An OpenAI-compatible HTTP server over the inference engine.

    GET  /v1/models              the one model this server holds
    POST /v1/completions         text in, text out            (stream: server-sent events)
    POST /v1/chat/completions    messages through the tokenizer's chat template (tools, JSON schemas)
    POST /v1/embeddings          the last hidden state, mean-pooled over each input's tokens
    GET  /health                 ok, with the engine's load
    GET  /                       the chat page (chat.html)

The engine runs in one background thread; each HTTP request submits an engine request and reads
its events from an asyncio queue. Limits: body size, prompt tokens, max tokens, concurrent
requests (more wait in a bounded queue, then get 429) and time per request, counted from its
arrival, so a client that trickles its body is cut off too (408). A client that goes away
mid-answer cancels its request, which frees its slot at the engine's next step.

Every error, the framework's own (404, 405, 500) included, is answered in OpenAI's format, and
/openapi.json describes the request bodies, so a schema-driven fuzzer can exercise them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException

from trulyopen.errors import UserError
from trulyopen.infer.engine import Engine, Event, Logprob, PromptTooLong
from trulyopen.infer.engine import Request as EngineRequest
from trulyopen.infer.sampling import SamplingParams
from trulyopen.infer.tool_calls import call_grammar, parse_calls
from trulyopen.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    ErrorResponse,
    NamedToolChoice,
    TraceRequest,
    parse,
)

# an assistant's tool call, as our chat template and Qwen's and Hermes' render it

# Below this, sampling is greedy: dividing float32 logits by a smaller temperature can overflow to
# inf, and NaN probabilities would fail every request in the engine's batch, not just this one.
MIN_TEMPERATURE = 1e-6


@dataclass
class Limits:
    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int | None = None  # default: the engine's length less one
    max_tokens: int = 1024  # the most a request may ask for; also the default when it asks none
    max_concurrent: int = 32  # requests decoding at once (the engine's slots)
    max_queue: int = 64  # requests waiting for a slot; one more gets 429 at once
    queue_timeout_s: float = 30.0  # a waiting request gets 429 after this long
    request_timeout_s: float = 300.0  # from the request's arrival: receiving its body, waiting, answering
    # images (vision-language models): http(s) image URLs are fetched only when allowed
    allow_image_urls: bool = False
    max_image_bytes: int = 20 * 1024 * 1024  # an image (data URL, file or download) larger is a 400


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
    def __init__(
        self, engine: Engine, tokenizer, name: str, limits: Limits, api_key: str | None = None, vlm=None
    ):
        """vlm: a vision-language model (vlm.generate.VLM) whose engine (vlm.generate.engine: ours
        or its generate() fallback) takes its processor's inputs: chat messages may then hold images."""
        from trulyopen.finetune.render import ChatRenderer, RenderError

        self.engine, self.tok, self.name, self.limits, self.api_key = engine, tokenizer, name, limits, api_key
        self.vlm = vlm
        self.max_prompt = limits.max_prompt_tokens or engine.max_len - 1
        # token ids a prompt may hold: 0 .. vocab-1, the rows of the embedding table
        self.vocab = engine.vocab_size
        try:
            self.chat = ChatRenderer(tokenizer)
            self.chat_stops = self.chat.stop_ids()
        except RenderError:
            self.chat, self.chat_stops = None, ()
        if vlm is not None:  # (the template is the processor's)
            from trulyopen.vlm.generate import stop_ids

            self.chat_stops = stop_ids(vlm.processor)
        self.grammars = None  # infer.constrain.Grammars, made on the first response_format
        self.grammar_cache: dict[str, str] = {}
        self.admission: Admission | None = None
        self.mailbox: Mailbox | None = None
        self.created = int(time.time())
        self.tracer = None  # trace.spans.Tracer where the model's run or release has a trace index
        self.no_trace = "this server's model has no trace index"  # why not, otherwise

    # ------------------------------------------------------------------ one request
    def check_key(self, authorization: str | None) -> None:
        if not self.api_key:
            return
        # constant time: how long a wrong key takes must not tell how much of it was right
        given, wanted = (authorization or "").encode(), f"Bearer {self.api_key}".encode()
        if not hmac.compare_digest(given, wanted):
            raise APIError(401, "invalid API key", "invalid_request_error", code="invalid_api_key")

    def check_model(self, model: str) -> None:
        if model != self.name:
            raise APIError(
                404,
                f"the model '{model}' does not exist; this server has '{self.name}'",
                param="model",
                code="model_not_found",
            )

    def params(self, body, stop_ids: tuple[int, ...], prompt_len: int) -> SamplingParams:
        self.check_model(body.model)
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
            temperature=body.temperature if body.temperature >= MIN_TEMPERATURE else 0.0,
            top_k=body.top_k,
            top_p=body.top_p,
            repetition_penalty=body.repetition_penalty,
            stop_ids=() if body.ignore_eos else self._stops(stop_ids),
            stop_strings=body.stops(),
            seed=body.seed,
            logprobs=body.wanted_logprobs(),
        )

    def grammar_of(self, body) -> str | None:
        """The grammar the answer is decoded under: a required or named tool's call, or the JSON
        that `response_format` asks for (None: free text)."""
        if self.tool_mode(body) in ("required", "named"):
            tools = self._tools(body)
            if isinstance(body.tool_choice, NamedToolChoice):
                tools = [t for t in tools if t.function.name == body.tool_choice.function.name]
            lark = call_grammar([(t.function.name, t.function.parameters) for t in tools])
            return self._compile(lark, "lark", "tools")
        fmt = body.response_format
        if fmt is None or fmt.type == "text":
            return None
        param = "response_format.json_schema.schema"
        if fmt.type == "json_object":
            schema = {"type": "object"}
        elif fmt.json_schema is None:
            raise APIError(
                400,
                "response_format.json_schema: required for type json_schema",
                param="response_format.json_schema",
            )
        else:
            schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {"type": "object"}
            _check_schema(schema, param)
        return self._compile(json.dumps(schema, sort_keys=True), "json_schema", param)

    def _compile(self, source: str, kind: str, param: str) -> str:
        """A grammar from a JSON schema's text or a Lark grammar, cached: agents send the same
        schemas again and again."""
        if (kind, source) not in self.grammar_cache:
            from trulyopen.infer.constrain import Grammars

            if self.grammars is None:
                self.grammars = Grammars(self.tok, self.vocab)
            build = (
                self.grammars.lark
                if kind == "lark"
                else lambda text: self.grammars.json_schema(json.loads(text))
            )
            try:
                self.grammar_cache[kind, source] = build(source)
            except ValueError as e:
                raise APIError(
                    400, f"{param}: the grammar library cannot compile it: {e}", param=param
                ) from None
        return self.grammar_cache[kind, source]

    def tool_mode(self, body) -> str | None:
        """None (no tools, or tool_choice none), auto, required or named."""
        if not isinstance(body, ChatRequest) or not body.tools or body.tool_choice == "none":
            if isinstance(body, ChatRequest) and body.tool_choice not in (None, "none") and not body.tools:
                raise APIError(400, "tool_choice: given without tools", param="tool_choice")
            return None
        if isinstance(body.tool_choice, NamedToolChoice):
            return "named"
        return body.tool_choice or "auto"

    def _tools(self, body) -> list:
        """The request's tools, checked: names unique, parameters a valid JSON schema, and a named
        tool_choice among them."""
        names = [t.function.name for t in body.tools]
        for i, t in enumerate(body.tools):
            _check_schema(t.function.parameters, f"tools.{i}.function.parameters")
            if names.index(t.function.name) != i:
                raise APIError(
                    400,
                    f"tools.{i}.function.name: '{t.function.name}' is given twice",
                    param=f"tools.{i}.function.name",
                )
        if isinstance(body.tool_choice, NamedToolChoice) and body.tool_choice.function.name not in names:
            name = body.tool_choice.function.name
            raise APIError(400, f"tool_choice: no tool is named '{name}'", param="tool_choice.function.name")
        return body.tools

    @staticmethod
    def calls_in(text: str) -> tuple[str | None, list[dict]]:
        """An answer's text, split into its content (None when only calls) and its tool calls in
        OpenAI's shape, each with an id and its arguments as a JSON string."""
        content, calls = parse_calls(text)
        return content, [
            {
                "id": "call_" + uuid.uuid4().hex[:24],
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
            }
            for name, arguments in calls
        ]

    def _stops(self, stop_ids: tuple[int, ...]) -> tuple[int, ...]:
        eos = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        return tuple(sorted({*stop_ids, *eos}))

    def prompt_ids(self, body) -> tuple[list[int], tuple[int, ...], dict | None]:
        """The prompt's token ids, the tokens that end its answer, and (a vision-language model's
        chat) the model's inputs: the ids with their images. Blocks while images are read: run it
        off the event loop for a VLM."""
        from jinja2 import TemplateError

        if isinstance(body, ChatRequest):
            if self.vlm is not None:
                return self.vision_prompt(body)
            if self.chat is None:
                raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions")
            for i, m in enumerate(body.messages):
                for j in m.image_parts():
                    where = f"messages.{i}.content.{j}"
                    message = f"{where}: {self.name} is a text model: it reads no images"
                    raise APIError(400, message, param=where)
            messages = [_message(m, i) for i, m in enumerate(body.messages)]
            tools = [t.model_dump(exclude_none=True) for t in self._tools(body)] if body.tools else None
            try:
                return self.chat.prompt(messages, tools), self.chat_stops, None
            except TemplateError as e:  # a template's raise_exception (roles must alternate, ...)
                raise APIError(
                    400, f"the chat template refused the messages: {e}", param="messages"
                ) from None
        if isinstance(body.prompt, list):
            ids = list(body.prompt)
            # an id past the embedding table would fail the forward of every request batched with it
            if any(i >= self.vocab for i in ids):
                raise APIError(400, f"token ids must be below the vocabulary's {self.vocab}", param="prompt")
        else:
            ids = self.tok(body.prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        return ids, (), None

    def vision_prompt(self, body: ChatRequest) -> tuple[list[int], tuple[int, ...], dict]:
        """A chat for a vision-language model: its images read (a bad one is a 400 naming its part)
        and the messages rendered by the processor's chat template."""
        from jinja2 import TemplateError

        from trulyopen.vlm import generate, images

        lim = self.limits
        limits = images.Limits(
            max_bytes=lim.max_image_bytes,
            allow_http=lim.allow_image_urls,
            timeout_s=min(images.Limits.timeout_s, lim.request_timeout_s),
        )
        messages = [_message(m, i, parts=True) for i, m in enumerate(body.messages)]
        tools = [t.model_dump(exclude_none=True) for t in self._tools(body)] if body.tools else None
        try:
            messages, pictures = generate.with_images(messages, limits)
            inputs = generate.prompt_inputs(self.vlm.processor, messages, pictures, tools)
        except images.BadImage as e:
            where = str(e).split(":", 1)[0] if str(e).startswith("messages") else "messages"
            raise APIError(400, str(e), param=where, code="invalid_image") from None
        except TemplateError as e:
            raise APIError(400, f"the chat template refused the messages: {e}", param="messages") from None
        return inputs["input_ids"][0].tolist(), self.chat_stops, inputs

    def submit(
        self, ids: list[int], params: SamplingParams, grammar: str | None = None, inputs: dict | None = None
    ) -> tuple[EngineRequest, asyncio.Queue]:
        queue, mailbox = asyncio.Queue(), self.mailbox
        req = EngineRequest(ids, params, lambda e: mailbox.post(queue, e), inputs=inputs)
        if grammar is not None:
            req.matcher = self.grammars.matcher(grammar)
        self.engine.submit(req)
        return req, queue

    def embedding_inputs(self, body) -> list[list[int]]:
        """Each input's token ids: texts are tokenized; ids are checked against the vocabulary."""
        raw = body.input
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]
        if not raw:
            raise APIError(400, "input: empty", param="input")
        inputs = []
        for i, x in enumerate(raw):
            ids = self.tok(x, add_special_tokens=False)["input_ids"] if isinstance(x, str) else list(x)
            if not ids or len(ids) > self.max_prompt or any(t >= self.vocab for t in ids):
                why = (
                    "empty"
                    if not ids
                    else f"longer than {self.max_prompt} tokens"
                    if len(ids) > self.max_prompt
                    else f"ids must be below {self.vocab}"
                )
                raise APIError(400, f"input.{i}: {why}", param=f"input.{i}")
            inputs.append(ids)
        return inputs

    def embed(self, inputs: list[list[int]]):
        """[inputs, hidden] float32: the model's last hidden state (after its final norm), averaged
        over each input's tokens. One input at a time: no padding to get wrong, and inputs are short."""
        import torch

        model = getattr(self.engine, "model", None)
        if model is None:
            raise APIError(400, "embeddings are served by the default engine only", param="model")
        device = next(model.parameters()).device
        out = []
        with torch.inference_mode():
            for ids in inputs:
                hidden = model.base_model(input_ids=torch.tensor([ids], device=device)).last_hidden_state
                out.append(hidden[0].float().mean(dim=0).cpu())
        return torch.stack(out)

    @staticmethod
    def choices(params: SamplingParams, n: int) -> list[SamplingParams]:
        """The sampling of each of `n` choices: with a seed, choice i samples with seed + i, so that
        n choices equal n single requests with those seeds."""
        if n == 1:
            return [params]
        return [replace(params, seed=None if params.seed is None else params.seed + i) for i in range(n)]

    async def merged(self, choices: list[tuple[EngineRequest, asyncio.Queue]], deadline: float):
        """(choice index, event) of every choice's events, as they come, until each one's last."""
        if len(choices) == 1:  # no task in between for the common case
            req, queue = choices[0]
            async for e in self.events(req, queue, deadline):
                yield 0, e
            return
        out: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, req: EngineRequest, queue: asyncio.Queue) -> None:
            try:
                async for e in self.events(req, queue, deadline):
                    out.put_nowait((i, e))
            except APIError as err:
                out.put_nowait((i, err))
            finally:
                out.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, *c)) for i, c in enumerate(choices)]
        try:
            left = len(tasks)
            while left:
                i, item = await out.get()
                if item is None:
                    left -= 1
                elif isinstance(item, APIError):
                    raise item
                else:
                    yield i, item
        finally:  # a caller that stops early (a client gone) cancels the choices still running
            for task in tasks:
                task.cancel()

    def _token(self, token: int) -> dict:
        text = self.tok.decode([token])
        return {"token": text, "bytes": list(text.encode())}

    def chat_logprobs(self, scored: list[Logprob]) -> dict:
        """OpenAI's chat form: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
        content = []
        for lp in scored:
            top = [{**self._token(t), "logprob": v} for t, v in lp.top]
            content.append({**self._token(lp.token), "logprob": lp.logprob, "top_logprobs": top})
        return {"content": content}

    def completion_logprobs(self, scored: list[Logprob]) -> dict:
        """OpenAI's legacy completions form: parallel lists, top_logprobs as {token: logprob}."""
        tokens = [self.tok.decode([lp.token]) for lp in scored]
        offsets = [sum(map(len, tokens[:i])) for i in range(len(tokens))]
        top = []  # {text: logprob}: tokens whose text is the same (half characters) keep the likeliest
        for lp in scored:
            top.append({})
            for t, v in lp.top:
                top[-1].setdefault(self.tok.decode([t]), v)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in scored],
            "top_logprobs": top,
            "text_offset": offsets,
        }

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
                    scored = (event.logprobs or []) + (more.logprobs or []) or None
                    event = Event(text, ids, more.finish_reason, more.error, scored)
                if event.finish_reason == TIMEOUT.finish_reason:
                    raise APIError(504, "the request took longer than this server allows", "timeout")
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            timer.cancel()
            if req.finish_reason is None:
                self.engine.cancel(req)


def _message(m, i: int, parts: bool = False) -> dict:
    """A message as chat templates take it (transformers' convention: a call's arguments a dict);
    with `parts`, a list content stays a list of parts (text and images, for a processor)."""
    from trulyopen.finetune.records import BadRecord, template_call

    content = m.text()
    if parts and isinstance(m.content, list):
        content = [part.model_dump(exclude_none=True) for part in m.content]
    out = {"role": m.role, "content": content}
    if m.tool_calls:
        calls = []
        for j, call in enumerate(m.tool_calls):
            try:
                calls.append(template_call(call.model_dump(), f"messages.{i}.tool_calls.{j}"))
            except BadRecord as e:
                raise APIError(400, str(e), param=e.field) from None
        out["tool_calls"] = calls
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _check_schema(schema: dict, param: str) -> None:
    """A 400 naming `param` (and the place inside it) unless `schema` is a valid JSON schema."""
    from jsonschema import Draft202012Validator, SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        raise APIError(
            400,
            f"{param}: not a valid JSON schema{f' at {where}' if where else ''}: {e.message}",
            param=param,
        ) from None


def _sse(data) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def _error(err: APIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class Disconnected(Exception):
    pass


class BodyGuard:
    """ASGI middleware that reads each request's whole body before the app sees it: at most
    max_body_bytes (413, as soon as it is over, whatever Content-Length said), and by the
    request's deadline (408). A client that trickles its body would otherwise hold a connection
    and a handler for as long as it likes: uvicorn bounds no body's time."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        lim = self.server.limits
        # the handler's request.state.deadline: one time for the whole request, from its arrival
        scope.setdefault("state", {})["deadline"] = time.monotonic() + lim.request_timeout_s
        close = {"connection": "close"}  # the rest of an unread body must not be read as a request
        try:
            async with asyncio.timeout(lim.request_timeout_s):
                body = await self._read(scope, receive, lim.max_body_bytes)
        except Disconnected:
            return
        except APIError as e:
            return await _error(e, close)(scope, receive, send)
        except TimeoutError:
            err = APIError(408, "the request body did not arrive in time", "timeout", code="request_timeout")
            return await _error(err, close)(scope, receive, send)

        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect, when the client goes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def _read(scope, receive, limit: int) -> bytes:
        def too_large(size: str) -> APIError:
            message = f"the request body has {size} bytes; this server takes at most {limit}"
            return APIError(413, message, code="body_too_large")

        declared = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > limit:
            raise too_large(declared)  # before reading any of it
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large(f"over {limit}")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


ERRORS = {  # for the OpenAPI schema: every error's body is an ErrorResponse
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "a bad request: the field is named in `param`",
        401: "a missing or wrong API key",
        404: "no such model",
        408: "the body took longer than the request's time",
        413: "the body is too large",
        429: "the server is full: try again later",
        500: "the generation failed",
        504: "the answer took longer than the request's time",
    }.items()
}


def _documented(cls: type) -> dict:
    """The OpenAPI entry of a completion route: its request body (the handler parses the body
    itself, to answer OpenAI-style errors, so FastAPI cannot see it), its answers and errors."""
    schema = {"$ref": f"#/components/schemas/{cls.__name__}"}
    body = {"required": True, "content": {"application/json": {"schema": schema}}}
    ok = {
        "description": "the answer (server-sent events when streamed)",
        "content": {"text/event-stream": {}},
    }
    return {"openapi_extra": {"requestBody": body}, "responses": {200: ok, **ERRORS}}


PAGE = Path(__file__).with_name("chat.html")


def _page_policy(html: str) -> str:
    """The chat page's Content-Security-Policy: only its own script runs (by hash) and it talks
    only to this server (the images it shows are the user's own attachments, as data URLs). The
    page writes model output as text, never as markup; this is the second line: were markup ever
    to slip in, no script or inline handler in it would run."""
    script = html.split("<script>", 1)[1].split("</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    return (
        f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


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
    app.add_middleware(BodyGuard, server=server)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return _error(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        # the framework's own: an unknown path (404), a wrong method (405, with its Allow header)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _error(APIError(exc.status_code, message), exc.headers)

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        # a bug: still an OpenAI error for the client (Starlette logs the traceback after this)
        return _error(APIError(500, f"internal error: {type(exc).__name__}", "server_error"))

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            ref = "#/components/schemas/{model}"
            _, defs = models_json_schema(
                [(m, "validation") for m in (CompletionRequest, ChatRequest)], ref_template=ref
            )
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(defs["$defs"])
            for name in ("CompletionRequest", "ChatRequest"):  # this server holds one model
                schemas[name]["properties"]["model"] = {"type": "string", "enum": [server.name]}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/health")
    async def health():
        e = server.engine
        running, waiting = len(e.running), len(e.waiting)
        trace = server.tracer is not None
        return {"status": "ok", "model": server.name, "running": running, "waiting": waiting, "trace": trace}

    page_headers = {"content-security-policy": _page_policy(PAGE.read_text())}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return FileResponse(PAGE, headers=page_headers)

    @app.get("/v1/models", responses={401: ERRORS[401]})
    async def list_models(request: Request):
        server.check_key(request.headers.get("authorization"))
        model = {"id": server.name, "object": "model", "created": server.created, "owned_by": "trulyopen"}
        return {"object": "list", "data": [model]}

    async def handle(request: Request, cls):
        server.check_key(request.headers.get("authorization"))
        body = parse(cls, await request.body())  # (BodyGuard has bounded its size and time)
        if server.vlm is not None:  # reading images (files, downloads) and the processor take time
            ids, stops, inputs = await asyncio.to_thread(server.prompt_ids, body)
        else:
            ids, stops, inputs = server.prompt_ids(body)
        params = server.params(body, stops, len(ids))
        grammar = server.grammar_of(body)  # a bad schema or tool is a 400 before any work
        chat = cls is ChatRequest
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        deadline = request.state.deadline
        await server.admission.acquire()
        try:
            choices = [server.submit(ids, p, grammar, inputs) for p in server.choices(params, body.n)]
        except ValueError as e:
            server.admission.release()
            code = "context_length_exceeded" if isinstance(e, PromptTooLong) else "invalid_value"
            raise APIError(400, str(e), code=code) from None
        head = {"id": rid, "created": int(time.time()), "model": server.name}
        logprobs = server.chat_logprobs if chat else server.completion_logprobs
        tools = server.tool_mode(body)

        def answer(text: str, reason: str | None) -> tuple[dict, str | None]:
            """The assistant's message, its tool calls parsed out of the text when tools were given.
            A required call cut off by max_tokens is no call and no content: nothing half-parsed."""
            if tools is None:
                return {"role": "assistant", "content": text}, reason
            if reason == "length" and tools in ("required", "named"):
                return {"role": "assistant", "content": None}, reason
            content, calls = server.calls_in(text)
            if not calls:
                return {"role": "assistant", "content": text}, reason
            return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"

        def usage():
            n = sum(len(req.output) for req, _ in choices)
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        if not body.stream:
            texts, reasons, scored = [[] for _ in choices], [None] * len(choices), [[] for _ in choices]
            try:
                async for i, e in server.merged(choices, deadline):
                    texts[i].append(e.text)
                    reasons[i] = e.finish_reason or reasons[i]
                    scored[i] += e.logprobs or []
                    if await request.is_disconnected():
                        return None
            finally:
                server.admission.release()
            for req, _ in choices:
                if req.finish_reason == "error":
                    raise APIError(500, f"generation failed: {req.error}", "server_error")
            out = []
            for i in range(len(choices)):
                content = "".join(texts[i])
                lp = logprobs(scored[i]) if params.logprobs is not None else None
                if chat:
                    message, reason = answer(content, reasons[i])
                    out.append({"index": i, "message": message, "finish_reason": reason, "logprobs": lp})
                else:
                    out.append({"index": i, "text": content, "finish_reason": reasons[i], "logprobs": lp})
            kind = "chat.completion" if chat else "text_completion"
            return {**head, "object": kind, "choices": out, "usage": usage()}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        kind = "chat.completion.chunk" if chat else "text_completion"

        def frame(choice: dict) -> dict:
            return {**head, "object": kind, "choices": [choice]}

        def chunk(i: int, e: Event | None, first: bool = False) -> dict:
            text, reason = (e.text, e.finish_reason) if e is not None else (None, None)
            lp = logprobs(e.logprobs or []) if e is not None and params.logprobs is not None else None
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice = {"index": i, "delta": delta, "finish_reason": reason, "logprobs": lp}
            else:
                choice = {"index": i, "text": text or "", "finish_reason": reason, "logprobs": lp}
            return frame(choice)

        def tool_chunks(i: int, text: str, reason: str) -> list[dict]:
            """A finished answer's chunks, as OpenAI streams calls: each call's id and name first,
            then its arguments; or the text as content."""
            message, reason = answer(text, reason)
            out = []
            if message["content"]:
                out.append(
                    frame({"index": i, "delta": {"content": message["content"]}, "finish_reason": None})
                )
            for j, call in enumerate(message.get("tool_calls", [])):
                fn = call["function"]
                opening = {
                    "index": j,
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": fn["name"], "arguments": ""},
                }
                arguments = {"index": j, "function": {"arguments": fn["arguments"]}}
                for delta in (opening, arguments):
                    out.append(frame({"index": i, "delta": {"tool_calls": [delta]}, "finish_reason": None}))
            out.append(frame({"index": i, "delta": {}, "finish_reason": reason}))
            return out

        async def stream():
            try:
                if chat:
                    for i in range(len(choices)):
                        yield _sse(chunk(i, None, first=True))
                held = [""] * len(choices)  # with tools: the text, until it is known to hold calls or not
                async for i, e in server.merged(choices, deadline):
                    if e.finish_reason == "error":
                        yield _sse(APIError(500, f"generation failed: {e.error}", "server_error").body())
                        break
                    if tools is not None:
                        held[i] += e.text
                        if e.finish_reason is not None:
                            for piece in tool_chunks(i, held[i], e.finish_reason):
                                yield _sse(piece)
                    elif e.text or e.finish_reason or e.logprobs:
                        yield _sse(chunk(i, e))
                if include_usage:
                    yield _sse({**head, "object": kind, "choices": [], "usage": usage()})
                yield _sse("[DONE]")
            except APIError as err:
                yield _sse(err.body())
            finally:
                server.admission.release()

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/embeddings", **_documented(EmbeddingRequest))
    async def embeddings(request: Request):
        server.check_key(request.headers.get("authorization"))
        body = parse(EmbeddingRequest, await request.body())
        server.check_model(body.model)
        inputs = server.embedding_inputs(body)
        await server.admission.acquire()
        try:  # off the event loop: a forward pass blocks for as long as it takes
            vectors = await asyncio.to_thread(server.embed, inputs)
        finally:
            server.admission.release()
        if body.dimensions is not None and body.dimensions != vectors.shape[-1]:
            raise APIError(
                400, f"dimensions: this model's embeddings have {vectors.shape[-1]}", param="dimensions"
            )
        data = []
        for i, v in enumerate(vectors):
            if body.encoding_format == "base64":  # little-endian float32, as OpenAI sends them
                e = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
            else:
                e = v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": e})
        n = sum(map(len, inputs))
        return {
            "object": "list",
            "data": data,
            "model": server.name,
            "usage": {"prompt_tokens": n, "total_tokens": n},
        }

    @app.post("/v1/trace", **_documented(TraceRequest))
    async def trace(request: Request):
        """The spans of a text (a model's answer) that occur verbatim in the training data."""
        from trulyopen.trace.spans import TraceOptions

        server.check_key(request.headers.get("authorization"))
        body = parse(TraceRequest, await request.body())
        if server.tracer is None:
            raise APIError(404, f"trace: {server.no_trace}", code="no_trace_index")
        opts = TraceOptions(body.min_len, body.keep, body.docs_per_span, body.context_tokens)
        try:  # off the event loop: the index is searched by the engine's threads
            return await asyncio.to_thread(server.tracer.trace, body.text, opts)
        except UserError as e:
            raise APIError(400, str(e), param="text") from None

    @app.post("/v1/completions", **_documented(CompletionRequest))
    async def completions(request: Request):
        return await handle(request, CompletionRequest)

    @app.post("/v1/chat/completions", **_documented(ChatRequest))
    async def chat_completions(request: Request):
        return await handle(request, ChatRequest)

    return app
