"""The server against hostile traffic, on loopback: Schemathesis fuzzes it from its own OpenAPI
schema (no 500s, every error in OpenAI's format); 200 connections over its limits get 429s while
its memory stays bounded; a client that trickles its body is cut off at the request's time; the
API key is compared in constant time; the chat page shows model output as text, never markup."""

import asyncio
import hmac
import json
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

import httpx
import pytest
import torch

from tests.conftest import tiny_llama
from tests.test_serve import CHAT_TEMPLATE, Running, wait_until_healthy
from trulyopen.serve.app import Limits

# What the parrot model says, token after token: markup that would run script were it rendered
HTML = '<script>alert(1)</script><img src=x onerror="alert(2)"><b>x</b>'


@pytest.fixture(scope="module")
def tok():
    """test_serve's small byte-level BPE tokenizer, plus one token that is all of HTML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    t.train_from_iterator(["def add(a, b):\n    return a + b\n"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.add_tokens([HTML])
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def parrot(tok):
    """A tiny Llama that says the HTML token whatever it is given: its layers add nothing to the
    residual stream and every token embeds alike, so the last hidden state is one fixed vector,
    which the head maps to HTML's logit (64) over zeros. Deterministic even when sampled."""
    m = tiny_llama(tok)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        m.model.embed_tokens.weight.fill_(1.0)
        m.lm_head.weight.zero_()
        m.lm_head.weight[tok.convert_tokens_to_ids(HTML)] = 1.0
    return m


def openai_error(body: bytes | str) -> dict:
    """The error of an OpenAI-format error body, which must be exactly that."""
    data = json.loads(body)
    assert set(data) == {"error"}, data
    error = data["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)
    return error


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------- fuzzing
FUZZ_CONFIG = {
    "seed": 14,
    "continue-on-failure": True,  # report every failing operation, not only the first
    "request-timeout": 20,
    "generation": {"mode": "all", "max-examples": 100, "deterministic": True, "database": "none"},
    # every phase but stateful (the API has no resources linked to one another)
    "phases": {"stateful": {"enabled": False}},
    # A request valid by the schema may still be refused: a prompt over the server's token
    # limit, or max_tokens over its limit, is a 400 that no JSON schema can foresee.
    "checks": {"positive_data_acceptance": {"enabled": False}},
}


def fuzz(url: str) -> tuple[list, list[str]]:
    """Runs Schemathesis's engine (examples, coverage and fuzzing phases, every default check)
    against the live server: (every request and response, every failure it reported)."""
    import schemathesis
    from schemathesis.config import SchemathesisConfig
    from schemathesis.engine import events

    config = SchemathesisConfig.from_dict(FUZZ_CONFIG)
    schema = schemathesis.openapi.from_url(url + "/openapi.json", config=config)
    interactions, failures = [], []
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.NonFatalError):  # (a request that failed to go or come back)
            failures.append(f"{event.label}: {event.value!r}")
        if isinstance(event, events.FatalError):
            failures.append(f"schemathesis: {event.exception!r}")
        if not isinstance(event, events.ScenarioFinished):
            continue
        interactions += event.recorder.interactions.values()
        for checks in event.recorder.checks.values():
            failures += [f"{c.name}: {c.failure_info.failure}" for c in checks if c.failure_info]
    return interactions, failures


def test_fuzzing_from_the_openapi_schema_finds_no_500_and_only_openai_errors(parrot, tok):
    # max_tokens 4: the fuzzer's requests that do generate are short, so hundreds of them fit
    live = Running(parrot, tok, Limits(max_concurrent=4, max_queue=8, max_tokens=4, max_prompt_tokens=100))
    try:
        spec = httpx.get(live.url + "/openapi.json").json()
        for path in ("/v1/completions", "/v1/chat/completions"):  # the bodies are there to fuzz
            assert "requestBody" in spec["paths"][path]["post"]
        interactions, failures = fuzz(live.url)
        assert httpx.get(live.url + "/health").json()["status"] == "ok"
    finally:
        live.stop()
    statuses = Counter(
        (i.request.method, urlsplit(i.request.uri).path, i.response and i.response.status_code)
        for i in interactions
    )
    # the fuzzer got past validation into generation on both routes, and was refused as often
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert statuses["POST", path, 200] >= 10 and statuses["POST", path, 400] >= 10, statuses
    assert not [k for k in statuses if k[2] is None], "a request got no response"
    server_errors = [
        (i.request.body, i.response.content[:300]) for i in interactions if i.response.status_code >= 500
    ]
    assert not server_errors
    for i in interactions:
        if i.response.status_code >= 400:
            openai_error(i.response.content)
    assert not failures, "\n".join(sorted(set(failures)))


def test_hand_made_bad_requests_get_openai_errors_and_spoil_no_one_elses(parrot, tok):
    """What a schema-driven fuzzer sends seldom or never: bad JSON, NaN, deep nesting, wrong
    content types, token ids past the vocabulary (which, once in the engine, failed every
    request in its batch), unknown routes. A long answer streams beside them, untouched."""
    live = Running(parrot, tok, Limits(max_concurrent=4, max_queue=8, max_tokens=200, max_body_bytes=10_000))
    url = live.url + "/v1/completions"
    ok = {"model": "tiny", "prompt": "def"}
    bad_json = [b"{not json", b'{"model": "tiny", "prompt": "x", "temperature": NaN}', b"[" * 5000]
    bad_json += [b'{"model": "tiny", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", b"[1, 2]"]
    bad_fields = [  # the token ids first: they would have failed the answer beside them
        ({"prompt": [10**6]}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 10**30}, "max_tokens"),
        ({"max_tokens": "16"}, "max_tokens"),  # strict, as OpenAI: a string is no integer
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"stream": 0}, "stream"),
        ({"seed": 2**70}, "seed"),
        ({"repetition_penalty": 5e-324}, "repetition_penalty"),
    ]
    try:
        with httpx.Client(timeout=60) as client:
            body = {**ok, "max_tokens": 200, "ignore_eos": True, "temperature": 0, "stream": True}
            with client.stream("POST", url, json=body) as beside:
                lines = beside.iter_lines()
                first = next(lines)  # it is running
                for fields, param in bad_fields:
                    r = client.post(url, json={**ok, **fields})
                    assert r.status_code == 400 and openai_error(r.text)["param"].startswith(param), fields
                for raw in bad_json:
                    r = client.post(url, content=raw, headers={"content-type": "application/json"})
                    assert r.status_code == 400 and openai_error(r.text)["code"] == "invalid_json", raw[:40]
                chat = {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}],
                }
                r = client.post(live.url + "/v1/chat/completions", json=chat)
                assert r.status_code == 400 and openai_error(r.text)["param"].startswith("messages.0.content")
                # the body is JSON whatever its Content-Type says; what is not JSON is a 400
                form = client.post(url, data={"model": "tiny", "prompt": "x"})
                assert form.status_code == 400 and openai_error(form.text)["code"] == "invalid_json"
                plain = client.post(url, content=json.dumps(ok), headers={"content-type": "text/plain"})
                assert plain.status_code == 200
                # 2.0 is the integer 2 in JSON (and JSON Schema): schema-driven clients send it so
                r = client.post(url, json={**ok, "n": 2.0, "max_tokens": 3.0})
                assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text
                # over the size limit with no Content-Length (chunked): counted as it arrives
                r = client.post(url, content=iter([b"[" + b" " * 6000] * 2))
                assert r.status_code == 413 and openai_error(r.text)["code"] == "body_too_large"
                r = client.get(live.url + "/v1/nothing")
                assert r.status_code == 404 and openai_error(r.text)
                r = client.delete(url)
                assert r.status_code == 405 and openai_error(r.text) and r.headers["allow"] == "POST"
                # a tiny temperature samples greedily, rather than dividing logits into inf and NaN
                r = client.post(url, json={**ok, "temperature": 1e-300, "max_tokens": 2})
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == HTML * 2
                events = [json.loads(line[6:]) for line in [first, *lines] if line.startswith("data: {")]
            assert events[-1]["choices"][0]["finish_reason"] == "length"
            assert "".join(e["choices"][0]["text"] for e in events) == HTML * 200
    finally:
        live.stop()


# ------------------------------------------------------------------------------------ load limits
def test_200_connections_over_the_limits_get_429s_and_memory_stays_bounded(parrot, tok, tmp_path):
    """`trulyopen serve` in its own process with 2 slots and a queue of 4; 200 clients at once:
    each gets its whole answer or an OpenAI-style 429, and the server's RSS barely moves."""
    import psutil

    parrot.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    port = free_port()
    flags = ["--port", str(port), "--precision", "fp32", "--max-len", "240", "--max-tokens", "200"]
    flags += ["--max-concurrent", "2", "--max-queue", "4"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "trulyopen", "serve", str(tmp_path / "tiny"), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    # 200 tokens each (a few hundred ms): the first six hold the slots and the queue throughout
    body = {"model": "tiny", "prompt": "def", "max_tokens": 200, "ignore_eos": True, "temperature": 0}

    async def storm() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:
            return await asyncio.gather(
                *(client.post(url + "/v1/completions", json=body) for _ in range(200))
            )

    try:
        wait_until_healthy(proc, url, 90)
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200  # warm
        server = psutil.Process(proc.pid)
        before = server.memory_info().rss
        responses = asyncio.run(storm())
        after = server.memory_info().rss
        codes = Counter(r.status_code for r in responses)
        assert set(codes) <= {200, 429} and codes[200] >= 6 and codes[429] >= 100, codes
        for r in responses:
            if r.status_code == 429:
                assert openai_error(r.text)["type"] == "rate_limit_error"
            else:
                assert r.json()["choices"][0]["text"] == HTML * 200
        assert after - before < 300 * 2**20, f"RSS grew by {(after - before) / 2**20:.0f} MiB"
        # still up, and serving
        r = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == HTML * 3
        assert httpx.get(url + "/health").json()["running"] == 0
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_a_client_that_trickles_its_body_is_cut_off_at_the_request_timeout(parrot, tok):
    """Headers, then a byte every 0.2 s of a 10 000-byte body: at request_timeout_s (2 s) the
    server answers 408 and closes the connection; other clients are served meanwhile."""
    live = Running(parrot, tok, Limits(max_concurrent=2, max_queue=4, max_tokens=8, request_timeout_s=2.0))
    got, times = [], {}

    def trickle():
        with socket.create_connection(("127.0.0.1", live.port), timeout=1) as s:
            head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            s.sendall((head + "Content-Length: 10000\r\n\r\n{").encode())
            times["start"] = time.monotonic()
            while time.monotonic() - times["start"] < 15:  # the test stops by itself
                try:
                    s.sendall(b" ")
                    chunk = s.recv(65536)  # (waits up to the 1 s timeout)
                except TimeoutError:
                    continue
                except OSError:  # reset by the server, once it closed
                    break
                if not chunk:  # closed by the server
                    break
                got.append(chunk)
                time.sleep(0.2)
            times["end"] = time.monotonic()

    try:
        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        time.sleep(0.5)
        # while it trickles, another client is answered: before it is cut off, not after
        r = httpx.post(live.url + "/v1/completions", json={"model": "tiny", "prompt": "def", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == HTML * 2
        assert thread.is_alive() and "end" not in times
        thread.join(timeout=30)
        assert not thread.is_alive()
        response = b"".join(got)
        assert response.startswith(b"HTTP/1.1 408"), response[:200]
        assert openai_error(response.split(b"\r\n\r\n", 1)[1])["type"] == "timeout"
        assert 1.8 < times["end"] - times["start"] < 5, times  # cut off at 2 s, not by the client
        assert httpx.get(live.url + "/health").json()["status"] == "ok"
    finally:
        live.stop()


# ---------------------------------------------------------------------------------------- API key
@pytest.fixture
def keyed(parrot, tok):
    live = Running(parrot, tok, Limits(max_concurrent=2, max_queue=4, max_tokens=4), api_key="sekret-key")
    yield live
    live.stop()


def test_wrong_or_missing_api_keys_get_401_and_the_right_one_works(keyed):
    body = {"model": "tiny", "prompt": "def", "max_tokens": 2}
    for headers in ({}, {"authorization": "Bearer sekret-kez"}, {"authorization": "sekret-key"}):
        for r in (
            httpx.get(keyed.url + "/v1/models", headers=headers),
            httpx.post(keyed.url + "/v1/completions", json=body, headers=headers),
        ):
            assert r.status_code == 401 and openai_error(r.text)["code"] == "invalid_api_key", headers
    right = {"authorization": "Bearer sekret-key"}
    assert httpx.get(keyed.url + "/v1/models", headers=right).json()["data"][0]["id"] == "tiny"
    r = httpx.post(keyed.url + "/v1/completions", json=body, headers=right)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == HTML * 2


def test_the_api_key_is_decided_by_hmac_compare_digest_on_bytes(keyed, monkeypatch):
    """Each request's key goes through hmac.compare_digest, as bytes, and its answer is what
    decides: made to say yes, it lets a wrong key in (no == anywhere beside it)."""
    calls = []
    real = hmac.compare_digest

    def recording(a, b):
        calls.append((a, b))
        return real(a, b)

    wrong, right = {"authorization": "Bearer nope"}, {"authorization": "Bearer sekret-key"}
    monkeypatch.setattr(hmac, "compare_digest", recording)
    assert httpx.get(keyed.url + "/v1/models", headers=wrong).status_code == 401
    assert httpx.get(keyed.url + "/v1/models", headers=right).status_code == 200
    assert calls == [(b"Bearer nope", b"Bearer sekret-key"), (b"Bearer sekret-key", b"Bearer sekret-key")]
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: True)
    assert httpx.get(keyed.url + "/v1/models", headers=wrong).status_code == 200


# -------------------------------------------------------------------------------------- chat page
def test_the_chat_page_shows_html_from_the_model_and_the_user_as_text(parrot, tok, chromium):
    """The parrot answers HTML three times; typed in, HTML is the user's message too. In headless
    Chromium both show as literal text: no element is made from them and no alert runs."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    live = Running(parrot, tok, Limits(max_concurrent=2, max_queue=4, max_tokens=3))
    try:
        # the second line of defence: only the page's own script (by its hash) may run
        policy = httpx.get(live.url + "/").headers["content-security-policy"]
        directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
        assert directives["default-src"] == "'none'" and directives["script-src"].startswith("'sha256-")
        driver = chromium
        driver.get(live.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny", "the page did not load")
        # record alerts rather than show them: a shown one would block the driver
        driver.execute_script("window.alerts = []; window.alert = (m) => window.alerts.push(String(m));")
        driver.find_element(By.ID, "input").send_keys(HTML)
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: "tokens/s" in d.find_element(By.ID, "stats").text, "no answer")
        assert driver.find_elements(By.CSS_SELECTOR, ".user")[-1].text == "you: " + HTML
        assert driver.find_elements(By.CSS_SELECTOR, ".assistant")[-1].text == "model: " + HTML * 3
        made = driver.execute_script("return document.getElementById('log').querySelectorAll('*').length")
        assert made == 2  # the two message divs, and nothing inside them
        assert driver.find_elements(By.CSS_SELECTOR, "#log script, #log img, #log b") == []
        time.sleep(0.3)  # (an <img onerror> would fire once its load failed)
        assert driver.execute_script("return window.alerts") == []
    finally:
        live.stop()
