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

Targets: single >= 2x generate(); server >= 10x sequential. The last line is JSON.
Model: --model (default runs/quickstart, its newest checkpoint). The single stream runs in bf16 and
in fp32, each with the matrix-vector floor: the time of one token's matrix products alone, which
bounds the ratio any decoder can reach on this machine. The server and sequential rows run in fp32
(`precision: auto` here: this CPU has no bf16 matrix hardware, so batched bf16 is slow).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import statistics
import subprocess
import sys
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


async def clients(url: str, name: str, prompts: list[list[int]], n: int) -> tuple[float, list[float], int]:
    """Every prompt as its own streaming request, all at once, with aiohttp (the client of vLLM's
    own serving benchmark): wall time, each request's time to first token, completion tokens."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def one(ids):
            body = {"model": name, "prompt": ids, "max_tokens": n, "temperature": 0, "stream": True}
            body |= {"ignore_eos": True, "stream_options": {"include_usage": True}}
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
        results = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - start
    return wall, [r[0] for r in results], sum(r[1] for r in results)


def start_server(model_arg: str, port: int, slots: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "trulyopen", "serve", model_arg, "--port", str(port), "--precision", "fp32"]
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
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")

    # the same requests one after another through generate()
    seq_start = time.perf_counter()
    for p in prompts:
        hf_generate(model, p, args.tokens)
    seq_s = time.perf_counter() - seq_start
    sequential = args.clients * args.tokens / seq_s
    print(f"sequential generate(): {args.clients} requests in {seq_s:.1f} s, {sequential:.1f} tok/s")
    del model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_server(args.model, port, args.clients)
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(clients(url, name, prompts[:2], 4))  # warm-up
        wall, ttft, used = asyncio.run(clients(url, name, prompts, args.tokens))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert used == args.clients * args.tokens, used
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
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    record = {
        "benchmark": "serve_throughput",
        "date": datetime.now(UTC).date().isoformat(),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "commit": commit.stdout.strip(),
        "args": vars(args),
        "single": singles,
        "sequential_tokens_per_s": sequential,
        "server": server,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
