"""`mlx_dft fuse`: merge an adapter into the base weights (as its method says how) and write a
Hugging Face model folder (config.json, model.safetensors, tokenizer files), and with ``gguf`` the
same model as one GGUF file for llama.cpp inside it (``model-<type>.gguf``)."""

from __future__ import annotations

import sys
from pathlib import Path

from mlx_dft import adapters
from mlx_dft.files import check_apart, staged_folder
from mlx_dft.interop.convert import read_source
from mlx_dft.models import is_quantized, load_model


def fuse(
    adapter: str | Path,
    out: str | Path,
    model: str | None = None,
    dequantize: bool = False,
    gguf: str | None = None,
) -> Path:
    """Fuse ``adapter`` (any source :func:`read_source` takes) into ``model`` (default: the
    adapter's base model) and write the result to ``out``; ``dequantize`` writes float weights.

    ``gguf`` (f32, f16, q8_0, q4_0) also writes ``out/model-<gguf>.gguf``. GGUF holds float weights
    or its own quantizations, so a quantized base is dequantized then, the folder's weights too
    (one model, two formats), with a note on stderr."""
    from mlx_lm.utils import dequantize_model, save_config, save_model

    from mlx_dft.gguf.export import file_name, write_model_gguf

    gguf_file = file_name(gguf) if gguf is not None else None  # an unknown type fails before any work
    check_apart(Path(out).expanduser(), {"adapter": adapter, "--model": model}, what="--out")
    source = read_source(adapter, model)
    check_apart(Path(out).expanduser(), {"base model": model or source.get("base_model")}, what="--out")
    method = adapters.method_of(source)
    method.check_fusable()  # before the base model loads
    net, tokenizer, model_cfg, _ = load_model(
        model or source.get("base_model"), dtype="float32", keep_quantized=True
    )
    if gguf_file and is_quantized(net) and not dequantize:
        print(
            "note: --gguf needs float weights: the quantized base is dequantized (as --dequantize), "
            "in the Hugging Face folder too",
            file=sys.stderr,
        )
        dequantize = True
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
        if gguf_file:
            write_model_gguf(stage, stage / gguf_file, gguf, name=out.name)
    return out
