"""The vlm stage: a small vision-language model of our own, the first half of the LLaVA recipe.

    data/corpus/ ──► codelines: pictures of code lines ──► vlm/data/ (captions, instructions, eval/)
    checkpoints/pretrain/newest + tokenizer/ ──► build: encoder + projector + our Llama ──► vlm/init/
    vlm/init/ + captions ──► finetune(method sft, vision.train [projector(, vision)]) ──► checkpoints/vlm/

Alignment (LLaVA's stage 1) is post-training's own finetune() on the caption records, with the
language model frozen and a stage name of its own, so its checkpoints, metrics and resumption are
those of every training stage. The finetune section then does LLaVA's stage 2: `finetune.base: null`
starts from this stage's newest checkpoint, and with no `finetune.data` it trains on
vlm/data/instructions.jsonl. The eval stage asks the held-out pictures of vlm/data/eval/.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from trulyopen.finetune.stage import FinetunePaths
from trulyopen.ledger import config_hash
from trulyopen.recipe import FinetuneConfig, FinetuneDataConfig, VlmConfig
from trulyopen.train import TrainingError, checkpoint


@dataclass
class VlmPaths(FinetunePaths):
    stage: ClassVar[str] = "vlm"

    @property
    def data(self) -> Path:
        return self.stage_dir / "data"  # the rendered code lines: pictures, records, eval/ tasks

    @property
    def init(self) -> Path:
        return self.stage_dir / "init"  # the assembled model before alignment (a Hugging Face directory)


def align_config(cfg: VlmConfig, base: Path, captions: Path) -> FinetuneConfig:
    """The finetune section that aligns the projector on the captions (LLaVA stage 1)."""
    a = cfg.align
    loop = a.model_dump(exclude={"train", "seq_len", "batch_size", "val_fraction"})
    return FinetuneConfig.model_validate({
        **loop,
        "method": "sft",
        "base": str(base),
        "data": [FinetuneDataConfig(path=captions, format="chat")],
        "seq_len": a.seq_len,
        "batch_size": a.batch_size,
        "val_fraction": a.val_fraction,
        "vision": {"train": list(a.train)},
    })  # fmt: skip


def run_vlm_stage(cfg: VlmConfig, run_dir: Path, sources: list[dict], fresh: bool = False) -> list[Path]:
    """Render the data, build the model, align it; return every file the stage wrote."""
    from trulyopen.finetune.stage import finetune
    from trulyopen.vlm.build import build_vlm
    from trulyopen.vlm.codelines import make_dataset

    paths = VlmPaths(run_dir)
    lm = checkpoint.newest(run_dir / "checkpoints" / "pretrain")
    if lm is None:
        raise TrainingError(f"vlm: {run_dir} has no pretraining checkpoint to build on; pretrain first")
    files = make_dataset(run_dir / "data" / "corpus", paths.data, cfg.images, sources)
    build_vlm(lm, run_dir / "tokenizer", cfg, paths.init, seed=cfg.align.seed)
    m = json.loads((paths.data / "manifest.json").read_text())["records"]
    print(
        f"vlm: {m['captions']:,} captions, {m['instructions']:,} instructions, {m['transcribe']:,} held-out "
        f"lines ({m['define']:,} define questions); model built on {lm.parent.name}/{lm.name} in {paths.init}"
    )
    align = align_config(cfg, paths.init, paths.data / "captions.jsonl")
    final = finetune(align, paths, fresh=fresh, recipe_hash=config_hash(cfg))
    print(f"vlm: aligned, final checkpoint {final}")
    init = sorted(p for p in paths.init.rglob("*") if p.is_file())
    return [*files, *init, *sorted(p for p in final.rglob("*") if p.is_file()), paths.metrics, paths.records]
