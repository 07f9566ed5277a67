"""Any transformers vision-language model, as the rest of the project sees it: recognised by its
config, loaded with AutoModelForImageTextToText + AutoProcessor, and split into three parts that
training names (`finetune.vision.train`, `finetune.vision.lora_targets`):

    vision      the image encoder (SigLIP, Qwen2-VL's ViT, ...)        frozen by default
    projector   what maps its features into the language model's space (LLaVA's MLP, Qwen's merger)
    language    the language model and its head

Families name these modules differently (`model.vision_tower`, `model.visual`, `model.multi_modal_projector`,
`model.visual.merger`, ...), so parts are found by the names' words, not by a table of families.

A processor whose family also handles videos (Qwen2-VL) needs torchvision for its video half; where
torchvision is missing, the processor is built from its image processor and tokenizer with a video
processor that refuses videos, so training and serving images work on a machine without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from trulyopen.files import write_json

PARTS = ("language", "projector", "vision")
# Module-name words, tried in order: the first part whose word is in a parameter's dotted name wins
# (Qwen2-VL's projector, `visual.merger`, sits inside its vision tower, so "projector" is tried first).
_WORDS = {
    "projector": ("multi_modal_projector", "mm_projector", "visual.merger", "connector", "projector"),
    "vision": ("vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder", "vision"),
}


def is_vlm_config(config: Any) -> bool:
    """Whether a transformers config (object or dict) is a vision-language model's."""
    if isinstance(config, dict):
        return "vision_config" in config
    if getattr(config, "vision_config", None) is not None:
        return True
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return getattr(config, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def is_vlm_dir(path: Path) -> bool:
    """Whether a model directory (config.json) holds a vision-language model."""
    cfg = Path(path) / "config.json"
    return cfg.is_file() and is_vlm_config(json.loads(cfg.read_text()))


def is_vlm_model(name: str) -> bool:
    """Whether a model directory, trulyopen checkpoint or hub name is a vision-language model."""
    if Path(name).is_dir():
        return is_vlm_dir(Path(name))
    from transformers import AutoConfig

    try:
        return is_vlm_config(AutoConfig.from_pretrained(name))
    except (OSError, ValueError):  # not a model transformers knows: not one of ours either
        return False


def part_of(name: str) -> str:
    """Which part ("language", "projector", "vision") a parameter or module name belongs to."""
    for part in ("projector", "vision"):
        if any(word in name for word in _WORDS[part]):
            return part
    return "language"


def set_trainable(model: torch.nn.Module, parts: list[str]) -> dict[str, int]:
    """Train only `parts` of the model (full fine-tuning); returns the parameter count of each part."""
    counts = dict.fromkeys(PARTS, 0)
    for name, p in model.named_parameters():
        part = part_of(name)
        p.requires_grad_(part in parts)
        counts[part] += p.numel()
    return counts


def lora_target_modules(model: torch.nn.Module, parts: list[str]) -> list[str]:
    """The full names of the Linear layers of `parts`, for peft's `target_modules` (a list of full
    names matches exactly, so a vision tower's `q_proj` is not caught by the language model's). The
    output head and mixture-of-experts routers are left out, as LoRA on text models does."""
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or part_of(name) not in parts or name.endswith("lm_head"):
            continue
        if name.endswith("mlp.gate") or "router" in name.rsplit(".", 1)[-1]:  # MoE routers, as for text
            continue
        out.append(name)
    return out


def skip_modules(model: torch.nn.Module) -> list[str]:
    """Module names that 4-bit quantisation leaves alone (bitsandbytes' llm_int8_skip_modules): the
    outermost modules of the vision tower and the projector, and the output head."""
    tops = set()
    for name, _ in model.named_modules():
        parts = name.split(".")
        prefixes = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
        top = next((p for p in prefixes if part_of(p) != "language"), None)
        if top:
            tops.add(top)
    return sorted(tops) + ["lm_head"]


def load_model(path: Path | str, dtype: torch.dtype = torch.float32, **kwargs: Any) -> torch.nn.Module:
    """A VLM from a directory, with AutoModelForImageTextToText."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype, **kwargs)


def load_processor(path: Path | str) -> Any:
    """The model's own processor (AutoProcessor); where its video half cannot load here (torchvision
    missing), the same processor class over its image processor and tokenizer, videos refused."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(path))
    except (ImportError, OSError) as e:  # no torchvision, or no video config (saved without one)
        if "orchvision" not in str(e) and "video" not in str(e):
            raise
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    cfg = {}
    for name in ("processor_config.json", "preprocessor_config.json"):
        f = Path(path) / name
        if f.is_file():
            cfg = {**json.loads(f.read_text()), **cfg}
    cls = getattr(transformers, cfg["processor_class"])
    tok = AutoTokenizer.from_pretrained(str(path))
    template = Path(path) / "chat_template.jinja"
    video = Path(path) / "video_preprocessor_config.json"
    kept = cfg.get("video_processor") or (json.loads(video.read_text()) if video.is_file() else None)
    return cls(
        image_processor=AutoImageProcessor.from_pretrained(str(path)),
        tokenizer=tok,
        video_processor=no_video(kept),
        chat_template=template.read_text() if template.is_file() else tok.chat_template,
    )


def no_video(kept: dict | None = None) -> Any:
    """A video processor that refuses videos (what a processor gets where torchvision is missing),
    keeping the family's video config, when the directory had one, to save it again as it was."""
    import transformers
    from transformers.video_processing_utils import VideoProcessorMixin

    # transformers exports the mixin only with torchvision, yet a processor checks its video part
    # against it by name: name it, so that check finds the class.
    if not hasattr(transformers, "VideoProcessorMixin"):
        transformers.VideoProcessorMixin = VideoProcessorMixin

    class NoVideo(VideoProcessorMixin):
        merge_size = 2
        temporal_patch_size = 2

        def preprocess(self, videos: Any, **kwargs: Any) -> Any:
            from trulyopen.errors import UserError

            raise UserError("videos need torchvision (pip install torchvision); images work without it")

    stand_in = NoVideo()
    stand_in.kept = kept
    return stand_in


def save_processor(processor: Any, out: Path | str) -> None:
    """processor.save_pretrained, with the family's own video config in place of a stand-in's
    (no_video), so the directory loads with its video processor wherever torchvision is installed."""
    processor.save_pretrained(str(out))
    video = getattr(processor, "video_processor", None)
    if video is not None and type(video).__name__ == "NoVideo":
        (Path(out) / "video_preprocessor_config.json").unlink(missing_ok=True)
        cfg = Path(out) / "processor_config.json"
        if cfg.is_file():
            data = json.loads(cfg.read_text())
            data.pop("video_processor", None)
            if getattr(video, "kept", None):
                data["video_processor"] = video.kept
            write_json(cfg, data)
