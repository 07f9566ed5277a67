"""Serving vision-language models: the real `openai` client sends images (data URLs, local paths,
http URLs behind --allow-image-urls) to our server over tiny random Qwen2-VL and LLaVA models and
gets the answer transformers' own generate() gives for the same inputs, streamed and not, with the
right usage; bad images are 400s naming the part. LLaVA runs on our batching engine (requests with
different images and without any share one prefill, each answered as generate() answers it alone);
Qwen2-VL falls back to generate() and `trulyopen serve` says so; `trulyopen chat --image` and the
chat page's attachment reach the model."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch

from tests.test_serve import Running, wait_until_healthy
from tests.tiny_vlm import shape_image, tiny_vlm_dir
from trulyopen.serve.app import Limits
from trulyopen.serve.launch import build_server
from trulyopen.vlm.images import data_url

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlms")
    return {family: tiny_vlm_dir(root, family) for family in ("qwen2_vl", "llava")}


@pytest.fixture(scope="module")
def servers(dirs):
    """A running server per family, built as `trulyopen serve` builds it."""
    running = {}
    for family, d in dirs.items():
        limits = Limits(max_tokens=64, max_image_bytes=50_000, request_timeout_s=60)
        running[family] = Running(None, None, limits, server=build_server(str(d), limits, precision="fp32"))
    yield running
    for r in running.values():
        r.stop()


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "red.png"
    shape_image("red", "circle", 40).save(path)
    return path


def expected(server, messages_for_template, images) -> tuple[str, int, int]:
    """(text, prompt tokens, completion tokens) of transformers' own greedy generate() on the inputs
    the model's processor makes, cut after the first end-of-turn token, as the server stops."""
    vlm = server.vlm
    proc, tok = vlm.processor, vlm.processor.tokenizer
    text = proc.apply_chat_template(messages_for_template, add_generation_prompt=True, tokenize=False)
    inputs = proc(text=[text], images=images or None, return_tensors="pt")
    new = alone(vlm, inputs)
    return tok.decode(new, skip_special_tokens=True), inputs["input_ids"].shape[1], len(new)


def alone(vlm, inputs: dict) -> list[int]:
    """The token ids of transformers' greedy generate() on one request's inputs, cut after the
    first end-of-turn token, as the server stops."""
    tok = vlm.processor.tokenizer
    with torch.inference_mode():
        out = vlm.model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    stops = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    for i, t in enumerate(new):
        if t in stops:
            return new[: i + 1]
    return new


def ask(image_part: dict, question: str = "What colour is the shape?") -> list[dict]:
    return [{"role": "user", "content": [image_part, {"type": "text", "text": question}]}]


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_openai_client_streams_the_answer_generate_gives_to_an_image(servers, picture, family):
    import openai
    from PIL import Image

    s = servers[family]
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="none")
    img = Image.open(picture).convert("RGB")
    messages = ask({"type": "image_url", "image_url": {"url": data_url(img)}})
    want, prompt_tokens, completion_tokens = expected(s.server, ask({"type": "image"}), [img])

    stream = client.chat.completions.create(
        model=family,
        messages=messages,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 1
    assert text == want
    assert chunks[-1].usage.prompt_tokens == prompt_tokens
    assert chunks[-1].usage.completion_tokens == completion_tokens

    done = client.chat.completions.create(
        model=family, messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    assert done.choices[0].message.content == want
    assert done.choices[0].finish_reason == ("length" if completion_tokens == MAX_TOKENS else "stop")
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    # the image is read: another picture gives another prompt (Qwen2-VL: another size, more tokens)
    other = Image.new("RGB", (56, 28), "blue")
    bigger = client.chat.completions.create(
        model=family,
        messages=ask({"type": "image_url", "image_url": {"url": data_url(other)}}),
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert bigger.choices[0].message.content == expected(s.server, ask({"type": "image"}), [other])[0]


@pytest.mark.parametrize("lean", [True, False])
def test_llava_batches_requests_with_other_images_and_none_each_answered_as_alone(servers, lean):
    """Our engine serves the LLaVA: two requests with different images, a text-only chat and a
    plain prompt are prefilled in one forward and decoded together, and each gets transformers'
    greedy answer for it alone; the first token's logprob is the model's own on the whole image
    (without the image features in place it would not be). Its Llama runs in the lean forward
    (infer/fast.py) or, for a language model outside that family, transformers' own. Qwen2-VL keeps
    the fallback."""
    from trulyopen.infer.engine import Engine, Request
    from trulyopen.infer.sampling import SamplingParams
    from trulyopen.vlm import generate

    assert isinstance(servers["qwen2_vl"].server.engine, generate.GenerateEngine)
    assert isinstance(servers["llava"].server.engine, Engine)
    vlm = servers["llava"].server.vlm
    engine = generate.engine(vlm, slots=4)
    assert isinstance(engine, Engine) and engine.fast is not None
    if not lean:
        engine.fast = None
    proc = vlm.processor
    chats = [
        (ask({"type": "image"}), [shape_image("red", "circle", 40)]),
        (ask({"type": "image"}, "Describe the image."), [shape_image("blue")]),
        ([{"role": "user", "content": "What colour is the shape?"}], []),
    ]
    inputs = [generate.prompt_inputs(proc, m, images) for m, images in chats]
    inputs.append({"input_ids": torch.tensor([proc.tokenizer("The shape is")["input_ids"]])})  # a completion
    params = SamplingParams(
        max_new_tokens=MAX_TOKENS, temperature=0, logprobs=0, stop_ids=generate.stop_ids(proc)
    )
    prefills, prefill = [], engine._prefill
    engine._prefill = lambda new: prefills.append(len(new)) or prefill(new)
    reqs = [
        engine.submit(Request(x["input_ids"][0].tolist(), params, inputs=x if i < 3 else None))
        for i, x in enumerate(inputs)
    ]
    logprobs: list[list[float]] = [[] for _ in reqs]
    for r, seen in zip(reqs, logprobs, strict=True):
        r.on_event = lambda e, seen=seen: seen.extend(x.logprob for x in e.logprobs or [])
    while engine.step():
        pass
    assert prefills == [4]  # one prefill for all four
    for r, x in zip(reqs, inputs, strict=True):
        assert r.finish_reason in ("stop", "length") and r.output == alone(vlm, x)
    for x, seen in zip(inputs[:2], logprobs[:2], strict=True):
        with torch.inference_mode():
            whole = vlm.model(**x).logits[0, -1].float().log_softmax(-1)
            blind = vlm.model(input_ids=x["input_ids"]).logits[0, -1].float().log_softmax(-1)
        first = int(whole.argmax())
        assert abs(seen[0] - float(whole[first])) < 1e-4 and abs(seen[0] - float(blind[first])) > 1e-3


def test_concurrent_openai_streams_with_images_share_the_servers_batch(servers, picture):
    """Three chats sent at once to the LLaVA server (two pictures, one without any), streamed by
    the real `openai` client: the server's engine prefills them together, and each streams the
    answer generate() gives it alone."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import openai
    from PIL import Image

    s = servers["llava"]
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="none")
    pictures = [Image.open(picture).convert("RGB"), shape_image("green", "square", 28)]
    chats = [(ask({"type": "image_url", "image_url": {"url": data_url(img)}}), img) for img in pictures]
    chats.append(([{"role": "user", "content": "What colour is the shape?"}], None))

    def stream(messages) -> str:
        chunks = client.chat.completions.create(
            model="llava", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    engine = s.server.engine
    prefills, step, prefill = [], engine.step, engine._prefill
    until = time.monotonic() + 30

    def gathered() -> bool:  # the engine's first step waits (boundedly) until all three are in
        if not engine.running and len(engine.waiting) < len(chats) and time.monotonic() < until:
            time.sleep(0.01)
            return True
        return step()

    engine._prefill = lambda new: prefills.append(len(new)) or prefill(new)
    engine.step = gathered
    try:
        with ThreadPoolExecutor(len(chats)) as pool:
            texts = list(pool.map(stream, [m for m, _ in chats]))
    finally:
        del engine.step, engine._prefill
    assert prefills == [3]
    for (messages, img), text in zip(chats, texts, strict=True):
        shown = ask({"type": "image"}) if img is not None else messages
        assert text == expected(s.server, shown, [img] if img is not None else [])[0]


def test_local_paths_and_hf_image_parts_equal_the_data_url(servers, picture):
    import openai
    from PIL import Image

    s = servers["qwen2_vl"]
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="none")
    answers = []
    for part in (
        {"type": "image_url", "image_url": {"url": data_url(Image.open(picture))}},
        {"type": "image_url", "image_url": {"url": str(picture)}},
        {"type": "image", "image": str(picture)},
    ):
        r = client.chat.completions.create(model="qwen2_vl", messages=ask(part), max_tokens=8, temperature=0)
        answers.append((r.choices[0].message.content, r.usage.prompt_tokens))
    assert answers[0] == answers[1] == answers[2]
    # a text-only chat and a completion go to the same model through the same fallback
    r = client.chat.completions.create(
        model="qwen2_vl", messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0
    )
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens < answers[0][1]
    c = client.completions.create(model="qwen2_vl", prompt="The shape is", max_tokens=4, temperature=0)
    assert c.usage.completion_tokens == 4
    e = client.embeddings.create(model="qwen2_vl", input=["The shape is red", "blue"])
    assert [len(d.embedding) for d in e.data] == [s.server.vlm.model.config.get_text_config().hidden_size] * 2


def test_bad_images_are_400s_naming_the_part(servers, picture, tmp_path):
    url = servers["llava"].url + "/v1/chat/completions"
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    huge = tmp_path / "huge.bmp"
    from PIL import Image

    Image.new("RGB", (200, 200), "white").save(huge)  # 120 kB: over the server's 50,000 bytes
    cases = {
        "data:image/png;base64,aGVsbG8=": "data URL image: not an image",
        "data:image/png;base64,@@@": "not valid base64",
        str(tmp_path / "missing.png"): "no such image file",
        str(not_image): "not an image",
        str(huge): "larger than 50,000",
        "http://127.0.0.1:9/x.png": "image URLs are not fetched",
    }
    for ref, why in cases.items():
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": ref}},
                ],
            }
        ]
        r = httpx.post(url, json={"model": "llava", "messages": messages, "max_tokens": 2}, timeout=30)
        assert r.status_code == 400, (ref, r.text)
        err = r.json()["error"]
        assert err["message"].startswith("messages.0.content.1: "), err
        assert why in err["message"] and err["param"] == "messages.0.content.1", (ref, err)
    # an image Qwen2-VL's processor refuses (an aspect ratio over 200)
    tiny = {"type": "image_url", "image_url": {"url": data_url(Image.new("RGB", (1, 400)))}}
    r = httpx.post(
        servers["qwen2_vl"].url + "/v1/chat/completions",
        json={"model": "qwen2_vl", "messages": ask(tiny), "max_tokens": 2},
        timeout=30,
    )
    assert r.status_code == 400 and "the model's processor refused the images" in r.json()["error"]["message"]
    # an image part that names nothing
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}]
    r = httpx.post(url, json={"model": "llava", "messages": messages}, timeout=30)
    assert r.status_code == 400 and "names no image" in r.json()["error"]["message"]


class PNGHandler(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_serve_command_notes_the_fallback_and_fetches_urls_only_with_the_flag(dirs, picture):
    """`trulyopen serve VLM --allow-image-urls`: its log says requests go through generate(); an
    http image (a loopback server) is fetched and answered as the same image's data URL."""
    PNGHandler.body = picture.read_bytes()
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PNGHandler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "trulyopen", "serve", str(dirs["qwen2_vl"]), "--port", str(port)]
    proc = subprocess.Popen(
        cmd + ["--precision", "fp32", "--allow-image-urls"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_healthy(proc, base, 90)
        answers = []
        for ref in (f"http://127.0.0.1:{files.server_address[1]}/red.png", str(picture)):
            body = {"model": "qwen2_vl", "messages": ask({"type": "image_url", "image_url": {"url": ref}})}
            r = httpx.post(
                base + "/v1/chat/completions", json=body | {"max_tokens": 6, "temperature": 0}, timeout=60
            )
            assert r.status_code == 200, r.text
            answers.append((r.json()["choices"][0]["message"]["content"], r.json()["usage"]))
        assert answers[0] == answers[1]
    finally:
        proc.terminate()
        files.shutdown()
    log = proc.communicate(timeout=60)[0]
    assert "vision-language model (qwen2_vl) that our batching engine does not take" in log
    assert "transformers' generate()" in log
    assert log.count("generate()") == 1 and "Traceback" not in log


def test_terminal_chat_takes_an_image_flag_and_the_image_command(dirs, picture):
    from typer.testing import CliRunner

    from trulyopen.cli import app

    runner = CliRunner()
    args = ["chat", str(dirs["llava"]), "--precision", "fp32", "--max-tokens", "4", "--temperature", "0"]
    r = runner.invoke(
        app, args + ["--image", str(picture)], input="What colour?\n/image " + str(picture) + "\nAnd now?\n\n"
    )
    assert r.exit_code == 0, r.output
    assert r.output.count("model> ") == 2 and "(the next message shows" in r.output
    assert r.output.count("tokens, ") == 2
    r = runner.invoke(app, args + ["--image", str(picture.parent / "missing.png")], input="\n")
    flat = " ".join(r.output.replace("│", " ").split())  # (the error box wraps lines)
    assert r.exit_code == 2 and "missing.png: no such file" in flat, r.output


def test_chat_page_attaches_an_image_and_gets_an_answer(servers, picture, chromium):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    s = servers["llava"]
    seen = []
    engine = s.server.engine
    submit = engine.submit
    engine.submit = lambda req: seen.append(req) or submit(req)  # what reaches the engine
    try:
        driver = chromium
        driver.get(s.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "llava", "the page did not load")
        driver.find_element(By.ID, "image").send_keys(str(picture))
        driver.find_element(By.ID, "input").send_keys("What colour is it?")
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: "tokens/s" in d.find_element(By.ID, "stats").text, "no answer")
        user = driver.find_elements(By.CSS_SELECTOR, ".user")[-1]
        shown = user.find_element(By.TAG_NAME, "img")
        assert shown.get_attribute("src").startswith("data:image/png;base64,")
        assert driver.execute_script("return arguments[0].naturalWidth", shown) == 40  # it decoded
        answer = driver.find_elements(By.CSS_SELECTOR, ".assistant")[-1].text
        assert answer.startswith("model: ") and "error" not in answer
    finally:
        engine.submit = submit
    assert len(seen) == 1 and seen[0].inputs is not None
    assert tuple(seen[0].inputs["pixel_values"].shape) == (1, 3, 28, 28)


def test_logprobs_are_the_models_own_and_a_json_schema_holds(servers, picture):
    """Through the fallback, as through our engine: each sampled token's logprob is the model's
    log-softmax at that step (a forward over prompt and answer, with the image), and an answer under
    `response_format` is decoded under its schema's grammar."""
    import openai
    from PIL import Image

    s = servers["llava"]
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="none")
    img = Image.open(picture).convert("RGB")
    messages = ask({"type": "image_url", "image_url": {"url": data_url(img)}})
    engine, seen = s.server.engine, []
    submit = engine.submit
    engine.submit = lambda req: seen.append(req) or submit(req)  # to read the answer's token ids
    try:
        r = client.chat.completions.create(
            model="llava",
            messages=messages,
            max_tokens=6,
            temperature=0.9,
            seed=3,
            logprobs=True,
            top_logprobs=2,
        )
    finally:
        engine.submit = submit
    scored = r.choices[0].logprobs.content
    assert len(scored) == r.usage.completion_tokens
    vlm = s.server.vlm
    proc = vlm.processor
    text = proc.apply_chat_template(ask({"type": "image"}), add_generation_prompt=True, tokenize=False)
    inputs = proc(text=[text], images=[img], return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    answer = torch.tensor([seen[0].output])
    with torch.inference_mode():
        logits = vlm.model(
            input_ids=torch.cat([inputs["input_ids"], answer], dim=1), pixel_values=inputs["pixel_values"]
        ).logits[0, n - 1 : -1]
    want = torch.log_softmax(logits.float(), dim=-1).gather(-1, answer[0, :, None])[:, 0]
    got = torch.tensor([x.logprob for x in scored])
    assert torch.allclose(got, want, atol=1e-4), (got, want)
    assert all(len(x.top_logprobs) == 2 and x.top_logprobs[0].logprob >= x.logprob - 1e-6 for x in scored)

    schema = {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "blue"]}},
        "required": ["colour"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
    for seed in range(3):
        r = client.chat.completions.create(
            model="llava", messages=messages, max_tokens=64, seed=seed, response_format=fmt
        )
        assert r.choices[0].finish_reason == "stop"  # (seeded: the same answers every run)
        assert json.loads(r.choices[0].message.content)["colour"] in ("red", "blue")


def test_the_models_generation_config_changes_no_answer(tmp_path):
    """A model shipped with a generation_config of its own (a penalty, no repeated words, its greedy
    answer's tokens suppressed) answers a greedy request as a plain argmax loop over its logits:
    only the request decides."""
    from transformers import AutoModelForImageTextToText, GenerationConfig

    from tests.tiny_vlm import tiny_vlm
    from trulyopen.infer.engine import Request
    from trulyopen.infer.sampling import SamplingParams
    from trulyopen.vlm.generate import VLM, GenerateEngine

    model, processor = tiny_vlm("llava")
    ids = processor.tokenizer("The shape is red red red")["input_ids"]
    x, plain = torch.tensor([ids]), []
    with torch.inference_mode():
        for _ in range(10):
            plain.append(int(model(input_ids=x).logits[0, -1].argmax()))
            x = torch.cat([x, torch.tensor([plain[-1:]])], dim=1)
    model.generation_config = GenerationConfig(
        repetition_penalty=3.0, no_repeat_ngram_size=1, min_length=40, suppress_tokens=plain
    )
    model.save_pretrained(tmp_path)  # as a downloaded model has it: generation_config.json
    model = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    engine = GenerateEngine(VLM(model, processor))
    req = engine.submit(Request(ids, SamplingParams(max_new_tokens=10, temperature=0)))
    while req.finish_reason is None:
        engine.step()
    assert req.output == plain and req.finish_reason == "length"
