"""A small vision-language model from our own language model, the LLaVA way, offline:

    picture (e.g. 512x32) ──► vision encoder ──► patch features ──► projector ──► image tokens ─┐
                              SigLIP or CLIP      one per 16x16     Linear-GELU-     in the LM's │
                              (a transformers     patch: 32x2 = 64  Linear           width       │
                              config, random or                                                  ▼
                              a local checkpoint)          "<|user|>\\n<image>Transcribe the line.<|end|>..."
                                                           our pretrained Llama reads both ──► text

The result is a transformers `LlavaForConditionalGeneration` with a `LlavaProcessor` (the SigLIP or
CLIP image processor, our tokenizer with an `<image>` token added, a chat template that renders
content-part lists), saved as a directory that `AutoModelForImageTextToText` and `AutoProcessor`
load like any downloaded VLM, so training, serving, evaluation and export need nothing of their own.

The encoder's position table is a square grid of (image_size / patch)^2 entries, but SigLIP adds it to
the flattened patches whatever their layout: a wide picture with as many patches (512x32 with patch 16:
32 x 2 = 64 = 8^2, image_size 128) fits it, and a line of code is wide. SigLIP has no class token, so
every patch feature becomes an image token ("full"); CLIP's class token is dropped ("default") and
CLIP takes square pictures only. The language model gains one token (`<image>`); its new embedding
row starts at the mean of the others.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from trulyopen.errors import UserError
from trulyopen.locate import loading
from trulyopen.recipe import VlmConfig

IMAGE_TOKEN = "<image>"
# Our turns (<|role|>\n ... <|end|>\n, as data/tokenizer.py's template), with content parts: text as
# it is, each image as one <image> (the processor expands it into the image's tokens).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ['image', 'image_url'] %}" + IMAGE_TOKEN + "\n{% endif %}"
    "{% endfor %}{% endif %}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class BuildError(UserError, ValueError):
    """The parts cannot make a model (the message names the field)."""


def image_tokens(cfg: VlmConfig) -> int:
    """Image tokens per picture: one per patch (CLIP: its class token dropped)."""
    p = cfg.vision.patch_size
    return (cfg.images.width // p) * (cfg.images.height // p)


def vision_config(cfg: VlmConfig):
    """The encoder's transformers config: a local checkpoint's, or a small one of the recipe's size."""
    v, im = cfg.vision, cfg.images
    if v.init_from is not None:
        from transformers import AutoConfig

        with loading(str(v.init_from), "vision encoder", "vlm.vision.init_from"):
            config = AutoConfig.from_pretrained(str(v.init_from))
        config = getattr(config, "vision_config", config)  # a whole SigLIP / CLIP: its vision half
        kind = "clip" if "clip" in config.model_type else "siglip"
        if kind != v.arch or config.patch_size != v.patch_size:
            raise BuildError(
                f"vlm.vision.init_from: {v.init_from} is {config.model_type} with patch {config.patch_size}; "
                f"set vlm.vision.arch to {kind} and vlm.vision.patch_size to {config.patch_size}"
            )
        side = config.image_size // config.patch_size
        if (v.arch == "siglip" and side * side != image_tokens(cfg)) or (
            v.arch == "clip" and (im.width, im.height) != (config.image_size,) * 2
        ):
            raise BuildError(
                f"vlm.images: {im.width}x{im.height} pictures do not fit {v.init_from}, whose positions "
                f"cover {config.image_size}x{config.image_size} pixels ({side * side} patches)"
            )
        return config
    dims = dict(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        patch_size=v.patch_size,
    )
    if v.arch == "clip":
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(image_size=im.width, projection_dim=v.hidden_size, **dims)
    from transformers import SiglipVisionConfig

    side = math.isqrt(image_tokens(cfg))  # a square grid with as many positions as the picture's patches
    return SiglipVisionConfig(image_size=side * v.patch_size, **dims)


def make_processor(tokenizer_dir: Path, cfg: VlmConfig):
    """The LlavaProcessor: image processor + our tokenizer with <image> + the content-part template."""
    from transformers import AutoTokenizer, LlavaProcessor

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    size = {"height": cfg.images.height, "width": cfg.images.width}
    if cfg.vision.arch == "clip":
        from transformers import CLIPImageProcessorPil as Images

        images = Images(size=size, crop_size=size, do_center_crop=False)
    else:
        from transformers import SiglipImageProcessorPil as Images  # (PIL: torchvision is not needed)

        images = Images(size=size)
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=cfg.vision.patch_size,
        vision_feature_select_strategy="default" if cfg.vision.arch == "clip" else "full",
        num_additional_image_tokens=1 if cfg.vision.arch == "clip" else 0,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def build_vlm(lm_dir: Path, tokenizer_dir: Path, cfg: VlmConfig, out: Path, seed: int = 0) -> Path:
    """Assemble encoder, projector and our language model (a checkpoint or HF directory at `lm_dir`),
    and save model and processor to `out` (written aside, then renamed); returns `out`."""
    from transformers import AutoModel, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    processor = make_processor(tokenizer_dir, cfg)
    tok = processor.tokenizer
    with loading(str(lm_dir), "language model", "vlm"):
        lm = LlamaForCausalLM.from_pretrained(str(lm_dir), dtype=torch.float32)
    if lm.config.max_position_embeddings < image_tokens(cfg) + 16:
        raise BuildError(
            f"vlm: a picture makes {image_tokens(cfg)} image tokens, too many for the language model's "
            f"{lm.config.max_position_embeddings} positions; use smaller pictures or larger patches"
        )
    old = lm.get_input_embeddings().num_embeddings
    lm.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():  # the new rows (<image>) at the mean of the others: an ordinary token
        for table in (lm.get_input_embeddings().weight, lm.get_output_embeddings().weight):
            table[old:] = table[:old].mean(0)
    text = lm.config
    # a reply ends at the end of its turn: generate() stops there (the config travels with every
    # checkpoint; generation_config.json does not)
    stops = [tok.convert_tokens_to_ids("<|end|>"), tok.eos_token_id]
    text.eos_token_id, text.pad_token_id = stops, tok.pad_token_id
    config = LlavaConfig(
        vision_config=vision_config(cfg),
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act=cfg.projector_act,
        vision_feature_select_strategy="default" if cfg.vision.arch == "clip" else "full",
        vision_feature_layer=-1,
        image_seq_length=image_tokens(cfg),
        tie_word_embeddings=text.tie_word_embeddings,
    )
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    if cfg.vision.init_from is not None:
        with loading(str(cfg.vision.init_from), "vision encoder", "vlm.vision.init_from"):
            encoder = AutoModel.from_pretrained(str(cfg.vision.init_from), dtype=torch.float32)
        encoder = getattr(encoder, "vision_model", encoder)  # a whole SigLIP / CLIP: its vision half
        model.model.vision_tower.load_state_dict(encoder.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    processor.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
