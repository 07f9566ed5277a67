"""llama.cpp as the serving engine, behind our own OpenAI API, limits, errors and chat page.

    trulyopen serve MODEL --engine llama.cpp
        MODEL ─► GGUF (exported once, cached by the weights' hash) ─► llama_cpp.Llama
        server ─► LlamaCppEngine.submit(Request) ─► one thread: generate token by token ─► Events

The engine has the interface of `trulyopen.infer.engine.Engine` (infer/serial.py: submit, cancel,
start, stop, running, waiting, max_len, vocab_size), so `serve.app.Server` cannot tell the two apart. Prompts
are tokenised by the model's own tokenizer (llama.cpp's gives the same ids: tests/test_gguf.py),
and text is streamed and stopped by the same `take` as in our engine; llama.cpp samples. A logits
processor, first in llama.cpp's sampler chain, keeps the raw logits for `logprobs` (the model's
own, as our engine's) and applies a grammar's llguidance mask (response_format, tool calls).

llama-cpp-python's `Llama` holds one sequence: requests are decoded one after another (its
`generate` keeps the key-value cache of the longest common prefix with the previous request, so a
chat's next turn does not recompute its history). BENCHMARKS.md has what this means for many
clients, and the README which engine to use for which workload.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import torch

from trulyopen.errors import UserError
from trulyopen.infer.engine import Request
from trulyopen.infer.serial import SerialEngine


def open_gguf(gguf_file: Path, n_ctx: int, threads: int | None = None, f32_cache: bool = False, **kw):
    """A `llama_cpp.Llama` on every core (its default, half of them, halves decoding on two cores).
    Its key-value cache is f16 unless `f32_cache` (then an f32 file computes as our engine in fp32
    does, to the token: tests/test_gguf.py).

    On CPUs with AMX, llama.cpp's AMX weight buffers (used for q8_0 and k-quants) crashed its
    decode here (llama-cpp-python 0.3.36, a segmentation fault on the first batch), so they are
    turned off there: the weights stay in the plain CPU buffer, which runs every type."""
    import llama_cpp
    import llama_cpp.llama_cpp as C

    default = C.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    if _cpu_has_amx():
        C.llama_model_default_params = without_extra_buffers  # read once, by the constructor below
    try:
        return llama_cpp.Llama(
            model_path=str(gguf_file),
            n_ctx=n_ctx,
            n_batch=min(n_ctx, 512),
            n_threads=threads or os.cpu_count() or 1,
            verbose=False,
            **({"type_k": C.GGML_TYPE_F32, "type_v": C.GGML_TYPE_F32} if f32_cache else {}),
            **kw,
        )
    finally:
        C.llama_model_default_params = default


def _cpu_has_amx() -> bool:
    try:
        return " amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


class LlamaCppEngine(SerialEngine):
    thread_name = "trulyopen-llama.cpp"

    def __init__(self, gguf_file: Path, decode, max_len: int, threads: int | None = None):
        self.llm = open_gguf(gguf_file, max_len, threads, f32_cache=gguf_file.name.endswith("-f32.gguf"))
        super().__init__(decode, max_len, self.llm.n_vocab())

    def _run(self, req: Request) -> None:
        import llama_cpp

        p = req.params
        seed = p.seed if p.seed is not None else random.randrange(2**31)
        self.llm.set_seed(seed % 2**32)
        step = _Step(req)
        wanted = req.matcher is not None or p.logprobs is not None
        tokens = self.llm.generate(
            req.prompt,
            temp=p.temperature,
            top_k=p.top_k,  # 0 keeps every token, in both engines
            top_p=p.top_p,
            min_p=0.0,  # llama-cpp-python's default is 0.05; ours samples from the whole distribution
            repeat_penalty=p.repetition_penalty,
            reset=True,  # keeps the cache of the prefix shared with the previous request
            logits_processor=llama_cpp.LogitsProcessorList([step]) if wanted else None,
        )
        try:
            for token in tokens:
                if step.error is not None:
                    raise step.error
                raw = torch.from_numpy(step.raw) if step.raw is not None else None
                if self.emit(req, int(token), raw):
                    return
        finally:
            tokens.close()


class _Step:
    """llama.cpp's logits processor for one request, run before its samplers at each step: it
    keeps the raw logits when the request asked for logprobs, and masks the tokens the request's
    grammar does not allow. (An exception raised here would only be printed by ctypes: it is kept
    for the engine to fail the request with.)"""

    def __init__(self, req: Request):
        self.req = req
        self.raw: np.ndarray | None = None
        self.error: Exception | None = None

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        try:
            if self.req.params.logprobs is not None:
                self.raw = np.array(scores, dtype=np.float32)  # a copy: the mask comes next
            if self.req.matcher is not None:
                allow(scores, self.req.matcher)
        except Exception as e:
            self.error = e
        return scores


def allow(scores: np.ndarray, matcher) -> None:
    """Set to -inf the scores [vocab] of the tokens `matcher` does not allow next, and of the ids
    past its tokenizer's (llama.cpp's vocabulary may be larger)."""
    import llguidance.numpy as ln

    bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.int32)  # bit k of word w: token 32w + k
    ln.apply_token_bitmask_inplace(scores, bits)


# ------------------------------------------------------------------------------------ the GGUF file


def cached_gguf(target: str, quant: str) -> Path:
    """The GGUF file of a model, exported once: a release's own model/gguf/ file when it has the
    type, else RUN_DIR/gguf/ (beside a checkpoint's run) or the user's cache, under the hash of the
    weights, so a changed checkpoint is exported again and an unchanged one never is."""
    from trulyopen.files import sha256_file
    from trulyopen.locate import locate
    from trulyopen.model.gguf import check_quant, export_gguf

    check_quant(quant)
    found = locate(target)
    if found.kind == "hub":
        raise UserError(
            f"--engine llama.cpp: {target}: give a local model (llama.cpp reads a GGUF file made here)"
        )
    path = Path(found.path)
    shipped = path / "gguf" / f"model-{quant}.gguf"  # a release's model/gguf/
    if shipped.exists():
        return shipped
    weights = sorted(path.glob("*.safetensors"))
    digest = hashlib.sha256("".join(sha256_file(w) for w in weights).encode()).hexdigest()[:16]
    if found.kind == "checkpoint":
        root = path.resolve().parents[2] / "gguf"  # <run>/checkpoints/<stage>/step_N
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trulyopen" / "gguf"
    out = root / digest / f"model-{quant}.gguf"
    if not out.exists():
        print(f"exporting {target} to GGUF ({quant}) for llama.cpp: {out}", flush=True)
        export_gguf(Path(target), out.parent, quant)
    return out


def build_server(
    target: str, quant: str, limits=None, api_key: str | None = None, max_len: int | None = None
):
    """Our `Server` over llama.cpp: same API, limits and errors as `serve.launch.build_server`."""
    import importlib.util

    from trulyopen.serve.app import Limits, Server

    if importlib.util.find_spec("llama_cpp") is None:
        raise UserError(
            "--engine llama.cpp: llama-cpp-python is not installed (pip install 'trulyopen[llamacpp]'); "
            "or use the built-in engine"
        )
    limits = limits or Limits()
    gguf_file = cached_gguf(target, quant)
    tok = _tokenizer(target)
    config_len = _context_length(gguf_file)
    engine = LlamaCppEngine(
        gguf_file, lambda ids: tok.decode(ids, skip_special_tokens=True), max_len or min(config_len, 4096)
    )
    name = Path(str(target).rstrip("/")).name or str(target)
    return Server(engine, tok, name, limits, api_key)


def _tokenizer(target: str):
    """The model's own tokenizer (a checkpoint's is its run's)."""
    from transformers import AutoTokenizer

    from trulyopen.errors import missing, reading
    from trulyopen.locate import locate
    from trulyopen.train.checkpoint import tokenizer_dir

    found = locate(target)
    where = tokenizer_dir(Path(found.path)) if found.kind == "checkpoint" else Path(found.path)
    if where is None:
        raise missing(f"{found.path}: tokenizer", "tokenizer", "the run's tokenizer/ folder is gone")
    with reading(where, "tokenizer"):
        return AutoTokenizer.from_pretrained(str(where))


def _context_length(gguf_file: Path) -> int:
    import gguf

    reader = gguf.GGUFReader(str(gguf_file))
    arch = reader.fields["general.architecture"].contents()
    return int(reader.fields[f"{arch}.context_length"].contents())
