"""`mlx_dft export` / `import`, and turning any adapter source into an mlx_dft folder.

Sources ``import`` and ``--adapter-from`` accept: an mlx_dft or mlx-lm folder, a PEFT LoRA/DoRA
folder, our Hugging Face Aligner folder, an official Aligner ``.pth``, or a Hub repo id holding
one of the folders (resolved through huggingface_hub's cache, so ``HF_HUB_OFFLINE=1`` works).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx

from mlx_dft import adapters as adapters_mod
from mlx_dft.checkpoint import staged_folder
from mlx_dft.errors import UserError
from mlx_dft.interop import aligner_hf, peft
from mlx_dft.interop.files import read_json, read_safetensors

RUN_FILE = "mlx_dft_run.json"  # training settings and final metrics, for model cards


def adapter_kind(config: dict) -> str:
    return config.get("adapter") or config.get("fine_tune_type") or "lora"


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
    keep = (
        "loss",
        "dft_floor",
        "dft_power",
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
        "lora_rank",
        "lora_scale",
        "aligner_tokens",
        "aligner_start_layer",
        "aligner_gate",
        "data",
        "seed",
    )
    training = {k: v for k, v in (config.get("training") or {}).items() if k in keep}
    return {
        "adapter": adapter_kind(config),
        "base_model": config.get("base_model"),
        "trainable_parameters": config.get("trainable_parameters"),
        "training": training,
        "final_metrics": {k: v for k, v in final.items() if isinstance(v, (int, float))},
    }


def export_adapter(
    adapter_dir: str | Path, out: str | Path, fmt: str = "auto", base_model: str | None = None
) -> Path:
    """Write a Hugging Face adapter folder: PEFT for LoRA/DoRA; our HF Aligner format (or, with
    ``fmt="peft"``, PEFT adaption prompt where the mapping is exact) for Aligner."""
    adapter_dir, out = Path(adapter_dir).expanduser(), Path(out).expanduser()
    config = adapters_mod.read_adapter_config(adapter_dir)
    kind = adapter_kind(config)
    if fmt not in ("auto", "peft", "hf"):
        raise UserError(f"--format {fmt}: choose auto, peft or hf")
    if kind in ("lora", "dora"):
        if fmt == "hf":
            raise UserError("--format hf is the Aligner format; LoRA/DoRA export to PEFT")
        peft.export_lora(adapter_dir, config, out, base_model)
    elif kind == "aligner":
        tensors = read_safetensors(adapter_dir / adapters_mod.aligner.WEIGHTS_FILE)
        if fmt == "peft":
            peft.export_adaption_prompt(config, tensors, out, base_model)
        else:
            aligner_hf.export_hf(config, tensors, out, base_model)
    elif kind == "full":
        raise UserError("a full fine-tune is not an adapter: use `mlx_dft fuse` to write the whole model")
    else:
        raise UserError(f"{adapter_dir}: unknown adapter type {kind!r}")
    (out / RUN_FILE).write_text(json.dumps(run_summary(adapter_dir, config), indent=2) + "\n")
    return out


def _model_layout(model: str) -> tuple[dict, list[str], str]:
    """(config.json, block linear paths, resolved path) of a base model, without loading weights."""
    from mlx_lm.utils import _get_classes

    from mlx_dft.adapters.lora import block_linear_paths
    from mlx_dft.models import model_config, resolve_model_path

    path = resolve_model_path(model)
    cfg = model_config(path)
    try:
        model_cls, args_cls = _get_classes(cfg)
        net = model_cls(args_cls.from_dict(cfg))  # lazy: no weight is materialised
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot build model {model}: {e}") from None
    return cfg, block_linear_paths(net), str(path)


def _resolve_source(src: str) -> Path:
    p = Path(src).expanduser()
    if p.exists():
        return p
    if src.startswith((".", "/", "~")) or src.count("/") != 1:
        raise UserError(f"adapter not found: {src} (a local folder or file, or a Hugging Face repo id)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.pth", "*.md"]))
    except Exception as e:  # offline, missing repo, gated...
        raise UserError(
            f"adapter not found: {src} is neither a local path nor a reachable Hugging Face "
            f"repo ({type(e).__name__})"
        ) from None


def read_source(src: str, model: str | None = None) -> dict:
    """Any supported adapter source -> an mlx_dft adapter config whose ``weights`` holds the tensors."""
    path = _resolve_source(src)
    if path.is_file():
        if path.suffix in (".pth", ".pt", ".bin"):
            return aligner_hf.import_official(path, model)
        raise UserError(f"{path}: not an adapter (expected a folder, or an official Aligner .pth)")
    if aligner_hf.is_hf_aligner(path):
        return aligner_hf.import_hf(path)
    if not (path / peft.PEFT_CONFIG).is_file():
        raise UserError(f"{path} is not an adapter folder: no adapter_config.json or aligner_config.json")
    config = read_json(path / peft.PEFT_CONFIG)
    if "peft_type" in config:
        base = model or config.get("base_model_name_or_path")
        if not base:
            raise UserError(f"{path}: the PEFT config names no base model; pass --model")
        model_cfg, block_paths, _ = _model_layout(base)
        out = peft.import_lora(path, model_cfg, base, block_paths)
        from mlx_dft.api import model_signature

        out["model_signature"] = model_signature(model_cfg)
        return out
    if "fine_tune_type" in config or "adapter" in config:
        kind = adapter_kind(config)
        files = adapters_mod.weight_files(kind)
        return {**config, "weights": {f: read_safetensors(path / f) for f in files}}
    raise UserError(f"{path / peft.PEFT_CONFIG}: neither a PEFT nor an mlx_dft adapter config")


def write_adapter(config: dict, out: Path, overwrite: bool = False) -> Path:
    """Write an mlx_dft folder (``adapter_config.json`` + weight files) atomically."""
    weights = config.pop("weights")
    with staged_folder(out, overwrite=overwrite) as tmp:
        for fname, arrays in weights.items():
            mx.save_safetensors(str(tmp / fname), arrays)
        (tmp / adapters_mod.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    config["weights"] = weights
    return out


def import_adapter(src: str, out: str | Path, model: str | None = None) -> Path:
    return write_adapter(read_source(src, model), Path(out).expanduser())


def as_local_adapter(src: str | Path, model: str | None = None) -> tuple[Path, Path | None]:
    """(an mlx_dft adapter folder for ``src``, a temporary folder to delete afterwards or None).
    mlx_dft/mlx-lm folders are used in place; everything else is converted on the fly."""
    p = Path(src).expanduser()
    if p.is_dir() and (p / adapters_mod.CONFIG_FILE).is_file():
        cfg = read_json(p / adapters_mod.CONFIG_FILE)
        if "peft_type" not in cfg:
            return p, None
    tmp = Path(tempfile.mkdtemp(prefix="mlx_dft_adapter_"))
    try:
        write_adapter(read_source(str(src), model), tmp / "adapter")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp / "adapter", tmp
