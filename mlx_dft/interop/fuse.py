"""`mlx_dft fuse`: merge an adapter into the base weights (as its method says how) and write a
Hugging Face model folder (config.json, model.safetensors, tokenizer files)."""

from __future__ import annotations

from pathlib import Path

from mlx_dft import adapters
from mlx_dft.files import staged_folder
from mlx_dft.interop.convert import read_source
from mlx_dft.models import load_model


def fuse(adapter: str | Path, out: str | Path, model: str | None = None, dequantize: bool = False) -> Path:
    """Fuse ``adapter`` (any source :func:`read_source` takes) into ``model`` (default: the
    adapter's base model) and write the result to ``out``; ``dequantize`` writes float weights."""
    from mlx_lm.utils import dequantize_model, save_config, save_model

    source = read_source(adapter, model)
    method = adapters.method_of(source)
    method.check_fusable()  # before the base model loads
    net, tokenizer, model_cfg, _ = load_model(model or source.get("base_model"), dtype="float32")
    adapters.apply_saved(net, source, source["weights"], str(adapter))
    method.fuse(net, dequantize)
    if dequantize:
        net = dequantize_model(net)
        model_cfg.pop("quantization", None)
        model_cfg.pop("quantization_config", None)
    model_cfg["torch_dtype"] = "float32"
    out = Path(out).expanduser()
    with staged_folder(out) as stage:
        save_model(stage, net, donate_model=False)
        save_config(model_cfg, config_path=stage / "config.json")
        tokenizer.save_pretrained(str(stage))
    return out
