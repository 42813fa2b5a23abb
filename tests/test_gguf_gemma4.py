"""GGUF for Gemma 4 (mlx-lm ``gemma4_text``, llama.cpp ``gemma4``), proven by llama.cpp itself
(llama-cpp-python, in a child process) on tests/arch_models.py's tiny random models.

Three variants between them hold every feature llama.cpp's gemma4 computes: two head sizes,
proportional RoPE on the full layers (``rope_freqs``), shared KV, per-layer inputs, final-logit
soft-capping and a tied output (``per_layer``); K = V full layers with their own key/value head
count, the double-wide MLP of the shared-KV layers and an untied output (``k_eq_v``); mixture-of-
experts blocks beside the dense MLP, with the router's scales (``moe``).

- written: a random LoRA fused with ``fuse(..., gguf="f32")`` (and ``f16``) runs in llama.cpp with
  mlx_dft's logits of base + adapter; the LoRA exported as llama.cpp's LoRA GGUF and applied by
  llama.cpp to the f32 base gives them too;
- read: the f32 file converted back gives the fused weights bit for bit and the same logits;
- llama.cpp's own Q4_K_M of our f32 file reads as ggml dequantizes it;
- refused in one line: what llama.cpp's gemma4 would compute differently.
"""

import dataclasses
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from arch_models import write_arch_model
from test_gguf_archs import IDS, LIBRARY, llama_cpp_logits, mlx_logits, random_lora, to_gguf_space

import isolated
from mlx_dft.errors import UserError
from mlx_dft.gguf import arch_gemma4, archs
from mlx_dft.gguf.convert import convert_gguf
from mlx_dft.gguf.export import write_model_gguf
from mlx_dft.interop.fuse import fuse

gguf = pytest.importorskip("gguf")

# llama.cpp's last layers reuse the KV of layer n - shared - 1 (full) / - 2 (sliding): two shared
# layers on [sliding, full, sliding, full] are what mlx-lm shares too.
VARIANTS = {
    "per_layer": {"num_kv_shared_layers": 2},
    "k_eq_v": {"num_kv_shared_layers": 2, "attention_k_eq_v": True, "num_global_key_value_heads": 2,
               "use_double_wide_mlp": True, "hidden_size_per_layer_input": 0, "tie_word_embeddings": False},
    "moe": {"num_kv_shared_layers": 2, "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2,
            "moe_intermediate_size": 32},
}  # fmt: skip

# |logit difference| from llama.cpp (logits up to ~2). llama.cpp's CPU GELU reads a float16 table
# (ggml-cpu/vec.h, GGML_GELU_FP16: input and result rounded to float16). Against mlx-lm's model as
# it is, measured (per_layer / k_eq_v / moe) max 2.0e-3 / 1.6e-3 / 2.6e-3 (Gemma 3's is 2.5e-3),
# mean 2.0e-4 / 1.5e-4 / 2.3e-4. With that table emulated in mlx-lm's GELUs (:func:`table_gelu`)
# the mean falls to 7.7e-6 / 2.5e-5 / 2.7e-5 (max 2.0e-4 / 5.5e-4 / 1.2e-3: an input a float32
# rounding apart from llama.cpp's can still round to another float16 and move a few logits): that
# is what proves the rest of the computation. llama.cpp applying the LoRA: the same to 1e-6.
F32_TOL = 1e-2
TABLE_MEAN_TOL, TABLE_MAX_TOL = 5e-5, 2e-3
F16_TOL = 3e-2  # measured 9.7e-3 / 8.7e-3 / 1.8e-2: the weights rounded to float16, on top


def assert_llama_cpp_gelu_explains(theirs: np.ndarray, table: np.ndarray) -> None:
    """llama.cpp's logits against mlx-lm's computed with llama.cpp's GELU table."""
    diff = np.abs(theirs - table)
    assert diff.mean() <= TABLE_MEAN_TOL and diff.max() <= TABLE_MAX_TOL, (diff.mean(), diff.max())


def table_gelu(x: mx.array) -> mx.array:
    """ggml's CPU GELU: tanh GELU of x rounded to float16, the result rounded to float16; x below
    -10 gives 0, above 10 x (ggml_vec_gelu_f32 with GGML_GELU_FP16)."""
    h = x.astype(mx.float16).astype(mx.float32)
    y = 0.5 * h * (1 + mx.tanh(0.7978845608028654 * h * (1 + 0.044715 * h * h)))
    y = y.astype(mx.float16).astype(mx.float32)
    return mx.where(x <= -10, 0.0, mx.where(x >= 10, x, y))


@pytest.fixture
def llama_cpp_gelu(monkeypatch):
    """mlx-lm's gemma4_text computing its GELUs (the MLP's and the per-layer gate's) as llama.cpp's CPU."""
    import mlx_lm.models.gemma4_text as g4

    monkeypatch.setattr(g4, "geglu", lambda gate, x: table_gelu(gate) * x)
    monkeypatch.setattr(nn, "gelu_approx", table_gelu)


@pytest.fixture(scope="module", params=list(VARIANTS))
def fused(request, tmp_path_factory):
    """(variant, base folder, adapter folder, fused folder with model-f32.gguf, f16 GGUF, the mlx
    logits of base + LoRA)."""
    variant = request.param
    root = tmp_path_factory.mktemp(variant)
    base = write_arch_model(root / "base", "gemma4_text", **VARIANTS[variant])
    adapter = random_lora(base, root / "adapter")
    ours = mlx_logits(base, adapter)
    assert np.abs(ours - mlx_logits(base)).max() > 0.05  # the adapter moves the logits
    folder = fuse(adapter, root / "fused", model=str(base), gguf="f32")
    f16 = write_model_gguf(folder, root / "model-f16.gguf", "f16")
    return variant, base, adapter, folder, f16, ours


def test_llama_cpp_runs_our_fused_gguf_with_our_logits(fused, llama_cpp_gelu):
    variant, base, adapter, folder, f16, ours = fused
    f32 = folder / "model-f32.gguf"
    meta = {k: f.contents() for k, f in gguf.GGUFReader(str(f32)).fields.items()}
    assert meta["general.architecture"] == "gemma4"
    assert meta["gemma4.attention.sliding_window_pattern"] == [True, False, True, False]
    assert (meta["gemma4.attention.key_length"], meta["gemma4.attention.key_length_swa"]) == (32, 16)
    theirs = llama_cpp_logits(f32)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=F32_TOL)
    assert_llama_cpp_gelu_explains(theirs, mlx_logits(base, adapter))
    np.testing.assert_allclose(llama_cpp_logits(f16), ours, rtol=0, atol=F16_TOL)


def test_llama_cpp_applies_our_lora_gguf_to_the_base_with_our_logits(fused, tmp_path, llama_cpp_gelu):
    """``export --format gguf``: every linear layer's LoRA (the per-layer input gate and
    projection included), applied by llama.cpp to our f32 file of the base."""
    from conftest import run_cli

    variant, base, adapter, _, _, ours = fused
    done = run_cli("export", adapter, "--out", tmp_path / "lora", "--format", "gguf")
    assert done.returncode == 0, done.stderr
    lora = tmp_path / "lora" / "adapter.gguf"
    reader = gguf.GGUFReader(str(lora))
    trained = {name.rsplit(".", 1)[0] for name in mx.load(str(adapter / "adapters.safetensors"))}
    assert len(reader.tensors) == 2 * len(trained)
    names = {t.name for t in reader.tensors}
    if variant == "per_layer":
        assert {"blk.0.inp_gate.weight.lora_a", "blk.3.proj.weight.lora_b"} <= names
    if variant == "moe":  # (the router and the experts, 3-D: llama.cpp takes each token's slices)
        assert {"blk.0.ffn_gate_inp.weight.lora_a", "blk.3.ffn_down_exps.weight.lora_b"} <= names
    f32 = write_model_gguf(base, tmp_path / "base-f32.gguf", "f32")
    theirs = isolated.call("native_llama_cpp:logits", str(f32), IDS, str(lora), library=LIBRARY, timeout=120)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=F32_TOL)
    assert_llama_cpp_gelu_explains(theirs, mlx_logits(base, adapter))


def test_our_gguf_reads_back_to_the_same_model(fused, tmp_path, monkeypatch):
    """``mlx_dft convert FILE.gguf`` and ``--model FILE.gguf``: the fused weights bit for bit (no
    rope_freqs among them: the config read back implies it), the config mlx-lm reads the same."""
    from conftest import run_cli

    variant, _, _, folder, _, ours = fused
    f32 = folder / "model-f32.gguf"
    done = run_cli("convert", f32, "--out", tmp_path / "back", "--dequantize")
    assert done.returncode == 0, done.stderr
    back = tmp_path / "back"
    want, got = mx.load(str(folder / "model.safetensors")), mx.load(str(back / "model.safetensors"))
    assert set(got) == set(want)
    for name, w in want.items():
        np.testing.assert_array_equal(np.array(got[name]), np.array(w), err_msg=name)
    config, original = (json.loads((f / "config.json").read_text()) for f in (back, folder))
    mine, theirs = arch_gemma4._args(config), arch_gemma4._args(original)
    for key in ("layer_types", "rope_parameters", "head_dim", "global_head_dim", "num_kv_shared_layers",
                "hidden_size_per_layer_input", "attention_k_eq_v", "num_global_key_value_heads",
                "use_double_wide_mlp", "final_logit_softcapping", "tie_word_embeddings", "sliding_window"):
        if key == "num_global_key_value_heads" and not theirs.attention_k_eq_v:
            continue  # (mlx-lm reads it for K=V layers only)
        assert getattr(mine, key) == getattr(theirs, key), key
    fused_logits = mlx_logits(folder)
    np.testing.assert_allclose(fused_logits, ours, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(mlx_logits(back), fused_logits)
    monkeypatch.setenv("MLX_DFT_CACHE", str(tmp_path / "cache"))
    if mx.default_device() == mx.cpu:  # (float32 conversion on a CPU)
        np.testing.assert_array_equal(mlx_logits(f32), fused_logits)


@pytest.mark.slow
def test_a_trained_lora_exports_for_llama_cpp(arith_data, tmp_path):
    """``mlx_dft train`` then ``export --format gguf`` on the double-wide model: the run records
    only the model's signature (not ``use_double_wide_mlp``), and the export still fits the wider
    MLP of the shared-KV layers; llama.cpp applying it gives the trained model's logits (measured
    4.0e-4 where the training moved them by 2.3)."""
    from conftest import run_cli

    base = write_arch_model(tmp_path / "base", "gemma4_text", **VARIANTS["k_eq_v"])
    done = run_cli("train", "--model", base, "--data", arith_data, "--output", tmp_path / "run", "--iters", 3,
                   "--learning-rate", "1e-2")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "use_double_wide_mlp" not in json.loads((tmp_path / "run" / "adapter_config.json").read_text())[
        "model_signature"]  # fmt: skip
    done = run_cli("export", tmp_path / "run", "--out", tmp_path / "lora", "--format", "gguf")
    assert done.returncode == 0, done.stderr
    f32 = write_model_gguf(base, tmp_path / "base.gguf", "f32")
    lora = str(tmp_path / "lora" / "adapter.gguf")
    theirs = isolated.call("native_llama_cpp:logits", str(f32), IDS, lora, library=LIBRARY, timeout=120)
    ours = mlx_logits(base, tmp_path / "run")
    assert np.abs(ours - mlx_logits(base)).max() > 0.5  # (the training moved them)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=F32_TOL)


@pytest.mark.slow
def test_llama_cpp_q4_k_m_reads_as_llama_cpp_reads_it(tmp_path):
    """llama.cpp's quantizer makes Q4_K_M from our f32 file (width 256 so K-quant blocks fit):
    every tensor we read is ggml's own dequantization of its blocks, llama.cpp computes our logits
    from the weights we read, and from the quantized file to the precision of its products."""
    sizes = {"hidden_size": 256, "intermediate_size": 256, "num_kv_shared_layers": 2}
    base = write_arch_model(tmp_path / "base", "gemma4_text", **sizes)
    f32 = write_model_gguf(base, tmp_path / "m-f32.gguf", "f32")
    path = isolated.call("native_llama_cpp:quantize", str(f32), str(tmp_path / "m.Q4_K_M.gguf"), "Q4_K_M",
                         library=LIBRARY)  # fmt: skip
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert "Q4_K" in types.values() and types["rope_freqs.weight"] == "F32", types
    out = convert_gguf(path, tmp_path / "model", dequantize=True)
    config = json.loads((out / "config.json").read_text())
    reference = isolated.call("native_llama_cpp:dequantize", path, library=LIBRARY)
    ours = to_gguf_space(mx.load(str(out / "model.safetensors")), config)
    ours.update(arch_gemma4.derived(config))  # (rope_freqs: from the config read back)
    assert set(ours) == set(reference)
    for name, ref in reference.items():
        np.testing.assert_allclose(ours[name], ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max(), err_msg=name)
    logits = mlx_logits(out)
    again = write_model_gguf(out, tmp_path / "read-f32.gguf", "f32")
    np.testing.assert_allclose(llama_cpp_logits(again), logits, rtol=0, atol=F32_TOL)
    # llama.cpp multiplies K-quant blocks with 8-bit-quantized activations (and its GELU table):
    # measured 9.1% of the largest logit (Q6_K 8.8%), the same top token at 18 of 20 positions;
    # Gemma 3 is bounded at 12% too (tests/test_gguf_archs.py)
    theirs = llama_cpp_logits(path)
    assert np.abs(logits - theirs).max() / np.abs(theirs).max() <= 0.12
    # re-quantized to MLX's affine layers (--model FILE.gguf on a GPU): measured 5.1% of the scale
    req = mlx_logits(convert_gguf(path, tmp_path / "requantized", requantize=True))
    assert np.abs(req - logits).max() / np.abs(logits).max() <= 0.1


def fuse_experts_gate_up(src, dst):
    """Our GGUF file with each block's experts' gate and up as one ``ffn_gate_up_exps`` tensor,
    gate rows first, as llama.cpp's converter writes Gemma 4's (with gguf-py's writer)."""
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), "gemma4")
    for field in reader.fields.values():
        if not field.name.startswith("GGUF.") and field.name != "general.architecture":
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub)
    tensors = {t.name: (np.array(t.data), t.tensor_type) for t in reader.tensors}
    for name, (data, kind) in tensors.items():  # (quantized ones as their blocks' bytes, by rows)
        if "ffn_up_exps" in name:
            continue
        if "ffn_gate_exps" in name:
            up = tensors[name.replace("gate", "up")][0]
            name, data = name.replace("gate_exps", "gate_up_exps"), np.concatenate([data, up], axis=-2)
        floats = kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        writer.add_tensor(name, data, raw_dtype=None if floats else kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.mark.parametrize("fused", ["moe"], indirect=True)
def test_experts_fused_as_llama_cpps_converter_writes_them_are_read(fused, tmp_path):
    """``ffn_gate_up_exps`` (llama.cpp's converter's layout): llama.cpp computes the same logits
    from it as from our file's gate and up apart, and we read it as the same weights; quantized
    by llama.cpp (Q4_K_M: its fallbacks for these 64-wide rows), as ggml dequantizes it, and
    re-quantized (split after)."""
    _, _, _, folder, _, _ = fused
    ours = folder / "model-f32.gguf"
    theirs = fuse_experts_gate_up(ours, tmp_path / "fused.gguf")
    names = {t.name for t in gguf.GGUFReader(str(theirs)).tensors}
    assert "blk.0.ffn_gate_up_exps.weight" in names and "blk.0.ffn_up_exps.weight" not in names
    np.testing.assert_allclose(llama_cpp_logits(theirs), llama_cpp_logits(ours), rtol=0, atol=1e-5)
    want = mx.load(str(convert_gguf(ours, tmp_path / "apart", dequantize=True) / "model.safetensors"))
    got = mx.load(str(convert_gguf(theirs, tmp_path / "fused", dequantize=True) / "model.safetensors"))
    assert set(got) == set(want)
    for name, w in want.items():
        np.testing.assert_array_equal(np.array(got[name]), np.array(w), err_msg=name)
    path = isolated.call("native_llama_cpp:quantize", str(theirs), str(tmp_path / "m.Q4_K_M.gguf"), "Q4_K_M",
                         library=LIBRARY)  # fmt: skip
    out = convert_gguf(path, tmp_path / "q", dequantize=True)
    config = json.loads((out / "config.json").read_text())
    reference = isolated.call("native_llama_cpp:dequantize", path, library=LIBRARY)
    read = to_gguf_space(mx.load(str(out / "model.safetensors")), config)
    for name, ref in reference.items():
        parts = arch_gemma4.unfused(name)
        refs = dict(zip(parts, np.split(ref, len(parts), axis=-2))) if parts else {name: ref}
        for part, r in refs.items():
            if part in read:  # (rope_freqs: from the config)
                np.testing.assert_allclose(read[part], r, rtol=1e-6, atol=1e-6 * abs(r).max(), err_msg=part)
    requantized = mlx_logits(convert_gguf(path, tmp_path / "rq", requantize=True))
    assert np.abs(requantized - mlx_logits(out)).max() / np.abs(mlx_logits(out)).max() <= 0.1
    # Q8_0 (MLX's own layout, kept quantized): packed weights, scales and biases split alike
    q8 = write_model_gguf(folder, tmp_path / "m-q8_0.gguf", "q8_0")
    apart = mx.load(str(convert_gguf(q8, tmp_path / "q8-apart") / "model.safetensors"))
    q8_fused = fuse_experts_gate_up(q8, tmp_path / "q8-fused.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(q8_fused)).tensors}
    assert types["blk.0.ffn_gate_up_exps.weight"] == "Q8_0"
    together = convert_gguf(q8_fused, tmp_path / "q8-fused")
    got = mx.load(str(together / "model.safetensors"))
    assert set(got) == set(apart) and "model.layers.0.experts.switch_glu.gate_proj.scales" in got
    for name, w in apart.items():
        np.testing.assert_array_equal(np.array(got[name]), np.array(w), err_msg=name)


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize("overrides, message", [
    ({}, r"^llama.cpp's gemma4 shares the KV of layer 2 with full-attention and of layer 1 with sliding "
         r"layers; this model shares \{3: 1\}"),
    ({"num_kv_shared_layers": 2, "vocab_size_per_layer_input": 256},
     r"^llama.cpp's gemma4 reads per-layer embeddings of the model's vocabulary \(512\)"),
    ({"num_kv_shared_layers": 2, "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     r"^gemma4 full RoPE 'linear' with factor 2.0 is not written to GGUF"),
])  # fmt: skip
def test_models_llama_cpp_would_compute_differently_are_refused(tmp_path, overrides, message):
    folder = write_arch_model(tmp_path / "m", "gemma4_text", **overrides)
    with pytest.raises(UserError, match=message) as e:
        write_model_gguf(folder, tmp_path / "m.gguf", "f32")
    assert "\n" not in str(e.value) and not list(tmp_path.glob("*.gguf*"))


def _written_with(tmp_path, monkeypatch, **hooks):
    """A gemma4 GGUF written with other metadata or rope_freqs than ours (as another converter
    might), for the reader to refuse."""
    entry = archs.ARCHS["gemma4_text"]
    monkeypatch.setitem(archs.ARCHS, "gemma4_text", dataclasses.replace(entry, **hooks))
    folder = write_arch_model(tmp_path / "m", "gemma4_text", **VARIANTS["moe"])
    path = write_model_gguf(folder, tmp_path / "m.gguf", "f32")
    monkeypatch.undo()
    return path


@pytest.mark.parametrize("hooks, message", [
    ({"derived": lambda c: {"rope_freqs.weight": np.array([1, 0.5] + [1e30] * 14, np.float32)}},
     r"^the GGUF gemma4 rope_freqs are not 1 then 1e30 per frequency"),
    ({"write": lambda c: {**arch_gemma4.write(c), "{arch}.attention.shared_kv_layers": 1}},
     r"^llama.cpp's gemma4 shares the KV of layer 2 .*; the GGUF file shares \{3: 1\}"),
    ({"write": lambda c: {**arch_gemma4.write(c), "{arch}.rope.dimension_count_swa": 8}},
     r"^the GGUF gemma4 file rotates part of its sliding layers' heads"),
])  # fmt: skip
def test_files_mlx_lm_would_compute_differently_are_refused(tmp_path, monkeypatch, hooks, message):
    path = _written_with(tmp_path, monkeypatch, **hooks)
    with pytest.raises(UserError, match=message) as e:
        convert_gguf(path, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


# ------------------------------------------------------------------ the gemma4 tokenizer

TEXTS = [
    "Hello world, this is a test of the tokenizer.",
    "  two  spaces, a tab\tand\n\n\nnewlines\n",
    "héllo 日本語 🙂 naïve — «quotes»",
    "<bos>special<eos> tokens in the text",
    "def f(x):\n    return x ** 2  # squared\n",
]


def gemma4_style_tokenizer(folder):
    """A tokenizer.json of Gemma 4's kind (SentencePiece-style BPE: spaces as ▁, no prefix, byte
    fallback to ``<0xNN>`` tokens, lines split from newline runs, BOS added), trained here on the
    project's docs: 512 tokens, for the tiny model's embedding."""
    from pathlib import Path

    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    special = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\n]+|[\n]+"), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=special, limit_alphabet=120)
    docs = sorted((Path(__file__).parents[1] / "docs").glob("*.md"))
    tok.train_from_iterator((d.read_text(encoding="utf-8") for d in docs), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    # the 256 byte tokens in the vocabulary after the special ones, as SentencePiece lays them out
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    byte_tokens = {f"<0x{b:02X}>": 4 + b for b in range(256)}
    spec["model"]["vocab"] = {**{t: i for t, i in vocab.items() if i < 4}, **byte_tokens,
                              **{t: i + 256 for t, i in vocab.items() if i >= 4}}  # fmt: skip
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    names = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "GemmaTokenizerFast", **names}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


def test_a_gemma4_tokenizer_is_written_and_read_as_llama_cpp_tokenizes(tmp_path):
    """Gemma 4's tokenizer kind as ``tokenizer.ggml.model = gemma4``: llama.cpp's tokenization of
    the written file is the tokenizer's own on mixed text (newline runs, bytes outside the
    vocabulary, special tokens), and the tokenizer rebuilt from the file gives the same ids."""
    from tokenizers import Tokenizer

    folder = write_arch_model(tmp_path / "m", "gemma4_text", num_kv_shared_layers=2, bos_token_id=2,
                              eos_token_id=1)  # fmt: skip
    tok = gemma4_style_tokenizer(folder)
    path = write_model_gguf(folder, tmp_path / "m.gguf", "f32")
    meta = {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()}
    assert meta["tokenizer.ggml.model"] == "gemma4" and "tokenizer.ggml.pre" not in meta
    assert meta["tokenizer.ggml.token_type"][4:260] == [6] * 256  # (the <0xNN> tokens: bytes)
    want = [tok.encode(t).ids for t in TEXTS]
    assert any(10 <= i < 260 for i in want[2])  # (byte fallback happens)
    assert isolated.call("native_llama_cpp:tokenize", str(path), TEXTS, True, library=LIBRARY) == want
    back = convert_gguf(path, tmp_path / "back", dequantize=True)
    rebuilt = Tokenizer.from_file(str(back / "tokenizer.json"))
    assert [rebuilt.encode(t).ids for t in TEXTS] == want
    plain = [t for t in TEXTS if "<" not in t]
    assert [rebuilt.decode(tok.encode(t).ids) for t in plain] == plain


def test_gemma_4s_own_vocabulary_is_rebuilt_as_its_tokenizer_tokenizes():
    """llama.cpp's test vocabulary of Gemma 4 (``models/ggml-vocab-gemma-4.gguf``: the published
    tokenizer's 262,144 tokens and 514,906 merges) and its 46 texts with the ids the Hugging Face
    tokenizer gives them (``.inp`` / ``.out``, made by llama.cpp's convert_hf_to_gguf_update.py):
    the tokenizer rebuilt from the file gives those ids, and decodes them back to the text. The
    file (16 MB) ships in llama.cpp's source tree only: the test runs where $LLAMA_CPP_SOURCE
    names one (measured 2026-12-08 with llama-cpp-python 0.3.36's: 46 of 46)."""
    import os
    from pathlib import Path

    from mlx_dft.gguf.reader import read_header
    from mlx_dft.gguf.tokenizer import build_tokenizer

    source = os.environ.get("LLAMA_CPP_SOURCE")
    vocab = Path(source or ".") / "models" / "ggml-vocab-gemma-4.gguf"
    if not source or not vocab.is_file():
        pytest.skip("set LLAMA_CPP_SOURCE to a llama.cpp source tree (its models/ggml-vocab-gemma-4.gguf)")
    tok, special = build_tokenizer(read_header(vocab).metadata)
    texts = vocab.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = vocab.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(texts) == 46 and special["add_bos_token"] and special["bos_token"] == ("<bos>", 2)
    for text, want in zip(texts, ids):
        got = tok.encode(text, add_special_tokens=False).ids
        assert got == [int(i) for i in want.split()], text
        assert tok.decode(got) == text, text
