"""Export to GGUF, the file llama.cpp and Ollama run: weights, architecture and tokenizer in one file.

    Hugging Face directory ─► GGUF (f32 | f16 | bf16)  ─► llama.cpp's quantizer ─► q8_0 | q4_k_m
    (config, safetensors,      written with `gguf`,        (llama-cpp-python's
     tokenizer)                the format's own library)    binding, when installed)

The file format, tensor names (`gguf.get_tensor_name_map`) and tokenizer metadata (`gguf.SpecialVocab`:
merges, bos/eos/pad, chat template) come from the `gguf` package, so what is ours here is only the
mapping of a config onto llama.cpp's architecture keys, as llama.cpp's own `convert_hf_to_gguf.py`
does for these families. Two of its conventions matter:

- llama.cpp's "llama" rotates interleaved pairs of a head's dimensions, transformers rotates its two
  halves; so the q and k projections of llama are permuted (qwen3 and olmo2 use the halves, "neox").
- Norm weights (1-D) stay float32 in every file type, as llama.cpp writes them.

q8_0 also has a writer of its own in `gguf` (numpy, the same rounding as llama.cpp's reference), used
when llama-cpp-python is not installed, so a release always has its q8_0 file; k-quants need
llama.cpp. Beside each GGUF goes an Ollama `Modelfile` (see `modelfile`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trulyopen.errors import UserError


class GGUFError(UserError, ValueError):
    """A model, tokenizer or quantization type that cannot be written as GGUF (the message says why)."""


@dataclass(frozen=True)
class Family:
    arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool  # llama.cpp's "norm" rope (interleaved pairs) against transformers' halves


# transformers model_type -> llama.cpp architecture (these are tested end to end against llama.cpp)
FAMILIES = {
    "llama": Family("LLAMA", permute_qk=True),
    "qwen3": Family("QWEN3", permute_qk=False),
    "olmo2": Family("OLMO2", permute_qk=False),
}
# file types written directly, and those made by llama.cpp's quantizer from an f32 file
PLAIN = ("f32", "f16", "bf16")
QUANTIZED = {"q8_0": 7, "q4_k_m": 15}  # llama_ftype values (LLAMA_FTYPE_MOSTLY_*)
QUANTS = (*PLAIN, *QUANTIZED)
# pre-tokenizers llama.cpp implements, by the regex the tokenizer splits with (tokenizer.json)
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
KNOWN_SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",  # noqa: E501
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",  # noqa: E501
    GPT2_REGEX: "gpt-2",
}


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def check_quant(quant: str) -> None:
    """Before any work: a type we do not know, or one that needs llama.cpp where it is absent."""
    if quant not in QUANTS:
        raise GGUFError(f"--quant {quant}: not a GGUF type this export writes (choose {', '.join(QUANTS)})")
    if quant in QUANTIZED and quant != "q8_0" and not llama_cpp_available():
        raise GGUFError(
            f"--quant {quant}: needs llama.cpp's quantizer, and llama-cpp-python is not installed "
            "(pip install 'trulyopen[llamacpp]'); f32, f16, bf16 and q8_0 need nothing more"
        )


def check_family(model_type: str, where: str) -> Family:
    if model_type not in FAMILIES:
        raise GGUFError(
            f"{where}: model_type '{model_type}' has no GGUF export here (llama.cpp-tested families: "
            f"{', '.join(FAMILIES)}); export --format hf and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    return FAMILIES[model_type]


def pre_tokenizer(tokenizer_json: dict) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenizer (`tokenizer.ggml.pre`), or None."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "ByteLevel" and step.get("use_regex", True):
            return "gpt-2"  # ByteLevel's own split is GPT-2's regex
        if step.get("type") == "Split":
            return KNOWN_SPLITS.get((step.get("pattern") or {}).get("Regex", ""))
    return None


def write_gguf(hf_dir: Path, out: Path, quant: str = "f16", name: str | None = None) -> Path:
    """Write the Hugging Face model in `hf_dir` as one GGUF file `out` (renamed into place once
    complete); quantized types go through llama.cpp's quantizer (q8_0 through `gguf` without it)."""
    check_quant(quant)
    hf_dir, out = Path(hf_dir), Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if quant in QUANTIZED and llama_cpp_available():
        f32 = out.with_name(out.name + ".f32.tmp")
        try:
            _write(hf_dir, f32, "f32", name)
            _quantize(f32, tmp, quant)
        finally:
            f32.unlink(missing_ok=True)
    else:
        _write(hf_dir, tmp, quant, name)
    tmp.replace(out)
    return out


def _write(hf_dir: Path, out: Path, quant: str, name: str | None) -> None:
    import gguf
    import numpy as np
    from safetensors import safe_open

    config = json.loads((hf_dir / "config.json").read_text())
    family = check_family(config.get("model_type", "?"), f"{hf_dir}/config.json")
    arch = getattr(gguf.MODEL_ARCH, family.arch)
    layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(arch, layers)
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name or hf_dir.name)
    _hyperparameters(writer, config)
    _tokenizer(writer, hf_dir, config["vocab_size"])
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[quant]
    writer.add_file_type(file_type)
    if quant == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    heads, kv_heads = (
        config["num_attention_heads"],
        config.get("num_key_value_heads") or config["num_attention_heads"],
    )
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise GGUFError(f"{hf_dir}: no .safetensors weights to export")
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                target = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if target is None:
                    raise GGUFError(f"{file}: tensor {key} has no place in llama.cpp's {family.arch.lower()}")
                data = f.get_tensor(key).float()
                if family.permute_qk and key.endswith(("q_proj.weight", "q_proj.bias")):
                    data = _permute(data, heads)
                elif family.permute_qk and key.endswith(("k_proj.weight", "k_proj.bias")):
                    data = _permute(data, kv_heads)
                array = data.numpy()
                if array.ndim == 1 or quant == "f32":
                    writer.add_tensor(target, array.astype(np.float32))
                elif quant == "f16":
                    writer.add_tensor(target, array.astype(np.float16))
                else:  # bf16 and q8_0: gguf's own packing (q8_0 needs rows in blocks of 32)
                    qtype = (
                        gguf.GGMLQuantizationType.BF16 if quant == "bf16" else gguf.GGMLQuantizationType.Q8_0
                    )
                    if array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
                        writer.add_tensor(target, array.astype(np.float16))  # as llama.cpp falls back
                    else:
                        packed = gguf.quants.quantize(array, qtype)
                        writer.add_tensor(target, packed, raw_shape=packed.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _permute(w, heads: int):
    """Each head's rows from [first half; second half] to interleaved pairs (convert_hf_to_gguf's
    LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hyperparameters(writer, config: dict) -> None:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    # transformers 5 keeps rope settings in rope_parameters; older configs in rope_theta/rope_scaling
    rope = config.get("rope_parameters") or {**(config.get("rope_scaling") or {}), "rope_theta": None}
    theta = rope.get("rope_theta") or config.get("rope_theta") or 10000.0
    writer.add_rope_freq_base(float(theta))
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind != "default":
        raise GGUFError(
            f"config.json: rope scaling '{kind}' is not written by this GGUF export (default and linear "
            "are); use llama.cpp's convert_hf_to_gguf.py"
        )
    if (
        config.get("sliding_window")
        and config.get("use_sliding_window", True)
        and any(t == "sliding_attention" for t in config.get("layer_types") or ["sliding_attention"])
    ):
        raise GGUFError("config.json: sliding-window attention is not written by this GGUF export")


def _tokenizer(writer, hf_dir: Path, vocab_size: int) -> None:
    """Tokens, their types and the pre-tokenizer (as convert_hf_to_gguf's gpt2 vocabulary), then
    merges, special ids and the chat template through gguf.SpecialVocab."""
    import gguf
    from transformers import AutoTokenizer

    if not (hf_dir / "tokenizer.json").exists():
        raise GGUFError(f"{hf_dir}: no tokenizer.json (a byte-level BPE fast tokenizer is needed for GGUF)")
    spec = json.loads((hf_dir / "tokenizer.json").read_text())
    if (spec.get("model") or {}).get("type") != "BPE":
        raise GGUFError(f"{hf_dir}/tokenizer.json: not a BPE tokenizer; this export writes BPE vocabularies")
    pre = pre_tokenizer(spec)
    if pre is None:
        raise GGUFError(
            f"{hf_dir}/tokenizer.json: a pre-tokenizer llama.cpp is not known to share; use llama.cpp's "
            "convert_hf_to_gguf.py, which identifies tokenizers by their output"
        )
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise GGUFError(f"{hf_dir}: the tokenizer has ids past the model's {vocab_size} embeddings")
    by_id = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows past the tokenizer (padded vocabularies)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(hf_dir, load_merges=True)
    # whether the tokenizer itself adds bos / eos: what llama.cpp must do to tokenise the same
    plain, full = tok("a", add_special_tokens=False)["input_ids"], tok("a")["input_ids"]
    special.add_special_token["bos"] = len(full) > len(plain) and full[0] == tok.bos_token_id
    special.add_special_token["eos"] = len(full) > len(plain) and full[-1] == tok.eos_token_id
    special.add_to_gguf(writer, quiet=True)
    end_of_turn = vocab.get("<|end|>")
    if end_of_turn is not None:
        writer.add_eot_token_id(end_of_turn)


def _quantize(src: Path, dst: Path, quant: str) -> None:
    import logging
    import os

    import llama_cpp
    import llama_cpp.llama  # noqa: F401  (routes llama.cpp's log through the logger below)

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its per-tensor lines: errors only
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZED[quant]
    params.nthread = os.cpu_count() or 1
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if code != 0:
        raise GGUFError(f"{src}: llama.cpp's quantizer failed ({quant}, code {code})")


# ---------------------------------------------------------------------------------------------- Ollama

# our chat template's turns in Ollama's Go template language (tool definitions and calls are not
# rendered: Ollama's tool support reads a template's .Tools, which this one does not use yet)
OLLAMA_TEMPLATE = "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n"


def modelfile(gguf_name: str, chat_template: str | None, stops: list[str]) -> str:
    """An Ollama Modelfile for the GGUF file `gguf_name` beside it: FROM, the chat template in Go's
    template language when it is ours (Ollama reads other models' templates from the GGUF), stops."""
    lines = [f"FROM ./{gguf_name}"]
    from trulyopen.data.tokenizer import CHAT_TEMPLATE, LEGACY_CHAT_TEMPLATE

    if chat_template in (CHAT_TEMPLATE, LEGACY_CHAT_TEMPLATE):
        lines.append(f'TEMPLATE """{OLLAMA_TEMPLATE}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(hf_dir: Path, gguf_file: Path) -> Path:
    from trulyopen.files import write_text

    config = json.loads((Path(hf_dir) / "tokenizer_config.json").read_text())
    template = config.get("chat_template")
    if template is None and (Path(hf_dir) / "chat_template.jinja").exists():
        template = (Path(hf_dir) / "chat_template.jinja").read_text()
    vocab = json.loads((Path(hf_dir) / "tokenizer.json").read_text())
    specials = {t["content"] for t in vocab.get("added_tokens", [])}
    stops = [s for s in ("<|end|>", config.get("eos_token")) if isinstance(s, str) and s in specials]
    path = gguf_file.parent / "Modelfile"
    write_text(path, modelfile(gguf_file.name, template, list(dict.fromkeys(stops))))
    return path


def export_gguf(target: Path, out_dir: Path, quant: str) -> Path:
    """`trulyopen export TARGET --format gguf`: TARGET is a checkpoint, a run or release directory or a
    Hugging Face directory; writes OUT_DIR/model-QUANT.gguf and OUT_DIR/Modelfile."""
    import tempfile

    from trulyopen.locate import locate

    check_quant(quant)
    found = locate(target)
    if found.kind == "hub":
        raise GGUFError(
            f"{target}: export takes a local model (a checkpoint, run, release or model directory)"
        )
    hf_dir = Path(found.path)
    if (hf_dir / "config.json").exists():  # refused before any export work
        check_family(json.loads((hf_dir / "config.json").read_text()).get("model_type", "?"), str(hf_dir))
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: an existing file; give a directory to write the GGUF file into")
    out_dir.mkdir(parents=True, exist_ok=True)
    name = Path(str(target).rstrip("/")).name
    with tempfile.TemporaryDirectory(prefix="trulyopen-gguf-") as scratch:
        if found.kind == "checkpoint":  # through the Hugging Face format: adapters merged, names settled
            from trulyopen.model.export import export_checkpoint

            hf_dir = export_checkpoint(hf_dir, Path(scratch) / "hf")
        out = write_gguf(hf_dir, out_dir / f"model-{quant}.gguf", quant, name)
        write_modelfile(hf_dir, out)
    return out
