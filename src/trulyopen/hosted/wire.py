"""The wire formats: for each provider, where a chat request goes, how it is authenticated, what its
body holds, and where the text is in the answer.

A conversation is a list of {"role": "user" | "assistant", "content": str} and an optional system
text; each format puts them where its API wants them:

    openai     messages: [{role: system}, {role, content}...]       choices[0].message.content
    anthropic  system, messages: [{role, content}...]               content[*].text (type text)
    gemini     systemInstruction.parts, contents: [{role: user |    candidates[0].content.parts[*].text
    vertex       model, parts: [{text}]}], generationConfig         (Gemini's format on Vertex AI)
    bedrock    system: [{text}], messages: [{role, content:         output.message.content[*].text
                 [{text}]}], inferenceConfig

Besides the text, a Reply keeps why generation stopped (finish_reason, stop_reason, finishReason,
stopReason) and the token counts the provider reported, under one pair of names. An answer without
text is never an empty string: it is a RemoteError naming the provider and the missing field, so a
blocked prompt or a candidate stopped for safety is told apart from a model that said nothing.

Bedrock takes either an API key (a bearer token) or AWS Signature Version 4, computed per attempt
by botocore's own signer (the `bedrock` extra) from the standard AWS environment variables.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from trulyopen.errors import UserError
from trulyopen.recipe import HostedModelConfig

DEFAULT_BASE_URL = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
}
ANTHROPIC_VERSION = "2023-06-01"
AWS_KEY_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

Messages = list[dict[str, str]]


class RemoteError(UserError):
    """One request that failed for good (retries spent, or an answer we could not read)."""


class KeyMissing(RemoteError):
    """The key (or the credentials) the config names is not in the environment: nothing is asked."""


@dataclass
class Reply:
    """A model's answer: its text, why it stopped, and the tokens the provider counted."""

    text: str
    finish: str | None = None
    usage: dict[str, int] = field(default_factory=dict)  # input_tokens, output_tokens (those reported)


def endpoint(cfg: HostedModelConfig) -> str:
    """The root every request of `cfg` goes under (recorded in manifests and results)."""
    if cfg.base_url:
        return cfg.base_url.rstrip("/")
    if cfg.provider == "vertex":
        host = "aiplatform.googleapis.com"
        return f"https://{host}" if cfg.location == "global" else f"https://{cfg.location}-{host}"
    if cfg.provider == "bedrock":
        return f"https://bedrock-runtime.{cfg.region}.amazonaws.com"
    return DEFAULT_BASE_URL[cfg.provider]


def _dig(provider: str, data: Any, *path: str | int) -> Any:
    """data[path[0]][path[1]]...; RemoteError naming the first step that is not there."""
    node, seen = data, ""
    for step in path:
        seen += f"[{step}]" if isinstance(step, int) else f".{step}" if seen else step
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            raise RemoteError(f"{provider}: the answer has no {seen}") from None
    return node


def _usage(raw: Any, input_name: str, output_name: str) -> dict[str, int]:
    if not isinstance(raw, dict):
        return {}
    pairs = (("input_tokens", raw.get(input_name)), ("output_tokens", raw.get(output_name)))
    return {name: n for name, n in pairs if isinstance(n, int) and not isinstance(n, bool)}


def _texts(provider: str, blocks: Any, where: str, **kind: str) -> str:
    """The text of a list of content blocks (those of `kind`, e.g. type="text"), joined."""
    if not isinstance(blocks, list):
        raise RemoteError(f"{provider}: the answer's {where} is not a list")
    return "".join(
        b["text"]
        for b in blocks
        if isinstance(b, dict)
        and isinstance(b.get("text"), str)
        and not b.get("thought")  # (Gemini's thought summaries are not the answer)
        and all(b.get(k) == v for k, v in kind.items())
    )


class Wire:
    """One provider's request and answer formats, and its credentials."""

    name = ""

    def __init__(self, cfg: HostedModelConfig, key: str):
        self.cfg, self._key = cfg, key
        self.base = endpoint(cfg)
        self.secrets: tuple[str, ...] = (key,)
        self.credential = f"the key in ${cfg.api_key_env}"  # what a 401 says was refused

    @property
    def url(self) -> str:
        raise NotImplementedError

    def headers(self, content: bytes) -> dict[str, str]:
        """The authentication headers of one attempt at sending `content`."""
        return {"Authorization": f"Bearer {self._key}"}

    def body(self, messages: Messages, system: str, max_tokens: int) -> dict[str, Any]:
        raise NotImplementedError

    def read(self, data: Any) -> Reply:
        raise NotImplementedError

    def _reply(self, text: object, where: str, finish: Any, usage: dict[str, int]) -> Reply:
        """The Reply; RemoteError when `text` (found at `where`) is no text or empty."""
        if not isinstance(text, str) or not text:
            raise RemoteError(f"{self.name}: the answer's {where} holds no text (stopped: {finish})")
        return Reply(text, finish, usage)


class OpenAIWire(Wire):
    name = "openai"

    @property
    def url(self) -> str:
        return self.base + "/chat/completions"

    def body(self, messages: Messages, system: str, max_tokens: int) -> dict[str, Any]:
        turns = ([{"role": "system", "content": system}] if system else []) + messages
        return {
            "model": self.cfg.model,
            "messages": turns,
            "temperature": self.cfg.temperature,
            "max_tokens": max_tokens,
        }

    def read(self, data: Any) -> Reply:
        message = _dig(self.name, data, "choices", 0, "message")
        text = message.get("content") if isinstance(message, dict) else None
        finish = data["choices"][0].get("finish_reason")  # (a mapping: it held "message")
        usage = _usage(data.get("usage"), "prompt_tokens", "completion_tokens")
        return self._reply(text, "choices[0].message.content", finish, usage)


class AnthropicWire(Wire):
    name = "anthropic"

    @property
    def url(self) -> str:
        return self.base + "/v1/messages"

    def headers(self, content: bytes) -> dict[str, str]:
        return {"x-api-key": self._key, "anthropic-version": ANTHROPIC_VERSION}

    def body(self, messages: Messages, system: str, max_tokens: int) -> dict[str, Any]:
        return {
            "model": self.cfg.model,
            **({"system": system} if system else {}),
            "messages": messages,
            "temperature": self.cfg.temperature,
            "max_tokens": max_tokens,
        }

    def read(self, data: Any) -> Reply:
        text = _texts(self.name, _dig(self.name, data, "content"), "content", type="text")
        usage = _usage(data.get("usage"), "input_tokens", "output_tokens")
        return self._reply(text, "content", data.get("stop_reason"), usage)


class GeminiWire(Wire):
    """The Gemini API (generativelanguage.googleapis.com), with an API key."""

    name = "gemini"

    @property
    def url(self) -> str:
        model = quote(self.cfg.model.removeprefix("models/"), safe="")
        return f"{self.base}/v1beta/models/{model}:generateContent"

    def headers(self, content: bytes) -> dict[str, str]:
        return {"x-goog-api-key": self._key}

    def body(self, messages: Messages, system: str, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "contents": [
                {"role": "model" if m["role"] == "assistant" else "user", "parts": [{"text": m["content"]}]}
                for m in messages
            ],
            "generationConfig": {"maxOutputTokens": max_tokens, "temperature": self.cfg.temperature},
        }
        if system:
            body["systemInstruction"] = {"parts": [{"text": system}]}
        return body

    def read(self, data: Any) -> Reply:
        if not isinstance(data, dict):
            raise RemoteError(f"{self.name}: the answer is not a JSON object")
        if not data.get("candidates"):
            feedback = data.get("promptFeedback")
            blocked = feedback.get("blockReason") if isinstance(feedback, dict) else None
            if blocked:
                raise RemoteError(f"{self.name}: the prompt was blocked (blockReason: {blocked})")
            raise RemoteError(f"{self.name}: the answer has no candidates")
        candidate = _dig(self.name, data, "candidates", 0)
        candidate = candidate if isinstance(candidate, dict) else {}
        content = candidate.get("content")
        parts = content.get("parts", []) if isinstance(content, dict) else []
        text = _texts(self.name, parts, "candidates[0].content.parts")
        usage = _usage(data.get("usageMetadata"), "promptTokenCount", "candidatesTokenCount")
        return self._reply(text, "candidates[0].content.parts", candidate.get("finishReason"), usage)


class VertexWire(GeminiWire):
    """Gemini on Vertex AI: the same body and answer, a project's URL and an OAuth bearer token."""

    name = "vertex"

    def __init__(self, cfg: HostedModelConfig, key: str):
        super().__init__(cfg, key)
        self.credential = f"the access token in ${cfg.api_key_env}"

    def headers(self, content: bytes) -> dict[str, str]:
        return Wire.headers(self, content)  # an OAuth bearer token, not an API key

    @property
    def url(self) -> str:
        model = quote(self.cfg.model, safe="")
        where = f"projects/{quote(self.cfg.project or '', safe='')}/locations/{self.cfg.location}"
        return f"{self.base}/v1/{where}/publishers/google/models/{model}:generateContent"


class BedrockWire(Wire):
    """AWS Bedrock's Converse API, with an API key or SigV4-signed with AWS credentials."""

    name = "bedrock"
    service = "bedrock"  # the signing name of bedrock-runtime

    def __init__(self, cfg: HostedModelConfig, key: str = "", credentials: Any = None):
        super().__init__(cfg, key)
        self._credentials = credentials
        if credentials is not None:
            parts = (credentials.access_key, credentials.secret_key, credentials.token)
            self.secrets = tuple(s for s in parts if s)
            self.credential = "the AWS credentials in $" + " and $".join(AWS_KEY_VARS)

    @property
    def url(self) -> str:
        # a model id holds ':' and an inference profile's ARN '/': both percent-encoded, as boto3 does
        return f"{self.base}/model/{quote(self.cfg.model, safe='')}/converse"

    def headers(self, content: bytes) -> dict[str, str]:
        if self._credentials is None:
            return super().headers(content)
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        request = AWSRequest("POST", self.url, data=content, headers={"Content-Type": "application/json"})
        SigV4Auth(self._credentials, self.service, self.cfg.region).add_auth(request)  # dated now
        return dict(request.headers.items())

    def body(self, messages: Messages, system: str, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "messages": [{"role": m["role"], "content": [{"text": m["content"]}]} for m in messages],
            "inferenceConfig": {"maxTokens": max_tokens, "temperature": self.cfg.temperature},
        }
        if system:
            body["system"] = [{"text": system}]
        return body

    def read(self, data: Any) -> Reply:
        text = _texts(
            self.name, _dig(self.name, data, "output", "message", "content"), "output.message.content"
        )
        usage = _usage(data.get("usage"), "inputTokens", "outputTokens")
        return self._reply(text, "output.message.content", data.get("stopReason"), usage)


WIRES: dict[str, type[Wire]] = {
    "openai": OpenAIWire,
    "anthropic": AnthropicWire,
    "gemini": GeminiWire,
    "vertex": VertexWire,
    "bedrock": BedrockWire,
}


def _aws_credentials(environ: Mapping[str, str]) -> Any:
    """Frozen credentials from the standard AWS variables (botocore's own reader), or None."""
    if not any(environ.get(v) for v in AWS_KEY_VARS):
        return None
    try:
        from botocore.credentials import EnvProvider
        from botocore.exceptions import PartialCredentialsError
    except ImportError:
        raise RemoteError(
            "bedrock: signing requests with AWS keys needs botocore; pip install 'trulyopen[bedrock]'"
        ) from None
    try:
        found = EnvProvider(environ=dict(environ)).load()
    except PartialCredentialsError as e:
        raise KeyMissing(f"${e.kwargs.get('cred_var', 'AWS_SECRET_ACCESS_KEY')} is not set") from None
    return found.get_frozen_credentials() if found is not None else None


def wire_for(cfg: HostedModelConfig, environ: Mapping[str, str]) -> Wire:
    """The wire of `cfg` with its credentials from `environ`; KeyMissing when they are not there."""
    key = environ.get(cfg.api_key_env, "")
    if cfg.provider == "bedrock" and not key:
        credentials = _aws_credentials(environ)
        if credentials is None:
            raise KeyMissing(f"${cfg.api_key_env} is not set, nor are ${' and $'.join(AWS_KEY_VARS)}")
        return BedrockWire(cfg, credentials=credentials)
    if not key:
        raise KeyMissing(f"${cfg.api_key_env} is not set")
    return WIRES[cfg.provider](cfg, key)
