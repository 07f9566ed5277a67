"""Hosted models: each provider's wire format against a fake server on loopback that checks the
request is really that provider's (path, headers, body; for Bedrock, a SigV4 signature recomputed
on the server with botocore), and the same retries, errors and key scrubbing for all of them."""

from __future__ import annotations

import hmac
import json
import re
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest

from trulyopen.hosted import (
    KeyMissing,
    KeyRefused,
    RateLimiter,
    RemoteError,
    endpoint,
    open_client,
    retry_after_seconds,
)
from trulyopen.recipe import HostedModelConfig, RecipeError, load_recipe

from .fake_api import DROP, Reply, anthropic_reply, fake_api, openai_reply

KEY_ENV = "TRULYOPEN_TEST_HOSTED_KEY"
SECRET = "sk-hosted-very-secret-0123456789"
AWS = {
    "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE0123456789",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
    "AWS_SESSION_TOKEN": "session-token-0123456789-secret",
}
BEDROCK_MODEL = "anthropic.claude-3-haiku-20240307-v1:0"
CHAT = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Are you sure?"},
]


def config(provider: str, url: str, **kw: object) -> HostedModelConfig:
    fields: dict = {"requests_per_minute": 1e9, "max_retries": 2, "api_key_env": KEY_ENV, "base_url": url}
    if provider == "openai":
        fields["base_url"] = url + "/v1"
    if provider == "vertex":
        fields |= {"project": "my-proj", "location": "europe-west4"}
    if provider == "bedrock":
        fields["region"] = "us-west-2"
    model = {"bedrock": BEDROCK_MODEL, "gemini": "gemini-2.5-flash", "vertex": "gemini-2.5-flash"}
    return HostedModelConfig(provider=provider, model=model.get(provider, "fake-model"), **(fields | kw))


def good(provider: str, text: str) -> Reply:
    """A well-formed answer of the provider, with its stop reason and token counts."""
    if provider == "openai":
        status, headers, body = openai_reply(text)
        body |= {"usage": {"prompt_tokens": 11, "completion_tokens": 3}}
        body["choices"][0]["finish_reason"] = "stop"
        return status, headers, body
    if provider == "anthropic":
        status, headers, body = anthropic_reply(text)
        return (
            status,
            headers,
            body | {"stop_reason": "end_turn", "usage": {"input_tokens": 11, "output_tokens": 3}},
        )
    if provider in ("gemini", "vertex"):
        parts = [{"text": "(thinking...)", "thought": True}, {"text": text}]
        return (
            200,
            {},
            {
                "candidates": [
                    {"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}
                ],
                "usageMetadata": {"promptTokenCount": 11, "candidatesTokenCount": 3, "totalTokenCount": 14},
            },
        )
    return (
        200,
        {},
        {
            "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
            "stopReason": "end_turn",
            "usage": {"inputTokens": 11, "outputTokens": 3, "totalTokens": 14},
        },
    )


FINISH = {
    "openai": "stop",
    "anthropic": "end_turn",
    "gemini": "STOP",
    "vertex": "STOP",
    "bedrock": "end_turn",
}
PROVIDERS = list(FINISH)


def sigv4_verifies(url: str, headers: dict, raw: bytes, region: str) -> bool:
    """What AWS does with a request: recompute its SigV4 signature from the same credentials (botocore's
    signer over the signed headers, the exact body bytes and the request's own timestamp)."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    match = re.fullmatch(
        r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
        r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})",
        headers.get("authorization", ""),
    )
    if match is None:
        return False
    key_id, day, where, service, signed, signature = match.groups()
    names = signed.split(";")
    stamp = headers.get("x-amz-date", "")
    age = datetime.now(UTC) - datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    if key_id != AWS["AWS_ACCESS_KEY_ID"] or (where, service) != (region, "bedrock") or day != stamp[:8]:
        return False
    if abs(age) > timedelta(minutes=5) or not {"host", "x-amz-date", "x-amz-security-token"} <= set(names):
        return False
    request = AWSRequest("POST", url, data=raw, headers={n: headers[n] for n in names})
    request.context["timestamp"] = stamp
    creds = Credentials(AWS["AWS_ACCESS_KEY_ID"], AWS["AWS_SECRET_ACCESS_KEY"], AWS["AWS_SESSION_TOKEN"])
    signer = SigV4Auth(creds, "bedrock", region)
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    return hmac.compare_digest(expected, signature)


def check_request(provider: str, path: str, headers: dict, body: dict, auth: str = "key") -> None:
    """The request is in the provider's own format, with its key where that provider wants it."""
    assert headers["content-type"] == "application/json"
    if provider == "openai":
        assert path == "/v1/chat/completions" and headers["authorization"] == f"Bearer {SECRET}"
        assert body["model"] == "fake-model" and body["max_tokens"] > 0 and body["temperature"] == 0
        assert body["messages"] == [{"role": "system", "content": "Be brief."}, *CHAT]
    elif provider == "anthropic":
        assert path == "/v1/messages" and headers["x-api-key"] == SECRET
        assert headers["anthropic-version"] == "2023-06-01" and "authorization" not in headers
        assert body["system"] == "Be brief." and body["messages"] == CHAT and body["max_tokens"] > 0
    elif provider in ("gemini", "vertex"):
        if provider == "gemini":
            assert path == "/v1beta/models/gemini-2.5-flash:generateContent"
            assert headers["x-goog-api-key"] == SECRET and "authorization" not in headers
        else:
            assert path == (
                "/v1/projects/my-proj/locations/europe-west4/publishers/google/models/"
                "gemini-2.5-flash:generateContent"
            )
            assert headers["authorization"] == f"Bearer {SECRET}" and "x-goog-api-key" not in headers
        assert body["contents"] == [
            {"role": "user", "parts": [{"text": "What is 2 + 2?"}]},
            {"role": "model", "parts": [{"text": "5"}]},
            {"role": "user", "parts": [{"text": "Are you sure?"}]},
        ]
        assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
        assert set(body) == {"contents", "systemInstruction", "generationConfig"}
        assert (
            body["generationConfig"]["maxOutputTokens"] > 0 and body["generationConfig"]["temperature"] == 0
        )
    else:
        assert path == "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"
        assert body["messages"] == [{"role": m["role"], "content": [{"text": m["content"]}]} for m in CHAT]
        assert body["system"] == [{"text": "Be brief."}] and set(body) == {
            "messages",
            "system",
            "inferenceConfig",
        }
        assert body["inferenceConfig"]["maxTokens"] > 0 and body["inferenceConfig"]["temperature"] == 0
        if auth == "key":
            assert headers["authorization"] == f"Bearer {SECRET}"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_each_provider_speaks_its_own_wire_format(provider: str) -> None:
    with fake_api(lambda path, headers, body, n: good(provider, "4, I am sure.")) as api:
        with open_client(config(provider, api.url), {KEY_ENV: SECRET}) as client:
            reply = client.chat(CHAT, "Be brief.")
            assert client.ask("Be brief.", "Hi") == "4, I am sure."
            stats = client.stats()
    assert len(api.requests) == 2
    check_request(provider, *api.requests[0])
    assert api.requests[1][0] == api.requests[0][0] and "Hi" in json.dumps(api.requests[1][2])
    assert (reply.text, reply.finish) == ("4, I am sure.", FINISH[provider])
    assert reply.usage == {"input_tokens": 11, "output_tokens": 3}
    assert stats == {"requests": 2, "retries": 0, "input_tokens": 22, "output_tokens": 6}


def test_bedrock_signs_with_sigv4_that_the_server_can_verify() -> None:
    region = "us-west-2"
    box: list = []

    def respond(path: str, headers: dict, body: dict, n: int) -> Reply:
        api = box[0]
        if not sigv4_verifies(api.url + path, headers, api.raw[n - 1], region):
            return 403, {}, {"message": "The request signature we calculated does not match"}
        return (429, {"Retry-After": "0"}, {"message": "slow down"}) if n == 1 else good("bedrock", "ok")

    environ = dict(AWS)
    with fake_api(respond) as api:
        box.append(api)
        with open_client(config("bedrock", api.url), environ) as client:
            assert client.chat(CHAT, "Be brief.").text == "ok"  # the retry is signed anew
            assert client.stats()["retries"] == 1
        check_request("bedrock", *api.requests[0], auth="sigv4")
        assert "x-amz-security-token" in api.requests[0][1]

        # the check can fail: a client with another secret is refused, and says which keys
        wrong = environ | {"AWS_SECRET_ACCESS_KEY": "not-the-secret-0123456789"}
        with open_client(config("bedrock", api.url), wrong) as client, pytest.raises(KeyRefused) as e:
            client.chat(CHAT, "Be brief.")
        assert "AWS_ACCESS_KEY_ID" in str(e.value) and len(api.requests) == 3
    sent = json.dumps([r[1] for r in api.requests]) + b"".join(api.raw).decode()
    assert AWS["AWS_SECRET_ACCESS_KEY"] not in sent and wrong["AWS_SECRET_ACCESS_KEY"] not in sent


@pytest.mark.parametrize("provider", PROVIDERS)
def test_retries_honour_retry_after_then_back_off(provider: str) -> None:
    answers = [
        (429, {"Retry-After": "3"}, {"error": "slow down"}),
        (503, {}, {"error": "busy"}),
        DROP,
        good(provider, "fine"),
    ]
    slept: list[float] = []
    with fake_api(lambda path, headers, body, n: answers[n - 1]) as api:
        cfg = config(provider, api.url, max_retries=3)
        with open_client(cfg, {KEY_ENV: SECRET}, backoff_s=0.5, sleep=slept.append) as client:
            assert client.ask("", "hello") == "fine"
            assert client.stats()["requests"] == 4 and client.retries == 3
    # Retry-After wins over the backoff (0.5); then the backoff doubles: 1.0, 2.0
    assert [s for s in slept if s > 0.01] == [3.0, 1.0, 2.0]


def test_timeouts_and_spent_retries() -> None:
    def slow(path: str, headers: dict, body: dict, n: int) -> Reply:
        if n == 1:
            time.sleep(1.0)
        return good("gemini", "late but here")

    with fake_api(slow) as api:
        with open_client(
            config("gemini", api.url), {KEY_ENV: SECRET}, timeout_s=0.3, sleep=lambda s: None
        ) as c:
            assert c.ask("", "q") == "late but here" and c.retries == 1

    with fake_api(lambda path, headers, body, n: (500, {}, {"error": "down"})) as api:
        with open_client(config("bedrock", api.url), {KEY_ENV: SECRET}, sleep=lambda s: None) as c:
            with pytest.raises(RemoteError, match=r"^HTTP 500, 3 attempts$"):
                c.ask("", "q")
    assert len(api.requests) == 3


@pytest.mark.parametrize("provider", ["gemini", "vertex", "bedrock"])
def test_refused_keys_stop_and_keys_never_appear_in_errors(provider: str) -> None:
    with fake_api(lambda path, headers, body, n: (401, {}, {"error": "bad key"})) as api:
        with open_client(config(provider, api.url), {KEY_ENV: SECRET}) as c, pytest.raises(KeyRefused) as e:
            c.ask("", "q")
    assert len(api.requests) == 1 and f"${KEY_ENV}" in str(e.value)

    def echo(path: str, headers: dict, body: dict, n: int) -> Reply:
        # the key's header echoed where a 200-character cut would split it
        sent = next(v for k, v in headers.items() if k in ("authorization", "x-goog-api-key"))
        return 400, {}, "e" * 185 + f" bad key: {sent.removeprefix('Bearer ')} was refused"

    with fake_api(echo) as api:
        with open_client(config(provider, api.url), {KEY_ENV: SECRET}) as c, pytest.raises(RemoteError) as e:
            c.ask("", "q")
    assert str(e.value).startswith("HTTP 400") and SECRET[:4] not in str(e.value) and "***" in str(e.value)


MALFORMED = [
    ("openai", "<html>oops</html>", "openai: the answer is not JSON"),
    ("openai", {"choices": []}, "openai: the answer has no choices[0]"),
    ("openai", {"choices": [{"message": {"content": None}, "finish_reason": "content_filter"}]}, "no text"),
    ("anthropic", {"type": "message"}, "anthropic: the answer has no content"),
    ("anthropic", {"content": [{"type": "tool_use"}], "stop_reason": "tool_use"}, "stopped: tool_use"),
    ("gemini", {}, "gemini: the answer has no candidates"),
    (
        "gemini",
        {"promptFeedback": {"blockReason": "SAFETY"}},
        "gemini: the prompt was blocked (blockReason: SAFETY)",
    ),
    (
        "gemini",
        {"candidates": [{"finishReason": "SAFETY"}]},
        "gemini: the answer's candidates[0].content.parts",
    ),
    (
        "vertex",
        {"candidates": [{"content": {"parts": [{"text": ""}]}, "finishReason": "MAX_TOKENS"}]},
        "MAX_TOKENS",
    ),
    ("vertex", [1, 2], "vertex: the answer is not a JSON object"),
    ("gemini", {"candidates": [{"content": "text"}], "promptFeedback": 3}, "content.parts holds no text"),
    ("bedrock", {"output": {}}, "bedrock: the answer has no output.message"),
    ("bedrock", {"output": {"message": {"content": []}}, "stopReason": "guardrail_intervened"}, "guardrail"),
    ("bedrock", "", "bedrock: the answer is not JSON"),
]


@pytest.mark.parametrize(("provider", "body", "message"), MALFORMED)
def test_malformed_answers_name_the_provider_and_what_is_missing(
    provider: str, body: object, message: str
) -> None:
    with fake_api(lambda path, headers, b, n: (200, {}, body)) as api:
        with open_client(config(provider, api.url), {KEY_ENV: SECRET}) as c, pytest.raises(RemoteError) as e:
            c.ask("", "q")
    assert message in str(e.value) and str(e.value).startswith(provider)
    assert len(api.requests) == 1  # an unreadable answer is not retried


def test_missing_keys_are_named_and_nothing_is_asked() -> None:
    cfg = config("gemini", "http://127.0.0.1:9")
    with pytest.raises(KeyMissing, match=rf"^\${KEY_ENV} is not set$"):
        open_client(cfg, {})
    bedrock = config("bedrock", "http://127.0.0.1:9")
    with pytest.raises(KeyMissing, match=r"nor are \$AWS_ACCESS_KEY_ID and \$AWS_SECRET_ACCESS_KEY"):
        open_client(bedrock, {})
    with pytest.raises(KeyMissing, match=r"AWS_SECRET_ACCESS_KEY is not set"):
        open_client(bedrock, {"AWS_ACCESS_KEY_ID": "AKID"})
    assert open_client(bedrock, {KEY_ENV: SECRET}).wire.credential == f"the key in ${KEY_ENV}"


def test_provider_settings_are_checked_and_defaulted(tmp_path: Path) -> None:
    assert HostedModelConfig(provider="gemini", model="m").api_key_env == "GEMINI_API_KEY"
    assert HostedModelConfig(provider="openai", model="m").api_key_env == "OPENAI_API_KEY"
    vertex = HostedModelConfig(provider="vertex", model="m", project="p")
    assert vertex.location == "us-central1" and vertex.api_key_env == "GOOGLE_OAUTH_ACCESS_TOKEN"
    assert endpoint(vertex) == "https://us-central1-aiplatform.googleapis.com"
    bedrock = HostedModelConfig(provider="bedrock", model="m", region="eu-west-1")
    assert endpoint(bedrock) == "https://bedrock-runtime.eu-west-1.amazonaws.com"
    assert bedrock.api_key_env == "AWS_BEARER_TOKEN_BEDROCK"

    def recipe_error(remote: dict) -> str:
        path = tmp_path / "r.yaml"
        path.write_text(
            "name: r\ndata: {sources: [{name: s, type: text, path: x.txt, license: MIT}]}\n"
            f"synth: {{remote: {json.dumps(remote)}}}\n"
        )
        with pytest.raises(RecipeError) as e:
            load_recipe(path)
        return str(e.value)

    message = recipe_error({"provider": "bedrock", "model": "m"})
    assert "r.yaml" in message and "synth.remote" in message and "needs 'region'" in message
    assert "'region' applies to provider bedrock only" in recipe_error(
        {"provider": "openai", "model": "m", "region": "x"}
    )
    assert "needs 'project'" in recipe_error({"provider": "vertex", "model": "m"})
    assert "synth.remote.provider" in recipe_error({"provider": "cohere", "model": "m"})


def test_rate_limiter_and_retry_after() -> None:
    now, slept = [0.0], []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    limiter = RateLimiter(30, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        limiter.wait()
    assert slept == [2.0, 2.0]
    assert retry_after_seconds("7") == 7.0 and retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 < retry_after_seconds(later) <= 30
