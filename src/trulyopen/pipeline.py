"""The pipeline: stages in order, each skipped when nothing it depends on has changed.

A stage reads files (its inputs), writes files (its outputs) and appends one ledger entry. Before
running it, we hash its inputs and its section of the recipe and compare them, and the code
version, with its last ledger entry; if all agree and its outputs are still there with the same
hashes, the stage is skipped. `--force STAGE` redoes that stage and every stage after it.

Stages write every file under a temporary name and the ledger entry comes last, so a stage killed
half-way has no entry and simply runs again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from trulyopen.data import card, curate, shards, sources, tokenizer
from trulyopen.data.decontam import eval_set_files
from trulyopen.errors import warn
from trulyopen.files import remove_leftovers, write_json, write_text
from trulyopen.history.project import end_run, start_run
from trulyopen.ledger import Ledger, code_version, config_hash, file_record, machine_summary
from trulyopen.recipe import Recipe, RecipeError, recipe_to_yaml
from trulyopen.where import where

MIN_VAL_DOCS = 5  # fewer held-out documents than this makes a validation loss mostly noise


@dataclass
class Context:
    recipe: Recipe
    run_dir: Path
    workers: int
    fresh: bool = False  # the stage was forced: start over instead of resuming

    @property
    def data(self) -> Path:
        return self.run_dir / "data"


@dataclass
class Stage:
    name: str
    sections: Callable[[Recipe], tuple[BaseModel, ...]]  # the parts of the recipe the stage depends on
    inputs: Callable[[Context], list[Path]]
    run: Callable[[Context, list[dict]], list[Path]]  # gets input records, returns output paths
    distributed: bool = False  # under torchrun every process runs it; other stages run on rank 0 only
    enabled: Callable[[Recipe], bool] = lambda r: r.data is not None  # the recipe has what it needs


# ----------------------------------------------------------------------------- the stages


def _data_inputs(ctx: Context) -> list[Path]:
    files = [p for src in ctx.recipe.data.sources for p in sources.input_files(src)]
    return files + eval_set_files(ctx.recipe.data.decontamination.eval_files)


def _data_run(ctx: Context, records: list[dict]) -> list[Path]:
    cfg = ctx.recipe.data
    files = {src.name: sources.input_files(src) for src in cfg.sources}
    rest = iter(records)  # records come in the order of _data_inputs: sources first, in order
    write_json(ctx.data / "sources.json", {name: [next(rest) for _ in fs] for name, fs in files.items()})
    # finished tasks are kept only for the same config, inputs and code
    key = {"config": config_hash(cfg), "inputs": records, "code": code_version().get("source_sha256")}
    with executor_for(ctx) as executor:
        record = curate.curate(cfg, ctx.data, files, executor, key, fresh=ctx.fresh)
    read, last = record["steps"][0], record["steps"][-1]
    s = record["splits"]
    print(
        f"data: {read['docs_in']:,} inputs -> {last['docs_out']:,} documents "
        f"(train {s['train']['docs']:,}, val {s['val']['docs']:,}), {last['bytes_out'] / 1e6:.1f} MB; "
        + "; ".join(f"{st['step']} removed {sum(st['removed'].values()):,}" for st in record["steps"][2:])
    )
    if record["problem_count"]:
        first = "; ".join(_where(p) for p in record["problems"][:3])
        warn(
            f"data: {record['problem_count']:,} input records or files skipped ({first}"
            f"{'; ...' if record['problem_count'] > 3 else ''}); all of them in {ctx.data / 'problems.jsonl'}"
        )
    for name, tally in record["sources"].items():
        if not tally["docs_kept"]:
            warn(f"data: source '{name}' contributed no document ({tally['docs_read']:,} read); check it")
    val = s["val"]["docs"]
    if val < MIN_VAL_DOCS:
        warn(
            f"data: the validation split has {val} document{'s' * (val != 1)}: validation loss and "
            f"evaluation will be {'impossible' if not val else 'noisy'}; raise data.split.val_fraction "
            f"(now {cfg.split.val_fraction}) or add data"
        )
    names = ("sources.json", "corpus/train.jsonl", "corpus/val.jsonl", "removed.jsonl", "problems.jsonl")
    return [ctx.data / n for n in (*names, "curation.json")]


def _where(problem: dict) -> str:
    return str(sources.Problem(**problem))


@contextmanager
def executor_for(ctx: Context):
    """The data executor of the recipe, closed (a local Ray shut down) when the stage ends."""
    from trulyopen.data.executor import make_executor

    executor = make_executor(ctx.recipe.data, ctx.workers)
    try:
        yield executor
    finally:
        if hasattr(executor, "close"):
            executor.close()


def _tokenizer_inputs(ctx: Context) -> list[Path]:
    own = (
        sorted(p for p in ctx.recipe.tokenizer.path.rglob("*") if p.is_file())
        if ctx.recipe.tokenizer.path
        else []
    )
    return [ctx.data / "corpus/train.jsonl", ctx.data / "corpus/val.jsonl", *own]


def _tokenizer_run(ctx: Context, records: list[dict]) -> list[Path]:
    out = ctx.run_dir / "tokenizer"
    stats = tokenizer.build_tokenizer(ctx.recipe.tokenizer, ctx.data / "corpus", out)
    bpt = stats["bytes_per_token_val"]
    print(
        f"tokenizer: vocabulary {stats['vocab_size']:,}" + (f", {bpt:.2f} bytes/token on val" if bpt else "")
    )
    return sorted(p for p in out.rglob("*") if p.is_file())


def _shards_inputs(ctx: Context) -> list[Path]:
    tok = ctx.run_dir / "tokenizer"
    return [
        *(ctx.data / n for n in ("sources.json", "curation.json", "corpus/train.jsonl", "corpus/val.jsonl")),
        tok / "tokenizer.json",
        tok / "stats.json",
    ]


def _shards_run(ctx: Context, records: list[dict]) -> list[Path]:
    out = ctx.data / "shards"
    key = {
        "config": config_hash(ctx.recipe.shards),
        "inputs": records,
        "code": code_version().get("source_sha256"),
    }
    with executor_for(ctx) as executor:
        record = shards.build_shards(
            ctx.data / "corpus", ctx.run_dir / "tokenizer", out, ctx.recipe.shards, executor, key, ctx.fresh
        )
    curation = json.loads((ctx.data / "curation.json").read_text())
    stats = json.loads((ctx.run_dir / "tokenizer/stats.json").read_text())
    source_files = json.loads((ctx.data / "sources.json").read_text())
    manifest = card.build_manifest(ctx.recipe, source_files, curation, stats, record)
    card.write_card(manifest, curation["length_histogram"], ctx.data)
    sp = record["splits"]
    print(
        f"shards: train {sp['train']['tokens']:,} tokens, val {sp['val']['tokens']:,} tokens "
        f"({record['dtype']}), fingerprint {record['fingerprint'][:16]}"
    )
    files = [
        out / f["path"]
        for split in record["splits"].values()
        for s in split["shards"]
        for f in s["files"].values()
    ]
    files = sorted([*files, out / "shards.json"])
    return files + [ctx.data / n for n in ("manifest.json", "DATACARD.md", "doc_lengths.png")]


def _index_inputs(ctx: Context) -> list[Path]:
    shards_dir = ctx.data / "shards"
    record = json.loads((shards_dir / "shards.json").read_text())
    bins = [shards_dir / f["path"] for s in record["splits"]["train"]["shards"] for f in s["files"].values()]
    return [shards_dir / "shards.json", *sorted(bins)]


def _index_run(ctx: Context, records: list[dict]) -> list[Path]:
    import time

    from trulyopen.trace.index import build_index, index_files

    out = ctx.data / "index"
    licenses = {s.name: s.license for s in ctx.recipe.data.sources}
    code = code_version().get("source_sha256")
    key = {"config": config_hash(ctx.recipe.index), "inputs": records, "code": code}
    t = time.perf_counter()
    with executor_for(ctx) as executor:
        index = build_index(ctx.data / "shards", out, licenses, executor, ctx.recipe.index, key)
    print(
        f"index: {index['tokens']:,} tokens of {index['docs']:,} documents in {len(index['shards'])} "
        f"shard(s), {index['bytes_per_token']:.2f} bytes a token, {time.perf_counter() - t:.1f} s"
    )
    return index_files(out)


def _pretrain_inputs(ctx: Context) -> list[Path]:
    shards_dir = ctx.data / "shards"
    return [
        ctx.run_dir / "tokenizer" / "tokenizer.json",
        *sorted(p for p in shards_dir.iterdir() if p.is_file()),
    ]


def suite_in_loop(cfg, paths):
    """pretrain.eval_suite as the loop runs it at each validation (None without one)."""
    if cfg.eval_suite is None:
        return None
    from trulyopen.evaluate.runner import in_loop

    return in_loop(cfg.eval_suite, paths.tokenizer)


def _pretrain_run(ctx: Context, records: list[dict]) -> list[Path]:
    from trulyopen.train.pretrain import Paths, pretrain

    paths = Paths(ctx.run_dir, ctx.data / "shards", ctx.run_dir / "tokenizer")
    final = pretrain(
        ctx.recipe.pretrain,
        ctx.recipe.model,
        paths,
        ctx.fresh,
        in_loop=suite_in_loop(ctx.recipe.pretrain, paths),
    )
    if os.environ.get("RANK", "0") == "0":
        print(f"pretrain: final checkpoint {final} (export it with `trulyopen export {final} --out DIR`)")
    return [*sorted(final.iterdir()), paths.metrics]


def _vlm_inputs(ctx: Context) -> list[Path]:
    from trulyopen.train.checkpoint import newest

    lm = newest(ctx.run_dir / "checkpoints" / "pretrain")
    weights = sorted(lm.glob("*.safetensors")) if lm else []
    tok = ctx.run_dir / "tokenizer" / "tokenizer.json"
    encoder = ctx.recipe.vlm.vision.init_from  # a local vision checkpoint to start from
    encoder_files = sorted(p for p in encoder.rglob("*") if p.is_file()) if encoder else []
    return [ctx.data / "corpus/train.jsonl", ctx.data / "corpus/val.jsonl", tok, *weights, *encoder_files]


def _vlm_run(ctx: Context, records: list[dict]) -> list[Path]:
    from trulyopen.vlm.stage import run_vlm_stage

    sources = [s.model_dump(include={"name", "type", "license"}) for s in ctx.recipe.data.sources]
    return run_vlm_stage(ctx.recipe.vlm, ctx.run_dir, sources, fresh=ctx.fresh)


def _synth_inputs(ctx: Context) -> list[Path]:
    return [ctx.data / "corpus/train.jsonl", *eval_set_files(ctx.recipe.data.decontamination.eval_files)]


def _synth_run(ctx: Context, records: list[dict]) -> list[Path]:
    from trulyopen.synth import synthesize

    out = ctx.run_dir / "synth"
    synthesize(
        ctx.recipe.synth, ctx.data / "corpus", out, ctx.recipe.data.decontamination, workers=ctx.workers
    )
    return sorted(p for p in out.iterdir() if p.is_file())


def _finetune_paths(ctx: Context):
    from trulyopen.finetune.stage import FinetunePaths

    return FinetunePaths(ctx.run_dir)


def _finetune_inputs(ctx: Context) -> list[Path]:
    from trulyopen.finetune.base import resolve
    from trulyopen.finetune.stage import data_sources

    cfg, paths = ctx.recipe.finetune, _finetune_paths(ctx)
    files = [s.path for s in data_sources(cfg, paths) if s.path is not None]
    files = [
        f for p in files for f in (sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p])
    ]
    base = Path(resolve(cfg, ctx.run_dir).model)
    weights = sorted(base.glob("*.safetensors")) if base.is_dir() else []
    return files + weights


def _finetune_run(ctx: Context, records: list[dict]) -> list[Path]:
    from trulyopen.finetune.stage import finetune

    paths = _finetune_paths(ctx)
    final = finetune(ctx.recipe.finetune, paths, fresh=ctx.fresh)
    if os.environ.get("RANK", "0") == "0":
        print(f"finetune: final checkpoint {final} (export it with `trulyopen export {final} --out DIR`)")
    return [*sorted(final.iterdir()), paths.metrics, paths.records]


def _eval_inputs(ctx: Context) -> list[Path]:
    from trulyopen.train.checkpoint import newest

    cfg = ctx.recipe.eval
    files = [ctx.data / "corpus/val.jsonl", ctx.data / "corpus/train.jsonl"] if ctx.recipe.data else []
    files.append(ctx.run_dir / "synth" / "tools_heldout.jsonl")  # the built-in tool_call task's
    files.append(ctx.data / "index" / "index.json")  # memorisation is traced with the index
    for held in ("eval", "images/eval"):  # the vlm stage's held-out tasks and pictures
        folder = ctx.run_dir / "vlm" / "data" / held
        files += sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    if cfg.suite is not None:
        from trulyopen.evaluate.taskfile import load_suite

        files += [cfg.suite, *(t.path for t in load_suite(cfg.suite))]
    for stage in cfg.models:
        ckpt = newest(ctx.run_dir / "checkpoints" / stage)
        files += sorted(ckpt.glob("*.safetensors")) if ckpt else []
    return [f for f in files if f.exists()]


def _eval_run(ctx: Context, records: list[dict]) -> list[Path]:
    from trulyopen.evaluate.stage import run_eval_stage

    return run_eval_stage(ctx.recipe.eval, ctx.run_dir)


def _release_inputs(ctx: Context) -> list[Path]:
    """Everything the run made, except the release itself and the ledger (which grows with every
    stage, the release's own entry included)."""
    skip = {"release", "release.tmp"}
    return sorted(
        p
        for p in ctx.run_dir.rglob("*")
        if p.is_file() and p.relative_to(ctx.run_dir).parts[0] not in skip and p.name != "ledger.jsonl"
    )


def _release_run(ctx: Context, records: list[dict]) -> list[Path]:
    from trulyopen.release.bundle import release

    out = release(ctx.run_dir, ctx.recipe)
    return sorted(p for p in out.rglob("*") if p.is_file())


STAGES = [
    Stage("data", lambda r: (r.data,), _data_inputs, _data_run),
    Stage("tokenizer", lambda r: (r.tokenizer,), _tokenizer_inputs, _tokenizer_run),
    Stage("shards", lambda r: (r.shards,), _shards_inputs, _shards_run),
    Stage("index", lambda r: (r.index,), _index_inputs, _index_run, enabled=lambda r: r.index is not None),
    Stage("pretrain", lambda r: (r.model, r.pretrain), _pretrain_inputs, _pretrain_run, distributed=True),
    Stage("vlm", lambda r: (r.vlm,), _vlm_inputs, _vlm_run, enabled=lambda r: r.vlm is not None),
    Stage("synth", lambda r: (r.synth,), _synth_inputs, _synth_run, enabled=lambda r: r.synth is not None),
    Stage(
        "finetune",
        lambda r: (r.finetune,),
        _finetune_inputs,
        _finetune_run,
        enabled=lambda r: r.finetune is not None,
        distributed=True,
    ),
    Stage("eval", lambda r: (r.eval,), _eval_inputs, _eval_run, enabled=lambda r: r.eval is not None),
    Stage(
        "release",
        lambda r: (r.release,),
        _release_inputs,
        _release_run,
        enabled=lambda r: r.release is not None,
    ),
]
STAGE_NAMES = [s.name for s in STAGES]


# ----------------------------------------------------------------------------- running


def _same_code(a: dict, b: dict) -> bool:
    return a.get("package") == b.get("package") and a.get("source_sha256") == b.get("source_sha256")


def _outputs_intact(entry: dict, run_dir: Path) -> bool:
    for out in entry["outputs"]:
        path = run_dir / out["path"]
        if (
            not path.is_file()
            or path.stat().st_size != out["size"]
            or file_record(path)["sha256"] != out["sha256"]
        ):
            return False
    return True


def _up_to_date(last: dict | None, chash: str, inputs: list[dict], run_dir: Path) -> bool:
    return (
        last is not None
        and last["config_hash"] == chash
        and _same_code(last["code_version"], code_version())
        and last["inputs"] == inputs
        and _outputs_intact(last, run_dir)
    )


def _world():
    """This process's place among torchrun's processes (a world of one without torchrun)."""
    from trulyopen.train.distributed import World, init

    return init() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else World()


def _barrier(world) -> None:
    from trulyopen.train.distributed import barrier

    barrier(world)


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / recipe.name


def run(
    recipe: Recipe,
    run_dir: Path | None = None,
    until: str | None = None,
    force: list[str] | tuple[str, ...] = (),
    workers: int | None = None,
    why: str | None = None,
    parents: list[str] | None = None,
) -> Path:
    """Run the stages in order up to `until` (all by default); return the run directory. The run's
    start and end go to its project's ledger (the folder it is in: history/), with `why`, the
    author's reason, and `parents`, the runs it came from where the caller knows them."""
    unknown = [f for f in force if f not in STAGE_NAMES]
    if unknown:
        raise RecipeError(f"--force {unknown[0]}: no such stage (stages: {', '.join(STAGE_NAMES)})")
    run_dir = Path(run_dir) if run_dir else default_run_dir(recipe)
    world = _world()
    project = start_run(run_dir, recipe.model_dump(mode="json"), why, parents) if world.main else None
    status, error = "killed", None
    try:
        out = _stages(recipe, run_dir, until, force, workers, world)
        status = "finished"
        return out
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        status, error = "failed", f"{type(e).__name__}: {e}"[:500]
        raise
    finally:
        end_run(project, run_dir, status, error)


def _stages(recipe: Recipe, run_dir: Path, until: str | None, force, workers: int | None, world) -> Path:
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # what a killed run was writing must not be listed as an output, hashed or released
        remove_leftovers(run_dir)
        write_text(run_dir / "recipe.yaml", recipe_to_yaml(recipe))
    workers = workers or recipe.workers or os.cpu_count() or 1
    ctx = Context(recipe, run_dir, workers)
    ledger = Ledger(run_dir)
    forcing = False
    for stage in STAGES:
        forcing = forcing or stage.name in force
        if not stage.enabled(recipe):
            if stage.name == until:
                break
            continue
        if not (world.main or stage.distributed):  # wait for rank 0 to do it
            _barrier(world)
            if stage.name == until:
                break
            continue
        inputs = [file_record(p, run_dir) for p in stage.inputs(ctx)]
        chash = config_hash(*stage.sections(recipe))
        skipped = not forcing and _up_to_date(ledger.last(stage.name), chash, inputs, run_dir)
        if skipped:
            if world.main:
                print(f"{stage.name}: up to date, skipped (--force {stage.name} redoes it)")
        else:
            # A stage that finished before and is out of date starts over; one that was
            # interrupted (no ledger entry yet) may resume from where it stopped.
            ctx.fresh = forcing or ledger.last(stage.name) is not None
            started, t0 = datetime.now(UTC).isoformat(timespec="seconds"), time.perf_counter()
            outputs = stage.run(ctx, inputs)
        if world.main and not skipped:
            ledger.append(
                {
                    "stage": stage.name,
                    "config_hash": chash,
                    "code_version": code_version(),
                    "inputs": inputs,
                    "outputs": [file_record(p, run_dir) for p in outputs],
                    "started": started,
                    "ended": datetime.now(UTC).isoformat(timespec="seconds"),
                    "seconds": round(time.perf_counter() - t0, 3),
                    "machine": machine_summary(),
                    "world_size": world.size,
                    **({"where": here} if (here := where()) else {}),
                }
            )
        _barrier(world)
        if stage.name == until:
            break
    return run_dir
