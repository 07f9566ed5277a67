"""GGUF export, checked against llama.cpp itself (through llama-cpp-python, the `llamacpp` extra):
it tokenises held-out standard-library files into our tokenizer's ids and renders the same chat
text; an f32 file decodes greedily to exactly our engine's tokens for each family; bf16, q8_0 and
q4_k_m files agree on the next token nearly everywhere and have the sizes their types imply; the
Ollama Modelfile parses and its template renders our chat format; bad exports are one line, exit 2."""

from __future__ import annotations

import json
import random
import re
import sysconfig
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from trulyopen.cli import app
from trulyopen.model import gguf as export
from trulyopen.model.export import export_hf

llama_cpp = pytest.importorskip("llama_cpp", reason="needs the llamacpp extra (pip install '.[llamacpp]')")

_ROOT = Path(sysconfig.get_paths()["stdlib"])
# the standard library's files in a fixed shuffled order: the tokenizer trains on the first 150
STDLIB = sorted(p for p in _ROOT.rglob("*.py") if "site-packages" not in p.parts)
random.Random(0).shuffle(STDLIB)
FAMILIES = ["llama", "qwen3", "olmo2"]
MULTIBYTE = "# héllo wörld: 日本語のテキスト, emoji 🚀🦙, ключ = 'значение'\nx = 'naïve café'  # ½ ≠ ∞\n"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """The quickstart's tokenizer recipe (byte-level BPE, our special tokens and chat template),
    trained on the first 150 standard-library files."""
    from trulyopen.data.tokenizer import save_hf, train_tokenizer
    from trulyopen.recipe import TokenizerConfig

    texts = [f.read_text(errors="ignore")[:6000] for f in STDLIB[:150]]
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    save_hf(train_tokenizer(iter(texts), TokenizerConfig(vocab_size=2000)), out)
    return out


@pytest.fixture(scope="module")
def held_out() -> list[str]:
    """200 standard-library files the tokenizer never saw (their first 3,000 characters), one with
    multi-byte characters of several scripts."""
    docs = [f.read_text(errors="ignore")[:3000] for f in STDLIB[150:350]]
    assert len(docs) == 200
    docs[0] = MULTIBYTE + docs[0]
    return docs


def tiny(arch: str, vocab: int, seed: int = 2) -> torch.nn.Module:
    """A random two-layer model of family `arch` (scaled output layer: peaked logits). With seed 2
    no greedy step of the test's prompts is a near-tie (see `greedy_margin`) in any family."""
    from transformers import AutoModelForCausalLM

    from trulyopen.model.presets import SIZES, build_config

    dims = replace(SIZES["tiny"], hidden=64, heads=4, kv_heads=2, intermediate=128)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_config(arch, dims, vocab, 512)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return model


@pytest.fixture(scope="module")
def models(tok_dir, tmp_path_factory) -> dict[str, Path]:
    """Each family exported to the Hugging Face format (what `trulyopen export` converts from)."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    root = tmp_path_factory.mktemp("models")
    return {arch: export_hf(tiny(arch, vocab), tok_dir, root / arch) for arch in FAMILIES}


def llama(path: Path):
    from trulyopen.serve.llamacpp import open_gguf

    return open_gguf(path, 512, threads=2, f32_cache=path.name.startswith("f32"))


def test_tokenisation_and_chat_template_match(models, held_out, tmp_path):
    from transformers import AutoTokenizer

    from trulyopen.finetune.render import ChatRenderer

    hf_dir = models["llama"]
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    path = export.write_gguf(hf_dir, tmp_path / "m.gguf", "f32")
    vocab_only = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for i, doc in enumerate(held_out):
        ours = tok(doc, add_special_tokens=False)["input_ids"]
        theirs = vocab_only.tokenize(doc.encode(), add_bos=False, special=False)
        assert theirs == ours, f"document {i} ({STDLIB[150 + i]}) tokenises differently"
    assert vocab_only.detokenize(tok(MULTIBYTE)["input_ids"]).decode() == MULTIBYTE
    # the chat template travels in the file: llama-cpp-python renders it as our tokenizer does
    meta = vocab_only.metadata
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
        template=meta["tokenizer.chat_template"], eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    messages = [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Reverse a list, naïvely."},
        {"role": "assistant", "content": "def rev(xs):\n    return xs[::-1]"},
        {"role": "user", "content": "Now a string."},
    ]
    ours = ChatRenderer(tok).text(messages, generation_prompt=True)
    assert formatter(messages=messages).prompt == ours
    # and the special tokens are the same ids, parsed as specials from the text
    assert vocab_only.tokenize(ours.encode(), add_bos=False, special=True) == tok(ours)["input_ids"]
    assert vocab_only.token_eos() == tok.eos_token_id
    assert int(meta["tokenizer.ggml.eot_token_id"]) == tok.convert_tokens_to_ids("<|end|>")


def prompts(tok_dir: Path, held_out: list[str], n: int = 20, length: int = 12) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    return [tok(doc, add_special_tokens=False)["input_ids"][:length] for doc in held_out[:n]]


def ours_greedy(hf_dir: Path, prompt_ids: list[list[int]], n: int) -> tuple[list[list[int]], float]:
    """Our engine's greedy tokens, and the smallest gap between the top two logits along them: a
    choice decided by less than float32 rounding could go either way in any other implementation."""
    from transformers import AutoModelForCausalLM

    from trulyopen.infer.engine import generate
    from trulyopen.infer.sampling import SamplingParams

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    outs = generate(model, prompt_ids, SamplingParams(max_new_tokens=n, temperature=0))
    margin = float("inf")
    with torch.no_grad():
        for p, out in zip(prompt_ids, outs, strict=True):
            top2 = model(torch.tensor([p + out])).logits[0, len(p) - 1 : -1].topk(2).values
            margin = min(margin, float((top2[:, 0] - top2[:, 1]).min()))
    return outs, margin


def theirs_greedy(llm, prompt: list[int], n: int) -> list[int]:
    out = []
    for token in llm.generate(prompt, temp=0.0, reset=True):
        out.append(int(token))
        if len(out) == n:
            return out
    return out


def theirs_top1(llm, sequence: list[int], start: int) -> list[int]:
    """llama.cpp's most likely next token after each prefix of `sequence` from `start` on (teacher
    forced: the positions are the same whatever it would have chosen)."""
    llm.reset()
    llm.eval(sequence[:start])
    top1 = []
    for token in sequence[start:]:
        last = llama_cpp.llama_get_logits_ith(llm.ctx, -1)  # the last evaluated position's logits
        top1.append(int(np.argmax(np.ctypeslib.as_array(last, shape=(llm.n_vocab(),)))))
        llm.eval([token])
    return top1


@pytest.mark.parametrize("arch", FAMILIES)
def test_greedy_decoding_matches_our_engine(arch, models, tok_dir, held_out, tmp_path):
    hf_dir = models[arch]
    ids = prompts(tok_dir, held_out)
    ours, margin = ours_greedy(hf_dir, ids, 64)
    assert margin > 5e-5, "a near-tie: the comparison below would test rounding, not the export"
    f32 = export.write_gguf(hf_dir, tmp_path / "f32.gguf", "f32")
    llm = llama(f32)
    for i, p in enumerate(ids):
        assert theirs_greedy(llm, p, 64) == ours[i], f"{arch}: prompt {i} decodes differently"
    del llm
    # lower precisions: the next token at those same positions, and the file sizes
    params = sum(t.numel() for t in _tensors(hf_dir).values())
    for quant, bytes_per_param in (("bf16", 2), ("q8_0", 34 / 32), ("q4_k_m", None)):
        path = export.write_gguf(hf_dir, tmp_path / f"{quant}.gguf", quant)
        llm = llama(path)
        agree = total = 0
        for p, out in zip(ids, ours, strict=True):
            top1 = theirs_top1(llm, p + out, len(p))
            agree += sum(a == b for a, b in zip(top1, out, strict=True))
            total += len(out)
        del llm
        floor = 0.95 if quant != "q4_k_m" else 0.7  # 4 bits a weight on random weights: a floor, not the aim
        assert agree / total >= floor, f"{arch} {quant}: top-1 agreement {agree / total:.3f}"
        size, payload = path.stat().st_size, _payload(path)
        assert size - payload < 200_000  # the rest is the tokenizer and the header
        if bytes_per_param:
            # 1-D norm weights stay f32 and tensors too narrow for a block fall back to f16
            assert bytes_per_param * params <= payload <= bytes_per_param * params * 1.1
        else:
            assert payload < (34 / 32) * params  # smaller than q8_0


def _tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(hf_dir / "model.safetensors"))


def _payload(path: Path) -> int:
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


def test_file_holds_architecture_and_tokenizer(models, tmp_path):
    import gguf

    for arch, name in (("llama", "llama"), ("qwen3", "qwen3"), ("olmo2", "olmo2")):
        path = export.write_gguf(models[arch], tmp_path / f"{arch}.gguf", "f16")
        reader = gguf.GGUFReader(str(path))
        fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.t")}
        assert fields["general.architecture"] == name
        assert fields[f"{name}.block_count"] == 2 and fields[f"{name}.embedding_length"] == 64
        assert fields["tokenizer.ggml.pre"] == "gpt-2" and fields["tokenizer.ggml.model"] == "gpt2"
        assert fields["tokenizer.ggml.add_bos_token"] is False
        assert len(reader.fields["tokenizer.ggml.merges"].data) > 1000
        names = {t.name for t in reader.tensors}
        assert {"token_embd.weight", "output.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight"} <= names
        if arch == "olmo2":
            assert {"blk.0.post_attention_norm.weight", "blk.0.attn_q_norm.weight"} <= names


# ------------------------------------------------------------------------------------------ Ollama


def parse_modelfile(text: str) -> dict:
    """Ollama's Modelfile format: `INSTRUCTION args` per line; `\"\"\"...\"\"\"` spans lines; `#` comments."""
    out: dict = {"PARAMETER": []}
    pos = 0
    for m in re.finditer(r'(?ms)^\s*(#[^\n]*|(\w+)\s+("""(.*?)"""|[^\n]*))\s*$', text):
        assert text[pos : m.start()].strip() == "", f"unparsed: {text[pos : m.start()]!r}"
        pos = m.end()
        if m.group(1).startswith("#"):
            continue
        instruction, raw = m.group(2).upper(), m.group(3)
        value = m.group(4) if m.group(4) is not None else raw.strip()
        assert instruction in {"FROM", "TEMPLATE", "PARAMETER", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE"}
        if instruction == "PARAMETER":
            key, arg = value.split(None, 1)
            out["PARAMETER"].append((key, json.loads(arg) if arg.startswith('"') else arg))
        else:
            out[instruction] = value
    assert text[pos:].strip() == ""
    return out


def render_go_template(template: str, messages: list[dict]) -> str:
    """The subset of Go's text/template the Modelfile uses: {{ range .Messages }}...{{ end }},
    {{ .Role }}, {{ .Content }}, and the `{{-` / `-}}` whitespace trims."""
    template = re.sub(r"\s*\{\{-", "{{", template)
    template = re.sub(r"-\}\}\s*", "}}", template)
    head, rest = template.split("{{ range .Messages }}", 1)
    body, tail = rest.split("{{ end }}", 1)
    assert "{{" not in head + tail, "only a range over .Messages is rendered here"
    turns = "".join(
        body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]) for m in messages
    )
    return head + turns + tail


def test_ollama_modelfile(models, tmp_path):
    from transformers import AutoTokenizer

    out = export.export_gguf(models["qwen3"], tmp_path / "ollama", "q8_0")
    spec = parse_modelfile((out.parent / "Modelfile").read_text())
    assert spec["FROM"] == f"./{out.name}" and (out.parent / spec["FROM"]).exists()
    assert ("stop", "<|end|>") in spec["PARAMETER"] and ("stop", "<|endoftext|>") in spec["PARAMETER"]
    tok = AutoTokenizer.from_pretrained(str(models["qwen3"]))
    for messages in (
        [{"role": "user", "content": "hi"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Write f.\n"},
            {"role": "assistant", "content": "def f(): pass"},
            {"role": "user", "content": "Thanks — and g?"},
        ],
    ):
        ours = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_go_template(spec["TEMPLATE"], messages) == ours


# ------------------------------------------------------------------------------------------ the CLI


def test_export_cli_and_errors(models, tmp_path):
    runner = CliRunner()
    olmo = str(models["olmo2"])
    result = runner.invoke(app, ["export", olmo, "--format", "gguf", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "model-f16.gguf").exists() and (tmp_path / "o" / "Modelfile").exists()

    # an architecture llama.cpp cannot run here: exit 2, naming it, nothing written
    from transformers import AutoTokenizer

    from trulyopen.model.build import from_preset
    from trulyopen.model.presets import SIZES

    vocab = len(AutoTokenizer.from_pretrained(str(models["llama"])))
    moe = export_hf(from_preset("qwen3_moe", SIZES["tiny"], vocab, 64), models["llama"], tmp_path / "moe")
    result = runner.invoke(app, ["export", str(moe), "--format", "gguf", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "qwen3_moe" in result.output and "llama, qwen3, olmo2" in result.output
    assert not list((tmp_path).glob("x/*.gguf"))

    # a type that does not exist, then one that needs llama.cpp where it is absent
    llama = str(models["llama"])
    result = runner.invoke(app, ["export", llama, "--format", "gguf", "--quant", "q3_zz", "--out", "y"])
    assert result.exit_code == 2 and "q3_zz" in result.output and "q4_k_m" in result.output
    result = runner.invoke(app, ["export", llama, "--format", "hf", "--quant", "q8_0", "--out", "y"])
    assert result.exit_code == 2 and "int8" in result.output
    # a quantized Hugging Face export through the CLI: transformers reads its quantization config
    result = runner.invoke(
        app, ["export", llama, "--format", "hf", "--quant", "nf4", "--out", str(tmp_path / "q")]
    )
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["bnb_4bit_quant_type"] == "nf4" and (tmp_path / "q" / "tokenizer.json").exists()


def test_k_quants_need_llama_cpp(monkeypatch):
    monkeypatch.setattr(export, "llama_cpp_available", lambda: False)
    with pytest.raises(export.GGUFError, match="q4_k_m: needs llama.cpp's quantizer"):
        export.check_quant("q4_k_m")
    export.check_quant("q8_0")  # gguf's own q8_0 writer needs nothing more


def test_q8_0_without_llama_cpp_is_llama_cpp_s(models, tmp_path, monkeypatch):
    """gguf's numpy q8_0 gives the tensors llama.cpp's quantizer gives, byte for byte."""
    import gguf

    theirs = export.write_gguf(models["llama"], tmp_path / "theirs.gguf", "q8_0")
    monkeypatch.setattr(export, "llama_cpp_available", lambda: False)
    ours = export.write_gguf(models["llama"], tmp_path / "ours.gguf", "q8_0")
    a = {t.name: (t.tensor_type, bytes(t.data)) for t in gguf.GGUFReader(str(theirs)).tensors}
    b = {t.name: (t.tensor_type, bytes(t.data)) for t in gguf.GGUFReader(str(ours)).tensors}
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]


# ------------------------------------------------------------------------------------------ serving


def fake_run_checkpoint(hf_dir: Path, run_dir: Path) -> Path:
    """A run directory holding `hf_dir`'s weights as a pretraining checkpoint (its layout:
    config.json, model.safetensors, state.json; the tokenizer inside it)."""
    import shutil

    ckpt = run_dir / "checkpoints" / "pretrain" / "step_000004"
    shutil.copytree(hf_dir, ckpt)
    (ckpt / "state.json").write_text(json.dumps({"step": 4}))
    (run_dir / "ledger.jsonl").write_text("")
    return ckpt


def test_gguf_for_serving_is_exported_once_per_weights(models, tmp_path):
    from trulyopen.serve.llamacpp import cached_gguf

    ckpt = fake_run_checkpoint(models["llama"], tmp_path / "run")
    first = cached_gguf(str(tmp_path / "run"), "q8_0")
    assert first.parent.parent == tmp_path / "run" / "gguf"
    stamp = first.stat().st_mtime_ns
    assert cached_gguf(str(ckpt), "q8_0") == first and first.stat().st_mtime_ns == stamp
    # new weights, a new file
    from safetensors.torch import load_file, save_file

    weights = load_file(str(ckpt / "model.safetensors"))
    weights["model.norm.weight"] += 1
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    assert cached_gguf(str(ckpt), "q8_0") != first


class Served:
    """`trulyopen serve RUN --engine llama.cpp --quant f32` in its own process (a run whose
    checkpoint is the qwen3 model), with that model in fp32 and its tokenizer to check it by."""

    def __init__(self, models: dict[str, Path], tmp: Path):
        import socket
        import subprocess
        import sys

        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tests.test_serve import wait_until_healthy

        run = tmp / "run"
        fake_run_checkpoint(models["qwen3"], run)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "trulyopen", "serve", str(run), "--engine", "llama.cpp"]
        self.proc = subprocess.Popen(
            cmd + ["--quant", "f32", "--port", str(port), "--max-len", "512"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.url = f"http://127.0.0.1:{port}"
        try:
            wait_until_healthy(self.proc, self.url, 120)
        except BaseException:
            self.stop()
            raise
        self.model = AutoModelForCausalLM.from_pretrained(str(models["qwen3"]), dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(str(models["qwen3"]))

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="none")

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        text = self.tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def stop(self) -> str:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        return self.proc.stdout.read()


@pytest.fixture(scope="module")
def served(models, tmp_path_factory):
    s = Served(models, tmp_path_factory.mktemp("served"))
    yield s
    assert "Traceback" not in s.stop()


def test_serve_engine_llama_cpp_through_the_openai_client(served):
    """`trulyopen serve RUN --engine llama.cpp` in its own process: the real `openai` client gets
    our engine's greedy text (f32), streamed and not, on completions and chat."""
    import openai

    from tests.test_serve import greedy_text

    model, tok, client = served.model, served.tok, served.client()
    assert [m.id for m in client.models.list().data] == ["run"]
    prompt = "def parse(text):\n    "
    r = client.completions.create(model="run", prompt=prompt, max_tokens=24, temperature=0)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert r.choices[0].text == greedy_text(model, tok, ids, 24)
    assert r.usage.prompt_tokens == len(ids)
    streamed = client.completions.create(
        model="run", prompt=prompt, max_tokens=24, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo wörld"}]
    chat = client.chat.completions.create(model="run", messages=messages, max_tokens=16, temperature=0)
    end = tok.convert_tokens_to_ids("<|end|>")
    assert chat.choices[0].message.content == greedy_text(model, tok, served.chat_ids(messages), 16, (end,))
    chunks = list(
        client.chat.completions.create(
            model="run",
            messages=messages,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        chat.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    # sampling with a seed repeats; the limits and errors are the server's own
    a, b = (
        client.completions.create(model="run", prompt=prompt, max_tokens=16, temperature=1.0, seed=7)
        for _ in range(2)
    )
    assert a.choices[0].text == b.choices[0].text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="run", prompt=" ".join(map(str, range(400))), max_tokens=8)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x", max_tokens=8)


def test_llama_cpp_json_schema_and_tool_calls_validate(served):
    """Through llama.cpp, response_format json_schema answers (sampled, several seeds, streamed and
    not) validate against the schema, and tool_choice required / a named tool give tool_calls whose
    arguments validate against that tool's schema: the request's llguidance mask is applied in
    llama.cpp's sampler chain."""
    import jsonschema

    from tests.test_serve import ADD, PERSON, UPPER, check_tool_calls

    client = served.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    messages = [{"role": "user", "content": "héllo wörld"}]
    texts = set()
    for seed in range(6):
        args = dict(model="run", messages=messages, max_tokens=60, seed=seed, response_format=fmt)
        if seed % 2:
            r = client.chat.completions.create(**args)
            text, reason = r.choices[0].message.content, r.choices[0].finish_reason
        else:
            chunks = list(client.chat.completions.create(**args, stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), PERSON)
        texts.add(text)
    assert len(texts) > 3  # sampled: the seeds give different values

    messages = [{"role": "user", "content": "add 2 and 3"}]
    # closed (this vocabulary's random model would write further properties to max_tokens)
    upper = {**UPPER, "function": {**UPPER["function"]}}
    upper["function"]["parameters"] = {**UPPER["function"]["parameters"], "additionalProperties": False}
    check_tool_calls(client, "run", messages, [ADD, upper], seeds=2, max_tokens=96)


def model_logprobs(model, prompt: list[int], out: list[int]) -> torch.Tensor:
    """Our model's log-softmax over the vocabulary before each token of `out` [len(out), vocab]."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1)


def test_llama_cpp_logprobs_equal_our_models(served):
    """logprobs through llama.cpp (f32) on completions and chat, streamed and not: each greedy
    token's log-probability, and its top alternatives, are our model's log-softmax to 1e-3; the
    alternatives are sorted and the chosen token is the first."""
    from trulyopen.infer.engine import generate
    from trulyopen.infer.sampling import SamplingParams

    model, tok, client = served.model, served.tok, served.client()
    prompt = "def parse(text):\n    "
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r = client.completions.create(model="run", prompt=ids, max_tokens=16, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    out = generate(model, [ids], SamplingParams(max_new_tokens=16, temperature=0))[0]  # llama.cpp's too
    want = model_logprobs(model, ids, out)
    assert len(lp.token_logprobs) == len(out) and lp.tokens == [tok.decode([t]) for t in out]
    for i, (top, token, value) in enumerate(zip(lp.top_logprobs, lp.tokens, lp.token_logprobs, strict=True)):
        assert abs(value - float(want[i, out[i]])) < 1e-3
        # (at most 3: tokens that decode to the same text, such as half characters, share an entry)
        assert 1 <= len(top) <= 3 and list(top.values()) == sorted(top.values(), reverse=True)
        assert abs(top[token] - value) < 1e-6  # greedy: the chosen token is the most likely
        best = want[i].topk(3).values
        assert all(float((best - v).abs().min()) < 1e-3 for v in top.values())

    messages = [{"role": "user", "content": "héllo wörld"}]
    args = dict(model="run", messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)
    chat = client.chat.completions.create(**args)
    content = chat.choices[0].logprobs.content
    chat_ids = served.chat_ids(messages)
    stops = (tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>"))
    answer = generate(model, [chat_ids], SamplingParams(max_new_tokens=10, temperature=0, stop_ids=stops))[0]
    want = model_logprobs(model, chat_ids, answer)
    assert len(content) == len(answer)
    assert all(abs(c.logprob - float(want[i, answer[i]])) < 1e-3 for i, c in enumerate(content))
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token for c in content)
    streamed = [c for c in client.chat.completions.create(**args, stream=True) if c.choices]
    pieces = [x for c in streamed if c.choices[0].logprobs for x in c.choices[0].logprobs.content]
    assert [x.token for x in pieces] == [x.token for x in content]
    assert np.allclose([x.logprob for x in pieces], [x.logprob for x in content], atol=1e-4)


class Collected:
    """A request's events, and whether it has finished."""

    def __init__(self):
        import threading

        self.events, self.done = [], threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if event.finish_reason is not None:
            self.done.set()


def test_llama_cpp_engine_under_a_grammar_keeps_the_models_logprobs(models, tmp_path):
    """LlamaCppEngine directly (f32): a sampled answer under a JSON schema validates, and its
    logprobs are the model's own log-softmax (to 1e-3), taken before the mask (the grammar forces
    tokens the model would not have ranked first). A matcher that refuses the sampled token, or
    that fails in llama.cpp's sampler callback, fails its request alone, with "error"."""
    import jsonschema
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.test_serve import PERSON
    from trulyopen.infer.constrain import Grammars
    from trulyopen.infer.engine import Request
    from trulyopen.infer.sampling import SamplingParams
    from trulyopen.serve.llamacpp import LlamaCppEngine

    tok = AutoTokenizer.from_pretrained(str(models["qwen3"]))
    model = AutoModelForCausalLM.from_pretrained(str(models["qwen3"]), dtype=torch.float32).eval()
    gguf_file = export.write_gguf(models["qwen3"], tmp_path / "model-f32.gguf", "f32")
    engine = LlamaCppEngine(gguf_file, lambda ids: tok.decode(ids, skip_special_tokens=True), 256, threads=2)
    grammars = Grammars(tok, engine.vocab_size)
    grammar = grammars.json_schema(PERSON)
    prompt = tok("def parse(text):\n    ", add_special_tokens=False)["input_ids"]

    def run(matcher, logprobs=None, seed=0) -> Collected:
        got = Collected()
        params = SamplingParams(max_new_tokens=60, temperature=1.0, seed=seed, logprobs=logprobs)
        req = Request(prompt, params, got)
        req.matcher = matcher
        engine.submit(req)
        assert got.done.wait(60)
        return got

    engine.start()
    try:
        forced = 0
        for seed in range(2):
            got = run(grammars.matcher(grammar), logprobs=2, seed=seed)
            assert got.events[-1].finish_reason == "stop", got.events[-1]
            out = [t for e in got.events for t in e.token_ids]
            jsonschema.validate(json.loads(tok.decode(out, skip_special_tokens=True)), PERSON)
            scored = [lp for e in got.events for lp in e.logprobs]
            want = model_logprobs(model, prompt, out)
            assert [lp.token for lp in scored] == out
            for i, lp in enumerate(scored):
                assert abs(lp.logprob - float(want[i, out[i]])) < 1e-3
                top = want[i].topk(2)
                assert [t for t, _ in lp.top] == top.indices.tolist()
                assert np.allclose([v for _, v in lp.top], top.values, atol=1e-3)
                forced += lp.top[0][0] != lp.token
        assert forced > 0  # the mask chose against the model's first choice, the logprobs did not follow

        class Refusing:  # allows every token, then refuses the one sampled
            def compute_bitmask(self):
                return b"\xff" * (4 * ((engine.vocab_size + 31) // 32))

            def consume_token(self, token):
                return False

            def get_error(self):
                return "no such token here"

            def is_stopped(self):
                return False

        class Failing(Refusing):
            def compute_bitmask(self):
                raise RuntimeError("the mask failed")

        refused = run(Refusing()).events[-1]
        assert refused.finish_reason == "error" and "refused a token: no such token here" in refused.error
        failed = run(Failing()).events[-1]
        assert failed.finish_reason == "error" and "the mask failed" in failed.error
        # and the engine goes on: a free request after them
        assert run(None).events[-1].finish_reason in ("stop", "length")
    finally:
        engine.stop()


def test_the_grammar_mask_covers_ids_past_the_tokenizers(tok_dir):
    """llama.cpp's vocabulary may be larger than the tokenizer's: those ids are masked too, and
    the others are masked as the matcher's own bitmask says."""
    from transformers import AutoTokenizer

    from tests.test_serve import PERSON
    from trulyopen.infer.constrain import Grammars
    from trulyopen.serve.llamacpp import allow

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    grammars = Grammars(tok, len(tok))
    matcher = grammars.matcher(grammars.json_schema(PERSON))
    scores = np.zeros(len(tok) + 100, dtype=np.float32)
    allow(scores, matcher)
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    allowed = set(np.flatnonzero(np.isfinite(scores)).tolist())
    assert allowed == set(np.flatnonzero(bits[: len(tok)]).tolist())
    assert allowed == {tok.convert_tokens_to_ids("{")} | allowed and len(allowed) < 20
    assert np.isneginf(scores[len(tok) :]).all()
