"""The tokenizer stage: train a byte-level BPE tokenizer on the training split, or reuse one.

Byte-level BPE (GPT-2 style, with the `tokenizers` library) has no unknown token and no
normaliser, so decode(encode(text)) gives back the text exactly, code indentation included. The
tokenizer is saved in the Hugging Face format, with special tokens for text boundaries, padding and
chat roles and a chat template, so `transformers.AutoTokenizer.from_pretrained(dir)` loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trulyopen.errors import missing, reading, warn
from trulyopen.files import write_json
from trulyopen.recipe import TokenizerConfig

EOT = "<|endoftext|>"
VAL_SAMPLE_CHARS = 20_000_000  # bytes per token is measured on at most this much of the val split
PAD = "<|pad|>"
ROLES = ("system", "user", "assistant")
END = "<|end|>"
SPECIAL_TOKENS = [EOT, PAD, *(f"<|{r}|>" for r in ROLES), END]
# Turns as <|role|>\ntext<|end|>\n. With tools (transformers' apply_chat_template(tools=...)), a
# system turn lists them, an assistant's calls are <tool_call>{"name", "arguments"}</tool_call>
# (the convention of Qwen's and Hermes' templates), and results come back as `tool` turns. Without
# tools it renders exactly what LEGACY_CHAT_TEMPLATE, the template before tools, renders.
CHAT_TEMPLATE = (
    "{% if tools %}<|system|>\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "You can call these tools. To call one, answer with "
    '<tool_call>{"name": ..., "arguments": {...}}</tool_call>.\n<tools>\n'
    "{% for tool in tools %}{{ (tool['function'] if 'function' in tool else tool) | tojson }}\n{% endfor %}"
    "</tools><|end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if not (tools and loop.first and message['role'] == 'system') %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% for call in message.get('tool_calls') or [] %}"
    "<tool_call>{\"name\": {{ call['function']['name'] | tojson }}, "
    "\"arguments\": {{ call['function']['arguments'] | tojson }}}</tool_call>"
    "{% endfor %}<|end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
LEGACY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def corpus_texts(path: Path, max_chars: int | None = None) -> Iterator[str]:
    """Texts of a corpus JSONL file, in order, stopping after `max_chars` characters.

    When the file holds more than `max_chars` (bytes standing in for characters), documents are
    sampled by a hash of their id at the rate that fills the budget, so the sample is deterministic,
    bounded, and spread over the whole corpus rather than its first sources."""
    rate = 1.0
    if max_chars is not None and path.stat().st_size > max_chars:
        rate = max_chars / path.stat().st_size
    seen = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if (
                rate < 1
                and int.from_bytes(hashlib.sha256(rec["id"].encode()).digest()[:8], "big") >= rate * 2**64
            ):
                continue
            yield rec["text"]
            seen += len(rec["text"])
            if max_chars is not None and seen >= max_chars:
                return


def train_tokenizer(texts: Iterator[str], cfg: TokenizerConfig):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty() and os.environ.get("TRULYOPEN_QUIET") != "1",
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_hf(tok, out: Path) -> None:
    """Save in the Hugging Face format (tokenizer.json, tokenizer_config.json, special tokens)."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=PAD)
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(out))


def bytes_per_token(tokenizer_file: Path, texts: list[str]) -> float | None:
    from tokenizers import Tokenizer

    if not texts:
        return None
    tok = Tokenizer.from_file(str(tokenizer_file))
    n_tokens = 0
    for i in range(0, len(texts), 256):  # in chunks: an Encoding per text holds far more than its ids
        n_tokens += sum(len(e.ids) for e in tok.encode_batch(texts[i : i + 256], add_special_tokens=False))
    return sum(len(t.encode()) for t in texts) / max(n_tokens, 1)


def build_tokenizer(cfg: TokenizerConfig, corpus_dir: Path, out: Path) -> dict[str, Any]:
    """Train (or copy) the tokenizer into `out`, replacing it only once complete; return its stats."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.path is not None:
        shutil.copytree(cfg.path, tmp)
        origin = {"reused_from": str(cfg.path)}
    else:
        tok = train_tokenizer(corpus_texts(corpus_dir / "train.jsonl", cfg.max_train_chars), cfg)
        save_hf(tok, tmp)
        origin = {
            "trained_on": "train split (a sample by id hash when larger than max_train_chars)",
            "max_train_chars": cfg.max_train_chars,
        }
    if not (tmp / "tokenizer.json").exists():
        raise missing(
            f"tokenizer.path: {cfg.path}/tokenizer.json",
            "file",
            "give a Hugging Face fast tokenizer's directory",
        )
    from tokenizers import Tokenizer

    with reading(f"tokenizer.path: {cfg.path}/tokenizer.json" if cfg.path else tmp, "tokenizer"):
        vocab = Tokenizer.from_file(str(tmp / "tokenizer.json")).get_vocab_size()
    if cfg.path is None and vocab < cfg.vocab_size:
        warn(
            f"tokenizer: learned only {vocab:,} of the {cfg.vocab_size:,} tokens of tokenizer.vocab_size: "
            "its training text is too small (add data, or lower tokenizer.vocab_size)"
        )
    val = list(corpus_texts(corpus_dir / "val.jsonl", VAL_SAMPLE_CHARS))
    stats = {
        **origin,
        "vocab_size": vocab,
        "bytes_per_token_val": bytes_per_token(tmp / "tokenizer.json", val),
    }
    write_json(tmp / "stats.json", stats)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return stats
