"""Quantized Hugging Face exports (int8, nf4) through bitsandbytes' CPU backend: a plain
`from_pretrained(dir)` gets bitsandbytes layers, the files are smaller than fp32, and greedy next
tokens mostly agree with the fp32 model's on real text."""

import copy
import json

import pytest
import torch

from trulyopen.errors import UserError
from trulyopen.model.export import export_hf
from trulyopen.model.quantize_hf import export_hf_quantized

pytest.importorskip("bitsandbytes")

TEXTS = [
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "The quick brown fox jumps over the lazy dog, then sleeps in the sun all afternoon.",
    "héllo wörld 日本語: for i in range(10): total += i * i  # squares\n",
    "import json\nwith open('data.json') as f:\n    rows = json.load(f)\n",
]
# Text the tokenizer was not trained on too: more, shorter tokens, so more positions to compare.
PROMPTS = [
    *TEXTS,
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n"
    "        self.items.append(x)\n",
    "Quantization stores each weight in fewer bits, trading a little accuracy for memory.",
    "Le renard brun saute par-dessus le chien paresseux. Der Fuchs springt über den Hund.",
    "SELECT name, count(*) FROM users WHERE age > 30 GROUP BY name ORDER BY 2 DESC;",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot product in C",
    "Numbers: 3.14159, 2.71828, 1.41421, 42, 1e-9, 0xff; dates: 2024-05-01, 1999-12-31.",
]
# Greedy next tokens that agree with fp32's, least over seeds 0-7: 0.968 (int8), 0.779 (nf4); with
# the decoder layers zeroed, at most 0.40 agree (`test_the_layers_decide_most_next_tokens`).
AGREEMENT = {"int8": 0.9, "nf4": 0.7}
# Bytes of the decoder layers' tensors, of fp32's: 0.265 (int8: 1 byte a weight and a scale a row)
# and 0.190 (nf4: half a byte and the block scales, a large share at this size).
LAYER_BYTES = {"int8": 0.3, "nf4": 0.22}
LAYER_TYPE = {"int8": "Linear8bitLt", "nf4": "Linear4bit"}


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """A tiny random Llama and a byte-level BPE tokenizer, exported in fp32 by `export_hf`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    t.train_from_iterator(TEXTS * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok_dir = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(str(tok_dir))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,  # nf4 on CPUs with AVX512-BF16 needs out_features a multiple of 32; int8 any
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    out = export_hf(model, tok_dir, tmp_path_factory.mktemp("fp32") / "hf")
    return model, tok, out


def next_tokens(model, tok) -> torch.Tensor:
    """The greedy next token at every position of PROMPTS, one flat tensor."""
    with torch.no_grad():
        return torch.cat(
            [model(input_ids=torch.tensor([tok(t).input_ids])).logits[0].argmax(-1) for t in PROMPTS]
        )


def weight_bytes(d) -> tuple[int, int]:
    """Bytes of the weight files, and of the decoder layers' tensors in them."""
    from safetensors import safe_open

    layers = 0
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            for t in (s.get_tensor(k) for k in s.keys() if ".layers." in k):
                layers += t.numel() * t.element_size()
    return sum(f.stat().st_size for f in d.glob("*.safetensors")), layers


def test_the_layers_decide_most_next_tokens(fp32):
    """With the decoder layers' outputs zeroed, most greedy next tokens change: agreement with a
    quantized model measures its layers, not the (unquantized) embeddings and output layer."""
    model, tok, _ = fp32
    skipped = copy.deepcopy(model)
    with torch.no_grad():
        for layer in skipped.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    same = (next_tokens(skipped, tok) == next_tokens(model, tok)).float().mean().item()
    assert same < 0.6, same


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_export_loads_with_plain_from_pretrained(fp32, quant, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok, hf_dir = fp32
    out = tmp_path / quant
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier export")
    assert export_hf_quantized(hf_dir, out, quant) == out
    assert not (out / "stale.txt").exists() and not out.with_name(out.name + ".tmp").exists()

    q = AutoModelForCausalLM.from_pretrained(str(out)).eval()  # the quantization comes from config.json
    linears = {n: type(m).__name__ for n, m in q.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears.pop("lm_head") == "Linear"  # the output layer stays unquantized
    assert len(linears) == 14 and set(linears.values()) == {LAYER_TYPE[quant]}, linears
    if quant == "nf4":
        state = q.model.layers[0].mlp.up_proj.weight.quant_state
        assert state.quant_type == "nf4" and state.nested  # double quantization
        assert state.dtype == torch.bfloat16

    (size, layers), (full, full_layers) = weight_bytes(out), weight_bytes(hf_dir)
    assert size < full * 0.45, (size, full)  # embeddings and output layer in bf16: half of fp32
    assert layers < full_layers * LAYER_BYTES[quant], (layers, full_layers)

    agree = (next_tokens(q, tok) == next_tokens(model, tok)).float().mean().item()
    print(
        f"{quant}: weights {size / full:.3f} of fp32's, layers {layers / full_layers:.3f}; agree {agree:.3f}"
    )
    assert agree >= AGREEMENT[quant], agree

    assert AutoTokenizer.from_pretrained(str(out))(TEXTS[0]).input_ids == tok(TEXTS[0]).input_ids
    saved = json.loads((out / "generation_config.json").read_text())
    assert saved == json.loads((hf_dir / "generation_config.json").read_text())


def test_unknown_quant_names_the_choices(fp32, tmp_path):
    with pytest.raises(UserError, match="int4.*int8, nf4"):
        export_hf_quantized(fp32[2], tmp_path / "q", "int4")
    assert not (tmp_path / "q").exists()


def test_missing_bitsandbytes_says_what_to_install(fp32, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what Python sees when it is not installed
    with pytest.raises(UserError, match=r"pip install 'trulyopen\[qlora\]'.*pip install bitsandbytes"):
        export_hf_quantized(fp32[2], tmp_path / "q", "nf4")
