"""The VLM quickstart: rendered code lines (deterministic, held-out lines kept out of training), a
LLaVA model built from our own language model that transformers loads, and the recipe at toy size
through every stage to a release."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from trulyopen.recipe import VlmConfig, VlmImagesConfig
from trulyopen.vlm.codelines import DEFINE, TRANSCRIBE, defines, make_dataset

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _corpus(root: Path, train: list[str], val: list[str]) -> Path:
    """A curated corpus as the data stage writes it: corpus/{train,val}.jsonl of standard-library files."""
    out = root / "corpus"
    out.mkdir(parents=True)
    for split, names in (("train", train), ("val", val)):
        with open(out / f"{split}.jsonl", "w") as f:
            for name in names:
                f.write(json.dumps({"id": f"stdlib/{name}", "text": (STDLIB / name).read_text()}) + "\n")
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _corpus(
        tmp_path_factory.mktemp("codelines"),
        ["json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py"],
        ["json/scanner.py", "json/__init__.py", "fnmatch.py"],
    )


def _lines(path: Path) -> set[str]:
    return {x.strip() for r in map(json.loads, path.open()) for x in r["text"].split("\n")}


def test_code_lines_are_deterministic_and_keep_held_out_lines_out_of_training(corpus, tmp_path):
    cfg = VlmImagesConfig(train_lines=40, eval_lines=12, font_sizes=[11, 15])
    files = make_dataset(corpus, tmp_path / "a", cfg)
    again = make_dataset(corpus, tmp_path / "b", cfg)
    rel = [p.relative_to(tmp_path / "a") for p in files]
    assert rel == [p.relative_to(tmp_path / "b") for p in again]
    assert all((tmp_path / "a" / r).read_bytes() == (tmp_path / "b" / r).read_bytes() for r in rel)
    other = make_dataset(corpus, tmp_path / "c", cfg.model_copy(update={"seed": 1}))
    assert {p.name for p in other if p.suffix == ".png"} != {p.name for p in files if p.suffix == ".png"}
    # made again in the same place, nothing of the other seed's pictures lingers
    make_dataset(corpus, tmp_path / "c", cfg)
    on_disk = sorted(p.relative_to(tmp_path / "c") for p in (tmp_path / "c").rglob("*") if p.is_file())
    assert on_disk == sorted(rel)

    out = tmp_path / "a"
    read = lambda name: [json.loads(x) for x in (out / name).read_text().splitlines()]  # noqa: E731
    captions, instructions = read("captions.jsonl"), read("instructions.jsonl")
    transcribe, define = read("eval/transcribe.jsonl"), read("eval/define.jsonl")
    assert len(captions) == len(instructions) == 40 and len(transcribe) == 12 and define
    trained = {r["messages"][1]["content"] for r in captions}
    trained |= {
        r["messages"][1]["content"]
        for r in instructions
        if r["messages"][0]["content"][1]["text"] == TRANSCRIBE
    }
    held = {r["verifier"]["answer"] for r in transcribe}
    train_corpus, val_corpus = _lines(corpus / "train.jsonl"), _lines(corpus / "val.jsonl")
    assert trained <= train_corpus and not trained & val_corpus  # no held-out line in any training picture
    assert held <= val_corpus and not held & train_corpus  # nor any held-out picture's line in training
    # every record points at its own picture, of the configured size, in a font the manifest lists
    from PIL import Image

    manifest = json.loads((out / "manifest.json").read_text())
    fonts = {f["file"]: f for f in manifest["fonts"]}
    assert {f["license"] for f in fonts.values()} == {"Bitstream-Vera", "OFL-1.1"}
    pictures = [r["messages"][0]["content"][0]["image"] for r in captions + instructions]
    pictures += [str(Path("eval") / r["images"][0]) for r in transcribe]
    assert len(set(pictures)) == len(pictures) == 92
    for r in captions[:5] + transcribe[:5]:
        path = out / (
            r["messages"][0]["content"][0]["image"] if "messages" in r else Path("eval") / r["images"][0]
        )
        assert Image.open(path).size == (512, 32) and r["meta"]["font"] in fonts
    # the define questions: def/class lines, the right kind and name among the choices
    line_of = {r["id"].split("/")[1]: r["messages"][1]["content"] for r in captions}  # same line, same id
    asked = [r for r in instructions if r["messages"][0]["content"][1]["text"] == DEFINE]
    assert asked
    for r in asked:
        kind, name = defines(line_of[r["id"].split("/")[1]])
        assert r["messages"][1]["content"] == f"a {kind} named {name}"
    for item in define:
        line = next(t["verifier"]["answer"] for t in transcribe if t["images"] == item["images"])
        kind, name = defines(line)
        assert item["choices"][item["answer"]] == f"a {kind} named {name}" and len(set(item["choices"])) == 4


@pytest.fixture(scope="module")
def language_model(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint directory, tokenizer directory): a tiny Llama over a tokenizer of the quickstart's
    recipe (our special tokens and chat turns), saved as the pretraining stage saves checkpoints."""
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config
    from trulyopen.data.tokenizer import save_hf, train_tokenizer
    from trulyopen.recipe import TokenizerConfig

    root = tmp_path_factory.mktemp("lm")
    texts = [(STDLIB / n).read_text() for n in ("textwrap.py", "shlex.py", "fnmatch.py")]
    save_hf(train_tokenizer(iter(texts), TokenizerConfig(vocab_size=400)), root / "tokenizer")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(400)).save_pretrained(root / "step_000004")
    return root / "step_000004", root / "tokenizer"


VISION = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}


@pytest.mark.parametrize(
    "arch, size, tokens",
    [("siglip", (512, 32), 64), ("clip", (64, 64), 16)],  # patches of 16: 32 x 2; CLIP: 4 x 4, no CLS
)
def test_built_model_loads_in_transformers_with_the_language_models_logits(
    language_model, tmp_path, arch, size, tokens
):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlamaForCausalLM

    from trulyopen.vlm.build import build_vlm, image_tokens

    lm_dir, tok_dir = language_model
    images = {"width": size[0], "height": size[1]}
    cfg = VlmConfig.model_validate({"images": images, "vision": {"arch": arch, **VISION}})
    out = build_vlm(lm_dir, tok_dir, cfg, tmp_path / "vlm")
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    end = processor.tokenizer.convert_tokens_to_ids("<|end|>")
    assert end in model.config.text_config.eos_token_id  # generate() stops at the end of the turn
    assert (
        type(model.model.vision_tower).__name__
        == {"siglip": "SiglipVisionModel", "clip": "CLIPVisionModel"}[arch]
    )
    assert image_tokens(cfg) == tokens == model.config.image_seq_length
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TRANSCRIBE}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == f"<|user|>\n<image>\n{TRANSCRIBE}<|end|>\n<|assistant|>\n"
    batch = processor(text=text, images=Image.new("RGB", size, "white"), return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, size[1], size[0])
    # the processor expands <image> into as many tokens as the projector makes features
    assert int((batch["input_ids"] == model.config.image_token_index).sum()) == tokens
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()
    # the language model inside is ours, unchanged: same logits on text (the new <image> column aside)
    lm = LlamaForCausalLM.from_pretrained(lm_dir).eval()
    ids = processor.tokenizer("def add(a, b):\n    return a + b", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits[..., :400], lm(ids).logits)


def test_bad_vision_settings_are_named():
    from trulyopen.recipe import RecipeError, load_recipe

    recipe = Path(__file__).parent.parent / "recipes" / "vlm-quickstart.yaml"
    for change, expected in [
        ("vlm.images.width=500", "multiples of vision.patch_size"),
        ("vlm.images.width=256", "must be a square"),  # 16 x 2 = 32 patches
        ("vlm.vision.arch=clip", "square pictures only"),
        ("vlm.images.fonts=[Comic.ttf]", "field 'vlm.images.fonts': 'Comic.ttf' is not one of matplotlib's"),
    ]:
        with pytest.raises(RecipeError, match=expected):
            load_recipe(recipe, [change])


TOY = [
    'data.sources.0.include=["json/*.py", "email/*.py", "textwrap.py"]',
    "data.split.val_fraction=0.2",
    "tokenizer.vocab_size=600",
    "pretrain.max_steps=2", "pretrain.global_batch_tokens=1024", "pretrain.micro_batch_size=4",
    "pretrain.warmup_steps=1", "pretrain.eval_every=2", "pretrain.checkpoint_every=2",
    "vlm.images.train_lines=24", "vlm.images.eval_lines=6",
    "vlm.vision.hidden_size=32", "vlm.vision.num_layers=1", "vlm.vision.num_heads=2",
    "vlm.vision.intermediate_size=64",
    "vlm.align.max_steps=2", "vlm.align.batch_size=4", "vlm.align.micro_batch_size=4",
    "vlm.align.warmup_steps=1", "vlm.align.eval_every=2", "vlm.align.checkpoint_every=2",
    "finetune.max_steps=2", "finetune.batch_size=4", "finetune.micro_batch_size=4",
    "finetune.warmup_steps=1", "finetune.eval_every=2", "finetune.checkpoint_every=2",
]  # fmt: skip


def test_the_vlm_quickstart_at_toy_size_runs_every_stage_and_releases(tmp_path):
    """The VLM quickstart's own recipe, on a few standard-library packages and a few steps of each
    stage: pictures, the built and aligned VLM, instruction tuning from it, evaluation, release."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from typer.testing import CliRunner

    from trulyopen.cli import app
    from trulyopen.files import sha256_file
    from trulyopen.ledger import Ledger
    from trulyopen.release.audit import audit

    recipe = Path(__file__).parent.parent / "recipes" / "vlm-quickstart.yaml"
    args = ["run", str(recipe), "--run-dir", str(tmp_path), "--workers", "1"]
    result = CliRunner().invoke(app, args + [x for o in TOY for x in ("--set", o)])
    assert result.exit_code == 0, result.output
    stages = [e["stage"] for e in Ledger(tmp_path).entries() if "seconds" in e]
    assert stages == ["data", "tokenizer", "shards", "pretrain", "vlm", "finetune", "eval", "release"]
    # the vlm stage's ledger entry hashes every picture it drew
    entry = Ledger(tmp_path).last("vlm")
    pictures = {o["path"]: o["sha256"] for o in entry["outputs"] if o["path"].endswith(".png")}
    assert len(pictures) == 24 * 2 + 6
    assert all(sha256_file(tmp_path / p) == h for p, h in pictures.items())
    # instruction tuning started from the aligned model, whose base is the built one
    state = json.loads(next((tmp_path / "checkpoints" / "finetune").glob("step_*/state.json")).read_text())
    assert "checkpoints/vlm/step_000002" in state["base"]
    # evaluated on the held-out pictures: transcription (generation) and what a line defines (choice)
    tasks = json.loads((tmp_path / "eval" / "finetune" / "results.json").read_text())["tasks"]
    assert (
        tasks["transcribe_line"]["metrics"]["score"]["n"] == 6 and tasks["define_line"]["metrics"]["acc"]["n"]
    )
    # the release: audited, its model a VLM that transformers loads, the pictures' sources and licences
    out = tmp_path / "release"
    assert audit(out).cls == 1
    model = AutoModelForImageTextToText.from_pretrained(out / "model")
    processor = AutoProcessor.from_pretrained(out / "model")
    assert type(model).__name__ == "LlavaForConditionalGeneration" and processor.image_token == "<image>"
    card = (out / "data" / "vlm" / "DATACARD.md").read_text()
    assert "DejaVuSansMono.ttf" in card and "OFL-1.1" in card and "Python-2.0" in card
    assert "SIL OPEN FONT LICENSE" in (out / "LICENSES" / "fonts" / "OFL-1.1.txt").read_text().upper()
    assert (out / "data" / "vlm" / "captions.jsonl").exists() and (
        out / "logs" / "vlm" / "metrics.jsonl"
    ).exists()
    assert "pipeline_tag: image-text-to-text" in (out / "README.md").read_text()
    result = CliRunner().invoke(app, ["verify", str(out)])
    assert result.exit_code == 0, result.output


def test_the_vision_encoder_starts_from_a_local_checkpoint(language_model, tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from trulyopen.vlm.build import BuildError, build_vlm

    torch.manual_seed(3)
    dims = {k: VISION[k] for k in ("hidden_size", "intermediate_size")}
    encoder = SiglipVisionModel(
        SiglipVisionConfig(**dims, num_hidden_layers=1, num_attention_heads=2, image_size=128, patch_size=16)
    )
    encoder.save_pretrained(tmp_path / "siglip")
    cfg = VlmConfig.model_validate({"vision": {"init_from": str(tmp_path / "siglip"), **VISION}})
    out = build_vlm(*language_model, cfg, tmp_path / "vlm")
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(out)
    ours = model.model.vision_tower.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in encoder.state_dict().items())
    # a checkpoint whose positions do not fit the pictures is refused, naming the field
    wide = cfg.model_copy(update={"images": cfg.images.model_copy(update={"width": 256})})
    with pytest.raises(BuildError, match="vlm.images: 256x32 pictures do not fit"):
        build_vlm(*language_model, wide, tmp_path / "vlm2")
