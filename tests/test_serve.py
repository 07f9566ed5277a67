"""The server through the real `openai` client on loopback: completions and chat, streamed and
not; 32 concurrent greedy clients get exactly the sequential greedy text; every bad request gets
the right status and an OpenAI-style error; limits and disconnects free their slots."""

import asyncio
import json
import socket
import subprocess
import threading
import time

import httpx
import pytest
import torch

from tests.conftest import tiny_llama
from trulyopen.infer.engine import Engine, generate
from trulyopen.infer.sampling import SamplingParams
from trulyopen.serve.app import Limits, Server, build_app

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A small byte-level BPE tokenizer with chat tokens, trained here on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    text = ["def add(a, b):\n    return a + b\n", "héllo wörld 日本語 print('x')\n"] * 50
    t.train_from_iterator(
        text,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = tiny_llama(tok)
    with torch.no_grad():
        m.lm_head.weight.mul_(30)
    return m


def wait_until_healthy(proc: subprocess.Popen, url: str, seconds: float) -> None:
    """Wait for a `trulyopen serve` process to answer /health (failing if it dies or is late)."""
    deadline = time.time() + seconds
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.ConnectError:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.2)


class Running:
    """Our app under uvicorn in a thread, on a free loopback port."""

    def __init__(self, model, tok, limits: Limits, api_key=None, server: Server | None = None):
        """Over our engine on `model`, or over `server` as given (then model, tok, limits unused)."""
        import uvicorn

        if server is None:
            engine = Engine(
                model,
                lambda ids: tok.decode(ids, skip_special_tokens=True),
                slots=limits.max_concurrent,
                max_len=256,
            )
            server = Server(engine, tok, "tiny", limits, api_key)
        self.server = server
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(build_app(self.server), host="127.0.0.1", port=self.port, log_level="warning")
        self.uv = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.uv.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.uv.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(model, tok):
    s = Running(model, tok, Limits(max_concurrent=32, max_queue=64, max_tokens=128, max_prompt_tokens=200))
    yield s
    s.stop()


def greedy_text(model, tok, ids, n, stops=()):
    stop_ids = tuple(sorted({tok.eos_token_id, *stops}))
    out = generate(model, [ids], SamplingParams(max_new_tokens=n, temperature=0, stop_ids=stop_ids))[0]
    return tok.decode(out, skip_special_tokens=True)


def test_openai_client_completions_and_chat(server, model, tok):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    prompt = "def add(a, b):"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert r.choices[0].text == greedy_text(model, tok, ids, 12)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens <= 12
    streamed = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text

    messages = [{"role": "user", "content": "héllo wörld"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    chat_ids = tok(
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"]
    end = tok.convert_tokens_to_ids("<|end|>")
    assert chat.choices[0].message.content == greedy_text(model, tok, chat_ids, 10, (end,))
    assert chat.choices[0].message.role == "assistant"
    pieces = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(pieces)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_32_concurrent_clients_get_the_sequential_greedy_text(server, model, tok):
    import openai

    prompts = [f"def f{i}(a, b):\n    return" + " a" * (i % 7) for i in range(32)]
    expected = [greedy_text(model, tok, tok(p, add_special_tokens=False)["input_ids"], 24) for p in prompts]

    async def all_at_once():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none")

        async def one(p):
            stream = await client.completions.create(
                model="tiny", prompt=p, max_tokens=24, temperature=0, stream=True
            )
            return "".join([c.choices[0].text async for c in stream])

        return await asyncio.gather(*(one(p) for p in prompts))

    peak = []
    watcher = threading.Thread(
        target=lambda: [
            peak.append(len(server.server.engine.running)) or time.sleep(0.01) for _ in range(300)
        ],
        daemon=True,
    )
    watcher.start()
    got = asyncio.run(all_at_once())
    assert got == expected
    assert max(peak) > 8  # they really ran together


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


def test_bad_requests_get_openai_errors(server):
    url = server.url + "/v1/completions"
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in error_of(r)["message"]
    r = httpx.post(url, json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    r = httpx.post(url, json={"model": "tiny", "prompt": "x", "max_tokens": -1})
    assert r.status_code == 400 and error_of(r)["param"] == "max_tokens"
    r = httpx.post(url, json={"model": "tiny", "prompt": "x", "max_tokens": 129})
    assert r.status_code == 400 and error_of(r)["param"] == "max_tokens"
    r = httpx.post(url, json={"model": "tiny", "prompt": list(range(5, 206))})
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 400 and error_of(r)["param"] == "messages"
    r = httpx.post(url, content=b"x" * 1_000_001, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert "<html" in httpx.get(server.url + "/").text


def test_api_key_queue_limit_and_disconnect(model, tok):
    import openai

    s = Running(
        model, tok, Limits(max_concurrent=1, max_queue=1, queue_timeout_s=30, max_tokens=200), api_key="k1"
    )
    slow_decode = s.server.engine._decode  # a slow model: 20 ms a token, so requests overlap for sure

    def slow():
        time.sleep(0.02)
        slow_decode()

    s.server.engine._decode = slow
    try:
        wrong = openai.OpenAI(base_url=s.url + "/v1", api_key="k2")
        with pytest.raises(openai.AuthenticationError) as e:
            wrong.completions.create(model="tiny", prompt="x", max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        headers = {"authorization": "Bearer k1"}
        body = {
            "model": "tiny",
            "prompt": "def",
            "max_tokens": 200,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        # one request decodes, one waits in the queue, a third gets 429 at once
        with httpx.Client(timeout=60) as c1, httpx.Client(timeout=60) as c2:
            with c1.stream("POST", s.url + "/v1/completions", json=body, headers=headers) as first:
                lines = first.iter_lines()  # (kept: a dropped iterator closes the response)
                next(lines)
                streaming = s.server.engine.running[0]
                waiting = threading.Thread(
                    target=lambda: c2.post(
                        s.url + "/v1/completions",
                        json={**body, "stream": False, "max_tokens": 2},
                        headers=headers,
                    ),
                    daemon=True,
                )
                waiting.start()
                deadline = time.time() + 10
                while s.server.admission.waiting < 1:
                    assert time.time() < deadline
                    time.sleep(0.02)
                r = httpx.post(s.url + "/v1/completions", json=body, headers=headers)
                assert r.status_code == 429 and error_of(r)["type"] == "rate_limit_error"
            # the first client has gone mid-stream: its request is cancelled, and the waiting one runs
            waiting.join(timeout=30)
            assert not waiting.is_alive()
            assert streaming.finish_reason == "cancelled" and len(streaming.output) < 100
        deadline = time.time() + 10
        while s.server.engine.running:
            assert time.time() < deadline
            time.sleep(0.02)
        # a request over its time gets 504 (or, streaming, an error event), and its slot back
        s.server.limits.request_timeout_s = 0.3
        r = httpx.post(s.url + "/v1/completions", json={**body, "stream": False}, headers=headers, timeout=60)
        assert r.status_code == 504 and error_of(r)["type"] == "timeout"
        with httpx.stream("POST", s.url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert events[-1]["error"]["type"] == "timeout"
        deadline = time.time() + 10
        while s.server.engine.running:
            assert time.time() < deadline
            time.sleep(0.02)
    finally:
        s.stop()


def test_serve_command_drains_running_requests_on_sigterm(model, tok, tmp_path):
    """`trulyopen serve DIR` in its own process: a streaming request that is running when SIGTERM
    arrives gets its whole answer, then the process exits cleanly."""
    import os
    import signal
    import sys

    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trulyopen",
            "serve",
            str(tmp_path / "tiny"),
            "--port",
            str(port),
            "--precision",
            "fp32",
            "--max-len",
            "240",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(proc, url, 60)
        body = {"model": "tiny", "prompt": "def", "max_tokens": 200, "temperature": 0, "stream": True}
        body |= {"ignore_eos": True, "stream_options": {"include_usage": True}}
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[6:])
                    break
            os.kill(proc.pid, signal.SIGTERM)
            events += [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 200
        # uvicorn re-raises the signal once it has shut down, so the exit is by SIGTERM, not a crash
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_chat_page_streams_an_answer_in_headless_chromium(server, chromium):
    """The page at / loads in Chromium; a typed message gets a streamed answer and a tokens/s line.
    (`.ci/run` installs Debian's chromium and chromium-driver.)"""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium
    driver.get(server.url + "/")
    wait = WebDriverWait(driver, 60)
    wait.until(
        lambda d: d.find_element(By.ID, "model").text == "tiny", "the page did not load the model name"
    )
    box = driver.find_element(By.ID, "input")
    box.send_keys("héllo wörld")
    driver.find_element(By.ID, "send").click()
    wait.until(lambda d: "tokens/s" in d.find_element(By.ID, "stats").text, "no answer")
    user = driver.find_elements(By.CSS_SELECTOR, ".user")[-1].text
    answer = driver.find_elements(By.CSS_SELECTOR, ".assistant")[-1].text
    assert user == "you: héllo wörld"
    assert answer.startswith("model: ") and len(answer) > len("model: ")
    assert "error" not in answer


def test_an_image_to_a_text_model_is_a_400_naming_the_part(server):
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "look"}, part]}]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": messages})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages.0.content.1"
    assert "tiny is a text model: it reads no images" in r.json()["error"]["message"]


def test_an_outside_engine_that_is_not_here_is_named_clearly(tmp_path):
    import importlib.util

    from typer.testing import CliRunner

    from trulyopen.cli import app

    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        pytest.skip("vLLM and a GPU are here: this test is for machines without them")
    result = CliRunner().invoke(app, ["serve", str(tmp_path), "--engine", "vllm"])
    assert result.exit_code == 2
    assert "--engine vllm" in result.output and (
        "not installed" in result.output or "no GPU" in result.output
    )
    result = CliRunner().invoke(app, ["serve", str(tmp_path), "--engine", "tgi"])
    assert result.exit_code != 0 and "choose trulyopen, llama.cpp, vllm or sglang" in result.output


def test_logprobs_of_a_greedy_answer_equal_the_scorers_log_likelihood(server, model, tok):
    """logprobs (chat) and the legacy logprobs (completions), streamed and not: each token's
    log-probability sums to what the evaluation scorer gives the same text, to 1e-4; the top
    alternatives are sorted, and the greedy token is the first of them."""
    import openai

    from trulyopen.evaluate.loglik import Request as Scored
    from trulyopen.evaluate.loglik import score

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    prompt = "def add(a, b):"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    out = generate(model, [ids], SamplingParams(max_new_tokens=12, temperature=0))[0]
    (want,) = score(model, [Scored(ids, [out])], max_len=256)[0:1]
    assert len(lp.token_logprobs) == len(out) == want[0].tokens
    assert abs(sum(lp.token_logprobs) - want[0].logprob) < 1e-4
    assert lp.tokens == [tok.decode([t]) for t in out]
    for top, token, value in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs, strict=True):
        # (at most 3: tokens that decode to the same text, such as half characters, share an entry)
        assert 1 <= len(top) <= 3 and list(top.values()) == sorted(top.values(), reverse=True)
        assert abs(top[token] - value) < 1e-6  # greedy: the chosen token is the most likely
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])

    messages = [{"role": "user", "content": "héllo wörld"}]
    args = dict(model="tiny", messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)
    chat = client.chat.completions.create(**args)
    content = chat.choices[0].logprobs.content
    chat_ids = tok(
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"]
    end = tok.convert_tokens_to_ids("<|end|>")
    stops = tuple(sorted({tok.eos_token_id, end}))
    answer = generate(model, [chat_ids], SamplingParams(max_new_tokens=10, temperature=0, stop_ids=stops))[0]
    (scored,) = score(model, [Scored(chat_ids, [answer])], max_len=256)[0]
    assert len(content) == len(answer)
    assert abs(sum(c.logprob for c in content) - scored.logprob) < 1e-4
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token for c in content)
    assert all(bytes(c.bytes) == c.token.encode() for c in content)
    streamed = [c for c in client.chat.completions.create(**args, stream=True) if c.choices]
    pieces = [x for c in streamed if c.choices[0].logprobs for x in c.choices[0].logprobs.content]
    assert [(x.token, x.logprob) for x in pieces] == [(x.token, x.logprob) for x in content]


def test_n_choices_with_a_seed_equal_single_requests_with_seed_plus_i(server):
    """n=4 with seed s gives the four texts that single requests with seeds s..s+3 give, streamed
    or not; usage counts every choice's tokens."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    args = dict(model="tiny", prompt="def add(a, b):", max_tokens=10, temperature=1.0)
    r = client.completions.create(**args, n=4, seed=7)
    singles = [client.completions.create(**args, seed=7 + i).choices[0].text for i in range(4)]
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == singles
    assert len(set(singles)) > 1  # the choices differ: each samples with its own seed
    assert r.usage.completion_tokens == sum(
        client.completions.create(**args, seed=7 + i).usage.completion_tokens for i in range(4)
    )
    texts = [""] * 4
    for c in client.completions.create(**args, n=4, seed=7, stream=True):
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == singles

    messages = [{"role": "user", "content": "héllo"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, n=3, seed=1)
    alone = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, seed=3)
    assert len(chat.choices) == 3 and chat.choices[2].message.content == alone.choices[0].message.content


def test_logprobs_and_n_bad_values_name_the_field(server):
    chat, url = server.url + "/v1/chat/completions", server.url + "/v1/completions"
    messages = [{"role": "user", "content": "x"}]
    r = httpx.post(chat, json={"model": "tiny", "messages": messages, "top_logprobs": 2})
    assert r.status_code == 400 and "top_logprobs needs logprobs" in error_of(r)["message"]
    r = httpx.post(chat, json={"model": "tiny", "messages": messages, "logprobs": True, "top_logprobs": 21})
    assert r.status_code == 400 and error_of(r)["param"] == "top_logprobs"
    r = httpx.post(url, json={"model": "tiny", "prompt": "x", "logprobs": 6})
    assert r.status_code == 400 and error_of(r)["param"] == "logprobs"
    r = httpx.post(url, json={"model": "tiny", "prompt": "x", "n": 17})
    assert r.status_code == 400 and error_of(r)["param"] == "n"


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def test_json_schema_answers_validate_for_50_seeds_beside_free_requests(server, model, tok):
    """response_format json_schema: 50 sampled answers (concurrent, streamed and not), each valid
    JSON under the schema (jsonschema); free greedy requests in the same batches keep their text."""
    import jsonschema
    import openai

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    messages = [{"role": "user", "content": "héllo wörld"}]
    prompt = "def add(a, b):"

    async def constrained(seed: int) -> tuple[str, str]:
        args = dict(model="tiny", messages=messages, max_tokens=60, seed=seed, response_format=fmt)
        if seed % 2:
            r = await client.chat.completions.create(**args)
            return r.choices[0].message.content, r.choices[0].finish_reason
        text, reason = "", None
        async for c in await client.chat.completions.create(**args, stream=True):
            text += c.choices[0].delta.content or ""
            reason = c.choices[0].finish_reason or reason
        return text, reason

    async def free() -> str:
        r = await client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        return r.choices[0].text

    async def main():
        return await asyncio.gather(*(constrained(s) for s in range(50)), *(free() for _ in range(6)))

    results = asyncio.run(main())
    answers, frees = results[:50], results[50:]
    for text, reason in answers:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), PERSON)
    assert len({t for t, _ in answers}) > 10  # sampled: the seeds give different values
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert set(frees) == {greedy_text(model, tok, ids, 12)}

    sync = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    json_object = {"response_format": {"type": "json_object"}}  # (vLLM's extension to completions)
    r = sync.completions.create(model="tiny", prompt=prompt, max_tokens=40, extra_body=json_object)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].text), dict)
    else:  # an object the tiny model kept open until max_tokens: a prefix of one
        assert r.choices[0].text.startswith("{")


def test_bad_schemas_get_a_400_that_names_the_field_or_the_librarys_reason(server):
    url = server.url + "/v1/chat/completions"
    base = {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}

    def with_schema(schema) -> httpx.Response:
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        return httpx.post(url, json={**base, "response_format": fmt})

    r = with_schema({"type": "object", "properties": {"a": {"type": "no-such-type"}}})
    e = error_of(r)
    assert r.status_code == 400 and e["param"] == "response_format.json_schema.schema", e
    assert "not a valid JSON schema at properties/a/type" in e["message"], e
    r = with_schema({"type": "string", "pattern": "(?<=x)y"})  # valid JSON schema; no regular grammar
    e = error_of(r)
    assert r.status_code == 400 and "cannot compile" in e["message"] and "look-around" in e["message"], e
    r = httpx.post(url, json={**base, "response_format": {"type": "json_schema"}})
    assert r.status_code == 400 and error_of(r)["param"] == "response_format.json_schema"
    r = httpx.post(url, json={**base, "response_format": {"type": "yaml"}})
    assert r.status_code == 400 and error_of(r)["param"] == "response_format.type"


ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            # bounded: a random model's digits would run on to max_tokens (llguidance enforces ranges)
            "properties": {
                "a": {"type": "integer", "minimum": -99, "maximum": 99},
                "b": {"type": "integer", "minimum": -99, "maximum": 99},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
UPPER = {
    "type": "function",
    "function": {
        "name": "upper",
        "parameters": {
            "type": "object",
            "properties": {
                "s": {"type": "string", "maxLength": 2}
            },  # short: a tiny vocabulary spells it byte by byte
            "required": ["s"],
        },
    },
}


def check_tool_calls(client, model: str, messages: list, tools: list, seeds: int, max_tokens: int):
    """tool_choice required, then the last tool named, for `seeds` seeds: the answer carries one
    call (an id, finish_reason tool_calls) whose arguments validate against its tool's schema, and
    the streamed deltas join into the same call. Returns the last call."""
    import jsonschema

    specs = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    named = tools[-1]["function"]["name"]
    for choice in ("required", {"type": "function", "function": {"name": named}}):
        for seed in range(seeds):
            args = dict(
                model=model,
                messages=messages,
                tools=tools,
                tool_choice=choice,
                max_tokens=max_tokens,
                seed=seed,
            )
            r = client.chat.completions.create(**args)
            assert r.choices[0].message.tool_calls, r.choices[0]
            (call,) = r.choices[0].message.tool_calls
            assert r.choices[0].finish_reason == "tool_calls" and call.id.startswith("call_")
            if choice != "required":
                assert call.function.name == named
            jsonschema.validate(json.loads(call.function.arguments), specs[call.function.name])
            calls: dict[int, dict] = {}
            reason = None
            for c in client.chat.completions.create(**args, stream=True):
                for d in c.choices[0].delta.tool_calls or []:
                    got = calls.setdefault(d.index, {"name": "", "arguments": ""})
                    got["name"] += (d.function.name or "") if d.function else ""
                    got["arguments"] += (d.function.arguments or "") if d.function else ""
                reason = c.choices[0].finish_reason or reason
            assert reason == "tool_calls" and list(calls.values()) == [
                {"name": call.function.name, "arguments": call.function.arguments}
            ]
    return call


def test_required_and_named_tool_calls_validate_against_the_tools_schema(server):
    """Even the tiny model answers tool_choice required / a named tool with tool_calls whose
    arguments validate against that tool's schema, streamed (as OpenAI's deltas) and not; a tool
    turn is accepted in the conversation that follows."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    messages = [{"role": "user", "content": "add 2 and 3"}]
    call = check_tool_calls(client, "tiny", messages, [ADD, UPPER], seeds=3, max_tokens=128)
    follow = messages + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "5"},
    ]
    r = client.chat.completions.create(model="tiny", messages=follow, tools=[ADD, UPPER], max_tokens=5)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_a_call_cut_off_by_max_tokens_is_length_and_nothing_half_parsed(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    messages = [{"role": "user", "content": "add"}]
    r = client.chat.completions.create(
        model="tiny", messages=messages, tools=[ADD], tool_choice="required", max_tokens=4
    )
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content is None


def test_bad_tools_get_a_400_that_names_the_field(server):
    url = server.url + "/v1/chat/completions"
    base = {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
    no_name = {"type": "function", "function": {"parameters": {"type": "object"}}}
    no_params = {"type": "function", "function": {"name": "f"}}
    bad_params = {"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}
    cases = [
        ({"tools": [no_name]}, "tools.0.function.name"),
        ({"tools": [no_params]}, "tools.0.function.parameters"),
        ({"tools": [ADD, bad_params], "tool_choice": "required"}, "tools.1.function.parameters"),
        (
            {"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{x"}}
                        ],
                    }
                ]
            },
            "messages.0.tool_calls.0.function.arguments",
        ),
    ]
    for extra, param in cases:
        r = httpx.post(url, json={**base, **extra})
        assert r.status_code == 400 and error_of(r)["param"] == param, (extra, r.text)


def test_our_chat_template_renders_tools_and_trains_on_the_calls(tok):
    """Without tools the template renders what it rendered before tools; with them, a system turn
    lists them, an assistant's call is <tool_call>{...}</tool_call>, and those tokens are trained."""
    from trulyopen.data.tokenizer import CHAT_TEMPLATE, LEGACY_CHAT_TEMPLATE
    from trulyopen.finetune.render import ChatRenderer

    plain = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]
    for gp in (False, True):
        new = tok.apply_chat_template(
            plain, chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=gp
        )
        old = tok.apply_chat_template(
            plain, chat_template=LEGACY_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=gp
        )
        assert new == old
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    talk = [
        {"role": "user", "content": "add 2 and 3"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "It is 5."},
    ]
    renderer = ChatRenderer(tok, CHAT_TEMPLATE)
    text = renderer.text(talk, tools=[ADD])
    assert '"name": "add"' in text.split("</tools>")[0] and '"description": "Add two integers."' in text
    assert (
        '<|assistant|>\n<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call><|end|>' in text
    )
    assert "<|tool|>\n5<|end|>" in text
    r = renderer.conversation(talk)  # (without tools in the system turn: the calls are the assistant's)
    trained = tok.decode([t for t, x in zip(r.ids, r.trained, strict=True) if x])
    assert '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>' in trained
    assert (
        "It is 5." in trained
        and "add 2 and 3" not in trained
        and "5<|end|>" not in trained.replace("It is 5.<|end|>", "")
    )


def test_embeddings_are_the_mean_of_the_last_hidden_state(server, model, tok):
    """/v1/embeddings through the openai client (which asks for base64) and as floats: each input's
    last hidden state averaged over its tokens, texts and token ids alike; bad inputs name the field."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    texts = ["def add(a, b):", "héllo wörld 日本語"]
    r = client.embeddings.create(model="tiny", input=texts)
    floats = httpx.post(server.url + "/v1/embeddings", json={"model": "tiny", "input": texts}).json()
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    with torch.no_grad():
        want = [model.model(input_ids=torch.tensor([i])).last_hidden_state[0].mean(0) for i in ids]
    for got, plain, w in zip(r.data, floats["data"], want, strict=True):
        assert torch.allclose(torch.tensor(got.embedding), w, atol=1e-5)
        assert torch.allclose(torch.tensor(plain["embedding"]), w, atol=1e-5)
    assert r.usage.prompt_tokens == sum(map(len, ids))
    by_ids = client.embeddings.create(model="tiny", input=ids[0])
    assert torch.allclose(torch.tensor(by_ids.data[0].embedding), want[0], atol=1e-5)
    bad = httpx.post(server.url + "/v1/embeddings", json={"model": "tiny", "input": ["x", ""]})
    assert bad.status_code == 400 and error_of(bad)["param"] == "input.1"


def test_the_openai_agents_sdk_runs_a_tool_loop_to_the_end(server):
    """The OpenAI Agents SDK, pointed at our server with the tiny model: the agent's first turn must
    call the tool (tool_choice required, decoded under its schema), the SDK runs it and sends the
    result back, and the next turn (tool_choice reset to auto, as the SDK does) ends the run."""
    from typing import Annotated

    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI
    from pydantic import Field

    set_tracing_disabled(True)
    calls = []

    @function_tool
    def add(a: Annotated[int, Field(ge=-99, le=99)], b: Annotated[int, Field(ge=-99, le=99)]) -> int:
        """Add two integers."""
        calls.append((a, b))
        return a + b

    model = OpenAIChatCompletionsModel(
        model="tiny", openai_client=AsyncOpenAI(base_url=server.url + "/v1", api_key="none")
    )
    settings = ModelSettings(tool_choice="required", max_tokens=128, temperature=0.0)
    agent = Agent(
        name="calculator",
        instructions="Add with the tool.",
        tools=[add],
        model=model,
        model_settings=settings,
    )
    result = Runner.run_sync(agent, "What is 2 plus 3?", max_turns=3)
    assert len(calls) == 1 and all(-99 <= x <= 99 for x in calls[0])  # the framework called the tool once
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"] and kinds[-1] == "message_output_item", (
        kinds
    )
    assert result.final_output is not None


def test_the_eager_mask_equals_llguidances_compiled_one(tok, monkeypatch):
    """Where torch.compile cannot run (no C++ compiler), masks are applied eagerly: the same bits."""
    from trulyopen.infer import constrain

    grammars = constrain.Grammars(tok, 400)
    grammar = grammars.json_schema(PERSON)
    matchers = [grammars.matcher(grammar), None, grammars.matcher(grammar)]
    for t in tok('{"name": "a', add_special_tokens=False)["input_ids"]:
        assert matchers[2].consume_token(t)
    logits = torch.randn(3, 400)
    compiled, eager = logits.clone(), logits.clone()
    constrain.mask(compiled, matchers)
    monkeypatch.setattr(constrain, "_compiled", False)
    constrain.mask(eager, matchers)
    assert torch.equal(compiled, eager) and torch.equal(compiled[1], logits[1])
    assert 0 < int(torch.isfinite(compiled[0]).sum()) < 400 and not torch.equal(compiled[0], compiled[2])
