"""Tiny random vision-language models for tests, written like any downloaded one: a directory that
`AutoModelForImageTextToText.from_pretrained` and `AutoProcessor.from_pretrained` load, offline.

    tiny_vlm_dir(tmp_path, "qwen2_vl")  Qwen2-VL: its own vision tower and merger, mrope positions
    tiny_vlm_dir(tmp_path, "llava")     LLaVA: a SigLIP tower, an MLP projector, a Llama

Each holds the model (random weights, seeded), an image processor, a byte-level BPE tokenizer trained
here on a few sentences, and a ChatML chat template that renders content-part lists (text parts as
text, image parts as the family's placeholder, which the processor expands into image tokens). Images
are small (28 to 56 pixels a side) so a forward pass takes milliseconds.
"""

from __future__ import annotations

import functools
from pathlib import Path

from trulyopen.vlm.model import no_video, save_processor

FAMILIES = ("qwen2_vl", "llava")

# What an image part renders as, before the processor expands it to one token per image feature.
PLACEHOLDER = {"qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>", "llava": "<image>"}
IMAGE_TOKEN = {"qwen2_vl": "<|image_pad|>", "llava": "<image>"}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
FAMILY_SPECIALS = {
    "qwen2_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "llava": ["<image>"],
}

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ['image', 'image_url'] %}PLACEHOLDER{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# what Qwen2-VL's text config takes from the Llama's
DIMS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
DIMS += ("num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")

TEXTS = [
    "What colour is the shape in the picture? The shape is red. The shape is green. The shape is blue.",
    "Describe the image. A square on a white background. A circle, a triangle, a line of code.",
    "user assistant system: answer in one word. yes no maybe red green blue yellow black white.",
    "def add(a, b):\n    return a + b\nprint(add(1, 2))  # the first line of the file",
]


@functools.cache
def _tokenizer_json(family: str) -> str:
    """A byte-level BPE (about 300 entries) with the family's special tokens, as tokenizer.json text
    (trained once a process: a few milliseconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS + FAMILY_SPECIALS[family],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    t.train_from_iterator(TEXTS * 10, trainer)
    return t.to_str()


def tiny_tokenizer(family: str):
    """The family's tokenizer, with eos and pad set and the image token named where the processor
    looks for it."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    extra = {"image_token": IMAGE_TOKEN[family]} if family == "llava" else {}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(family)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        **extra,
    )
    tok.chat_template = CHAT_TEMPLATE.replace("PLACEHOLDER", PLACEHOLDER[family])
    return tok


def _text_config(tok):
    """The language model: the tests' two-layer Llama (conftest), over this tokenizer."""
    from tests.conftest import tiny_llama_config

    ids = dict(bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tiny_llama_config(len(tok), max_position_embeddings=512, **ids)


def _qwen2_vl(tok):
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
        Qwen2VLProcessor,
    )

    ids = tok.convert_tokens_to_ids
    llama = _text_config(tok)
    text = {k: getattr(llama, k) for k in DIMS}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    model = Qwen2VLForConditionalGeneration(config)
    # 28 to 56 pixels a side: 4 to 16 patches of 14, merged 2x2 into 1 to 4 image tokens.
    images = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2)
    try:
        from transformers import Qwen2VLVideoProcessor

        video = Qwen2VLVideoProcessor()
    except ImportError:  # torchvision missing: images only
        video = no_video()
    processor = Qwen2VLProcessor(
        image_processor=images, tokenizer=tok, video_processor=video, chat_template=tok.chat_template
    )
    return model, processor


def _llava(tok):
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )

    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vision = SiglipVisionConfig(**dims, image_size=28, patch_size=14)
    config = LlavaConfig(
        vision_config=vision,
        text_config=_text_config(tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(config)
    images = SiglipImageProcessorPil(size={"height": 28, "width": 28})  # 2x2 patches: 4 image tokens an image
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="full",
        image_token="<image>",
        num_additional_image_tokens=0,  # SigLIP has no CLS token
        chat_template=tok.chat_template,
    )
    return model, processor


def tiny_vlm(family: str, seed: int = 0):
    """(model, processor) of a tiny random VLM of `family` (one of FAMILIES), in eval mode."""
    import torch

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    torch.manual_seed(seed)
    model, processor = {"qwen2_vl": _qwen2_vl, "llava": _llava}[family](tiny_tokenizer(family))
    return model.eval(), processor


def tiny_vlm_dir(tmp_path: Path, family: str, seed: int = 0) -> Path:
    """A directory holding a tiny random VLM of `family` and its processor, as save_pretrained writes
    them: `tmp_path / family`."""
    out = Path(tmp_path) / family
    model, processor = tiny_vlm(family, seed)
    model.save_pretrained(str(out))
    save_processor(processor, out)
    return out


def shape_image(colour: str, shape: str = "square", size: int = 28):
    """A PIL image: a coloured shape on white, `size` pixels a side (the tests' image set)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    {"square": draw.rectangle, "circle": draw.ellipse}[shape](box, fill=colour)
    return img
