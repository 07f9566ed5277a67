"""vLLM and SGLang behind `trulyopen serve --engine vllm|sglang`: the command line they are started
with (no GPU is needed to build it). Tools, response_format and logprobs are those servers' own;
what we add is their parser for the tool calls our chat template writes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from trulyopen.serve import launch


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A Hugging Face directory with our tokenizer (and so our chat template, which writes
    <tool_call>{"name", "arguments"}</tool_call>), as `trulyopen export` writes it."""
    from trulyopen.data.tokenizer import save_hf, train_tokenizer
    from trulyopen.recipe import TokenizerConfig

    out = tmp_path_factory.mktemp("hf")
    save_hf(
        train_tokenizer(iter(["def add(a, b):\n    return a + b\n"] * 20), TokenizerConfig(vocab_size=300)),
        out,
    )
    (out / "config.json").write_text("{}")
    return out


def test_the_command_line_turns_on_the_tool_call_parser_our_template_needs(model_dir, tmp_path):
    assert "<tool_call>" in launch.chat_template(str(model_dir))
    assert launch.chat_template(str(tmp_path)) == ""  # no template here

    template = launch.chat_template(str(model_dir))
    assert launch.tool_parser("vllm", template) == "hermes"
    assert launch.tool_parser("sglang", template, ("qwen25", "hermes", "llama3")) == "hermes"
    assert launch.tool_parser("sglang", template, ("qwen25", "llama3")) == "qwen25"  # an older SGLang
    assert launch.tool_parser("vllm", "{{ messages }}") is None

    vllm = launch.external_command("vllm", "/m", "quick", "127.0.0.1", 8000, "k", "hermes")
    assert vllm == [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "/m",
        "--served-model-name", "quick", "--host", "127.0.0.1", "--port", "8000", "--api-key", "k",
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
    ]  # fmt: skip
    sglang = launch.external_command("sglang", "/m", "quick", "0.0.0.0", 30000, None, "qwen25")
    assert sglang == [
        sys.executable, "-m", "sglang.launch_server", "--model-path", "/m",
        "--served-model-name", "quick", "--host", "0.0.0.0", "--port", "30000",
        "--tool-call-parser", "qwen25",
    ]  # fmt: skip
    plain = launch.external_command("vllm", "/m", "quick", "127.0.0.1", 8000)
    assert "--tool-call-parser" not in plain and "--enable-auto-tool-choice" not in plain


def test_serve_external_starts_vllm_with_the_parser_for_our_model(model_dir, monkeypatch):
    """serve_external end to end, the GPU and the server stood in for: the model's own directory,
    its name, and the parser read from its template."""
    started = []
    find_spec = launch.importlib.util.find_spec
    monkeypatch.setattr(
        launch.importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "vllm" else find_spec(name, *a),
    )
    monkeypatch.setattr(launch.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(launch.subprocess, "call", lambda cmd, env: started.append(cmd) or 0)
    assert launch.serve_external("vllm", str(model_dir), "127.0.0.1", 8000) == 0
    (cmd,) = started
    assert cmd[cmd.index("--model") + 1] == str(model_dir)
    assert cmd[cmd.index("--served-model-name") + 1] == model_dir.name
    assert cmd[-3:] == ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
