"""Serving throughput: our engine and server against transformers' generate(), same model, one run.

    .venv/bin/python benchmarks/serve_throughput.py                 # the run recorded in BENCHMARKS.md
    .venv/bin/python benchmarks/serve_throughput.py --model DIR     # any Hugging Face directory or run
    .venv/bin/python benchmarks/serve_throughput.py --quick         # a smoke run

Rows:
  single   one greedy stream of --tokens new tokens after a --prompt-tokens prompt: our engine
           (trulyopen.infer.engine.generate) vs model.generate(do_sample=False); tokens/s, best of
           --repeat. Both run to exactly --tokens (no stop token).
  server   --clients concurrent streaming clients (aiohttp, asyncio) against `trulyopen serve` in its
           own process, each asking for --tokens tokens (ignore_eos) after its own prompt:
           aggregate completion tokens/s over the wall time, and time to first token (p50, p99).
  sequential  the same requests one after another through model.generate(): tokens/s.
  structured  the server row with every other client asking for JSON under a schema
           (response_format json_schema; its grammar masks that request's tokens), against all
           free, interleaved twice, best of each: the ratio (target >= 0.9x).

  llama.cpp  (when llama-cpp-python is installed; --no-llamacpp skips) on the same model and on a 150M
           Llama made here over the same tokenizer (random weights: speed does not depend on them),
           both in bf16 GGUF and in our engine in bf16:
             raw        llama-cpp-python's own Llama.generate, greedy, single stream, best of --repeat
             ours       our engine, bf16, single stream: ratio to raw (target >= 0.6x at 150M)
             served     `trulyopen serve --engine llama.cpp`, one streaming client: ratio to raw
                        (target >= 0.9x)
             clients    --clients streaming clients against `serve --engine llama.cpp` and against
                        `serve` (our engine, bf16): aggregate tokens/s of each

Targets: single >= 2x generate(); server >= 10x sequential. The last line is JSON.
Model: --model (default runs/quickstart, its newest checkpoint). The single stream runs in bf16 and
in fp32, each with the matrix-vector floor: the time of one token's matrix products alone, which
bounds the ratio any decoder can reach on this machine. The server and sequential rows run in fp32
(`precision: auto` here: this CPU has no bf16 matrix hardware, so batched bf16 is slow).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent


def prompts_for(tok, n: int, length: int) -> list[list[int]]:
    """n distinct prompts of `length` tokens cut from the standard library's own source."""
    import inspect as pyinspect
    import json as pyjson

    text = pyinspect.getsource(pyjson.decoder) + pyinspect.getsource(pyjson.encoder)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return [ids[i * 37 : i * 37 + length] for i in range(n)]


def hf_generate(model, ids: list[int], n: int) -> float:
    start = time.perf_counter()
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    assert out.shape[1] == len(ids) + n
    return time.perf_counter() - start


def matvec_floor_s(model) -> float:
    """Seconds for one token's matrix-vector products alone (every linear layer once, in model
    order, best of 50): the memory-bandwidth floor of any decode step in this precision."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}
    best = float("inf")
    with torch.inference_mode():
        for _ in range(50):
            start = time.perf_counter()
            for w in weights:
                torch.nn.functional.linear(inputs[w.shape[1]], w)
            best = min(best, time.perf_counter() - start)
    return best


def ours_generate(model, ids: list[int], n: int) -> float:
    from trulyopen.infer.engine import generate
    from trulyopen.infer.sampling import SamplingParams

    start = time.perf_counter()
    out = generate(model, [ids], SamplingParams(max_new_tokens=n, temperature=0))[0]
    assert len(out) == n
    return time.perf_counter() - start


# half the clients of the structured-output row answer under this schema: a string of code, so
# that constrained answers run about as long as free ones
SCHEMA = {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}


async def clients(
    url: str, name: str, prompts: list[list[int]], n: int, constrained: int = 0
) -> tuple[float, list[float], int]:
    """Every prompt as its own streaming request, all at once, with aiohttp (the client of vLLM's
    own serving benchmark): wall time, each request's time to first token, completion tokens.
    Every `constrained`-th request (0: none) asks for JSON under SCHEMA (response_format)."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def one(i, ids):
            body = {"model": name, "prompt": ids, "max_tokens": n, "temperature": 0, "stream": True}
            body |= {"ignore_eos": True, "stream_options": {"include_usage": True}}
            if constrained and i % constrained == 0:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "c", "schema": SCHEMA},
                }
            start, first, used = time.perf_counter(), None, 0
            async with session.post(url + "/v1/completions", json=body) as r:
                async for line in r.content:
                    if not line.startswith(b"data: {"):
                        continue
                    if first is None:
                        first = time.perf_counter() - start
                    if b'"usage"' in line:
                        used = json.loads(line[6:])["usage"]["completion_tokens"]
            return first, used

        start = time.perf_counter()
        results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        wall = time.perf_counter() - start
    return wall, [r[0] for r in results], sum(r[1] for r in results)


def start_server(model_arg: str, port: int, slots: int, extra: tuple[str, ...] = ("--precision", "fp32")):
    cmd = [sys.executable, "-m", "trulyopen", "serve", model_arg, "--port", str(port), *extra]
    cmd += ["--max-concurrent", str(slots)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.ConnectError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not start")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(model_arg: str, name: str, prompts, n: int, extra: tuple[str, ...]) -> tuple[float, float]:
    """(tokens/s of one streaming client, aggregate tokens/s of len(prompts) clients) through
    `trulyopen serve` in its own process."""
    port = free_port()
    proc = start_server(model_arg, port, len(prompts), extra)
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(clients(url, name, prompts[:1], 4))  # warm-up
        one = min(asyncio.run(clients(url, name, prompts[:1], n))[0] for _ in range(2))
        wall, _, used = asyncio.run(clients(url, name, prompts, n))
        assert used == len(prompts) * n, used
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return n / one, used / wall


def raw_llama_cpp(gguf_file: Path):
    """llama-cpp-python on its own: a function timing `n` greedy tokens of one stream after
    `ids` (its prompt cache cleared first)."""
    from trulyopen.serve.llamacpp import open_gguf  # llama_cpp.Llama on every core (and AMX's workaround)

    llm = open_gguf(gguf_file, 512)

    def once(ids: list[int], n: int) -> float:
        llm.reset()
        start, got = time.perf_counter(), 0
        for _ in llm.generate(ids, temp=0.0, min_p=0.0, reset=True):
            got += 1
            if got == n:
                break
        return time.perf_counter() - start

    return once


def llamacpp_rows(model_dir: str, label: str, args, prompts) -> dict:
    """llama.cpp against our engine and through our server, on one model (bf16 on both sides)."""
    from trulyopen.serve.launch import load
    from trulyopen.serve.llamacpp import cached_gguf

    theirs_once = raw_llama_cpp(cached_gguf(model_dir, "bf16"))
    model, _, name = load(model_dir, "bf16")
    theirs_once(prompts[0], 8), ours_generate(model, prompts[0], 8)  # warm-up
    # interleaved, best of --repeat each: a slower spell of this shared machine hits both sides
    theirs_s, ours_s = float("inf"), float("inf")
    for _ in range(args.repeat):
        theirs_s = min(theirs_s, theirs_once(prompts[0], args.tokens))
        ours_s = min(ours_s, ours_generate(model, prompts[0], args.tokens))
    raw, ours = args.tokens / theirs_s, args.tokens / ours_s
    del theirs_once
    params = sum(p.numel() for p in model.parameters())
    del model
    one, many = served(model_dir, name, prompts, args.tokens, ("--engine", "llama.cpp", "--quant", "bf16"))
    _, ours_many = served(model_dir, name, prompts, args.tokens, ("--precision", "bf16"))
    row = {
        "params_m": params / 1e6,
        "raw_tokens_per_s": raw,
        "ours_tokens_per_s": ours,
        "ours_ratio": ours / raw,
        "served_tokens_per_s": one,
        "served_ratio": one / raw,
        f"served_{args.clients}_clients_tokens_per_s": many,
        f"ours_served_{args.clients}_clients_tokens_per_s": ours_many,
    }
    print(
        f"llama.cpp, {label} ({params / 1e6:.1f} M, bf16): raw llama-cpp-python {raw:.1f} tok/s; our engine "
        f"{ours:.1f} tok/s ({ours / raw:.2f}x, target 0.6x at 150M); `serve --engine llama.cpp`, one "
        f"client {one:.1f} tok/s ({one / raw:.2f}x raw, target 0.9x); {args.clients} clients: llama.cpp "
        f"{many:.1f} tok/s, our engine {ours_many:.1f} tok/s"
    )
    return row


def model_150m(model_dir: str, out: Path) -> str:
    """A 150M Llama (the `150m` preset) over the model's own tokenizer, in the Hugging Face format."""
    from trulyopen.locate import locate
    from trulyopen.model.build import from_preset
    from trulyopen.model.export import export_hf
    from trulyopen.model.presets import SIZES
    from trulyopen.train.checkpoint import tokenizer_dir

    found = locate(model_dir)
    tok_dir = tokenizer_dir(Path(found.path)) if found.kind == "checkpoint" else Path(found.path)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    export_hf(from_preset("llama", SIZES["150m"], vocab, 2048), tok_dir, out)
    return str(out)


def cpu_name() -> str:
    """The CPU's model name and the matrix features that decide bf16 speed (lscpu's reading)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if "model name" in line), "")
    flags = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f" {f}" in text]
    return f"{name or platform.machine()} ({', '.join(flags)})"


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "runs" / "quickstart"))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-llamacpp", action="store_true", help="Skip the llama.cpp rows.")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.clients, args.repeat = 32, 8, 1
    if not Path(args.model).exists():
        raise SystemExit(
            f"{args.model}: not found (run `trulyopen run recipes/quickstart.yaml` first, or give --model)"
        )
    from trulyopen.serve.launch import load

    torch.manual_seed(0)
    singles = {}
    for precision in ("bf16", "fp32"):  # fp32 last: the rest of the run uses it
        model, tok, name = load(args.model, precision)
        prompts = prompts_for(tok, args.clients, args.prompt_tokens)
        # warm up both, then the best of --repeat
        hf_generate(model, prompts[0], 8)
        ours_generate(model, prompts[0], 8)
        hf_s = min(hf_generate(model, prompts[0], args.tokens) for _ in range(args.repeat))
        ours_s = min(ours_generate(model, prompts[0], args.tokens) for _ in range(args.repeat))
        floor = matvec_floor_s(model)
        single = {"hf_tokens_per_s": args.tokens / hf_s, "ours_tokens_per_s": args.tokens / ours_s}
        single["ratio"] = single["ours_tokens_per_s"] / single["hf_tokens_per_s"]
        # no decoder can beat the matrix-vector products: the best ratio this machine allows
        single["matvec_floor_ms"], single["ceiling_ratio"] = floor * 1e3, hf_s / args.tokens / floor
        singles[precision] = single
        print(
            f"single stream, {precision}: ours {single['ours_tokens_per_s']:.1f} tok/s, generate() "
            f"{single['hf_tokens_per_s']:.1f} tok/s: {single['ratio']:.2f}x (target 2x); matrix-vector "
            f"floor {floor * 1e3:.2f} ms a token, so at most {single['ceiling_ratio']:.2f}x here"
        )
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")

    # the same requests one after another through generate()
    seq_start = time.perf_counter()
    for p in prompts:
        hf_generate(model, p, args.tokens)
    seq_s = time.perf_counter() - seq_start
    sequential = args.clients * args.tokens / seq_s
    print(f"sequential generate(): {args.clients} requests in {seq_s:.1f} s, {sequential:.1f} tok/s")
    del model

    port = free_port()
    proc = start_server(args.model, port, args.clients)
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(clients(url, name, prompts[:2], 4))  # warm-up
        asyncio.run(clients(url, name, prompts[:2], 4, constrained=1))  # (compiles the schema once)
        wall, ttft, used = asyncio.run(clients(url, name, prompts, args.tokens))
        # structured outputs: half the clients under a JSON schema, against all free, interleaved
        free_runs, mixed_runs = [], []
        for _ in range(2):
            w, _, u = asyncio.run(clients(url, name, prompts, args.tokens))
            free_runs.append(u / w)
            w, _, u = asyncio.run(clients(url, name, prompts, args.tokens, constrained=2))
            mixed_runs.append(u / w)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert used == args.clients * args.tokens, used
    structured = {"free_tokens_per_s": max(free_runs), "half_constrained_tokens_per_s": max(mixed_runs)}
    structured["ratio"] = structured["half_constrained_tokens_per_s"] / structured["free_tokens_per_s"]
    half, free = structured["half_constrained_tokens_per_s"], structured["free_tokens_per_s"]
    print(
        f"server, {args.clients} clients, half under a JSON schema: {half:.1f} tok/s against {free:.1f} "
        f"all free ({structured['ratio']:.2f}x, target 0.9x)"
    )
    server = {
        "wall_s": wall,
        "tokens_per_s": used / wall,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": percentile(ttft, 0.99),
    }
    server["ratio"] = server["tokens_per_s"] / sequential
    print(
        f"server, {args.clients} concurrent streaming clients: {server['tokens_per_s']:.1f} tok/s "
        f"({server['ratio']:.1f}x sequential, target 10x); time to first token "
        f"p50 {server['ttft_p50_s']:.3f} s, p99 {server['ttft_p99_s']:.3f} s"
    )
    llamacpp = {}
    if not args.no_llamacpp and importlib.util.find_spec("llama_cpp") is not None:
        with tempfile.TemporaryDirectory(prefix="serve-bench-") as scratch:
            os.environ["XDG_CACHE_HOME"] = scratch  # GGUF exports of these models go here, then away
            llamacpp["quickstart"] = llamacpp_rows(args.model, "the quickstart model", args, prompts)
            big = model_150m(args.model, Path(scratch) / "llama-150m")
            llamacpp["150m"] = llamacpp_rows(big, "a 150M Llama", args, prompts)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    record = {
        "benchmark": "serve_throughput",
        "date": datetime.now(UTC).date().isoformat(),
        "machine": {
            "cpu": cpu_name(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "commit": commit.stdout.strip(),
        "args": vars(args),
        "single": singles,
        "sequential_tokens_per_s": sequential,
        "server": server,
        "structured": structured,
        "llamacpp": llamacpp,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
