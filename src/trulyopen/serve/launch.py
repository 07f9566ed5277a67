"""Loading a model for inference, and starting a server: ours, or vLLM / SGLang where present.

Any target `trulyopen eval` takes works here too (a run directory, a checkpoint, a Hugging Face
directory or hub name). bf16 is used where the hardware runs it fast (`precision: auto`).
"""

from __future__ import annotations

import errno
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from trulyopen.errors import UserError
from trulyopen.locate import locate


class EngineUnavailable(UserError, RuntimeError):
    pass


def load(target: str, precision: str = "auto", device: str | None = None):
    """(model, tokenizer, name): the model in eval mode, in the chosen precision, on the device."""
    from trulyopen.evaluate import models
    from trulyopen.train.precision import choose_dtype

    em = models.load(target)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = choose_dtype(precision, dev)
    model = em.model.to(device=dev, dtype=dtype).eval()
    name = Path(str(target).rstrip("/")).name or str(target)
    return model, em.tokenizer, name


def build_server(
    target: str, limits=None, api_key: str | None = None, precision: str = "auto", max_len: int | None = None
):
    from trulyopen.infer.engine import Engine
    from trulyopen.serve.app import Limits, Server

    limits = limits or Limits()
    model, tok, name = load(target, precision)
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
    print(f"serving {server.name} at http://{host}:{port}/v1 (chat page: http://{host}:{port}/)", flush=True)
    uvicorn.run(build_app(server), host=host, port=port, log_level="warning", timeout_graceful_shutdown=60)


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
    # the two servers take the same options but one: how the model directory is named
    entry, model_opt = {
        "vllm": ("vllm.entrypoints.openai.api_server", "--model"),
        "sglang": ("sglang.launch_server", "--model-path"),
    }[engine]
    cmd = [sys.executable, "-m", entry, model_opt, str(model_dir), "--served-model-name", name]
    cmd += ["--host", host, "--port", str(port)] + (["--api-key", api_key] if api_key else [])
    print(" ".join(cmd), flush=True)
    return subprocess.call(cmd, env=os.environ.copy())
