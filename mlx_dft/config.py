"""Every training option, in one dataclass shared by the Python API, the CLI and YAML configs.

CLI flags are the field names in kebab case (``learning_rate`` -> ``--learning-rate``);
YAML keys may be spelled either way. mlx-lm's YAML keys for the same concepts are also
accepted (``fine_tune_type``, ``lora_parameters``, ``adapter_path``, ``save_every``...).
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mlx_dft.errors import UserError
from mlx_dft.losses import LOSSES, Loss, make_loss
from mlx_dft.options import option

if TYPE_CHECKING:
    from mlx_dft.checkpoint import Resume

ADAPTERS = ("lora", "dora", "full", "aligner")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "linear", "constant")
REPORTERS = ("wandb", "tensorboard")
DEFAULT_LR = {"lora": 1e-4, "dora": 1e-4, "full": 1e-5, "aligner": 9e-3}
# Aligner's paper: AdamW, lr 9e-3, weight decay 0.02; the DFT paper: weight decay 0.01.
DEFAULT_WEIGHT_DECAY = {"aligner": 0.02}


@dataclass
class TrainConfig:
    # what
    model: str | None = option(
        None, "Model folder or Hugging Face repo id (default: the bundled tiny LLaMA)."
    )
    data: str | None = option(
        None,
        "Folder with train/valid[/test].jsonl, one .jsonl file, or a Hugging Face dataset ORG/NAME "
        "(default: the bundled task).",
    )
    hf_config: str | None = option(None, "Configuration (subset) of a Hugging Face --data dataset.")
    hf_splits: list[str] | None = option(
        None,
        "Splits of a Hugging Face --data dataset for train,valid[,test], e.g. train[:90%],train[90%:] "
        "(default: train, validation and test where they exist).",
        is_list=True,
    )
    output: str | None = option(
        None,
        "Output folder for adapter, checkpoints and metrics (default: runs/<time>-<loss>-<type>).",
        aliases=("--adapter-path",),
    )
    # loss
    loss: str = option(
        "dft",
        "Token loss: " + "; ".join(f"{c.name}: {c.summary}" for c in LOSSES.values())
        + ". Each loss's options are --<loss>-*.",
        tuple(LOSSES),
    )
    reference_copy: bool = option(
        False,
        "A loss with a reference model (asft, prift) under --fine-tune-type full: keep a frozen copy of "
        "the trained blocks' initial weights as the reference (doubles the memory of those blocks).",
        deprecated={"--asft-reference-copy": ""},
    )
    sft_warmup_steps: int = option(0, "Plain SFT for the first N optimizer steps, then --loss.")
    # adapter
    adapter: str = option(
        "lora",
        "What to train: lora, dora, full or aligner (YAML: fine_tune_type).",
        ADAPTERS,
        flag="--fine-tune-type",
        deprecated={"--adapter": " in train (everywhere else it names an adapter folder)"},
    )
    num_layers: int = option(16, "Adapt the last N transformer blocks; -1 for all (lora, dora, full).")
    lora_rank: int = option(8, "LoRA/DoRA rank.")
    lora_scale: float = option(
        20.0, "LoRA/DoRA scale (mlx-lm's absolute multiplier). Ignored when --lora-alpha is set."
    )
    lora_alpha: float | None = option(None, "PEFT-style alpha: scale = alpha / rank.")
    lora_dropout: float = option(0.0, "Dropout on the LoRA input.")
    lora_keys: list[str] | None = option(
        None,
        "Modules to adapt, e.g. q_proj,v_proj (default: every linear layer of every block kind, experts "
        "included, routers frozen).",
        is_list=True,
    )
    aligner_tokens: int = option(1, "Aligner: number of shared prefix tokens N.")
    aligner_start_layer: int = option(2, "Aligner: first adapted layer (the official code: 2).")
    aligner_gate: str = option(
        "head",
        "Aligner gates: one per attention head (the paper) or one per layer (PEFT adaption prompt).",
        ("head", "layer"),
    )
    # optimisation
    optimizer: str = option("adamw", "Optimizer.", OPTIMIZERS)
    learning_rate: float | None = option(
        None, "Peak learning rate (default: 1e-4 for lora/dora, 1e-5 for full, 9e-3 for aligner)."
    )
    weight_decay: float | None = option(
        None, "AdamW weight decay (default 0.01 as the DFT paper; 0.02 for aligner)."
    )
    adam_beta1: float = option(0.9, "Adam beta1.")
    adam_beta2: float = option(0.999, "Adam beta2 (DFT paper: 0.95).")
    lr_schedule: str = option("cosine", "Learning-rate schedule after warmup.", SCHEDULES)
    warmup: float = option(
        0.1, "Warmup: a fraction of the steps if < 1, else a number of steps (DFT paper: 10%)."
    )
    warmup_init: float = option(0.0, "Learning rate the warmup starts from (mlx-lm's warmup_init).")
    min_learning_rate: float = option(0.0, "Learning rate the cosine or linear decay ends at.")
    decay_steps: int | None = option(
        None,
        "Steps the decay takes after warmup, then the rate stays at --min-learning-rate "
        "(default: the rest of the run).",
    )
    max_grad_norm: float = option(1.0, "Clip the gradient's global norm (0: no clipping).")
    # batches and length
    batch_size: int = option(
        4, "Examples per micro-batch (across all workers); a step sees batch-size x grad-accumulation-steps."
    )
    grad_accumulation_steps: int = option(1, "Micro-batches accumulated per optimizer step.")
    iters: int | None = option(None, "Optimizer steps to run (default: one epoch).")
    epochs: float | None = option(None, "Epochs to run instead of --iters.")
    max_seq_length: int = option(2048, "Longer examples are truncated (and counted).")
    pack: bool = option(
        False,
        "Pack several examples into each row of up to --max-seq-length tokens (attention kept "
        "within each example); --batch-size then counts rows.",
    )
    mask_prompt: bool = option(
        True,
        "Train on responses only (completions; every assistant turn of chats). "
        "--no-mask-prompt trains on all tokens.",
    )
    chat_template: str | None = option(
        None, "Chat template (a .jinja file or a template string) for models without one."
    )
    use_chat_template: bool | None = option(
        None, "Wrap prompt/completion records in the chat template (default: when the tokenizer has one)."
    )
    prompt_feature: str = option("prompt", "Prompt key of completions records.")
    completion_feature: str = option("completion", "Completion key of completions records.")
    text_feature: str = option("text", "Key of text records.")
    chat_feature: str = option("messages", "Key of chat records.")
    seed: int = option(0, "Seed for adapter initialisation, data order and dropout.")
    # reporting, evaluation and saving
    steps_per_report: int = option(10, "Steps between training reports.")
    steps_per_eval: int | None = option(None, "Steps between validations (default: a tenth of the run).")
    val_batches: int | None = option(
        None,
        "Validation batches per validation; -1 for the whole split (default: scaled with the run, "
        "all validations together a quarter of the training batches, 2 to 25 each).",
    )
    save_every: int = option(100, "Steps between checkpoints.")
    keep_checkpoints: int = option(0, "Keep only the newest N checkpoints (0: keep all).")
    test: bool = option(False, "Evaluate on the test split after training.")
    accuracy_problems: int = option(
        50,
        "Greedy answer accuracy before and after training on the first N test (else valid) records "
        "that have an 'answer' field (prompt/completion data; 0: off).",
    )
    report_to: list[str] | None = option(
        None,
        "Also log every metric and the run's configuration to wandb and/or tensorboard "
        "(comma-separated; tensorboard writes OUTPUT/tensorboard).",
        is_list=True,
    )
    project_name: str | None = option(None, "wandb project (default: mlx_dft).")
    adapter_from: str | None = option(
        None,
        "Start from an existing adapter (its settings and weights): an mlx_dft/mlx-lm or PEFT folder, an "
        "exported Aligner, an official Aligner .pth, or a Hub repo id.",
    )
    resume: str | None = option(
        None, "Resume from a checkpoint folder or an output folder (its newest checkpoint)."
    )
    overwrite: bool = option(False, "Allow writing into an output folder that already holds a run.")
    # numerics and memory
    dtype: str = option(
        "auto",
        "Compute dtype: auto (float32 on CPU, as stored on GPU), float32, bfloat16, float16.",
        ("auto", "float32", "bfloat16", "float16"),
    )
    keep_quantized: bool = option(
        False,
        "Keep a quantized base quantized on a CPU (by default it computes in float32 there when that "
        "fits in memory: MLX's CPU has no fast quantized matmul).",
    )
    grad_checkpoint: bool = option(False, "Recompute block activations in the backward pass to save memory.")
    tiled_mlp: bool = option(
        False,
        "With --grad-checkpoint: run each block's MLP over the sequence in tiles of about 16 MiB of "
        "activations, each recomputed in the backward pass (less memory at long rows and wide MLPs, for "
        "one more MLP forward pass).",
    )
    loss_chunk_tokens: int = option(
        0, "Supervised tokens per logits chunk in the loss (0: auto, ~32 MiB of float32 logits a chunk)."
    )
    # sharding (mlx_dft/sharding.py)
    shard: str = option(
        "none",
        "Under mlx.launch: fsdp holds the blocks' weights, gradients and optimizer state 1/N a process "
        "(gathered a block at a time); tensor splits each block's linear layers over the processes (mlx-lm's "
        "shard(), one model replica); none replicates the model (data parallelism).",
        ("none", "fsdp", "tensor"),
    )
    shard_timeout: float = option(
        600.0,
        "--shard fsdp: seconds a process waits for the others (a step, a validation, a checkpoint) before "
        "it concludes one stopped answering and exits 1 (0: wait forever).",
    )

    def resolved_learning_rate(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR.get(self.adapter, 1e-4)

    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return DEFAULT_WEIGHT_DECAY.get(self.adapter, 0.01)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _with_loss_options(base: type) -> type:
    """``base`` with one field per option of every registered loss (:mod:`mlx_dft.losses`):
    ``dft_floor``, ``eaft_top_k``... (their metadata names the loss under ``loss_option``)."""
    extra = []
    taken = {f.name for f in dataclasses.fields(base)}
    for cls in LOSSES.values():
        for f in cls.option_fields():
            name = cls.option_name(f.name)
            if name in taken:
                raise ValueError(f"the {cls.name} loss's option {f.name!r} would be {name}, taken already")
            taken.add(name)
            meta = {**f.metadata, "loss_option": cls.name}
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            extra.append((name, kind, field(default=f.default, metadata=meta)))
    made = dataclasses.make_dataclass("TrainConfig", extra, bases=(base,))
    made.__module__, made.__qualname__, made.__doc__ = __name__, "TrainConfig", base.__doc__
    return made


TrainConfig = _with_loss_options(TrainConfig)  # noqa: F811  (the same class, with the losses' options)
LOSS_OPTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig) if "loss_option" in f.metadata)
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


# A loss object given from Python that is not a registered loss (``mlx_dft.train(loss=obj)``):
# set while that run resolves and trains; ``--loss`` then holds its name.
CUSTOM_LOSS: contextvars.ContextVar[Loss | None] = contextvars.ContextVar("mlx_dft_custom_loss", default=None)


def loss_of(cfg: TrainConfig) -> Loss:
    """The :class:`~mlx_dft.losses.Loss` that ``cfg`` asks for (``--loss`` and its options, or the
    Python loss object of this run)."""
    custom = CUSTOM_LOSS.get()
    if custom is not None and custom.name == cfg.loss:
        return custom
    return make_loss(cfg.loss, **{k: getattr(cfg, k) for k in LOSS_OPTIONS})

# The panels of `mlx_dft train --help`, in order; every field is in one (tests/test_cli.py checks).
HELP_GROUPS: dict[str, tuple[str, ...]] = {
    "Data": (
        "data", "hf_config", "hf_splits", "max_seq_length", "pack", "mask_prompt", "use_chat_template",
        "chat_template", "prompt_feature", "completion_feature", "text_feature", "chat_feature",
    ),
    "Model and adapter": (
        "model", "adapter", "num_layers", "lora_rank", "lora_scale", "lora_alpha", "lora_dropout",
        "lora_keys", "aligner_tokens", "aligner_start_layer", "aligner_gate", "adapter_from", "dtype",
        "keep_quantized", "grad_checkpoint", "tiled_mlp", "shard", "shard_timeout",
    ),
    "Loss": ("loss", *LOSS_OPTIONS, "reference_copy", "sft_warmup_steps", "loss_chunk_tokens"),
    "Optimisation": (
        "optimizer", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "lr_schedule", "warmup",
        "warmup_init", "min_learning_rate", "decay_steps", "max_grad_norm", "batch_size",
        "grad_accumulation_steps", "seed",
    ),
    "Run length and reporting": (
        "iters", "epochs", "steps_per_report", "steps_per_eval", "val_batches", "test",
        "accuracy_problems", "report_to",
        "project_name",
    ),
    "Output": ("output", "save_every", "keep_checkpoints", "resume", "overwrite"),
}  # fmt: skip

# mlx-lm's YAML spelling of the same options.
MLX_LM_ALIASES = {"fine_tune_type": "adapter", "adapter_path": "output"}
# Options renamed since a release: the old key still reads (YAML, saved runs), as the new one.
RENAMED = {"asft_reference_copy": "reference_copy"}
# Keys of mlx-lm configs that have no meaning here: accepted, with a one-line note saying why.
MLX_LM_IGNORED = {
    "train": "mlx_dft train always trains",
    "config": "a config file does not name another",
    "test_batches": "--test evaluates the whole test split",
    "clear_cache_threshold": "MLX's cache is managed by mlx_dft",
    "trust_remote_code": "only the built-in mlx-lm architectures are loaded",
}
# mlx-lm's lr_schedule names, with the order of their ``arguments``.
MLX_LM_SCHEDULES = {
    "cosine_decay": ("cosine", ("learning_rate", "decay_steps", "min_learning_rate")),
    "linear_schedule": ("linear", ("learning_rate", "min_learning_rate", "decay_steps")),
}
LORA_KEYS = {
    "rank": "lora_rank",
    "scale": "lora_scale",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "keys": "lora_keys",
}


def _snake(key: str) -> str:
    return key.strip().replace("-", "_")


def normalise(raw: dict, source: str) -> dict:
    """Map user keys (kebab/snake, mlx-lm aliases) onto TrainConfig field names; reject unknown ones."""
    out: dict[str, Any] = {}
    schedule: dict[str, Any] = {}
    for key, value in raw.items():
        k = _snake(str(key))
        if k == "adapter" and source != "option":  # YAML and plans; the Python API's field name
            print(f"note: {source}: 'adapter' is deprecated for the adapter type; use fine_tune_type",
                  file=sys.stderr)  # fmt: skip
            out["adapter"] = value
        elif k == "lr_schedule" and isinstance(value, dict):
            schedule = _mlx_lm_schedule(value, source)  # applied last: it sets the rate mlx-lm uses
        elif k in FIELDS:
            out[k] = value
        elif k == "lora_parameters" and isinstance(value, dict):
            for sub, v in value.items():
                if sub not in LORA_KEYS:
                    raise UserError(f"{source}: unknown key lora_parameters.{sub}")
                out[LORA_KEYS[sub]] = v
        elif k == "optimizer_config" and isinstance(value, dict):
            for settings in value.values():
                for sub, v in (settings or {}).items():
                    if sub == "weight_decay":
                        out["weight_decay"] = v
                    elif sub == "betas":
                        if not isinstance(v, list) or len(v) != 2:
                            raise UserError(
                                f"{source}: optimizer_config betas must be a list of two numbers, not {v!r}"
                            )
                        out["adam_beta1"], out["adam_beta2"] = v
                    else:
                        raise UserError(f"{source}: unsupported optimizer_config key {sub}")
        elif k == "hf_dataset":
            out.update(_mlx_lm_hf_dataset(value, source))
        elif k == "wandb":  # mlx-lm's older spelling: wandb: PROJECT
            out["report_to"], out["project_name"] = ["wandb"], value
        elif k == "lora_layers":
            print(f"note: {source}: lora_layers is mlx-lm's old name for num_layers", file=sys.stderr)
            out["num_layers"] = value

        elif k in MLX_LM_ALIASES:
            out[MLX_LM_ALIASES[k]] = value
        elif k in RENAMED:
            out[RENAMED[k]] = value
        elif k == "resume_adapter_file":
            raise UserError(
                f"{source}: resume_adapter_file (weights only) is not supported; "
                "use resume: with a checkpoint folder"
            )
        elif k in MLX_LM_IGNORED:
            print(f"note: {source}: {key} ignored ({MLX_LM_IGNORED[k]})", file=sys.stderr)
        else:
            close = [f for f in FIELDS if f.startswith(k[:4])][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(f"{source}: unknown option '{key}'{hint}")
    if schedule and "warmup" not in schedule and "warmup" not in out:
        schedule["warmup"] = 0  # mlx-lm warms up only when the block says so
    for key, value in schedule.items():  # mlx-lm uses the block's values: say so where they differ
        if key in out and out[key] != value:
            print(f"note: {source}: lr_schedule sets {key} to {value}, not {out[key]}", file=sys.stderr)
    return {**out, **schedule}


# mlx-lm's hf_dataset keys and ours; train/valid splits default to mlx-lm's.
HF_DATASET_KEYS = ("path", "train_split", "valid_split", "test_split", "config", "name", "prompt_feature",
                   "completion_feature", "text_feature", "chat_feature", "mask_prompt")  # fmt: skip


def _mlx_lm_hf_dataset(block: Any, source: str) -> dict:
    """mlx-lm's ``hf_dataset: {path, train_split, valid_split, test_split, config, *_feature}``."""
    if isinstance(block, list):
        if len(block) != 1:
            raise UserError(
                f"{source}: hf_dataset lists {len(block)} datasets; mlx_dft trains on one (concatenate "
                "them into one dataset first)"
            )
        block = block[0]
    if not isinstance(block, dict) or "path" not in block:
        raise UserError(f"{source}: hf_dataset must be a mapping with a path: ORG/NAME")
    unknown = sorted(set(block) - set(HF_DATASET_KEYS))
    if unknown:
        raise UserError(f"{source}: unknown key hf_dataset.{unknown[0]}")
    extra = block.get("config") or {}
    if not isinstance(extra, dict) or set(extra) - {"name"}:
        raise UserError(f"{source}: hf_dataset.config supports only name (the dataset configuration)")
    out: dict[str, Any] = {"data": block["path"]}
    name = block.get("name") or extra.get("name")
    if name:
        out["hf_config"] = name
    splits = [block.get("train_split", "train[:80%]"), block.get("valid_split", "train[-10%:]")]
    if block.get("test_split"):
        splits.append(block["test_split"])
    out["hf_splits"] = splits
    for key in ("prompt_feature", "completion_feature", "text_feature", "chat_feature", "mask_prompt"):
        if key in block:
            out[key] = block[key]
    return out


def _mlx_lm_schedule(block: dict, source: str) -> dict:
    """mlx-lm's ``lr_schedule: {name, arguments, warmup, warmup_init}`` as our options."""
    unknown = set(block) - {"name", "arguments", "warmup", "warmup_init"}
    if unknown:
        raise UserError(f"{source}: unknown key lr_schedule.{sorted(unknown)[0]}")
    name = block.get("name")
    if name not in MLX_LM_SCHEDULES:
        known = ", ".join(MLX_LM_SCHEDULES)
        raise UserError(f"{source}: lr_schedule.name {name!r} is not supported (supported: {known})")
    schedule, names = MLX_LM_SCHEDULES[name]
    args = block.get("arguments", [])
    if not isinstance(args, list) or len(args) > len(names):
        raise UserError(
            f"{source}: lr_schedule.arguments of {name} must be a list of at most {len(names)} values "
            f"({', '.join(names)})"
        )
    out = {"lr_schedule": schedule, **dict(zip(names, args))}
    for key in ("warmup", "warmup_init"):  # warmup: a number of steps, as ours above 1
        if key in block:
            out[key] = block[key]
    return out


def read_yaml(path: Path, limit: int = 1 << 20):
    """The YAML document in ``path`` (a config or a plan): at most ``limit`` bytes of UTF-8, safe
    types only, ``1e-5`` read as a float (YAML 1.1 reads it as a string), and no aliases
    (``*name``): a few hundred bytes of nested aliases expand to billions of items for whatever
    walks the result. Every failure is one line naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path} not found")
    size = path.stat().st_size
    if size > limit:
        raise UserError(f"{path} is {size:,} bytes; a config is at most {limit:,}")
    try:
        text = path.read_bytes().decode("utf-8")
        return yaml.load(text, Loader=ConfigLoader)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start + 1})") from None
    except RecursionError:
        raise UserError(f"{path}: invalid YAML (nested too deeply)") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with ``1e-5`` read as a float and aliases refused."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            line = event.start_mark.line + 1
            raise yaml.YAMLError(f"aliases (*{event.anchor}, line {line}) are not allowed in a config")
        return super().compose_node(parent, index)


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?\.?\d*(?:[eE][-+]?\d+)$"),
    list("-+0123456789."),
)


def load_yaml(path: str | Path) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    data = read_yaml(p)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected a mapping of option: value")
    return normalise(data, str(p))


def coerce(name: str, value: Any) -> Any:
    """Check and convert one value to its field's type; raises UserError naming the option."""
    f = FIELDS[name]
    flag = "--" + name.replace("_", "-")
    if value is None:
        return None
    tp = str(f.type)
    try:
        if "list" in tp:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return [str(v) for v in value]
        if tp.startswith("bool"):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if tp.startswith("float"):
            return float(value)
        value = str(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag}: invalid value {value!r}") from None
    choices = f.metadata.get("choices")
    if name == "loss":  # the registered losses now, and this run's Python loss (validate says which)
        return value
    if choices and value not in choices:
        raise UserError(f"{flag}: {value!r} is not one of {', '.join(choices)}")
    return value


def build_config(*layers: dict) -> TrainConfig:
    """Later layers override earlier ones; every value is checked."""
    values: dict[str, Any] = {}
    for layer in layers:
        for k, v in layer.items():
            if k not in FIELDS:
                raise UserError(f"unknown option '{k}'")
            values[k] = coerce(k, v)
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


# Options a resumed run does not take from the run it continues.
NOT_INHERITED = ("output", "resume", "overwrite")


def resolve(
    config: TrainConfig | dict | str | Path | None, options: dict
) -> tuple[TrainConfig, dict, Resume | None]:
    """The run's configuration: defaults < the resumed run's < YAML file < explicit options.

    ``config`` is a YAML file, a dict of options or a :class:`TrainConfig`; ``options`` override it.
    Returns (config, the options the caller gave explicitly, the checkpoint to resume or None).
    """
    from mlx_dft.checkpoint import Resume

    if isinstance(config, (str, Path)):
        options = {"config": str(config), **options}
    elif isinstance(config, TrainConfig):
        options = {**{k: v for k, v in config.to_dict().items() if v != FIELDS[k].default}, **options}
    elif isinstance(config, dict):
        options = {**config, **options}
    options = {k: v for k, v in options.items() if v is not None}
    config_file = options.pop("config", None)
    explicit = normalise(options, "option")
    file_layer = load_yaml(config_file) if config_file else {}
    resume_from = explicit.get("resume") or file_layer.get("resume")
    saved_layer, resume = {}, None
    if resume_from:
        resume = Resume.find(resume_from)
        training = resume.config.get("training", {})
        training = {RENAMED.get(k, k): v for k, v in training.items()}
        saved_layer = {k: v for k, v in training.items() if k in FIELDS and k not in NOT_INHERITED}
        if "output" not in explicit and "output" not in file_layer:
            saved_layer["output"] = str(resume.run_folder)  # continue in the run's own folder
            saved_layer["overwrite"] = True
    return build_config(saved_layer, file_layer, explicit), explicit, resume


def total_steps(cfg: TrainConfig, n_batches: int) -> int:
    """Optimizer steps of the run: ``iters``, else ``epochs`` (default 1) of ``n_batches``."""
    if cfg.iters is not None:
        return cfg.iters
    if cfg.epochs is None:  # one epoch, and at least one step
        return max(1, math.ceil(n_batches / cfg.grad_accumulation_steps))
    # A little tolerance: 0.57 epochs of 100 batches is 57 batches, not 57.000000000000004.
    steps = cfg.epochs * n_batches / cfg.grad_accumulation_steps
    if steps < 1 - 1e-9:
        raise UserError(
            f"--epochs {cfg.epochs:g} is less than one optimizer step ({n_batches} batches an epoch, "
            f"{cfg.grad_accumulation_steps} a step): give at least "
            f"{cfg.grad_accumulation_steps / n_batches:.6g} epochs, or --iters"
        )
    return max(1, math.ceil(steps - 1e-9))


def check_run_length(cfg: TrainConfig, steps: int) -> None:
    """Refuse options that do not fit a run of ``steps`` optimizer steps."""
    if cfg.sft_warmup_steps >= steps:
        raise UserError(
            f"--sft-warmup-steps {cfg.sft_warmup_steps} must be below the run's {steps} steps "
            "(or the run never reaches --loss)"
        )


def warmup_steps(cfg: TrainConfig, steps: int) -> int:
    """``warmup`` as steps: a fraction of the run below 1, else a count; never beyond the run."""
    warmup = int(round(cfg.warmup * steps)) if cfg.warmup < 1 else int(cfg.warmup)
    return min(warmup, steps)


def validate(cfg: TrainConfig) -> None:
    def check(ok: bool, msg: str):
        if not ok:
            raise UserError(msg)

    for f in dataclasses.fields(cfg):  # inf and nan are never meant (--warmup inf, --epochs nan)
        value = getattr(cfg, f.name)
        if isinstance(value, float):
            check(math.isfinite(value), f"--{f.name.replace('_', '-')} must be a finite number, not {value}")
    check(0 <= cfg.seed < 2**64, "--seed must be >= 0 and below 2^64")
    for flag, beta in (("--adam-beta1", cfg.adam_beta1), ("--adam-beta2", cfg.adam_beta2)):
        check(0 <= beta < 1, f"{flag} must be in [0, 1), not {beta}")
    check(cfg.batch_size >= 1, "--batch-size must be at least 1")
    tiled_ok = not cfg.tiled_mlp or cfg.grad_checkpoint
    check(tiled_ok, "--tiled-mlp needs --grad-checkpoint (it tiles the recomputed blocks)")
    check(cfg.grad_accumulation_steps >= 1, "--grad-accumulation-steps must be at least 1")
    check(cfg.iters is None or cfg.iters >= 1, "--iters must be at least 1")
    check(cfg.epochs is None or cfg.epochs > 0, "--epochs must be positive")
    check(cfg.iters is None or cfg.epochs is None, "give --iters or --epochs, not both")
    check(cfg.max_seq_length >= 2, "--max-seq-length must be at least 2")
    check(cfg.lora_rank >= 1, "--lora-rank must be at least 1")
    check(0.0 <= cfg.lora_dropout < 1.0, "--lora-dropout must be in [0, 1)")
    check(cfg.num_layers == -1 or cfg.num_layers >= 1, "--num-layers must be -1 (all) or at least 1")
    custom = CUSTOM_LOSS.get()
    check(
        cfg.loss in LOSSES or (custom is not None and custom.name == cfg.loss),
        f"unknown --loss {cfg.loss!r}; choose one of {', '.join(LOSSES)} (a loss of your own is given "
        "from Python: mlx_dft.train(loss=...), also to resume its run)",
    )
    try:
        loss = loss_of(cfg)
    except ValueError as e:
        raise UserError(str(e)) from None
    check(cfg.sft_warmup_steps >= 0, "--sft-warmup-steps must be >= 0")
    check(
        cfg.sft_warmup_steps == 0 or cfg.loss != "sft",
        "--sft-warmup-steps switches from SFT to another --loss; with --loss sft it has nothing to do",
    )
    if cfg.iters is not None:
        check_run_length(cfg, cfg.iters)
    check(cfg.learning_rate is None or cfg.learning_rate > 0, "--learning-rate must be positive")
    check(cfg.warmup >= 0, "--warmup must be >= 0")
    # Options of one loss or schedule are refused with another, not ignored.
    used = {loss.name, *type(loss).borrows}
    for name in LOSS_OPTIONS:
        owner = FIELDS[name].metadata["loss_option"]
        check(
            owner in used or getattr(cfg, name) == FIELDS[name].default,
            f"--{name.replace('_', '-')} applies to --loss {owner} only (this run's is {cfg.loss})",
        )
    check(
        loss.needs_reference or not cfg.reference_copy,
        f"--reference-copy applies to losses with a reference model "
        f"({', '.join(n for n, c in LOSSES.items() if c.needs_reference)}), not --loss {cfg.loss}",
    )
    check(
        cfg.lr_schedule != "constant" or (cfg.min_learning_rate == 0 and cfg.decay_steps is None),
        "--min-learning-rate and --decay-steps shape a cosine or linear decay, not --lr-schedule constant",
    )
    check(cfg.warmup_init == 0 or cfg.warmup > 0, "--warmup-init needs a warmup (--warmup > 0)")
    check(cfg.warmup_init >= 0, "--warmup-init must be >= 0")
    check(cfg.min_learning_rate >= 0, "--min-learning-rate must be >= 0")
    check(cfg.decay_steps is None or cfg.decay_steps >= 1, "--decay-steps must be at least 1")
    check(cfg.max_grad_norm >= 0, "--max-grad-norm must be >= 0")
    check(cfg.shard_timeout >= 0, "--shard-timeout must be >= 0 (0: wait forever)")
    check(cfg.steps_per_report >= 1, "--steps-per-report must be at least 1")
    check(cfg.steps_per_eval is None or cfg.steps_per_eval >= 1, "--steps-per-eval must be at least 1")
    check(cfg.save_every >= 1, "--save-every must be at least 1")
    check(
        cfg.val_batches is None or cfg.val_batches == -1 or cfg.val_batches >= 1,
        "--val-batches must be -1 (all) or at least 1",
    )
    check(cfg.loss_chunk_tokens >= 0, "--loss-chunk-tokens must be >= 0")
    check(cfg.aligner_tokens >= 1, "--aligner-tokens must be at least 1")
    check(cfg.aligner_start_layer >= 0, "--aligner-start-layer must be >= 0")
    check(cfg.weight_decay is None or cfg.weight_decay >= 0, "--weight-decay must be >= 0")
    check(cfg.keep_checkpoints >= 0, "--keep-checkpoints must be >= 0")
    check(cfg.accuracy_problems >= 0, "--accuracy-problems must be >= 0")
    check(
        cfg.project_name is None or "wandb" in (cfg.report_to or ()),
        "--project-name names a wandb project: give it with --report-to wandb",
    )
    for name in cfg.report_to or ():
        check(name in REPORTERS, f"--report-to: unknown tracker {name!r}; choose from {', '.join(REPORTERS)}")
