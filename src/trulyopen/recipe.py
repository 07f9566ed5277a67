"""The recipe: one YAML file that describes a whole run, validated by a typed schema.

Every field has a description, so `trulyopen run --help` and error messages can say what was
expected. Relative paths in a recipe are resolved against the directory of the recipe file, so a
recipe works the same from any working directory. Any field can be overridden from the command
line as `--set data.dedup.threshold=0.8` (list items by index: `--set data.sources.0.path=...`).

A wrong recipe fails before any work with a `RecipeError` naming the file, the dotted field and what
was expected; the CLI turns it into exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trulyopen.errors import UserError


class RecipeError(UserError):
    """A recipe that cannot be used: the message names the file, the field and what was expected."""


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # Fields that change how a stage runs but not what it makes; they are left out of its config hash.
    not_hashed: ClassVar[frozenset[str]] = frozenset()


# ----------------------------------------------------------------------------- data


SourceType = Literal["python-stdlib", "directory", "text", "jsonl", "parquet", "hf-disk", "hf-hub"]


class SourceConfig(Section):
    name: str = Field(description="Short unique name of the source; document ids start with it.")
    type: SourceType = Field(
        description="Kind of source: python-stdlib (the running interpreter's standard library), "
        "directory (a tree filtered by globs), text (plain text files), jsonl, parquet, "
        "hf-disk (a dataset saved with datasets.save_to_disk) or hf-hub (a dataset name on the hub)."
    )
    license: str = Field(description="SPDX licence identifier of the source, e.g. Python-2.0 or CC-BY-4.0.")
    path: Path | str | None = Field(
        default=None,
        description="File or directory to read (directory, text, jsonl, parquet, hf-disk): a local path "
        "(relative paths are resolved against the recipe's directory) or an fsspec URL such as "
        "s3://bucket/crawl/, gs://..., hf://datasets/org/name/ or memory://...",
    )
    dataset: str | None = Field(default=None, description="Dataset name on the hub (hf-hub only).")
    split: str = Field(default="train", description="Dataset split to read (hf-disk, hf-hub).")
    include: list[str] = Field(
        default_factory=lambda: ["**/*"],
        description="Glob patterns (relative to the directory) of files to read; directory and text sources.",
    )
    exclude: list[str] = Field(default_factory=list, description="Glob patterns of files to leave out.")
    text_field: str = Field(
        default="text", description="Field or column holding the text (jsonl, parquet, hf-*)."
    )
    id_field: str | None = Field(
        default=None,
        description="Field or column holding the record's own id (jsonl, parquet, hf-*): the document id "
        "becomes <source>/<id>, and the file:line (or #row) location is kept beside it in the metadata.",
    )
    meta_fields: list[str] = Field(
        default_factory=list,
        description="Fields or columns (url, date, ...) that travel with each document into the corpus, "
        "removed.jsonl and the manifest (jsonl, parquet, hf-*); a record without one gets null.",
    )

    @field_validator("path", mode="before")
    @classmethod
    def _path_or_url(cls, v: Any) -> Any:
        """A string with '://' stays a URL (read through fsspec); anything else is a local path."""
        return Path(v) if isinstance(v, str) and "://" not in v else v

    @model_validator(mode="after")
    def _needs(self) -> SourceConfig:
        if self.type in ("directory", "text", "jsonl", "parquet", "hf-disk") and self.path is None:
            raise ValueError(f"a source of type {self.type!r} needs a 'path'")
        if self.type == "hf-hub" and not self.dataset:
            raise ValueError("a source of type 'hf-hub' needs a 'dataset' name")
        return self


class CleanConfig(Section):
    unicode_normalization: Literal["NFC", "NFKC", "none"] = Field(
        default="NFC", description="Unicode normal form applied to every document, or none."
    )
    undecodable: Literal["skip", "replace"] = Field(
        default="skip",
        description="What to do with a file that is not valid UTF-8: skip the document, "
        "or replace the bad bytes with U+FFFD. Either way it is counted.",
    )
    strip_control_chars: bool = Field(
        default=True, description="Remove control characters other than newline, tab and carriage return."
    )


class FilterConfig(Section):
    min_chars: int = Field(default=64, ge=0, description="Drop documents shorter than this many characters.")
    max_chars: int = Field(
        default=1_000_000, ge=1, description="Drop documents longer than this many characters."
    )
    max_duplicate_line_fraction: float | None = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Gopher repetition filter: drop a document when more than this fraction of its "
        "non-blank lines are repeats of an earlier line. null disables.",
    )
    max_top_ngram_char_fraction: float | None = Field(
        default=0.35,
        ge=0,
        le=1,
        description="Gopher repetition filter: drop a document when its most frequent word n-gram "
        "covers more than this fraction of its word characters. null disables.",
    )
    top_ngram_size: int = Field(default=3, ge=1, description="n of the word n-grams for the filter above.")


class PIIConfig(Section):
    enabled: bool = Field(default=False, description="Replace personal data with placeholders.")
    email: bool = Field(default=True, description="Replace e-mail addresses with <EMAIL>.")
    ip: bool = Field(default=True, description="Replace IPv4 addresses with <IP_ADDRESS>.")
    phone: bool = Field(default=True, description="Replace phone numbers with <PHONE>.")


class DedupConfig(Section):
    exact: bool = Field(default=True, description="Remove documents whose cleaned text is identical.")
    near: bool = Field(default=True, description="Remove near duplicates with MinHash and LSH.")
    shingle_size: int = Field(default=5, ge=1, description="Words per shingle.")
    num_perm: int = Field(default=112, ge=2, description="Number of MinHash permutations (= bands x rows).")
    bands: int = Field(default=14, ge=1, description="LSH bands; rows per band = num_perm / bands.")
    threshold: float = Field(
        default=0.8,
        ge=0,
        le=1,
        description="Estimated Jaccard similarity at or above which two LSH candidates are duplicates.",
    )
    seed: int = Field(default=1, ge=0, description="Seed of the MinHash hash functions.")

    @model_validator(mode="after")
    def _bands_divide(self) -> DedupConfig:
        if self.num_perm % self.bands:
            raise ValueError(f"num_perm ({self.num_perm}) must be a multiple of bands ({self.bands})")
        return self


class DecontaminationConfig(Section):
    eval_files: list[Path] = Field(
        default_factory=list,
        description="Evaluation sets: JSONL files with a text field, or directories of them.",
    )
    text_field: str = Field(default="text", description="Field of each evaluation record holding its text.")
    ngram: int = Field(
        default=13, ge=1, description="Drop a training document sharing an n-gram of this many words."
    )


class SplitConfig(Section):
    val_fraction: float = Field(
        default=0.02, ge=0, lt=1, description="Share of documents held out for validation, chosen by id hash."
    )


class RayConfig(Section):
    address: str | None = Field(
        default=None,
        description="Address of a running Ray cluster (ray.init(address=...)), e.g. 'auto' or "
        "'ray://head:10001'; unset: a local Ray is started for the stage with one CPU per worker.",
    )
    max_retries: int = Field(default=3, ge=0, description="Times Ray retries a failed task before naming it.")
    object_store_mb: int = Field(
        default=256, ge=64, description="Object store of a local Ray started for you (tasks pass only paths)."
    )


class SlurmConfig(Section):
    partition: str | None = Field(
        default=None, description="Partition (sbatch --partition); unset: the default."
    )
    time: str = Field(default="02:00:00", description="Time limit of each array task (sbatch --time).")
    mem: str | None = Field(
        default=None, description="Memory of each array task (sbatch --mem, e.g. 4G); unset: the cluster's."
    )
    max_parallel: int | None = Field(
        default=None, ge=1, description="Array tasks running at once (sbatch --array=...%N); unset: no limit."
    )
    python: str | None = Field(
        default=None,
        description="Python that runs each task on the nodes (it must import trulyopen); unset: this one.",
    )
    sbatch_args: list[str] = Field(
        default_factory=list, description="More sbatch options, e.g. ['--account=lm', '--qos=normal']."
    )
    poll_seconds: float = Field(default=2.0, gt=0, description="How often squeue is asked about the job.")


class DataConfig(Section):
    # Where tasks run never changes what they make, so it is left out of the stage's config hash.
    not_hashed: ClassVar[frozenset[str]] = frozenset({"executor", "ray", "slurm"})
    sources: list[SourceConfig] = Field(min_length=1, description="Where the text comes from.")
    strict: bool = Field(
        default=False,
        description="Stop at the first bad file or record instead of skipping and counting it.",
    )
    executor: Literal["local", "ray", "slurm"] = Field(
        default="local",
        description="Where the data stage's tasks run: processes on this machine (--workers), Ray Core "
        "tasks (the 'ray' extra), or one Slurm job array per step on a shared file system. The output "
        "bytes are the same on each.",
    )
    task_bytes: int = Field(
        default=64_000_000,
        ge=1024,
        description="Largest logical task: inputs are cut into tasks of at most this many bytes (files, "
        "line-aligned byte ranges of plain JSONL, Parquet row groups); a corpus under 64 tasks' worth is "
        "cut into about 64 tasks of at least 1 MB. The layout depends on the corpus only.",
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray executor settings.")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig, description="Slurm executor settings.")
    clean: CleanConfig = Field(default_factory=CleanConfig, description="Normalisation and cleaning.")
    filters: FilterConfig = Field(default_factory=FilterConfig, description="Length and repetition filters.")
    pii: PIIConfig = Field(default_factory=PIIConfig, description="Personal data scrubbing.")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Exact and near deduplication.")
    decontamination: DecontaminationConfig = Field(
        default_factory=DecontaminationConfig, description="Removal of overlap with evaluation sets."
    )
    split: SplitConfig = Field(default_factory=SplitConfig, description="Train / validation split.")

    @model_validator(mode="after")
    def _unique_names(self) -> DataConfig:
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dup)}")
        return self


# ----------------------------------------------------------------------------- tokenizer and shards


class TokenizerConfig(Section):
    path: Path | None = Field(
        default=None,
        description="Reuse this Hugging Face tokenizer directory instead of training one.",
    )
    vocab_size: int = Field(default=8192, ge=300, description="Vocabulary size of the trained BPE tokenizer.")
    min_frequency: int = Field(default=2, ge=1, description="Minimum pair frequency for a BPE merge.")
    max_train_chars: int = Field(
        default=200_000_000,
        ge=1,
        description="Train on at most this many characters of the training split (taken in order).",
    )


class ShardsConfig(Section):
    shard_tokens: int = Field(
        default=100_000_000, ge=1, description="Start a new shard file once a shard holds this many tokens."
    )


class IndexConfig(Section):
    """The index stage: an infini-gram suffix array over the train shards, for `trulyopen trace`."""

    part_bytes: int = Field(
        default=1 << 30,
        ge=1,
        description="Largest byte range of one shard's tokens sorted at once; larger shards are sorted in "
        "parts and merged (the same bytes either way). Memory: about 8x this.",
    )
    group_tokens: int = Field(
        default=500_000_000,
        ge=1,
        description="Consecutive train shards are indexed together until a group holds this many tokens. "
        "Each query searches every index folder, so a few large ones answer faster than many small ones; "
        "1 gives one index per shard.",
    )


# ----------------------------------------------------------------------------- model and pretraining


class ModelConfig(Section):
    arch: str = Field(
        default="llama",
        description="A transformers model type: llama, qwen3, olmo2, qwen3_moe, deepseek_v3, or any other.",
    )
    size: str | None = Field(
        default="quickstart",
        description="Size preset: tiny, quickstart, 30m, 150m, 1b, 7b; null to give every dimension below.",
    )
    hidden_size: int | None = Field(default=None, ge=1, description="Overrides the preset's hidden size.")
    num_layers: int | None = Field(default=None, ge=1, description="Overrides the preset's number of layers.")
    num_heads: int | None = Field(default=None, ge=1, description="Overrides the preset's attention heads.")
    num_kv_heads: int | None = Field(default=None, ge=1, description="Overrides the key-value heads (GQA).")
    intermediate_size: int | None = Field(default=None, ge=1, description="Overrides the MLP width.")
    num_experts: int | None = Field(default=None, ge=1, description="Experts per MoE layer (MoE families).")
    experts_per_token: int | None = Field(default=None, ge=1, description="Experts each token uses (MoE).")
    init_from: str | None = Field(
        default=None,
        description="Continue from this Hugging Face checkpoint: a local directory or a hub name.",
    )
    config_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Extra fields passed to the transformers config as they are."
    )

    @field_validator("size")
    @classmethod
    def _known_size(cls, size: str | None) -> str | None:
        from trulyopen.model.presets import SIZES  # (no torch, no transformers: recipes load fast)

        if size is not None and size not in SIZES:
            raise ValueError(f"unknown preset '{size}' (presets: {', '.join(SIZES)})")
        return size

    def dim_overrides(self) -> dict[str, int | None]:
        return {
            "hidden": self.hidden_size,
            "layers": self.num_layers,
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
            "intermediate": self.intermediate_size,
            "experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
        }


class LoopConfig(Section):
    """What every training loop shares: the optimizer, its schedule, precision, checkpoints, logging."""

    # DDP, FSDP or one process, and where metrics are mirrored, make the same run
    not_hashed: ClassVar[frozenset[str]] = frozenset({"distributed", "log_to"})
    micro_batch_size: int = Field(default=8, ge=1, description="Sequences per forward pass per process.")
    max_steps: int = Field(default=200, ge=1, description="Optimizer steps to train.")
    lr: float = Field(default=3e-3, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(
        default=0.1, ge=0, le=1, description="Final learning rate as a share of the peak."
    )
    warmup_steps: int = Field(default=20, ge=0, description="Steps of linear warmup.")
    schedule: Literal["cosine", "wsd", "constant"] = Field(
        default="cosine", description="Decay after warmup: cosine, warmup-stable-decay (wsd) or constant."
    )
    decay_fraction: float = Field(default=0.2, gt=0, le=1, description="wsd: share of steps spent decaying.")
    weight_decay: float = Field(
        default=0.1, ge=0, description="AdamW weight decay (not on norms and biases)."
    )
    beta1: float = Field(default=0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(default=0.95, ge=0, lt=1, description="AdamW beta2.")
    grad_clip: float | None = Field(
        default=1.0, gt=0, description="Clip the gradient norm to this; null: off."
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto",
        description="Matmul precision: auto is bf16 on GPUs and on CPUs with AMX or AVX-512 BF16, else fp32.",
    )
    compile: bool = Field(default=False, description="Compile the model with torch.compile.")
    log_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list,
        description="Also send metrics to TensorBoard (pip install tensorboard) or W&B (pip install wandb).",
    )
    eval_every: int = Field(default=50, ge=1, description="Validate every this many steps (and at the end).")
    checkpoint_every: int = Field(default=50, ge=1, description="Write a checkpoint every this many steps.")
    keep_every: int = Field(
        default=1, ge=1, description="Keep every k-th checkpoint (1 keeps all); the newest is always kept."
    )
    seed: int = Field(default=0, description="Seed of the weights' initialisation and of the data order.")
    distributed: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="Under torchrun: ddp (each process holds the model) or fsdp (FSDP2, sharded).",
    )
    on_nan: Literal["stop", "skip"] = Field(
        default="stop", description="A NaN or infinite loss stops the run, or skips that step."
    )


class PretrainConfig(LoopConfig):
    seq_len: int = Field(default=256, ge=8, description="Tokens per training sequence.")
    global_batch_tokens: int = Field(
        default=8192,
        ge=8,
        description="Tokens per optimizer step over all processes (a multiple of seq_len).",
    )
    z_loss: float = Field(
        default=0.0, ge=0, description="Weight of the z-loss (log-sum-exp of logits squared)."
    )
    document_masking: bool = Field(
        default=False,
        description="Keep attention inside each packed document (block-diagonal mask, positions restart).",
    )
    eval_sequences: int = Field(default=16, ge=1, description="Validation sequences per evaluation.")
    eval_suite: Path | None = Field(
        default=None,
        description="A task suite YAML run at every validation; its metrics go to metrics.jsonl as "
        "eval/<task>/<metric> (keep it small: it runs in the training process).",
    )

    @model_validator(mode="after")
    def _batch_divides(self) -> PretrainConfig:
        if self.global_batch_tokens % self.seq_len:
            raise ValueError(
                f"global_batch_tokens ({self.global_batch_tokens}) must be a multiple of "
                f"seq_len ({self.seq_len})"
            )
        return self


# ----------------------------------------------------------------------------- post-training data


HostedProvider = Literal["openai", "anthropic", "gemini", "vertex", "bedrock"]

# the environment variable each provider's key (or token) is read from unless api_key_env names another
DEFAULT_KEY_ENV: dict[str, str] = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "gemini": "GEMINI_API_KEY",
    "vertex": "GOOGLE_OAUTH_ACCESS_TOKEN",
    "bedrock": "AWS_BEARER_TOKEN_BEDROCK",
}
_ONLY_FOR = {"project": "vertex", "location": "vertex", "region": "bedrock"}


class HostedModelConfig(Section):
    """A model behind a hosted API (trulyopen.hosted), asked only when its key is set."""

    provider: HostedProvider = Field(
        description="API style: openai (any OpenAI-compatible chat completions endpoint), anthropic "
        "(messages), gemini (the Gemini API), vertex (Gemini on Vertex AI) or bedrock (AWS Bedrock "
        "Converse)."
    )
    model: str = Field(description="Model name sent with every request (bedrock: the model or profile id).")
    base_url: str | None = Field(
        default=None,
        description="Endpoint root, e.g. http://127.0.0.1:8000/v1; default: the provider's public API.",
    )
    api_key_env: str = Field(
        default="OPENAI_API_KEY",
        description="Environment variable holding the key; when it is unset, the model is not asked. "
        "Default by provider: OPENAI_API_KEY, ANTHROPIC_API_KEY, GEMINI_API_KEY, "
        "GOOGLE_OAUTH_ACCESS_TOKEN (vertex: an OAuth access token, e.g. from `gcloud auth "
        "print-access-token`), AWS_BEARER_TOKEN_BEDROCK (bedrock: an API key; without it requests "
        "are signed with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN).",
    )
    project: str | None = Field(default=None, description="vertex: the Google Cloud project id (required).")
    location: str | None = Field(
        default=None,
        description="vertex: the Google Cloud location, e.g. us-central1 (the default) or global.",
    )
    region: str | None = Field(
        default=None, description="bedrock: the AWS region, e.g. us-east-1 (required)."
    )
    requests_per_minute: float = Field(default=60, gt=0, description="Rate limit.")
    max_retries: int = Field(default=4, ge=0, description="Retries (with backoff) on 429, 5xx and timeouts.")
    temperature: float = Field(default=0.0, ge=0, description="Sampling temperature of the requests.")

    @model_validator(mode="before")
    @classmethod
    def _provider_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("provider") in DEFAULT_KEY_ENV:
            data = {"api_key_env": DEFAULT_KEY_ENV[data["provider"]], **data}
            if data["provider"] == "vertex":
                data.setdefault("location", "us-central1")
        return data

    @model_validator(mode="after")
    def _provider_fields(self) -> HostedModelConfig:
        for name, provider in _ONLY_FOR.items():
            if getattr(self, name) is not None and self.provider != provider:
                raise ValueError(f"'{name}' applies to provider {provider} only, not {self.provider}")
        if self.provider == "vertex" and not self.project:
            raise ValueError("provider vertex needs 'project' (the Google Cloud project id)")
        if self.provider == "bedrock" and not self.region:
            raise ValueError("provider bedrock needs 'region' (the AWS region, e.g. us-east-1)")
        return self


class RemoteModelConfig(HostedModelConfig):
    """An outside model that `synth` may ask to write or judge examples (only when its key is set)."""

    # where and how fast to ask change nothing in what is asked: not hashed
    not_hashed: ClassVar[frozenset[str]] = frozenset({"base_url", "requests_per_minute", "max_retries"})
    task: Literal["write", "judge"] = Field(
        default="judge",
        description="write: it answers each instruction; judge: it rates each example, low ones dropped.",
    )
    max_examples: int = Field(default=200, ge=1, description="At most this many requests.")


class SynthConfig(Section):
    """Post-training data derived from the run's curated corpus, with no outside model by default."""

    kinds: list[Literal["sft", "preference", "grpo", "tools"]] = Field(
        default_factory=lambda: ["sft", "preference", "grpo"],
        description="What to make: sft (write a function from its docstring and signature), "
        "preference (the real body against a corrupted one), grpo (prompts with checkable answers), "
        "tools (conversations that call a corpus function with arguments the corpus uses, and its "
        "sandboxed result; trained with sft).",
    )
    max_per_kind: int = Field(default=2000, ge=1, description="At most this many examples of each kind.")
    max_answer_lines: int = Field(
        default=30, ge=1, description="Functions whose body is longer than this are left out."
    )
    tools_per_example: int = Field(
        default=3,
        ge=1,
        le=16,
        description="Tools listed in a tool-use conversation: the called one and others.",
    )
    tools_heldout: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="Share of the called functions held out of training; their conversations go to "
        "tools_heldout.jsonl (with one call of each other function called three or more times), "
        "which the eval stage's tool_call tasks ask.",
    )
    seed: int = Field(default=0, description="Seed of the selection and of the corruptions.")
    remote: RemoteModelConfig | None = Field(
        default=None, description="Optionally ask an outside model to write or judge examples."
    )


# ----------------------------------------------------------------------------- post-training


class FinetuneDataConfig(Section):
    path: Path | None = Field(
        default=None, description="JSONL file or a dataset saved with datasets.save_to_disk."
    )
    dataset: str | None = Field(default=None, description="Dataset name on the hub instead of a path.")
    split: str = Field(default="train", description="Split to read (datasets only).")
    format: Literal["auto", "chat", "prompt_completion", "preference", "unpaired", "grpo"] = Field(
        default="auto",
        description="Record format: chat ({messages: [{role, content}]}), prompt_completion ({prompt, "
        "completion}), preference ({prompt, chosen, rejected}), unpaired ({prompt, completion, label}: "
        "KTO), grpo ({prompt, verifier}); auto: by keys.",
    )

    @model_validator(mode="after")
    def _one_place(self) -> FinetuneDataConfig:
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give exactly one of path and dataset")
        return self


class LoraConfig(Section):
    r: int = Field(default=16, ge=1, description="Rank of the low-rank update.")
    alpha: float = Field(default=32, gt=0, description="Scale: the update is multiplied by alpha / r.")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | None = Field(
        default=None,
        description="Names of the linear layers to adapt; null: every attention and MLP projection "
        "of the architecture (not the output layer, not MoE routers).",
    )


class FinetuneVisionConfig(Section):
    """A vision-language model's parts in post-training (records with images; ignored for text models)."""

    train: list[Literal["language", "projector", "vision"]] = Field(
        default_factory=lambda: ["language", "projector"],
        min_length=1,
        description="What full fine-tuning (adapter none) updates: the language model, the projector "
        "between the vision tower and it, the vision tower; the rest stays frozen.",
    )
    lora_targets: list[Literal["language", "projector", "vision"]] = Field(
        default_factory=lambda: ["language"],
        min_length=1,
        description="Where LoRA and QLoRA put adapters (lora.target_modules, when set, wins); QLoRA "
        "keeps the vision tower and projector out of 4-bit in any case.",
    )
    max_image_bytes: int = Field(
        default=20 * 1024 * 1024, ge=1, description="An image file larger than this is a bad record."
    )
    max_image_pixels: int = Field(
        default=4096 * 4096, ge=1, description="A decoded image with more pixels is a bad record."
    )


class DPOConfig(Section):
    beta: float = Field(default=0.1, gt=0, description="Strength of the pull towards the reference.")
    loss: Literal["sigmoid", "ipo"] = Field(
        default="sigmoid", description="sigmoid (the DPO paper) or ipo (squared, on mean log-probabilities)."
    )


class GRPOConfig(Section):
    group_size: int = Field(default=8, ge=2, description="Completions sampled per prompt.")
    max_new_tokens: int = Field(default=64, ge=1, description="Longest completion.")
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    top_k: int = Field(default=0, ge=0, description="Keep the k likeliest tokens (0: all).")
    clip_eps: float = Field(default=0.2, gt=0, description="PPO clipping of the probability ratio.")
    kl_coef: float = Field(
        default=0.0, ge=0, description="Weight of the KL penalty to the reference (0: no reference kept)."
    )
    updates_per_batch: int = Field(
        default=1, ge=1, description="Optimizer steps on each batch of completions (>1 makes clipping act)."
    )
    epsilon_high: float | None = Field(
        default=None,
        gt=0,
        description="Upper clip of the ratio: 1 + epsilon_high (DAPO clip-higher: 0.28); null: clip_eps.",
    )
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = Field(
        default="dapo",
        description="How token losses make the step's loss: grpo (mean per completion, then over "
        "completions), dr_grpo (sum / (completions x max_new_tokens): no length bias), dapo (mean over "
        "every completion token of the step).",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        default="group",
        description="Advantages are divided by the group's reward std, the batch's, or nothing (Dr. GRPO).",
    )
    dynamic_sampling: bool = Field(
        default=False,
        description="DAPO: drop groups whose completions all scored the same (they carry no gradient).",
    )
    reward_model: str | None = Field(
        default=None,
        description="A reward-model checkpoint (finetune method reward) whose score is added to the "
        "verifiers' reward.",
    )
    reward_model_weight: float = Field(default=1.0, description="Weight of the reward model's score.")
    tools: bool = Field(
        default=False,
        description="A tool environment: a completion may call python (a <tool_call> of the chat format); "
        "the call runs in the sandbox, its output is appended (and masked out of the loss), and the "
        "model goes on.",
    )
    max_tool_calls: int = Field(default=2, ge=1, description="Tool calls per completion at most.")


class KTOConfig(Section):
    beta: float = Field(default=0.1, gt=0, description="Strength of the pull towards the reference.")
    desirable_weight: float = Field(default=1.0, gt=0, description="Weight of desirable replies' losses.")
    undesirable_weight: float = Field(default=1.0, gt=0, description="Weight of undesirable replies' losses.")


class ORPOConfig(Section):
    lam: float = Field(
        default=0.1, gt=0, description="Weight of the odds-ratio term beside the NLL (TRL's beta)."
    )


class SimPOConfig(Section):
    beta: float = Field(default=2.0, gt=0, description="Scale of the length-normalised log-probabilities.")
    gamma: float = Field(default=0.5, ge=0, description="Target reward margin.")
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5, description="Label smoothing of the sigmoid.")


class RewardConfig(Section):
    center_rewards_coefficient: float | None = Field(
        default=None, ge=0, description="Weight of (r_chosen + r_rejected)^2, keeping rewards centred at 0."
    )


class DistillConfig(Section):
    teacher: str | None = Field(
        default=None,
        description="The teacher: a trulyopen checkpoint, a Hugging Face directory or hub name; its "
        "tokenizer must be the student's.",
    )
    beta: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Generalised JSD between student and teacher: 0 is forward KL(teacher || student), 1 "
        "reverse KL.",
    )
    temperature: float = Field(default=1.0, gt=0, description="Softmax temperature of both models.")
    lmbda: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Share of steps on the student's own samples (on-policy, GKD); 0: on the data's replies.",
    )
    max_new_tokens: int = Field(default=64, ge=1, description="Longest student sample (lmbda > 0).")


class FinetuneConfig(LoopConfig):
    """Post-training: one loop, several objectives, on our checkpoints or any Hugging Face model."""

    method: Literal["sft", "dpo", "kto", "orpo", "simpo", "reward", "distill", "grpo"] = Field(
        description="The objective: sft; preferences with a reference (dpo, kto) or without (orpo, "
        "simpo); a reward model (reward); distill from a teacher (GKD when distill.lmbda > 0); grpo."
    )
    adapter: Literal["none", "lora", "qlora"] = Field(
        default="none",
        description="none trains every weight; lora trains a low-rank adapter (peft); qlora does so on a "
        "4-bit NF4 base (bitsandbytes).",
    )
    base: str | None = Field(
        default=None,
        description="Model to start from: null is this run's final pretraining checkpoint; else a trulyopen "
        "checkpoint directory, a Hugging Face model directory or a hub name.",
    )
    data: list[FinetuneDataConfig] = Field(
        default_factory=list,
        description="Training data; empty: what the run's synth stage made for this method.",
    )
    on_bad_record: Literal["skip", "stop"] = Field(
        default="skip",
        description="A malformed record is reported with file and line, then skipped or fatal.",
    )
    chat_template: str | None = Field(
        default=None, description="Jinja chat template to use instead of the tokenizer's own."
    )
    seq_len: int = Field(default=512, ge=8, description="Longest sequence; longer examples are bad records.")
    batch_size: int = Field(
        default=16,
        ge=1,
        description="Per optimizer step: packed sequences (sft, distill), pairs (dpo, orpo, simpo, reward), "
        "replies (kto) or prompts (grpo).",
    )
    max_steps: int = Field(default=100, ge=1, description="Optimizer steps to train.")
    lr: float = Field(default=2e-5, gt=0, description="Peak learning rate (adapters usually want ~1e-4).")
    warmup_steps: int = Field(default=5, ge=0, description="Steps of linear warmup.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    val_fraction: float = Field(
        default=0.05, ge=0, lt=1, description="Share of the records held out for validation (by id hash)."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Adapter settings (lora, qlora).")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="DPO settings.")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="GRPO settings.")
    kto: KTOConfig = Field(default_factory=KTOConfig, description="KTO settings.")
    orpo: ORPOConfig = Field(default_factory=ORPOConfig, description="ORPO settings.")
    simpo: SimPOConfig = Field(default_factory=SimPOConfig, description="SimPO settings.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward-model settings.")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="Distillation settings.")
    vision: FinetuneVisionConfig = Field(
        default_factory=FinetuneVisionConfig, description="Vision-language models: what trains, LoRA targets."
    )

    @model_validator(mode="after")
    def _whole_grpo_batches(self) -> FinetuneConfig:
        if self.method == "distill" and not self.distill.teacher:
            raise ValueError("distill.teacher: name the teacher model (finetune.method is distill)")
        # a resumed run samples a batch again from the checkpoint's model: checkpoints fall between batches
        u = self.grpo.updates_per_batch
        if self.method == "grpo" and (self.checkpoint_every % u or self.max_steps % u):
            raise ValueError(
                f"checkpoint_every and max_steps must be multiples of grpo.updates_per_batch ({u})"
            )
        return self


# ----------------------------------------------------------------------------- a small VLM of our own


VLM_FONTS = ["DejaVuSansMono.ttf", "DejaVuSans.ttf", "DejaVuSerif.ttf", "STIXGeneral.ttf"]
# the licence of each font file matplotlib ships that a recipe may name (SPDX identifiers); DejaVu
# is Bitstream Vera's glyphs with changes in the public domain, STIX is under the SIL Open Font Licence
VLM_FONT_LICENCES = {
    **dict.fromkeys(
        [*VLM_FONTS[:3], "DejaVuSansMono-Bold.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf"],
        "Bitstream-Vera",
    ),
    "STIXGeneral.ttf": "OFL-1.1",
    "STIXGeneralBol.ttf": "OFL-1.1",
}


class VlmImagesConfig(Section):
    """The rendered code lines (vlm/codelines.py): lines of the curated corpus drawn as pictures."""

    train_lines: int = Field(
        default=2000,
        ge=1,
        description="Lines of the training split to draw (a caption and an instruction each).",
    )
    eval_lines: int = Field(
        default=100, ge=1, description="Lines of the validation split drawn for the held-out evaluation."
    )
    min_chars: int = Field(default=8, ge=1, description="Shortest line drawn (characters, stripped).")
    max_chars: int = Field(default=48, ge=1, description="Longest line drawn (characters, stripped).")
    fonts: list[str] = Field(
        default_factory=lambda: list(VLM_FONTS),
        min_length=1,
        description="TrueType files from matplotlib's mpl-data/fonts/ttf (the same on every machine): "
        "DejaVu Sans, Sans Mono, Serif (Bitstream Vera licence) and STIX General (OFL-1.1).",
    )
    font_sizes: list[int] = Field(
        default_factory=lambda: [11, 13, 15],
        min_length=1,
        description="Font sizes in pixels; each picture takes one at random (a smaller one if the line "
        "is too wide).",
    )
    width: int = Field(
        default=512, ge=16, description="Picture width in pixels (a multiple of the patch size)."
    )
    height: int = Field(
        default=32, ge=16, description="Picture height in pixels (a multiple of the patch size)."
    )
    seed: int = Field(
        default=0, description="Seed of the choice of lines, fonts, sizes, shades and questions."
    )

    @field_validator("fonts")
    @classmethod
    def _known_fonts(cls, fonts: list[str]) -> list[str]:
        unknown = [f for f in fonts if f not in VLM_FONT_LICENCES]
        if unknown:
            raise ValueError(
                f"{unknown[0]!r} is not one of matplotlib's fonts we know the licence of "
                f"({', '.join(sorted(VLM_FONT_LICENCES))})"
            )
        return fonts

    @model_validator(mode="after")
    def _lengths(self) -> VlmImagesConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) is larger than max_chars ({self.max_chars})")
        return self


class VlmVisionConfig(Section):
    """The vision encoder: a transformers config (SigLIP or CLIP vision), random or from a checkpoint."""

    arch: Literal["siglip", "clip"] = Field(
        default="siglip",
        description="siglip (no class token; takes wide pictures with as many patches as its square "
        "grid) or clip (a class token; square pictures only).",
    )
    init_from: Path | None = Field(
        default=None,
        description="A local SigLIP or CLIP (vision) checkpoint directory to start from; null: random "
        "weights of the size below.",
    )
    hidden_size: int = Field(default=128, ge=8, description="Width of the encoder.")
    num_layers: int = Field(default=2, ge=1, description="Encoder layers.")
    num_heads: int = Field(default=4, ge=1, description="Attention heads.")
    intermediate_size: int = Field(default=256, ge=8, description="MLP width.")
    patch_size: int = Field(default=16, ge=2, description="Pixels a side of a patch (one image token each).")


class VlmAlignConfig(LoopConfig):
    """LLaVA's first stage: the projector (and a random vision tower) learns to caption pictures,
    the language model frozen; the same finetune() as post-training, method sft, stage vlm."""

    seq_len: int = Field(
        default=256, ge=8, description="Longest caption record in tokens, image tokens included."
    )
    batch_size: int = Field(default=16, ge=1, description="Caption records per optimizer step.")
    train: list[Literal["projector", "vision"]] = Field(
        default_factory=lambda: ["projector", "vision"],
        min_length=1,
        description="What learns: the projector, and the vision tower too (needed when it starts random).",
    )
    val_fraction: float = Field(
        default=0.05, ge=0, lt=1, description="Share of captions held out (by id hash)."
    )


class VlmConfig(Section):
    """The vlm stage: a small vision-language model built from this run's pretrained language model
    (LLaVA: vision encoder -> projector -> our Llama), aligned on captions of rendered code lines;
    the finetune section then tunes it on the instructions."""

    images: VlmImagesConfig = Field(default_factory=VlmImagesConfig, description="The rendered code lines.")
    vision: VlmVisionConfig = Field(default_factory=VlmVisionConfig, description="The vision encoder.")
    projector_act: str = Field(
        default="gelu", description="Activation between the projector's two linear layers (LLaVA's MLP)."
    )
    align: VlmAlignConfig = Field(
        default_factory=lambda: VlmAlignConfig(
            max_steps=100, lr=1e-3, warmup_steps=5, weight_decay=0.0, eval_every=50, checkpoint_every=50
        ),
        description="Training of the projector on the captions (LLaVA stage 1).",
    )

    @model_validator(mode="after")
    def _patches(self) -> VlmConfig:
        im, p = self.images, self.vision.patch_size
        if im.width % p or im.height % p:
            raise ValueError(
                f"images.width and images.height ({im.width}x{im.height}) must be multiples of "
                f"vision.patch_size ({p})"
            )
        n = (im.width // p) * (im.height // p)
        if self.vision.init_from is None and round(n**0.5) ** 2 != n:
            raise ValueError(
                f"a {im.width}x{im.height} picture makes {n} patches of {p}: the encoder's position grid "
                "is square, so the number of patches must be a square (e.g. 512x32 with patch 16: 64)"
            )
        if self.vision.arch == "clip" and im.width != im.height:
            raise ValueError(
                f"vision.arch clip takes square pictures only (images are {im.width}x{im.height})"
            )
        return self


# ----------------------------------------------------------------------------- evaluation


class EvalConfig(Section):
    """Evaluation of the run's models: built-in tasks from the held-out split, and any task suite."""

    suite: Path | None = Field(
        default=None, description="A task suite YAML file (a list of tasks); relative to the recipe."
    )
    builtin: bool = Field(
        default=True,
        description="Derive tasks from the held-out split: next line of a function (multiple choice), "
        "complete a function from its docstring and pass its doctest (code), held-out text (bits per byte).",
    )
    builtin_items: int = Field(default=200, ge=1, description="At most this many items per built-in task.")
    models: list[Literal["pretrain", "finetune"]] = Field(
        default_factory=lambda: ["pretrain", "finetune"],
        description="Whose newest checkpoint to evaluate: the base model, the post-trained one, or both.",
    )
    contamination: bool = Field(
        default=True, description="Report each task's n-gram overlap with the run's training corpus."
    )
    ngram: int = Field(default=13, ge=1, description="Words per n-gram of the contamination check.")
    memorisation_prompts: int = Field(
        default=100,
        ge=0,
        description="Where the run has a trace index: held-out prompts whose greedy continuations are "
        "traced, for the share of generated tokens copied verbatim (spans of 32+ tokens); 0: none.",
    )
    seed: int = Field(default=0, description="Seed of the built-in tasks and few-shot choices.")


class LicencesConfig(Section):
    """The licence of each kind of thing a release holds (SPDX identifiers)."""

    code: str = Field(default="Apache-2.0", description="Licence of the code in the release.")
    data: str | None = Field(
        default=None,
        description="Licence of the data (corpus, evaluation data); default: the sources' licence when "
        "they share one.",
    )
    documents: str = Field(default="CC-BY-4.0", description="Licence of the cards, paper and report.")
    weights: str = Field(default="Apache-2.0", description="Licence of the model's parameters.")


class ReleaseConfig(Section):
    """The release stage: a self-contained bundle of everything the run made, with cards and hashes."""

    licenses: LicencesConfig = Field(default_factory=LicencesConfig, description="Licences by kind.")
    decision_checkpoints: bool = Field(
        default=False,
        description="Ship the checkpoints of the runs in decisions/ too (their recipes, logs and results "
        "are always shipped).",
    )
    redistribute_data: bool | None = Field(
        default=None,
        description="Put the curated corpus in the release: true for every source, false for none; "
        "default: the documents of each source whose licence is open (OSI, FSF or an open data "
        "licence). data/REBUILD.md says, per source, how to make the rest again.",
    )
    producer: str = Field(default="", description="Who made the model (model card and mof.yml).")
    contact: str = Field(default="", description="Contact address (model card and mof.yml).")
    intended_use: str = Field(
        default="Research and education: studying how a language model is built, trained and evaluated "
        "end to end. Not for production use or for decisions about people.",
        description="The model card's intended-use section.",
    )
    limitations: str = Field(
        default="A small model trained on little data: its output is often wrong, and it knows nothing "
        "beyond its corpus. It was not tuned for safety.",
        description="The model card's limitations section (evaluation and contamination notes are added).",
    )


# ----------------------------------------------------------------------------- launching


LaunchTarget = Literal["aws", "gcp", "azure", "lambda", "runpod", "kubernetes", "slurm"]


class LaunchConfig(Section):
    """Where `trulyopen launch` runs the recipe; every field can be given on its command line instead."""

    target: LaunchTarget | None = Field(
        default=None,
        description="--on: aws, gcp, azure, lambda, runpod or kubernetes (through SkyPilot), or slurm "
        "(sbatch). (Not `on:`, which YAML reads as true.)",
    )
    gpus: str | None = Field(
        default=None,
        description="Accelerators per node, NAME:COUNT (H100:8, A100-80GB:4, L4:1); unset: none.",
    )
    nodes: int = Field(
        default=1, ge=1, description="Nodes; more than one needs a stage that runs under torchrun."
    )
    procs_per_node: int | None = Field(
        default=None,
        ge=1,
        description="Processes per node under torchrun; unset: one per GPU (one on a node without GPUs).",
    )
    spot: bool = Field(default=False, description="Spot (preemptible) instances; clouds that have them.")
    region: str | None = Field(default=None, description="Cloud region (SkyPilot's choice when unset).")
    store: str | None = Field(
        default=None,
        description="Where the run directory lives, seen by every node: a bucket URL (s3://, gs://, "
        "az://, r2://) mounted at ~/trulyopen-store, or volume:NAME (a SkyPilot volume, e.g. a "
        "Kubernetes PVC); needed for more than one node. Unset: the first node's disk.",
    )
    verb: Literal["run", "data", "pretrain", "finetune", "eval", "release"] = Field(
        default="run", description="What runs there: the whole recipe (run) or one verb and what it needs."
    )
    secrets: list[str] = Field(
        default_factory=lambda: [
            "HF_TOKEN",
            "WANDB_API_KEY",
            "OPENAI_API_KEY",
            "ANTHROPIC_API_KEY",
            "GEMINI_API_KEY",
        ],
        description="Environment variables passed to the nodes as secrets when set here: their values "
        "go on the launch command line, never into the task file.",
    )
    extras: list[str] = Field(
        default_factory=list, description="trulyopen's extras installed on the nodes, e.g. ['ray', 'wandb']."
    )
    disk_gb: int | None = Field(default=None, ge=1, description="Disk per node in GB (SkyPilot's default).")
    slurm: SlurmConfig = Field(
        default_factory=SlurmConfig,
        description="sbatch options under slurm: partition, time (of the whole job), mem, python (on "
        "the nodes; default this one: a shared file system is assumed), sbatch_args.",
    )


# ----------------------------------------------------------------------------- the recipe


class Recipe(Section):
    name: str = Field(description="Name of the run; the default run directory is runs/<name>/.")
    workers: int = Field(
        default=0,
        ge=0,
        description="Worker processes for parallel steps (0 = one per core). Outputs do not depend on it.",
    )
    data: DataConfig | None = Field(
        default=None,
        description="The data stage: sources, cleaning, filters, dedup, decontamination; without it, "
        "the run only post-trains a given model.",
    )
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="The tokenizer stage.")
    shards: ShardsConfig = Field(default_factory=ShardsConfig, description="The shards stage.")
    index: IndexConfig | None = Field(
        default=None,
        description="The index stage (trulyopen trace, ngram): a suffix array over the train shards; "
        "{} to build it with the defaults, null (the default) to skip it.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model to pretrain.")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="The pretraining stage.")
    synth: SynthConfig | None = Field(
        default=None, description="Derive post-training data from the curated corpus (the synth stage)."
    )
    vlm: VlmConfig | None = Field(
        default=None,
        description="Build a vision-language model from the pretrained one and align it on rendered "
        "code lines (the vlm stage); finetune then tunes it on the line instructions.",
    )
    finetune: FinetuneConfig | None = Field(default=None, description="The post-training stage.")
    eval: EvalConfig | None = Field(default=None, description="The evaluation stage.")
    release: ReleaseConfig | None = Field(
        default=None, description="The release stage: bundle, cards, licences, mof.yml and hashes."
    )
    launch: LaunchConfig | None = Field(
        default=None, description="Where `trulyopen launch` runs it (a cloud, Kubernetes or Slurm)."
    )

    @model_validator(mode="after")
    def _stages_have_inputs(self) -> Recipe:
        if self.synth is not None and self.data is None:
            raise ValueError("synth needs a data section: it derives its examples from the curated corpus")
        ft = self.finetune
        if ft is not None and ft.base is None and self.data is None:
            raise ValueError("finetune.base must name a model when there is no data section to pretrain on")
        if self.vlm is not None and self.data is None:
            raise ValueError("vlm needs a data section: its pictures are lines of the curated corpus")
        if ft is not None and not ft.data and self.synth is None and self.vlm is None:
            raise ValueError("finetune.data is empty and there is no synth section to make data")
        if self.eval is not None and self.eval.builtin and self.data is None:
            raise ValueError("eval.builtin needs a data section: its tasks come from the held-out split")
        if self.release is not None and self.release.licenses.data is None and self.data is not None:
            kinds = sorted({s.license for s in self.data.sources})
            if len(kinds) > 1:
                raise ValueError(
                    f"release.licenses.data: the sources have different licences ({', '.join(kinds)}); "
                    "name the licence of the released data"
                )
        return self

    def _path_fields(self) -> list[tuple[str, Any, str | int]]:
        """(dotted field, owner, key) of every file-system path in the recipe."""
        fields: list[tuple[str, Any, str | int]] = []
        if self.data is not None:
            fields += [(f"data.sources.{i}.path", s, "path") for i, s in enumerate(self.data.sources)]
            files = self.data.decontamination.eval_files
            fields += [(f"data.decontamination.eval_files.{i}", files, i) for i in range(len(files))]
        fields.append(("tokenizer.path", self.tokenizer, "path"))
        fields.append(("pretrain.eval_suite", self.pretrain, "eval_suite"))
        if self.vlm is not None:
            fields.append(("vlm.vision.init_from", self.vlm.vision, "init_from"))
        if self.finetune is not None:
            fields += [(f"finetune.data.{i}.path", d, "path") for i, d in enumerate(self.finetune.data)]
        if self.eval is not None:
            fields.append(("eval.suite", self.eval, "suite"))
        return fields

    def resolve_paths(self, base: Path) -> None:
        """Make every relative path absolute against `base` (the recipe's directory); a model (finetune
        base, distillation teacher, GRPO reward model) that names an existing directory there becomes
        its absolute path (else it is a hub name)."""
        for _, owner, key in self._path_fields():
            path = owner[key] if isinstance(key, int) else getattr(owner, key)
            if isinstance(path, Path) and not path.is_absolute():
                path = (base / path).resolve()
                owner.__setitem__(key, path) if isinstance(key, int) else setattr(owner, key, path)
        ft = self.finetune
        if ft is None:
            return
        # a model named by a directory beside the recipe becomes its absolute path (else a hub name)
        for owner, key in ((ft, "base"), (ft.distill, "teacher"), (ft.grpo, "reward_model")):
            name = getattr(owner, key)
            if name is not None and (base / name).is_dir():
                setattr(owner, key, str((base / name).resolve()))

    def missing_paths(self) -> list[tuple[str, Path]]:
        """(dotted field, path) for every path in the recipe that does not exist."""
        missing = []
        for dotted, owner, key in self._path_fields():
            path = owner[key] if isinstance(key, int) else getattr(owner, key)
            if isinstance(path, Path) and not path.exists():  # URLs are checked when read
                missing.append((dotted, path))
        return missing


# ----------------------------------------------------------------------------- loading


def _set_dotted(tree: dict, dotted: str, value: Any, where: str) -> None:
    """Set `a.b.0.c = value` inside nested dicts and lists, creating dicts on the way."""
    keys = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise RecipeError(f"{where}: --set {dotted}: '{'.'.join(keys[:i])}' has no item {key}")
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise RecipeError(f"{where}: --set {dotted}: '{'.'.join(keys[:i])}' is not a section")


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value), the value read as YAML so numbers and booleans keep their type."""
    if "=" not in text:
        raise RecipeError(f"--set {text}: expected FIELD=VALUE, e.g. --set data.dedup.threshold=0.8")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _describe(error: dict) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    kind = error["type"]
    got = error.get("input")
    if kind == "extra_forbidden":
        return f"field '{loc}': unknown key (check the spelling)"
    if kind == "missing":
        return f"field '{loc}': required but missing"
    msg = error["msg"].removeprefix("Value error, ")
    where = f"field '{loc}'" if loc else "recipe"
    return f"{where}: {msg} (got {got!r})" if not isinstance(got, dict | list) else f"{where}: {msg}"


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, validate and resolve a recipe; raise RecipeError naming file and field."""
    path = Path(path)
    if path.is_dir():
        what = "a checkpoint" if (path / "state.json").exists() else "a directory"
        hint = f"; its recipe is {path / 'recipe.yaml'}" if (path / "recipe.yaml").is_file() else ""
        raise RecipeError(f"{path}: {what}, not a recipe file{hint}; give a recipe YAML file")
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found; check the path (e.g. recipes/quickstart.yaml)")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise RecipeError(
            f"{path}: not valid YAML: {' '.join(str(e).split())}; fix the line it names"
        ) from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a UTF-8 text file; give a recipe YAML file") from None
    return recipe_from_tree(tree, overrides, str(path), path.resolve().parent)


def recipe_from_tree(
    tree: Any, overrides: list[str] | tuple[str, ...] = (), where: str = "recipe", base: Path | None = None
) -> Recipe:
    """Override, validate and resolve a recipe given as parsed YAML (a dict, changed in place);
    `where` names it in errors, relative paths are resolved against `base` (default: the current
    directory)."""
    if not isinstance(tree, dict):
        raise RecipeError(f"{where}: expected a mapping of fields at the top level (name:, data:, ...)")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value, where)
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as e:
        lines = [_describe(err) for err in e.errors()]
        raise RecipeError(
            f"{where}: " + "; ".join(lines) + "; see `trulyopen run --help` or the recipe docs"
        ) from None
    recipe.resolve_paths(base or Path.cwd())
    missing = recipe.missing_paths()
    if missing:
        raise RecipeError(
            f"{where}: "
            + "; ".join(f"field '{f}': path does not exist: {p}" for f, p in missing)
            + "; check the paths"
        )
    return recipe


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML, as stored in the run directory."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
