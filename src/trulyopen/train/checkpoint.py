"""Checkpoints: everything a run needs to continue to the same bits, written atomically.

    checkpoints/<stage>/step_000050/
        config.json         the transformers config: the model can be rebuilt from the checkpoint alone
        model.safetensors   weights (fp32 master copy), or
        adapter.safetensors only the trained adapter's weights (LoRA, QLoRA: the base stays where it was)
        optimizer.pt        optimizer state (tensors and numbers only: loaded with weights_only=True)
        rng.pt              torch RNG states
        state.json          step, tokens seen, data fingerprint, config hash, code version

A checkpoint is written into `step_000050.tmp/` and renamed when complete, so a directory without
`.tmp` is always whole; `newest()` ignores anything else. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file

from trulyopen.errors import missing, reading
from trulyopen.files import write_json
from trulyopen.train import TrainingError
from trulyopen.train.distributed import World, barrier, full_state, load_full_state
from trulyopen.train.layout import PREFIX, complete, newest, path_for, step_of  # noqa: F401 (callers use them from here)


def _tied_names(model: torch.nn.Module) -> dict[str, str]:
    """{name: name it shares its tensor with} for tied weights (e.g. lm_head -> embed_tokens)."""
    first: dict[int, str] = {}
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def save(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    world: World | None = None,
    adapter: bool = False,
    files: Path | None = None,
) -> Path:
    """Write checkpoint `step` under `root` and return its directory. Every rank must call it
    (gathering sharded state is collective); rank 0 writes. With `adapter`, only the parameters
    that train are written, to adapter.safetensors; the files of folder `files` are copied in (a
    vision-language model's processor, so the checkpoint loads on its own)."""
    world = world or World()
    model_sd, optim_sd = full_state(model, optimizer, trainable_only=adapter)
    final = path_for(root, step)
    if world.main:
        tmp = final.with_name(final.name + ".tmp")
        try:
            _write(tmp, model, model_sd, optim_sd, {**state, "step": step}, adapter, files)
        except OSError as e:  # a full disk, say: the last complete checkpoint stays as it was
            shutil.rmtree(tmp, ignore_errors=True)
            last = newest(root)
            raise TrainingError(
                f"could not write checkpoint {final}: {e.strerror or e}; "
                + (f"the last complete checkpoint is {last}" if last else "no complete checkpoint yet")
            ) from None
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    barrier(world)
    return final


def _write(
    tmp: Path,
    model: torch.nn.Module,
    model_sd: dict,
    optim_sd: dict,
    state: dict,
    adapter: bool,
    files: Path | None = None,
) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    if files is not None:
        shutil.copytree(files, tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # under an adapter
    cls = next(c for c in type(inner).__mro__ if not c.__name__.startswith("FSDP"))  # FSDP2 subclasses
    model.config.architectures = [cls.__name__]  # as save_pretrained does: which head this is
    model.config.to_json_file(str(tmp / "config.json"))
    tied = _tied_names(model)
    weights = {k: v.contiguous() for k, v in model_sd.items() if k not in tied}
    if adapter:  # the trained parameters only (a 4-bit base adds its quantisation state to the state dict)
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        weights = {k: v for k, v in weights.items() if k in trained}
    save_file(weights, str(tmp / ("adapter.safetensors" if adapter else "model.safetensors")))
    # tuples come back as lists after a load: store lists, so a resumed run writes the same bytes
    for group in optim_sd["param_groups"]:
        group.update({k: list(v) for k, v in group.items() if isinstance(v, tuple)})
    torch.save(optim_sd, tmp / "optimizer.pt")
    torch.save({"cpu": torch.get_rng_state()}, tmp / "rng.pt")
    write_json(tmp / "state.json", state)  # last: its presence marks a whole checkpoint


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load weights, optimizer and RNG state from `path` into a (possibly sharded) model; every rank
    calls it. Returns the checkpoint's state.json."""
    adapter = (path / "adapter.safetensors").exists()
    weights = path / ("adapter.safetensors" if adapter else "model.safetensors")
    with reading(weights, "checkpoint's weights"):
        model_sd = load_file(str(weights))
    for name, source in _tied_names(model).items():
        if source in model_sd:
            model_sd[name] = model_sd[source]
    with reading(path / "optimizer.pt", "checkpoint's optimizer state"):
        optim_sd = torch.load(path / "optimizer.pt", weights_only=True)
    load_full_state(model, optimizer, model_sd, optim_sd, trainable_only=adapter)
    with reading(path / "rng.pt", "checkpoint's random state"):
        torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["cpu"])
    return read_state(path)


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json (step, data fingerprint, config hash, ...)."""
    with reading(path / "state.json", "checkpoint's state"):
        return json.loads((path / "state.json").read_text())


def thin(root: Path, keep_multiple: int) -> None:
    """Delete checkpoints whose step is not a multiple of `keep_multiple`, always keeping the newest."""
    for p in complete(root)[:-1]:
        if step_of(p) % keep_multiple:
            shutil.rmtree(p)


def tokenizer_dir(ckpt: Path) -> Path | None:
    """The tokenizer of a checkpoint: inside it, where its state.json says, or the run's own."""
    state = json.loads((ckpt / "state.json").read_text()) if (ckpt / "state.json").exists() else {}
    run_dir = ckpt.resolve().parents[2]  # <run>/checkpoints/<stage>/step_N
    for candidate in (ckpt, run_dir / state.get("tokenizer", "tokenizer"), run_dir / "tokenizer"):
        if (candidate / "tokenizer.json").exists() or (candidate / "tokenizer_config.json").exists():
            return candidate
    return None


def load_for_inference(path: Path) -> torch.nn.Module:
    """The model of checkpoint `path`, rebuilt from its own config.json, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for name in ("config.json", "model.safetensors"):
        if not (path / name).exists():
            raise missing(
                path / name, "file", "not a whole trulyopen checkpoint: restore it, or make it again"
            )
    with reading(path / "config.json", "model config"):
        config = AutoConfig.from_pretrained(str(path))
    if any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        raise TrainingError(
            f"{path}: a reward model (finetune method reward): it scores sequences rather than writing "
            "them; use it as finetune.grpo.reward_model"
        )
    from trulyopen.vlm.model import is_vlm_config

    with reading(path / "config.json", "model config"):
        if is_vlm_config(config):  # a vision-language model: its vision tower and projector too
            from transformers import AutoModelForImageTextToText

            model = AutoModelForImageTextToText.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    with reading(path / "model.safetensors", "weights file"):
        load_model(model, str(path / "model.safetensors"))
    return model.eval()
