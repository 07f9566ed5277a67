"""Fine-tuning vision-language models through `finetune:`: records with images, the assistant's tokens
only, SFT / LoRA / QLoRA / DPO in the one loop, bad images as bad records, export that transformers
loads. Two families (Qwen2-VL; LLaVA with a SigLIP tower), tiny and random (tests/tiny_vlm.py); the
task: say the colour of the shape in the picture."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from tests.tiny_vlm import IMAGE_TOKEN, shape_image, tiny_vlm_dir
from trulyopen.finetune.stage import FinetunePaths, finetune
from trulyopen.recipe import FinetuneConfig, FinetuneDataConfig
from trulyopen.train import checkpoint
from trulyopen.train.packing import IGNORE

COLOURS = ("red", "green", "blue", "yellow")
FAMILIES = ("qwen2_vl", "llava")
QUESTION = "What colour is the shape?"
REFUSAL = "I do not know."  # DPO's rejected reply: an answer that is no colour


def write_images(root: Path) -> list[str]:
    (root / "img").mkdir(parents=True, exist_ok=True)
    names = []
    for colour in COLOURS:
        for shape in ("square", "circle"):
            shape_image(colour, shape, size=56).save(root / "img" / f"{colour}_{shape}.png")
            names.append(f"img/{colour}_{shape}.png")
    return names


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def image(path: str) -> dict:
    return {"type": "image", "image": path}


def text(s: str) -> dict:
    return {"type": "text", "text": s}


def sft_data(root: Path) -> Path:
    """One record per image (the answer is its colour), and one with two images."""
    rows = []
    for name in write_images(root):
        colour = Path(name).stem.split("_")[0]
        rows.append(
            {"messages": [user(image(name), text(QUESTION)), {"role": "assistant", "content": colour}]}
        )
    two = user(image("img/red_square.png"), image("img/blue_circle.png"), text("Which colours?"))
    rows.append({"messages": [two, {"role": "assistant", "content": "red and blue"}]})
    path = root / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg(data: Path, base: Path | None, **kw) -> FinetuneConfig:
    values = dict(
        method="sft",
        base=str(base) if base else None,
        data=[{"path": str(data)}],
        seq_len=128,
        batch_size=4,
        micro_batch_size=4,
        max_steps=8,
        lr=3e-3,
        warmup_steps=1,
        eval_every=8,
        checkpoint_every=8,
        precision="fp32",
        val_fraction=0.0,
    )
    return FinetuneConfig(**{**values, **kw})


def metrics(run: Path, stage: str = "finetune") -> list[dict]:
    return [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlms")
    return {family: tiny_vlm_dir(root, family) for family in FAMILIES}


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The parameters of a model directory or a full checkpoint, by the model's own names."""
    if (path / "state.json").exists():
        return checkpoint.load_for_inference(path).state_dict()
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(path)).state_dict()


def moved(before: dict, after: dict) -> set[str]:
    """The parts (language, projector, vision) whose parameters changed."""
    from trulyopen.vlm.model import part_of

    assert before.keys() == after.keys()
    return {part_of(k) for k in before if not torch.equal(before[k], after[k])}


def image_prompt(processor, root: Path) -> dict:
    """Processor inputs of one question about one image: what the exported model is compared on."""
    from PIL import Image

    messages = [user({"type": "image"}, text(QUESTION))]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return dict(
        processor(text=[prompt], images=[Image.open(root / "img" / "green_circle.png")], return_tensors="pt")
    )


# ----------------------------------------------------------------------------- masking


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_assistant_tokens_are_targets(vlm_dirs, tmp_path, family):
    from trulyopen.finetune.records import read_examples
    from trulyopen.finetune.render import ChatRenderer
    from trulyopen.vlm.batch import collate
    from trulyopen.vlm.images import Limits
    from trulyopen.vlm.model import load_processor
    from trulyopen.vlm.render import VlmRenderer

    processor = load_processor(vlm_dirs[family])
    tok = processor.tokenizer
    renderer = VlmRenderer(processor, ChatRenderer(tok, processor.chat_template), Limits())
    examples, bad = read_examples([FinetuneDataConfig(path=sft_data(tmp_path))], "sft", "stop")
    assert not bad
    items = renderer.build(examples[-2:], "sft", 128)  # one image, then two
    b = collate(renderer, items)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN[family])
    for row, (ex, it) in enumerate(zip(examples[-2:], items, strict=True)):
        ids = b.inputs[row][b.owner[row] >= 0]
        n_images = sum(p.get("type") == "image" for p in ex.messages[0]["content"])
        assert (ids == image_id).sum() == 4 * n_images  # each placeholder expanded to 4 image tokens
        targets = b.targets[row][b.targets[row] != IGNORE]
        assert image_id not in targets.tolist()
        # exactly the reply and the end of its turn (with the template's newline after it, as for text
        # models): no user text, no image token, no padding
        assert tok.decode(targets) == ex.messages[-1]["content"] + "<|im_end|>\n"
        assert QUESTION not in tok.decode(targets) and len(targets) == it.trained_tokens
    # rows are padded to the longest; padding is nobody's and no target
    assert (b.owner == -1).any() and (b.targets[b.owner == -1] == IGNORE).all()


# ----------------------------------------------------------------------------- SFT, LoRA, export


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_and_lora_learn_colours_and_export_to_transformers(vlm_dirs, tmp_path, family):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from trulyopen.finetune.base import base_of, with_adapter
    from trulyopen.model.export import export_checkpoint
    from trulyopen.vlm.model import load_processor, part_of

    base = vlm_dirs[family]
    data = sft_data(tmp_path)
    inputs = image_prompt(load_processor(base), tmp_path)
    before = weights(base)

    # full fine-tuning: the language model and projector move, the vision tower does not
    full = finetune(cfg(data, base, lr=1e-2, max_steps=6, eval_every=6), FinetunePaths(tmp_path / "full"))
    m = metrics(tmp_path / "full")
    assert m[-1]["loss"] < 0.7 * m[0]["loss"]
    assert moved(before, weights(full)) == {"language", "projector"}
    out = export_checkpoint(full, tmp_path / "hf_full")
    processor = load_processor(out)  # AutoProcessor (with a stand-in video half where torchvision is missing)
    assert processor.tokenizer.chat_template == load_processor(base).tokenizer.chat_template
    with torch.no_grad():
        trained = checkpoint.load_for_inference(full)(**inputs).logits
        exported = AutoModelForImageTextToText.from_pretrained(str(out)).eval()(**inputs).logits
        assert torch.allclose(trained, exported, atol=1e-5)
        # the checkpoint itself loads in transformers too, its processor with it
        direct = AutoModelForImageTextToText.from_pretrained(str(full)).eval()(**inputs).logits
        assert torch.equal(direct, trained) and load_processor(full).chat_template == processor.chat_template

    # LoRA on the language model: adapter-only checkpoints naming the base, exported in peft's format
    lora = finetune(cfg(data, base, adapter="lora", lr=1e-2), FinetunePaths(tmp_path / "lora"))
    m = metrics(tmp_path / "lora")
    assert sum(r["loss"] for r in m[-3:]) / 3 < m[0]["loss"] - 0.5  # slower than full: a random base
    saved = load_file(str(lora / "adapter.safetensors"))
    assert saved and all("lora_" in k and part_of(k) == "language" for k in saved)
    state = json.loads((lora / "state.json").read_text())
    assert state["base"] == str(base) and (lora / "processor_config.json").exists()
    out = export_checkpoint(lora, tmp_path / "hf_lora")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (out / "adapter").iterdir()
    }
    with torch.no_grad():
        adapted = with_adapter(lora, base_of(lora)).eval()(**inputs).logits
        merged = AutoModelForImageTextToText.from_pretrained(str(out)).eval()(**inputs).logits
        fresh = AutoModelForImageTextToText.from_pretrained(str(base)).eval()
        original = fresh(**inputs).logits
        via_peft = PeftModel.from_pretrained(fresh, str(out / "adapter")).eval()(**inputs).logits
    assert (adapted - original).abs().max() > 1e-2  # the adapter changed the model
    assert torch.allclose(merged, adapted, atol=1e-4) and torch.allclose(via_peft, adapted, atol=1e-4)


def test_lora_targets_reach_the_projector_and_vision_tower(vlm_dirs, tmp_path):
    from trulyopen.finetune import base as bases
    from trulyopen.vlm.model import part_of

    c = cfg(
        sft_data(tmp_path),
        vlm_dirs["llava"],
        adapter="lora",
        vision={"lora_targets": ["projector", "vision"]},
    )
    model = bases.load_model(bases.resolve(c, tmp_path), c, torch.float32, torch.device("cpu"), head="vlm")
    adapted = {part_of(n) for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"projector", "vision"}


# ----------------------------------------------------------------------------- DPO, QLoRA


def test_dpo_on_image_pairs_lowers_its_loss(vlm_dirs, tmp_path):
    """On Qwen2-VL (M-RoPE, its own processor): LLaVA's rows go through the same code."""
    family = "qwen2_vl"
    names = write_images(tmp_path)
    rows = []
    for name in names:
        colour = Path(name).stem.split("_")[0]
        rows.append({"prompt": [user(image(name), text(QUESTION))], "chosen": colour, "rejected": REFUSAL})
    data = tmp_path / "pref.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = cfg(data, vlm_dirs[family], method="dpo", adapter="lora", lr=1e-2, max_steps=4, eval_every=4)
    c = c.model_copy(update={"val_fraction": 0.3})
    finetune(c, FinetunePaths(tmp_path / "run"))
    m = metrics(tmp_path / "run")
    assert m[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # the policy starts at the reference: log 2
    assert m[-1]["loss"] < 0.45 and m[-1]["reward_accuracy"] > 0.5
    assert m[-1]["val_loss"] < 0.6  # held-out pictures: the refusal is dispreferred there too


def test_qlora_keeps_the_vision_tower_and_projector_in_full_precision(vlm_dirs, tmp_path):
    import bitsandbytes as bnb

    from trulyopen.finetune import base as bases
    from trulyopen.vlm.model import part_of

    c = cfg(sft_data(tmp_path), vlm_dirs["llava"], adapter="qlora", lr=1e-2, max_steps=2, eval_every=2)
    final = finetune(c, FinetunePaths(tmp_path / "run"))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics(tmp_path / "run"))
    assert (final / "adapter.safetensors").exists()
    model = bases.load_model(bases.resolve(c, tmp_path), c, torch.float32, torch.device("cpu"), head="vlm")
    four_bit = {part_of(n) for n, x in model.named_modules() if isinstance(x, bnb.nn.Linear4bit)}
    assert four_bit == {"language"}


# ----------------------------------------------------------------------------- bad images, the vlm stage


def test_bad_images_are_bad_records_named_by_file_and_line(vlm_dirs, tmp_path):
    data = sft_data(tmp_path)
    (tmp_path / "img" / "notes.png").write_text("not an image\n")
    (tmp_path / "img" / "big.png").write_bytes(
        (tmp_path / "img" / "red_square.png").read_bytes() + b"\0" * 4096
    )
    bad_rows = [
        {
            "messages": [
                user(image("img/missing.png"), text(QUESTION)),
                {"role": "assistant", "content": "red"},
            ]
        },
        {"messages": [user(image("img/notes.png"), text(QUESTION)), {"role": "assistant", "content": "red"}]},
        {"messages": [user(image("img/big.png"), text(QUESTION)), {"role": "assistant", "content": "red"}]},
        {"messages": [user({"type": "video", "video": "a.mp4"}), {"role": "assistant", "content": "red"}]},
    ]
    with open(data, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in bad_rows))
    big = (tmp_path / "img" / "big.png").stat().st_size
    c = cfg(data, vlm_dirs["qwen2_vl"], max_steps=1, eval_every=1, vision={"max_image_bytes": big - 1})
    paths = FinetunePaths(tmp_path / "run")
    finetune(c, paths)
    bad = sorted(json.loads(paths.records.read_text())["bad"], key=lambda b: int(b["where"].split(":")[-1]))
    assert [b["where"] for b in bad] == [f"{data}:{n}" for n in (10, 11, 12, 13)]
    assert "no such image file" in bad[0]["reason"] and "missing.png" in bad[0]["reason"]
    assert "not an image" in bad[1]["reason"] and "notes.png" in bad[1]["reason"]
    assert f"larger than {big - 1:,}" in bad[2]["reason"]
    assert bad[3]["reason"].startswith("messages[0].content[0] must be a text or image part")

    from trulyopen.data.sources import DataError

    stop = tmp_path / "stop.jsonl"  # the records up to the missing image: an image stops the run
    stop.write_text("".join(data.read_text().splitlines(keepends=True)[:10]))
    c = c.model_copy(update={"on_bad_record": "stop", "data": [FinetuneDataConfig(path=stop)]})
    with pytest.raises(DataError, match=r"stop.jsonl:10: .*missing.png: no such image file"):
        finetune(c, FinetunePaths(tmp_path / "stop"))


@dataclass
class VlmPaths(FinetunePaths):
    stage: ClassVar[str] = "vlm"


def test_projector_alignment_then_finetune_from_the_vlm_stage(vlm_dirs, tmp_path):
    """V2's vlm stage calls finetune() with vision.train [projector] under its own stage name; a later
    finetune with base null starts from its newest checkpoint."""
    data, base, run = sft_data(tmp_path), vlm_dirs["llava"], tmp_path / "run"
    aligned = finetune(
        cfg(data, base, max_steps=2, eval_every=2, vision={"train": ["projector"]}), VlmPaths(run)
    )
    assert moved(weights(base), weights(aligned)) == {"projector"}
    final = finetune(cfg(data, None, max_steps=2, eval_every=2, val_fraction=0.3), FinetunePaths(run))
    assert json.loads((final / "state.json").read_text())["base"] == str(aligned)
    assert 0 < metrics(run)[-1]["val_loss"] < 7  # held-out conversations, padded rows of images


def test_images_for_a_text_model_are_bad_records(tmp_path):
    from tests.conftest import tiny_llama
    from tests.tiny_vlm import tiny_tokenizer

    tok = tiny_tokenizer("llava")
    base = tmp_path / "text_model"
    tiny_llama(tok).save_pretrained(str(base))
    tok.save_pretrained(str(base))
    data = sft_data(tmp_path)
    with open(data, "a") as f:
        f.write(
            json.dumps({"messages": [user(text(QUESTION)), {"role": "assistant", "content": "none"}]}) + "\n"
        )
    paths = FinetunePaths(tmp_path / "run")
    finetune(cfg(data, base, max_steps=1, eval_every=1), paths)
    records = json.loads(paths.records.read_text())
    assert records["train"] == 1 and len(records["bad"]) == 9
    assert all("finetune.base is a text model" in b["reason"] for b in records["bad"])


def test_a_processor_saved_without_torchvision_keeps_its_video_config(vlm_dirs, tmp_path):
    """Qwen2-VL's video half needs torchvision: without it a stand-in refuses videos, and a saved copy
    (checkpoints, exports) still holds the family's video config for machines that have torchvision."""
    import shutil

    from trulyopen.errors import UserError
    from trulyopen.vlm.model import load_processor, save_processor

    src = shutil.copytree(vlm_dirs["qwen2_vl"], tmp_path / "src")
    cfg_file = src / "processor_config.json"
    video = {"video_processor_type": "Qwen2VLVideoProcessor", "merge_size": 2, "patch_size": 14}
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "video_processor": video}))
    processor = load_processor(src)
    save_processor(processor, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "processor_config.json").read_text())["video_processor"] == video
    if type(processor.video_processor).__name__ == "NoVideo":
        with pytest.raises(UserError, match="torchvision"):
            processor.video_processor(videos=[])
