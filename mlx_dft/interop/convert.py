"""`mlx_dft export` / `import`, and reading any adapter source.

Sources ``import``, ``--adapter-from``, ``generate --adapter-path`` and ``fuse`` accept: an mlx_dft or
mlx-lm folder (or one of its checkpoints), or anything an adapter method reads from another tool
(``AdapterMethod.read_foreign``: a PEFT LoRA/DoRA folder, our Hugging Face Aligner folder, an
official Aligner ``.pth``), or a Hub repo id holding one of the folders (resolved through
huggingface_hub's cache, so ``HF_HUB_OFFLINE=1`` works).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from mlx_dft import adapters
from mlx_dft.errors import UserError
from mlx_dft.files import (
    TMP_PREFIX,
    check_apart,
    local_or_hub,
    read_json,
    read_safetensors,
    save_safetensors,
    staged_folder,
)

RUN_FILE = "mlx_dft_run.json"  # training settings and final metrics, for model cards
ADAPTER_FILES = ("*.json", "*.safetensors", "*.pth", "*.md")
# TrainConfig keys every model card lists; the loss adds its options (:func:`loss_settings`), each
# method its own (``card_settings``).
CARD_SETTINGS = (
    "loss",
    "reference_copy",
    "sft_warmup_steps",
    "adapter",
    "learning_rate",
    "weight_decay",
    "optimizer",
    "lr_schedule",
    "warmup",
    "batch_size",
    "grad_accumulation_steps",
    "max_seq_length",
    "total_steps",
    "data",
    "seed",
)


def loss_settings(name: str | None) -> tuple[str, ...]:
    """The option names of loss ``name`` and of the losses it borrows from (none when unknown)."""
    from mlx_dft.losses import LOSSES

    cls = LOSSES.get(name or "")
    if cls is None:
        return ()
    owners = [cls, *(LOSSES[b] for b in cls.borrows)]
    return tuple(c.option_name(f.name) for c in owners for f in c.option_fields())


def run_summary(adapter_dir: Path, config: dict) -> dict:
    """What a model card reports: the training settings and the last metrics of the run."""
    final: dict = {}
    metrics = adapter_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            final.update({k: v for k, v in rec.items() if k != "step"})
            final["step"] = rec.get("step", final.get("step"))
    m = adapters.method_of(config)
    saved = config.get("training") or {}
    keep = (*CARD_SETTINGS, *loss_settings(saved.get("loss")), *m.card_settings)
    training = {k: v for k, v in saved.items() if k in keep}
    return {
        "adapter": m.name,
        "base_model": config.get("base_model"),
        "trainable_parameters": config.get("trainable_parameters"),
        "training": training,
        "final_metrics": {k: v for k, v in final.items() if isinstance(v, (int, float))},
    }


# What `mlx_dft train` saves of the tokenizer beside an adapter (transformers' file names).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt",
                   "added_tokens.json")  # fmt: skip


def export_adapter(
    adapter_dir: str | Path, out: str | Path, fmt: str = "auto", base_model: str | None = None
) -> Path:
    """Write the Hugging Face folder of an adapter in one of its method's ``export_formats``
    (``auto``: the first: PEFT for LoRA/DoRA, our HF format for the Aligner)."""
    adapter_dir, out = Path(adapter_dir).expanduser(), Path(out).expanduser()
    check_apart(out, {"adapter": adapter_dir, "--base-model": base_model}, what="--out")
    config = adapters.read_adapter_config(adapter_dir)
    if "peft_type" in config:
        raise UserError(f"{adapter_dir} is already a Hugging Face PEFT folder: nothing to export")
    m = adapters.method_of(config)
    if m.export_formats and fmt != "auto" and fmt not in m.export_formats:
        raise UserError(f"--format {fmt}: a {m.name} adapter exports as {' or '.join(m.export_formats)}")
    if fmt == "auto" and m.export_formats:
        fmt = m.export_formats[0]
    m.export(adapter_dir, config, out, fmt, base_model)
    (out / RUN_FILE).write_text(json.dumps(run_summary(adapter_dir, config), indent=2) + "\n")
    for name in TOKENIZER_FILES if fmt != "gguf" else ():  # the run's tokenizer travels with it
        if (adapter_dir / name).is_file():
            tmp = out / f"{TMP_PREFIX}{name}"
            shutil.copyfile(adapter_dir / name, tmp)
            os.replace(tmp, out / name)
    return out


def read_source(src: str | Path, model: str | None = None) -> dict:
    """Any supported adapter source -> an mlx_dft adapter config whose ``weights`` holds the
    tensors ({file name: tensors}). ``model`` is the base model, where the source needs one."""
    path = local_or_hub(src, ADAPTER_FILES, "adapter")
    for m in dict.fromkeys(adapters.METHODS.values()):
        found = m.read_foreign(path, model)
        if found is not None:
            return found
    if path.is_file():
        raise UserError(f"{path}: not an adapter (expected a folder, or an official Aligner .pth)")
    if not (path / adapters.CONFIG_FILE).is_file():
        raise UserError(f"{path} is not an adapter folder: no adapter_config.json or aligner_config.json")
    config = read_json(path / adapters.CONFIG_FILE)
    if not ({"fine_tune_type", "adapter", "lora_parameters"} & set(config)):
        raise UserError(f"{path / adapters.CONFIG_FILE}: neither a PEFT nor an mlx_dft adapter config")
    files = adapters.method_of(config).weight_files
    return {**config, "weights": {f: read_safetensors(path / f) for f in files}}


def write_adapter(config: dict, out: Path, overwrite: bool = False) -> Path:
    """Write an mlx_dft folder (``adapter_config.json`` + weight files) atomically."""
    with staged_folder(out, overwrite=overwrite) as tmp:
        for fname, arrays in config["weights"].items():
            save_safetensors(tmp / fname, arrays)
        settings = {k: v for k, v in config.items() if k != "weights"}
        (tmp / adapters.CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    return out


def import_adapter(src: str, out: str | Path, model: str | None = None) -> Path:
    out = Path(out).expanduser()
    check_apart(out, {"adapter source": src, "--model": model}, what="--out")
    return write_adapter(read_source(src, model), out)
