"""`mlx_dft fuse`: merge a LoRA/DoRA (or full) adapter into the base weights and write a
Hugging Face model folder (config.json, model.safetensors, tokenizer files)."""

from __future__ import annotations

from pathlib import Path

from mlx.utils import tree_unflatten

from mlx_dft import adapters as adapters_mod
from mlx_dft.checkpoint import staged_folder
from mlx_dft.errors import UserError


def fuse(adapter: str | Path, out: str | Path, model: str | None = None, dequantize: bool = False) -> Path:
    from mlx_lm.utils import dequantize_model, save_config, save_model

    from mlx_dft.interop.convert import adapter_kind, as_local_adapter
    from mlx_dft.models import load_model

    local, tmp = as_local_adapter(adapter, model)
    try:
        config = adapters_mod.read_adapter_config(local)
        kind = adapter_kind(config)
        if kind == "aligner":
            raise UserError(
                "an Aligner cannot be merged into the base weights: its prefix attention is not a weight "
                "change. Export it with `mlx_dft export` and load it with mlx_dft.torch_aligner instead"
            )
        net, tokenizer, model_cfg, _ = load_model(model or config.get("base_model"), dtype="float32")
        adapters_mod.load_adapter(net, local)
        fused = [(n, m.fuse(dequantize=dequantize)) for n, m in net.named_modules() if hasattr(m, "fuse")]
        if fused:
            net.update_modules(tree_unflatten(fused))
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
    finally:
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
