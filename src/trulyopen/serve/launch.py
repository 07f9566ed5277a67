"""Loading a model for inference, and starting a server: ours, or vLLM / SGLang where present.

Any target `trulyopen eval` takes works here too (a run directory, a checkpoint, a Hugging Face
directory or hub name). bf16 is used where the hardware runs it fast (`precision: auto`).
"""

from __future__ import annotations

import errno
import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from trulyopen.errors import UserError
from trulyopen.locate import locate


class EngineUnavailable(UserError, RuntimeError):
    pass


def load(target: str, precision: str = "auto", device: str | None = None):
    """(model, tokenizer, name): the model in eval mode, in the chosen precision, on the device. A
    vision-language model comes as a `vlm.generate.VLM` (the model with its processor)."""
    from trulyopen.evaluate import models
    from trulyopen.train.precision import choose_dtype

    em = models.load(target)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = choose_dtype(precision, dev)
    model = em.model.to(device=dev, dtype=dtype).eval()
    name = Path(str(target).rstrip("/")).name or str(target)
    processor = getattr(em, "processor", None)
    if processor is not None:
        from trulyopen.vlm.generate import VLM

        return VLM(model, processor), em.tokenizer, name
    return model, em.tokenizer, name


def build_server(
    target: str, limits=None, api_key: str | None = None, precision: str = "auto", max_len: int | None = None
):
    from trulyopen.infer.engine import Engine
    from trulyopen.serve.app import Limits, Server
    from trulyopen.vlm import generate

    limits = limits or Limits()
    model, tok, name = load(target, precision)
    if isinstance(model, generate.VLM):  # ours where the family allows, else generate() (vlm/generate.py)
        engine = generate.engine(model, slots=limits.max_concurrent, max_len=max_len)
        if isinstance(engine, generate.GenerateEngine):
            print(generate.note(name, model), flush=True)
        return Server(engine, tok, name, limits, api_key, vlm=model)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    engine = Engine(model, decode, slots=limits.max_concurrent, max_len=max_len)
    return Server(engine, tok, name, limits, api_key)


def serve(
    target: str,
    host: str,
    port: int,
    limits=None,
    api_key: str | None = None,
    precision: str = "auto",
    max_len: int | None = None,
    engine: str = "trulyopen",
    quant: str | None = None,
) -> None:
    """Our server, over our engine or llama.cpp's; uvicorn stops taking connections on SIGTERM and
    lets running requests finish."""
    import uvicorn

    app, _ = _app(target, host, port, limits, api_key, precision, max_len, engine, quant)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=60)


def _app(
    target,
    host,
    port,
    limits=None,
    api_key=None,
    precision="auto",
    max_len=None,
    engine="trulyopen",
    quant=None,
):
    """The checks and the model loading of `serve`: the app it runs, and the model's name there."""
    from trulyopen.serve.app import build_app

    check_port(host, port)  # before loading the model: a taken port is known in a millisecond
    if engine == "llama.cpp":
        from trulyopen.serve import llamacpp
        from trulyopen.train.precision import choose_dtype

        if quant is None:  # fp32 and bf16 as asked; auto: bf16 where the CPU runs it fast, else f16
            dtype = choose_dtype(precision, torch.device("cpu"))
            quant = {"fp32": "f32", "bf16": "bf16"}.get(
                precision, "bf16" if dtype == torch.bfloat16 else "f16"
            )
        server = llamacpp.build_server(target, quant, limits, api_key, max_len)
    else:
        server = build_server(target, limits, api_key, precision, max_len)
    attach_tracer(server, target)
    print(f"serving {server.name} at http://{host}:{port}/v1 (chat page: http://{host}:{port}/)", flush=True)
    return build_app(server), server.name


def attach_tracer(server, target: str) -> None:
    """POST /v1/trace answers from the trace index of the run or release the model comes from."""
    from trulyopen.trace.spans import Tracer, find_index

    try:
        server.tracer = Tracer(*find_index(target))
    except UserError as e:
        server.no_trace = str(e)
    else:
        print(f"tracing answers to {server.tracer.meta['tokens']:,} training tokens (POST /v1/trace)")


class Background:
    """`serve` on a thread of this process (a notebook's kernel, a script): `url`, `base_url` (what
    the `openai` client takes), `name` (the model's id), `stop()`, and a context manager that stops
    it. uvicorn leaves the signals alone off the main thread, so Ctrl-C stays the caller's."""

    def __init__(self, target: str, host: str = "127.0.0.1", port: int | None = None, **options: Any):
        """`options`: serve's (limits, api_key, precision, max_len, engine, quant)."""
        import threading
        import time

        import uvicorn

        port = port or free_port(host)
        app, self.name = _app(target, host, port, **options)
        self.url = f"http://{host}:{port}"
        self.base_url = self.url + "/v1"
        self._uv = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self._thread = threading.Thread(target=self._uv.run, name="trulyopen-serve", daemon=True)
        self._thread.start()
        while not self._uv.started:  # the model is loaded by now: this is the socket and the engine
            if not self._thread.is_alive():
                raise UserError(f"the server at {self.url} did not start (see the log above)")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop taking requests, let running ones finish, and stop the engine."""
        self._uv.should_exit = True
        self._thread.join()

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the system's choice)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port(host: str, port: int) -> None:
    """Fail with one line if `host:port` cannot be listened on (taken, or not this machine's)."""
    import socket

    try:
        with socket.create_server((host, port)):  # SO_REUSEADDR as uvicorn: TIME_WAIT is no obstacle
            pass
    except OSError as e:
        reason = (
            "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be listened on ({e.strerror})"
        )
        raise UserError(f"--port {port}: {host}:{port} {reason}; choose another --port or --host") from None


def serve_external(engine: str, target: str, host: str, port: int, api_key: str | None = None) -> int:
    """Export the model to the Hugging Face format and run vLLM's or SGLang's OpenAI server on it."""
    module = {"vllm": "vllm", "sglang": "sglang"}[engine]
    if importlib.util.find_spec(module) is None:
        raise EngineUnavailable(
            f"--engine {engine}: the '{module}' package is not installed "
            f"(pip install {module}); use the built-in engine instead"
        )
    if not torch.cuda.is_available():
        raise EngineUnavailable(f"--engine {engine}: no GPU is present; use the built-in engine instead")
    found = locate(target)
    model_dir = Path(found.path)
    if found.kind == "checkpoint":  # vLLM and SGLang read the Hugging Face format: export it first
        from trulyopen.model.export import export_checkpoint

        model_dir = Path(tempfile.mkdtemp(prefix="trulyopen-serve-"))
        export_checkpoint(Path(found.path), model_dir)
    name = Path(str(target).rstrip("/")).name
    known = _sglang_parsers() if engine == "sglang" else ()
    parser = tool_parser(engine, chat_template(str(model_dir)), known)
    cmd = external_command(engine, str(model_dir), name, host, port, api_key, parser)
    print(" ".join(cmd), flush=True)
    return subprocess.call(cmd, env=os.environ.copy())


def external_command(
    engine: str,
    model: str,
    name: str,
    host: str,
    port: int,
    api_key: str | None = None,
    tool_parser: str | None = None,
) -> list[str]:
    """The command line of vLLM's or SGLang's OpenAI server for `model` (a Hugging Face directory
    or hub name), served as `name`; with `tool_parser`, tool calls in the answers come back as
    `tool_calls` (tool_choice auto; both servers decode required and named calls under a grammar
    of their own). Tools, response_format and logprobs are those servers' own."""
    # the two servers take the same options but the model's and how tool calls are turned on
    entry, model_opt = {
        "vllm": ("vllm.entrypoints.openai.api_server", "--model"),
        "sglang": ("sglang.launch_server", "--model-path"),
    }[engine]
    cmd = [sys.executable, "-m", entry, model_opt, model, "--served-model-name", name]
    cmd += ["--host", host, "--port", str(port)] + (["--api-key", api_key] if api_key else [])
    if tool_parser is not None:
        if engine == "vllm":
            cmd.append("--enable-auto-tool-choice")
        cmd += ["--tool-call-parser", tool_parser]
    return cmd


def tool_parser(engine: str, template: str, sglang_parsers=()) -> str | None:
    """The parser, by the name `engine` knows it, of the calls a chat template writes as
    `<tool_call>{"name": .., "arguments": ..}</tool_call>` (ours, Hermes' and Qwen's convention);
    None for a template that writes none. SGLang's `qwen25` parser wants the newlines of Qwen 2.5's
    template inside the tags, which ours has not; its `hermes` parser (newer SGLang) does not, and
    is used where `sglang_parsers` (the installed SGLang's) has it."""
    if "<tool_call>" not in template:
        return None
    if engine == "vllm" or "hermes" in sglang_parsers:
        return "hermes"
    return "qwen25"


def chat_template(model: str) -> str:
    """The text of the files that hold a Hugging Face model's chat template ("" where none do); a
    hub model's when its files are in the local cache (nothing is downloaded for this)."""
    texts = []
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        path: Path | None = Path(model) / name
        if not path.is_file():
            try:
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(model, name)
            except Exception:  # not a hub name (a missing directory, say)
                cached = None
            path = Path(cached) if isinstance(cached, str) else None
        if path is not None:
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(texts)


def _sglang_parsers() -> tuple[str, ...]:
    """The tool-call parsers the installed SGLang knows (its module moved between versions)."""
    for module in ("sglang.srt.function_call.function_call_parser", "sglang.srt.function_call_parser"):
        try:
            return tuple(importlib.import_module(module).FunctionCallParser.ToolCallParserEnum)
        except Exception:
            continue
    return ()
