"""`trulyopen merge`: the models in, tensor by tensor through the method, a Hugging Face model out.

    A B … (--base X) ─► resolve ─► check: one config, tensors, tokenizer ─► per tensor name:
                                                                         read it from each model,
                                                                         merge (methods.py), keep
    OUT.tmp/  model(-0000i-of-0000n).safetensors, config.json, tokenizer, generation_config.json,
              ledger.jsonl (stage "merge": every input file's sha256, the method and its parameters,
              the code version, every output file's sha256)                 ─► renamed to OUT/

Memory stays at the merged model plus one tensor of each input: inputs are read from their
safetensors files one tensor at a time. The config, tokenizer and generation config are those of
the first model (the base, for ties). OUT is replaced only when it is an earlier merge's output.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from trulyopen.files import write_json
from trulyopen.ledger import Ledger, code_version, file_record, machine_summary
from trulyopen.merge.inputs import Reader, Source, check_compatible, resolve
from trulyopen.merge.methods import MergeError, Method, merge_tensor, mergekit_version
from trulyopen.progress import Progress


def merge_models(models: list[str], method: Method, out: Path, base: str | None = None) -> Path:
    """Merge `models` (and `base`, for ties) by `method` into the Hugging Face directory `out`."""
    out = Path(out)
    check_out(out, [*models, *([base] if base else [])])
    libraries = {"mergekit": mergekit_version(), "torch": torch.__version__}
    libraries["transformers"] = metadata.version("transformers")
    started, t0 = datetime.now(UTC).isoformat(timespec="seconds"), time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # adapters merged into their bases (and hub models) are written beside OUT, not into /tmp: as large
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-scratch-", dir=out.parent) as scratch:
        sources = [resolve(m, Path(scratch)) for m in models]
        if base is not None:
            sources.insert(0, resolve(base, Path(scratch), "--base"))
        sources = check_compatible(sources, Path(scratch))
        state = _merge(method, sources, has_base=base is not None)
        tmp.mkdir()
        _save_weights(state, tmp)
        del state
        _save_config(sources[0], tmp)
        from trulyopen.model.export import write_tokenizer

        write_tokenizer(sources[0].tokenizer, tmp)
        if (sources[0].config_dir / "generation_config.json").exists():  # the model's own sampling defaults
            shutil.copyfile(sources[0].config_dir / "generation_config.json", tmp / "generation_config.json")
        entry = _entry(method, sources, base is not None, tmp, libraries)
    Ledger(tmp).append(
        {
            **entry,
            "started": started,
            "ended": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - t0, 3),
        }
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    _record(out, models, base, method)
    return out


def _run_name(model: str) -> str:
    """The run a model comes from: RUN for RUN/checkpoints/STAGE/step_N, else the folder's (or hub) name."""
    path = Path(model.rstrip("/"))
    if len(path.parents) >= 3 and path.parents[1].name == "checkpoints":
        return path.parents[2].name
    return path.name


def _record(out: Path, models: list[str], base: str | None, method: Method) -> None:
    """The merge as a run of its project (OUT's folder): its parents are the models it merged."""
    from trulyopen.history.project import end_run, start_run

    names = list(dict.fromkeys(_run_name(m) for m in ([base] if base else []) + models))
    recipe = {"merge": {"method": method.name, "models": models, "base": base, **method.parameters()}}
    project = start_run(out, recipe, why=f"merge of {', '.join(names)} ({method.name})", parents=names)
    end_run(project, out, "finished")


def check_out(out: Path, models: list[str]) -> None:
    """OUT may be new, empty, or an earlier merge's output (replaced); never an input, nor anything else."""
    if out.exists() and not out.is_dir():
        raise MergeError(f"--out {out}: an existing file; give a directory to write the merged model into")
    if not out.exists() or not any(out.iterdir()):
        return
    for m in models:
        if Path(m).exists() and out.resolve() in (Path(m).resolve(), *Path(m).resolve().parents):
            raise MergeError(f"--out {out}: it holds {m}, a model being merged; give another directory")
    earlier = Ledger(out).entries() if (out / "ledger.jsonl").is_file() else []
    if not any(e.get("stage") == "merge" for e in earlier):
        raise MergeError(
            f"--out {out}: a directory with other things in it (not an earlier merge); give a new directory"
        )


def _merge(method: Method, sources: list[Source], has_base: bool) -> dict[str, torch.Tensor]:
    names = sorted(sources[0].weights)
    state = {}
    with Reader(sources) as reader, Progress("merge", len(names), unit="tensors") as progress:
        for name in names:
            tensors = reader.read(name)
            base, tensors = (tensors[0], tensors[1:]) if has_base else (None, tensors)
            merged = merge_tensor(method, tensors, base, name).contiguous()
            state[name] = merged
            progress.update(nbytes=merged.numel() * merged.element_size())
    return state


def _save_weights(state: dict[str, torch.Tensor], out: Path, max_shard_size: str = "5GB") -> None:
    """Safetensors files as `save_pretrained` writes them: one, or shards and their index."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        write_json(out / "model.safetensors.index.json", index)


def _save_config(source: Source, out: Path) -> None:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(str(source.config_dir))
    if not config.architectures and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.save_pretrained(str(out))


def _entry(
    method: Method, sources: list[Source], has_base: bool, tmp: Path, libraries: dict
) -> dict[str, Any]:
    """The ledger entry, less its times: what went in (with hashes), how, and what came out."""
    merged = sources[1:] if has_base else sources
    models = [sources[0].record("base")] if has_base else []
    for i, source in enumerate(merged):
        weight = {} if method.name == "slerp" else {"weight": method.weights[i]}
        models.append({**source.record("model"), **weight})
    settings = {"method": method.name, **method.parameters()}
    return {
        "stage": "merge",
        "method": method.name,
        "parameters": method.parameters(),
        "config_hash": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(),
        "models": models,
        "inputs": [{**file_record(p.resolve()), "model": s.arg} for s in sources for p in s.files],
        "outputs": [file_record(p, tmp) for p in sorted(tmp.rglob("*")) if p.is_file()],
        "code_version": code_version(),
        "libraries": libraries,
        "machine": machine_summary(),
    }
