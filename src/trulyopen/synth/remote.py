"""Optionally asking an outside model to write or judge the SFT examples.

Everything `synth` makes by default comes from the corpus alone, so the release stays fully open.
A user who has a key may still want a stronger model to rewrite the answers (`write`) or to weed
out weak pairs (`judge`); the data card then says which model touched the data and how.

Two API styles are spoken with plain `httpx`: OpenAI-compatible chat completions (which local
servers such as vLLM and llama.cpp also speak) and Anthropic messages. Requests are spaced to stay
under `requests_per_minute`; 429, 5xx, timeouts and dropped connections are retried with
exponential backoff (a `Retry-After` header wins), and an example whose retries run out is left as
it was and counted as failed. A 401 or 403 stops the step: every further request would be refused.

The key is read from the environment variable the config names, sent only in the request header,
and scrubbed from every message this module writes; with the variable unset nothing is requested.
"""

from __future__ import annotations

import ast
import email.utils
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx

from trulyopen.errors import UserError
from trulyopen.progress import Progress
from trulyopen.recipe import RemoteModelConfig

DEFAULT_BASE_URL = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}
ANTHROPIC_VERSION = "2023-06-01"
MAX_TOKENS = 1024
MAX_BACKOFF_S = 60.0
MIN_RATING = 5  # judged examples rated below this are dropped

WRITE_SYSTEM = (
    "You are an expert Python programmer. Reply with the complete definition asked for, docstring "
    "included, in a single ```python code block and nothing else."
)
JUDGE_SYSTEM = "You review training data for a Python coding assistant."
JUDGE_PROMPT = (
    "Rate the answer below from 1 to 10 for correctness (does the code do what the instruction and "
    "docstring say?) and usefulness as a training example. Reply with a bare integer and nothing else."
    "\n\n## Instruction\n\n{instruction}\n\n## Answer\n\n{answer}"
)


class RemoteError(UserError):
    """One request that failed for good (retries spent, or an answer we could not read)."""


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
    """One model behind one API, asked one question at a time, within the rate limit."""

    def __init__(
        self,
        cfg: RemoteModelConfig,
        api_key: str,
        *,
        timeout_s: float = 120.0,
        backoff_s: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.cfg, self._key = cfg, api_key
        self.backoff_s, self.sleep = backoff_s, sleep
        self.limiter = RateLimiter(cfg.requests_per_minute, sleep=sleep)
        self.requests = self.retries = 0
        base = (cfg.base_url or DEFAULT_BASE_URL[cfg.provider]).rstrip("/")
        if cfg.provider == "openai":
            self.url = base + "/chat/completions"
            headers = {"Authorization": f"Bearer {api_key}"}
        else:
            self.url = base + "/v1/messages"
            headers = {"x-api-key": api_key, "anthropic-version": ANTHROPIC_VERSION}
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_s, connect=10.0))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def scrub(self, text: str) -> str:
        """`text` with the key blanked out, for anything that may be printed or recorded."""
        return text.replace(self._key, "***") if self._key else text

    def _body(self, system: str, user: str) -> dict[str, Any]:
        if self.cfg.provider == "openai":
            return {
                "model": self.cfg.model,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
                "temperature": self.cfg.temperature,
                "max_tokens": MAX_TOKENS,
            }
        return {
            "model": self.cfg.model,
            "system": system,
            "messages": [{"role": "user", "content": user}],
            "temperature": self.cfg.temperature,
            "max_tokens": MAX_TOKENS,
        }

    def _text(self, response: httpx.Response) -> str:
        try:
            data = response.json()
            if self.cfg.provider == "openai":
                text = data["choices"][0]["message"]["content"]
            else:
                text = "".join(b["text"] for b in data["content"] if b.get("type") == "text")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise RemoteError("the reply is not in the expected format") from None
        if not isinstance(text, str):
            raise RemoteError("the reply holds no text")
        return text

    def ask(self, system: str, user: str) -> str:
        """The model's reply to one question; RemoteError once retries are spent."""
        delay = self.backoff_s
        for attempt in range(self.cfg.max_retries + 1):
            self.limiter.wait()
            self.requests += 1
            try:
                response = self._http.post(self.url, json=self._body(system, user))
            except httpx.TimeoutException:
                why, wait = "timed out", delay
            except httpx.TransportError as e:
                why, wait = self.scrub(f"connection failed ({type(e).__name__})"), delay
            else:
                code = response.status_code
                if code == 200:
                    return self._text(response)
                if code in (401, 403):
                    raise KeyRefused(f"HTTP {code}: the server refused the key in ${self.cfg.api_key_env}")
                if code != 429 and code < 500:
                    raise RemoteError(self.scrub(f"HTTP {code}: {response.text[:200]}"))
                why = f"HTTP {code}"
                asked = retry_after_seconds(response.headers.get("retry-after"))
                wait = delay if asked is None else asked
            if attempt == self.cfg.max_retries:
                raise RemoteError(f"{why}, {attempt + 1} attempts")
            self.retries += 1
            self.sleep(min(wait, MAX_BACKOFF_S))
            delay *= 2
        raise AssertionError("unreachable")


_CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(reply: str) -> str | None:
    """The code of a reply (its first fenced block, else all of it) when it parses and defines a function."""
    match = _CODE_BLOCK.search(reply)
    code = (match.group(1) if match else reply).strip()
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return None
    defines = any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) for n in tree.body)
    return code if defines else None


def parse_rating(reply: str) -> int | None:
    """A 1-10 rating from a reply that should be a bare integer but may say `Rating: 7/10`."""
    text = reply.strip()
    for pattern in (r"^(\d+)\.?$", r"\b(\d+)\s*(?:/|out of)\s*10\b", r"\b(\d+)\b"):
        match = re.search(pattern, text, re.IGNORECASE)
        if match:
            value = int(match.group(1))
            return value if 1 <= value <= 10 else None
    return None


def _write(client: ChatClient, record: dict, model: str) -> tuple[dict | None, str]:
    reply = client.ask(WRITE_SYSTEM, record["messages"][0]["content"])
    code = extract_code(reply)
    if code is None:
        return None, "unusable_reply"
    user, assistant = record["messages"]
    new = {
        **record,
        "messages": [user, {**assistant, "content": f"```python\n{code}\n```"}],
        "reference": assistant["content"],
        "written_by": model,
    }
    return new, "written"


def _judge(client: ChatClient, record: dict, model: str) -> tuple[dict | None, str]:
    user, assistant = record["messages"]
    question = JUDGE_PROMPT.format(instruction=user["content"], answer=assistant["content"])
    reply = client.ask(JUDGE_SYSTEM, question)
    score = parse_rating(reply)
    if score is None:
        return None, "unusable_reply"
    return {**record, "rating": {"score": score, "model": model}}, "rated"


def remote_step(
    records: list[dict],
    cfg: RemoteModelConfig,
    *,
    environ: Mapping[str, str] | None = None,
    backoff_s: float = 1.0,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], dict[str, Any]]:
    """Have the outside model write or judge the first `cfg.max_examples` SFT records.

    Returns the records (judged ones below MIN_RATING left out) and what happened, for the
    manifest. Records beyond max_examples, and any whose request failed, are returned unchanged.
    """
    stats: dict[str, Any] = {
        "provider": cfg.provider,
        "model": cfg.model,
        "task": cfg.task,
        "base_url": cfg.base_url or DEFAULT_BASE_URL[cfg.provider],
        "skipped": None,
    }
    key = (os.environ if environ is None else environ).get(cfg.api_key_env, "")
    if not key:
        stats["skipped"] = f"${cfg.api_key_env} is not set"
        log(
            f"synth: remote {cfg.task} step skipped: ${cfg.api_key_env} is not set, {cfg.model} was not asked"
        )
        return records, stats

    todo = records[: cfg.max_examples]
    outcomes: Counter = Counter()
    failures: Counter = Counter()
    ratings: Counter = Counter()
    dropped: list[str] = []
    out: list[dict] = []
    act = _write if cfg.task == "write" else _judge
    with (
        ChatClient(cfg, key, backoff_s=backoff_s) as client,
        Progress(f"remote {cfg.task}", len(todo), "examples") as bar,
    ):
        for i, record in enumerate(todo):
            try:
                new, outcome = act(client, record, cfg.model)
            except KeyRefused as e:
                log(f"synth: remote step stopped: {client.scrub(str(e))}")
                failures["key_refused"] += 1
                outcomes["failed"] += 1
                outcomes["not_asked"] += len(todo) - i - 1
                out.extend(todo[i:])
                break
            except RemoteError as e:
                failures[client.scrub(str(e))] += 1
                new, outcome = None, "failed"
            outcomes[outcome] += 1
            bar.update()
            if new is None:
                out.append(record)
            elif "rating" in new:
                ratings[new["rating"]["score"]] += 1
                if new["rating"]["score"] < MIN_RATING:
                    dropped.append(record["id"])
                else:
                    out.append(new)
            else:
                out.append(new)
        stats.update(requests=client.requests, retries=client.retries)
    stats.update(
        asked=len(todo),
        outcomes=dict(sorted(outcomes.items())),
        failed=outcomes["failed"],
        failures=dict(sorted(failures.items())),
    )
    if cfg.task == "judge":
        stats.update(
            min_rating=MIN_RATING,
            ratings={str(k): v for k, v in sorted(ratings.items())},
            dropped=len(dropped),
            dropped_ids=dropped,
        )
    log(
        f"synth: remote {cfg.task} with {cfg.model}: {len(todo)} examples, "
        + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
        + (f", {len(dropped)} dropped (rated below {MIN_RATING})" if cfg.task == "judge" else "")
    )
    return out + records[cfg.max_examples :], stats
