"""The one table of architecture facts mlx_dft relies on, on the floor below everything that
uses it (:mod:`mlx_dft.models`, which re-exports it, the adapters, and :mod:`mlx_dft.gguf`, which
:mod:`mlx_dft.models` calls to open GGUF files)."""

from __future__ import annotations

from dataclasses import dataclass

from mlx_dft.errors import UserError


@dataclass(frozen=True)
class Architecture:
    """What mlx_dft knows about one ``model_type``.

    ``mlx_module``: the ``mlx_lm.models`` module whose ``Attention`` the model's layers use (the
    Aligner extends it). ``adaption_prompt``: Hugging Face PEFT's adaption prompt supports it.
    ``gguf``: its GGUF ``general.architecture``; ``gguf_reorders_qk``: llama.cpp stores its q/k
    projection rows in rotary order (see :mod:`mlx_dft.gguf.names`). ``hf_class``: the
    transformers class a config.json names in ``architectures``.
    Every listed architecture has the hidden-state loss path, the Aligner, and the PyTorch
    Aligner runner; keys/values may carry biases (qwen2) and keys a per-head norm (qwen3), which
    the code reads off the layers themselves.
    """

    mlx_module: str
    adaption_prompt: bool
    gguf: str
    gguf_reorders_qk: bool
    hf_class: str


ARCHITECTURES = {
    "llama": Architecture("llama", True, "llama", gguf_reorders_qk=True, hf_class="LlamaForCausalLM"),
    "mistral": Architecture("llama", True, "llama", gguf_reorders_qk=True, hf_class="MistralForCausalLM"),
    "qwen2": Architecture("qwen2", False, "qwen2", gguf_reorders_qk=False, hf_class="Qwen2ForCausalLM"),
    "qwen3": Architecture("qwen3", False, "qwen3", gguf_reorders_qk=False, hf_class="Qwen3ForCausalLM"),
}


def architecture(model_type: str, what: str) -> Architecture:
    """The table entry for ``model_type``; ``what`` names the feature in the error."""
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"{what} supports model types {', '.join(ARCHITECTURES)}; this model is {model_type!r}"
        )
    return ARCHITECTURES[model_type]
