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


def test_serve_engine_llama_cpp_through_the_openai_client(models, tmp_path):
    """`trulyopen serve RUN --engine llama.cpp` in its own process: the real `openai` client gets
    our engine's greedy text (f32), streamed and not, on completions and chat."""
    import socket
    import subprocess
    import sys

    import openai
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.test_serve import greedy_text, wait_until_healthy

    run = tmp_path / "run"
    fake_run_checkpoint(models["qwen3"], run)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "trulyopen", "serve", str(run), "--engine", "llama.cpp", "--quant", "f32"]
    proc = subprocess.Popen(
        cmd + ["--port", str(port), "--max-len", "256"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(proc, url, 120)
        model = AutoModelForCausalLM.from_pretrained(str(models["qwen3"]), dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(str(models["qwen3"]))
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
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
        chat_ids = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        chat_ids = tok(chat_ids, add_special_tokens=False)["input_ids"]
        end = tok.convert_tokens_to_ids("<|end|>")
        assert chat.choices[0].message.content == greedy_text(model, tok, chat_ids, 16, (end,))
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
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert "Traceback" not in proc.stdout.read()
