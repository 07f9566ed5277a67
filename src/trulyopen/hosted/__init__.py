"""Hosted models: one client for the chat APIs of OpenAI, Anthropic, Google and AWS.

Some steps may ask a model we did not train: `synth` to write or judge examples, `eval` to judge a
model's answers. They all speak through `open_client(cfg)`, which turns a `HostedModelConfig` into
a `ChatClient` with the same behaviour whatever the provider:

    provider    request                                                  key (env var, by default)
    openai      POST {base}/chat/completions                             Bearer $OPENAI_API_KEY
    anthropic   POST {base}/v1/messages                                  x-api-key $ANTHROPIC_API_KEY
    gemini      POST {base}/v1beta/models/{model}:generateContent        x-goog-api-key $GEMINI_API_KEY
    vertex      POST {base}/v1/projects/{project}/locations/{location}/publishers/google/models/
                     {model}:generateContent                             Bearer $GOOGLE_OAUTH_ACCESS_TOKEN
    bedrock     POST https://bedrock-runtime.{region}.amazonaws.com/model/{model}/converse
                                                                         Bearer $AWS_BEARER_TOKEN_BEDROCK,
                                                                         else AWS SigV4 (botocore) with
                                                                         $AWS_ACCESS_KEY_ID ...

    chat(messages, system) ─► wire.body, wire.headers ─► POST wire.url ─► 200: wire.read ─► Reply
                               (signed anew per attempt)        │        (text, finish, usage)
        retry with backoff ◄── 429 / 5xx / timeout / dropped ◄──┤  (Retry-After wins; rate limit)
        KeyRefused         ◄── 401 / 403 ◄──────────────────────┤
        RemoteError        ◄── other 4xx, or no text to read ◄──┘

`wire.py` knows each provider's format (URL, headers, body, where the text is in the answer);
`client.py` knows nothing about providers. An answer that cannot be read (not JSON, a missing
field, a blocked or empty candidate) is a RemoteError naming the provider and what was missing.
Keys go only into request headers (or the SigV4 signature) and are scrubbed from every message;
with the key unset, `open_client` raises KeyMissing and callers skip the step with a one-line note.
"""

from trulyopen.hosted.client import ChatClient, KeyRefused, RateLimiter, open_client, retry_after_seconds
from trulyopen.hosted.wire import KeyMissing, RemoteError, Reply, endpoint

__all__ = [
    "ChatClient",
    "KeyMissing",
    "KeyRefused",
    "RateLimiter",
    "RemoteError",
    "Reply",
    "endpoint",
    "open_client",
    "retry_after_seconds",
]
