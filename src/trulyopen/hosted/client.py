"""The client: one model behind one API, asked one conversation at a time, within the rate limit.

What is the same for every provider lives here: requests are spaced to stay under
`requests_per_minute`; 429, 5xx, timeouts and dropped connections are retried with exponential
backoff (a `Retry-After` header wins, capped at a minute); 401 and 403 stop at once (every further
request would be refused too); any other 4xx, and an answer that cannot be read, fail the request.
Whatever the server says back is scrubbed of the key before it becomes a message.
"""

from __future__ import annotations

import email.utils
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

import httpx

from trulyopen.hosted.wire import Messages, RemoteError, Reply, Wire, wire_for
from trulyopen.recipe import HostedModelConfig

MAX_TOKENS = 1024
MAX_BACKOFF_S = 60.0


class KeyRefused(RemoteError):
    """The server refused the key (401 or 403): every further request would be refused too."""


class RateLimiter:
    """Spaces calls at least 60 / requests_per_minute seconds apart."""

    def __init__(
        self,
        requests_per_minute: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.interval = 60.0 / requests_per_minute
        self.clock, self.sleep = clock, sleep
        self.next_at = -float("inf")

    def wait(self) -> None:
        now = self.clock()
        if now < self.next_at:
            self.sleep(self.next_at - now)
            now = self.next_at
        self.next_at = now + self.interval


def retry_after_seconds(value: str | None) -> float | None:
    """The delay a Retry-After header asks for (seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class ChatClient:
    """Asks the model of `cfg` through `wire`; counts requests, retries and tokens."""

    def __init__(
        self,
        wire: Wire,
        cfg: HostedModelConfig,
        *,
        timeout_s: float = 120.0,
        backoff_s: float = 1.0,
        max_tokens: int = MAX_TOKENS,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.wire, self.cfg = wire, cfg
        self.backoff_s, self.max_tokens, self.sleep = backoff_s, max_tokens, sleep
        self.limiter = RateLimiter(cfg.requests_per_minute, sleep=sleep)
        self.requests = self.retries = 0
        self.tokens: Counter[str] = Counter()
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def scrub(self, text: str) -> str:
        """`text` with the key (every secret of the credentials) blanked out."""
        for secret in self.wire.secrets:
            if secret:
                text = text.replace(secret, "***")
        return text

    def stats(self) -> dict[str, int]:
        """Requests sent, retries among them, and the tokens the provider counted."""
        return {"requests": self.requests, "retries": self.retries, **dict(sorted(self.tokens.items()))}

    def ask(self, system: str, user: str) -> str:
        """The model's reply to one question: a judge's `ask`."""
        return self.chat([{"role": "user", "content": user}], system).text

    def chat(self, messages: Messages, system: str = "") -> Reply:
        """The model's reply to a conversation; RemoteError once retries are spent."""
        content = json.dumps(self.wire.body(messages, system, self.max_tokens)).encode()
        delay = self.backoff_s
        for attempt in range(self.cfg.max_retries + 1):
            self.limiter.wait()
            self.requests += 1
            headers = {"Content-Type": "application/json", **self.wire.headers(content)}
            try:
                response = self._http.post(self.wire.url, content=content, headers=headers)
            except httpx.TimeoutException:
                why, wait = "timed out", delay
            except httpx.TransportError as e:
                why, wait = self.scrub(f"connection failed ({type(e).__name__})"), delay
            else:
                code = response.status_code
                if code == 200:
                    return self._read(response)
                if code in (401, 403):
                    raise KeyRefused(f"HTTP {code}: the server refused {self.wire.credential}")
                if code != 429 and code < 500:
                    raise RemoteError(f"HTTP {code}: {self.scrub(response.text)[:200]}")  # scrubbed, then cut
                why = f"HTTP {code}"
                asked = retry_after_seconds(response.headers.get("retry-after"))
                wait = delay if asked is None else asked
            if attempt == self.cfg.max_retries:
                raise RemoteError(f"{why}, {attempt + 1} attempts")
            self.retries += 1
            self.sleep(min(wait, MAX_BACKOFF_S))
            delay *= 2
        raise AssertionError("unreachable")

    def _read(self, response: httpx.Response) -> Reply:
        try:
            data = response.json()
        except ValueError:
            raise RemoteError(f"{self.wire.name}: the answer is not JSON") from None
        try:
            reply = self.wire.read(data)
        except RemoteError as e:
            raise RemoteError(self.scrub(str(e))) from None
        self.tokens.update(reply.usage)
        return reply


def open_client(
    cfg: HostedModelConfig,
    environ: Mapping[str, str] | None = None,
    *,
    timeout_s: float = 120.0,
    backoff_s: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
) -> ChatClient:
    """A client for `cfg` with its key from `environ` (default: os.environ); KeyMissing without it."""
    wire = wire_for(cfg, os.environ if environ is None else environ)
    return ChatClient(wire, cfg, timeout_s=timeout_s, backoff_s=backoff_s, sleep=sleep)
