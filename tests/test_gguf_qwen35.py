"""GGUF for Qwen3.5 (mlx-lm ``qwen3_5``, llama.cpp ``qwen35``), proven by llama.cpp itself
(llama-cpp-python, in a child process) on tests/arch_models.py's tiny random qwen3_5: gated-delta
layers 0 and 2, full attention 1 and 3, 4 value heads on 2 key heads (so llama.cpp's order of the
value heads differs from mlx-lm's), partial interleaved RoPE, an untied output.

- written: a random LoRA on every linear layer fused with ``fuse(..., gguf="f32")`` (and ``f16``)
  runs in llama.cpp with mlx_dft's logits of base + adapter; the LoRA exported as llama.cpp's
  LoRA GGUF and applied by llama.cpp to the f32 base gives them too;
- read: the f32 file converted back gives the fused weights bit for bit (``A_log``, stored as
  ``-exp(A_log)``, within 2^-22) and their logits; a file with llama.cpp's multi-token-prediction
  block (its converter's default) reads as the model without it, and llama.cpp gives the same
  logits from it;
- llama.cpp's own Q4_K_M and Q6_K of our f32 file read as ggml dequantizes them;
- refused in one line: what llama.cpp's qwen35 would compute differently.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from arch_models import CONFIGS, write_arch_model
from test_gguf_archs import IDS, LIBRARY, llama_cpp_logits, mlx_logits, random_lora

import isolated
from mlx_dft.errors import UserError
from mlx_dft.gguf.convert import convert_gguf
from mlx_dft.gguf.export import write_model_gguf
from mlx_dft.gguf.names import stored_value, to_gguf_array, to_gguf_name
from mlx_dft.gguf.reader import read_header
from mlx_dft.gguf.writer import GGUFWriter, ValueType
from mlx_dft.interop.fuse import fuse

gguf = pytest.importorskip("gguf")

TEXT = CONFIGS["qwen3_5"]["text_config"]
# llama.cpp l2-normalises the gated-delta q/k with the RMSNorm epsilon, mlx-lm with 1e-6 (Qwen3.5's)
OWN = {"rms_norm_eps": 1e-6}
# K-quants are blocks of 256 along a row; value heads of 64 keep out_proj's reordered columns in
# whole groups of 32 (MLX-quantized when re-quantized)
WIDE = {"hidden_size": 256, "intermediate_size": 256, "head_dim": 64, "linear_key_head_dim": 64,
        "linear_value_head_dim": 64}  # fmt: skip
# Largest |logit difference| from llama.cpp (logits up to ~1.5): measured 1.5e-6 (f32; 1.8e-6 for
# llama.cpp applying our LoRA file) and 2.7e-3 (f16: the weights rounded to float16 against our
# float32 model). The wide model's logits reach ~3: 0.8-1.1e-5 there (f32).
F32_TOL, F16_TOL, WIDE_F32_TOL = 1e-5, 1e-2, 3e-5


def qwen35(path, seed=0, **settings):
    """A tiny random qwen3_5 folder, ``settings`` over its text_config."""
    return write_arch_model(path, "qwen3_5", seed, text_config={**TEXT, **OWN, **settings})


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """(root, fused folder with model-f32.gguf, f16 GGUF, the mlx logits of base + LoRA)."""
    root = tmp_path_factory.mktemp("qwen35")
    base = qwen35(root / "base")
    adapter = random_lora(base, root / "adapter")
    ours = mlx_logits(base, adapter)
    assert np.abs(ours - mlx_logits(base)).max() > 0.05  # the adapter moves the logits
    folder = fuse(adapter, root / "fused", model=str(base), gguf="f32")
    f16 = write_model_gguf(folder, root / "model-f16.gguf", "f16")
    return root, folder, f16, ours


def test_llama_cpp_runs_our_fused_gguf_with_our_logits(fused):
    _, folder, f16, ours = fused
    f32 = folder / "model-f32.gguf"
    meta = {k: f.contents() for k, f in gguf.GGUFReader(str(f32)).fields.items()}
    assert meta["general.architecture"] == "qwen35"
    assert (meta["qwen35.ssm.group_count"], meta["qwen35.ssm.time_step_rank"]) == (2, 4)
    assert meta["qwen35.rope.dimension_count"] == 8 and meta["qwen35.rope.dimension_sections"] == [2, 1, 1, 0]
    np.testing.assert_allclose(llama_cpp_logits(f32), ours, rtol=0, atol=F32_TOL)
    np.testing.assert_allclose(llama_cpp_logits(f16), ours, rtol=0, atol=F16_TOL)


def test_the_value_heads_are_in_llama_cpps_order(fused):
    """llama.cpp pairs value head j with key head j % 2, mlx-lm with j // 2: the file holds value
    heads [0, 2, 1, 3] (tiled) where the model has [0, 1, 2, 3] (grouped)."""
    _, folder, _, _ = fused
    weights = mx.load(str(folder / "model.safetensors"))
    stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(folder / "model-f32.gguf")).tensors}
    z = np.array(weights["language_model.model.layers.0.linear_attn.in_proj_z.weight"]).reshape(4, 16, -1)
    np.testing.assert_array_equal(stored["blk.0.attn_gate.weight"].reshape(4, 16, -1), z[[0, 2, 1, 3]])
    a_log = np.array(weights["language_model.model.layers.0.linear_attn.A_log"])
    np.testing.assert_allclose(stored["blk.0.ssm_a"], -np.exp(a_log[[0, 2, 1, 3]]), rtol=1e-6)


def test_llama_cpp_applies_our_lora_gguf_to_the_base_with_our_logits(fused, tmp_path):
    from conftest import run_cli

    root, _, _, ours = fused
    base, adapter = root / "base", root / "adapter"
    done = run_cli("export", adapter, "--out", tmp_path / "lora", "--format", "gguf")
    assert done.returncode == 0, done.stderr
    lora = tmp_path / "lora" / "adapter.gguf"
    trained = {name.rsplit(".", 1)[0] for name in mx.load(str(adapter / "adapters.safetensors"))}
    kinds = {".".join(m.split(".")[-2:]) for m in trained}
    assert {"linear_attn.out_proj", "linear_attn.in_proj_qkv", "self_attn.q_proj"} <= kinds
    assert len(gguf.GGUFReader(str(lora)).tensors) == 2 * len(trained)
    f32 = write_model_gguf(base, tmp_path / "base-f32.gguf", "f32")
    theirs = isolated.call("native_llama_cpp:logits", str(f32), IDS, str(lora), library=LIBRARY, timeout=120)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=F32_TOL)


def test_our_gguf_reads_back_to_the_same_model(fused, tmp_path):
    _, folder, _, ours = fused
    out = convert_gguf(folder / "model-f32.gguf", tmp_path / "back", dequantize=True)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_5" and config["text_config"]["linear_num_value_heads"] == 4
    want, got = mx.load(str(folder / "model.safetensors")), mx.load(str(out / "model.safetensors"))
    assert set(got) == set(want)
    for name, w in want.items():
        if stored_value(name, config):  # -exp(A_log) in float32, read back as log(exp(A_log))
            np.testing.assert_allclose(np.array(got[name]), np.array(w), rtol=0, atol=2**-22, err_msg=name)
        else:
            np.testing.assert_array_equal(np.array(got[name]), np.array(w), err_msg=name)
    np.testing.assert_allclose(mlx_logits(out), mlx_logits(folder), rtol=0, atol=1e-5)


def test_the_cli_and_model_file_paths_read_it(fused, tmp_path, monkeypatch):
    from conftest import run_cli

    _, folder, _, _ = fused
    expected = mlx_logits(folder)
    done = run_cli("convert", folder / "model-f32.gguf", "--out", tmp_path / "out", "--dequantize")
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(mlx_logits(tmp_path / "out"), expected, rtol=0, atol=1e-5)
    monkeypatch.setenv("MLX_DFT_CACHE", str(tmp_path / "cache"))
    if mx.default_device() == mx.cpu:  # (a GPU keeps quantized types quantized: not these f32 ones)
        np.testing.assert_allclose(mlx_logits(folder / "model-f32.gguf"), expected, rtol=0, atol=1e-5)


def rewrite(src, dst, keys=None, tensors=None, keep_tensors=True):
    """A copy of the GGUF file ``src`` with metadata ``keys`` ({key: (ValueType, value)}, a list
    value an array of that type) and ``tensors`` ({name: float32 array}) set over its own."""
    header = read_header(src)
    keys = {
        **{k: (ValueType[t.removeprefix("ARRAY[").removesuffix("]")], header.metadata[k])
           for k, t in header.value_types.items()},
        **(keys or {}),
    }  # fmt: skip
    writer = GGUFWriter()
    for key, (kind, value) in keys.items():
        writer.add_array(key, kind, value) if isinstance(value, list) else writer.add(key, kind, value)
    arrays = {t.name: np.array(t.data, np.float32) for t in gguf.GGUFReader(str(src)).tensors if keep_tensors}
    arrays.update(tensors or {})
    for name, a in arrays.items():
        writer.add_tensor(name, a.shape, "F32", lambda a=a: a)
    return writer.write(dst)


def test_a_file_with_llama_cpps_draft_block_reads_as_the_model(fused, tmp_path, capsys):
    """llama.cpp's converter writes Qwen3.5's multi-token-prediction block by default (one more
    block, ``nextn_predict_layers`` 1): llama.cpp runs the model without it, and so do we."""
    _, folder, _, _ = fused
    f32 = folder / "model-f32.gguf"
    rng = np.random.default_rng(0)
    h, n = 64, 4
    shapes = {"attn_norm.weight": (h,), "post_attention_norm.weight": (h,), "attn_q.weight": (2 * 64, h),
              "attn_k.weight": (32, h), "attn_v.weight": (32, h), "attn_output.weight": (h, 64),
              "attn_q_norm.weight": (16,), "attn_k_norm.weight": (16,), "ffn_gate.weight": (96, h),
              "ffn_up.weight": (96, h), "ffn_down.weight": (h, 96), "nextn.eh_proj.weight": (h, 2 * h),
              "nextn.enorm.weight": (h,), "nextn.hnorm.weight": (h,),
              "nextn.shared_head_norm.weight": (h,)}  # fmt: skip
    draft = {f"blk.{n}.{k}": rng.normal(0, 0.05, s).astype(np.float32) for k, s in shapes.items()}
    keys = {"qwen35.block_count": (ValueType.UINT32, n + 1),
            "qwen35.nextn_predict_layers": (ValueType.UINT32, 1)}  # fmt: skip
    path = rewrite(f32, tmp_path / "mtp.gguf", keys, draft)
    np.testing.assert_allclose(llama_cpp_logits(path), llama_cpp_logits(f32), rtol=0, atol=1e-6)
    out = convert_gguf(path, tmp_path / "out", dequantize=True)
    note = "its 1 multi-token-prediction block(s) (llama.cpp's draft head) are left out"
    assert note in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["text_config"]["num_hidden_layers"] == n
    plain = convert_gguf(f32, tmp_path / "plain", dequantize=True)
    np.testing.assert_array_equal(mlx_logits(out), mlx_logits(plain))


@pytest.fixture(scope="module")
def wide_f32(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen35-wide")
    base = qwen35(root / "base", **WIDE)
    return base, write_model_gguf(base, root / "model-f32.gguf", "f32")


# llama.cpp's run of its own quantized file against ours of the same weights (checked equal to
# ggml's dequantization): llama.cpp multiplies K-quant blocks with 8-bit-quantized activations, we
# with float32 ones. Measured max |diff| / max |logit|: Q4_K_M 6.3%, Q6_K 7.8% (lfm2 5.6/5.1%,
# gemma3 5.7/7.7%); the proof of the reading is the weights and llama.cpp's run of an f32 file of them.
QUANT_REL_TOL = 0.12


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q6_K"])
def test_llama_cpp_quantized_files_read_as_llama_cpp_reads_them(wide_f32, ftype, tmp_path, capsys):
    base, f32 = wide_f32
    path = isolated.call("native_llama_cpp:quantize", str(f32), str(tmp_path / f"m.{ftype}.gguf"), ftype,
                         library=LIBRARY)  # fmt: skip
    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert {"Q6_K"} <= types and (ftype == "Q6_K" or "Q4_K" in types), types
    out = convert_gguf(path, tmp_path / "model", dequantize=True)
    config = json.loads((out / "config.json").read_text())
    reference = isolated.call("native_llama_cpp:dequantize", path, library=LIBRARY)
    ours = {to_gguf_name(k, "qwen3_5"): to_gguf_array(k, np.array(w), config)
            for k, w in mx.load(str(out / "model.safetensors")).items()}  # fmt: skip
    assert set(ours) == set(reference)
    for name, ref in reference.items():
        np.testing.assert_allclose(ours[name], ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max(), err_msg=name)
    logits = mlx_logits(out)
    again = write_model_gguf(out, tmp_path / "read-f32.gguf", "f32")
    np.testing.assert_allclose(llama_cpp_logits(again), logits, rtol=0, atol=WIDE_F32_TOL)
    theirs = llama_cpp_logits(path)
    err = np.abs(logits - theirs).max() / np.abs(theirs).max()
    assert err <= QUANT_REL_TOL, (ftype, err)
    # re-quantized to MLX's affine layers (--model FILE.gguf on a GPU): out_proj's reordered columns
    # moved as whole groups of 32 of the packed codes; measured 1.1% (Q4_K_M) and 5.1% (Q6_K, fitted
    # at 8 bits) of the logits' scale from the exact reading
    requantized = convert_gguf(path, tmp_path / "requantized", requantize=True)
    packed = mx.load(str(requantized / "model.safetensors"))
    assert "language_model.model.layers.0.linear_attn.out_proj.scales" in packed
    drift = np.abs(mlx_logits(requantized) - logits).max() / np.abs(logits).max()
    assert drift <= 0.1, (ftype, drift)


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_0"])
@pytest.mark.parametrize("wide", [True, False])
def test_quantized_files_stay_mlx_quantized_in_the_models_order(wide_f32, fused, gguf_type, wide, tmp_path):
    """Q8_0/Q4_0 files are MLX's own layout: read without dequantizing, the layers stay quantized,
    out_proj's columns reordered as whole groups of 32 of the packed codes where value heads are
    whole groups (64 wide), dequantized where they are not (16 wide). Every kept layer dequantizes
    to exactly the weight the float reading of the file gives, which llama.cpp's run of the file
    computes."""
    folder = wide_f32[0] if wide else fused[1]
    path = write_model_gguf(folder, tmp_path / f"m-{gguf_type}.gguf", gguf_type)
    kept = mx.load(str(convert_gguf(path, tmp_path / "kept") / "model.safetensors"))
    assert "language_model.model.layers.0.linear_attn.in_proj_qkv.scales" in kept
    assert ("language_model.model.layers.0.linear_attn.out_proj.scales" in kept) == wide
    floats_folder = convert_gguf(path, tmp_path / "floats", dequantize=True)
    floats = mx.load(str(floats_folder / "model.safetensors"))
    layers = [k[: -len(".scales")] for k in kept if k.endswith(".scales")]
    for layer in layers:  # (q4_0 files keep the output projection Q8_0: the width per layer)
        w, scales, biases = (kept[f"{layer}.{leaf}"] for leaf in ("weight", "scales", "biases"))
        bits = w.shape[-1] // scales.shape[-1]  # (a group of 32 values is ``bits`` packed words)
        values = mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32), 32, bits)
        np.testing.assert_array_equal(np.array(values), np.array(floats[f"{layer}.weight"]), err_msg=layer)
    theirs, ours = llama_cpp_logits(path), mlx_logits(floats_folder)
    assert np.abs(ours - theirs).max() <= QUANT_REL_TOL * np.abs(theirs).max()


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"rms_norm_eps": 1e-5}, r"l2-normalises the gated-delta q/k with the RMSNorm epsilon; .* 1e-05$"),
        ({"linear_value_head_dim": 32}, r"one gated-delta head size; .* keys have 16, its values 32"),
        ({"attention_bias": True}, r"llama.cpp's qwen35 has no attention biases"),
        ({"rope_parameters": {**TEXT["rope_parameters"], "mrope_section": [4, 0, 0]}},
         r"M-RoPE with mrope_section \[4, 0, 0\] would not rotate all 8 rotary dimensions"),
    ],
)  # fmt: skip
def test_models_llama_cpp_would_compute_differently_are_refused(tmp_path, settings, message):
    folder = qwen35(tmp_path / "m", **settings)
    with pytest.raises(UserError, match=message) as e:
        write_model_gguf(folder, tmp_path / "m.gguf", "f32")
    assert "\n" not in str(e.value) and not list(tmp_path.glob("*.gguf*"))


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"qwen35.attention.layer_norm_rms_epsilon": (ValueType.FLOAT32, 1e-5)},
         r"RMSNorm epsilon 1e-05 is llama.cpp's l2-norm epsilon too, mlx-lm's is 1e-06$"),
        ({"qwen35.rope.dimension_sections": (ValueType.UINT32, [4, 0, 0, 0])},
         r"M-RoPE sections \[4, 0, 0, 0\] rotate"),
        ({"qwen35.attention.recurrent_layers": (ValueType.BOOL, [True, True, True, False])},
         r"gated-delta layers \[0, 1, 2\] are not"),
        ({"qwen35.ssm.inner_size": (ValueType.UINT32, 60)}, r"gated-delta sizes do not fit \(inner size 60"),
    ],
)  # fmt: skip
def test_files_mlx_lm_would_compute_differently_are_refused(fused, tmp_path, keys, message):
    _, folder, _, _ = fused
    path = rewrite(folder / "model-f32.gguf", tmp_path / "odd.gguf", keys)
    with pytest.raises(UserError, match=message) as e:
        convert_gguf(path, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_a_growing_state_is_refused(fused, tmp_path):
    _, folder, _, _ = fused
    growing = {"blk.0.ssm_a": np.ones(4, np.float32)}
    path = rewrite(folder / "model-f32.gguf", tmp_path / "odd.gguf", tensors=growing)
    with pytest.raises(UserError, match=r"a positive ssm_a \(a growing state\)"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ tokenizer

# Letters with combining marks (decomposed accents, Devanagari vowel signs): Qwen3.5's split keeps
# them in the word ([\p{L}\p{M}]+), Qwen2's cuts the word before each mark
QWEN35_LINES = [
    "cafe\u0301 nai\u0308ve re\u0301sume\u0301 Zoe\u0308 \u0928\u092e\u0938\u094d\u0924\u0947 it's 2024",
    "e\u0301e\u0301e\u0301 o\u0302te\u0301 a\u0300 la\u0300 the\u0301a\u0302tre DON'T we've",
]


def test_qwen35_text_split_is_llama_cpps(fused, tmp_path):
    """``tokenizer.ggml.pre = qwen35``: our tokenizer rebuilt from the file splits text as
    llama.cpp does (its own tokenizer on the same file), and differently from qwen2's split."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from mlx_dft.gguf.tokenizer import build_tokenizer

    # a vocabulary trained without any split, so that its merges cross the words' edges
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)  # fmt: skip
    tok.train_from_iterator(QWEN35_LINES * 50, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    texts = [*QWEN35_LINES, "Ame\u0301lie\u0301 na\u0308a\u0308 1e\u03012"]
    _, folder, _, _ = fused
    seen = {}
    for pre in ("qwen35", "qwen2"):
        types = [3 if t == "<|endoftext|>" else 1 for t in tokens]
        keys = {"tokenizer.ggml.tokens": (ValueType.STRING, tokens),
                "tokenizer.ggml.merges": (ValueType.STRING, merges),
                "tokenizer.ggml.token_type": (ValueType.INT32, types),
                "tokenizer.ggml.pre": (ValueType.STRING, pre),
                "tokenizer.ggml.add_bos_token": (ValueType.BOOL, False),
                **{f"tokenizer.ggml.{k}_token_id": (ValueType.UINT32, 0) for k in ("bos", "eos", "padding")}}
        path = rewrite(folder / "model-f32.gguf", tmp_path / f"{pre}.gguf", keys, keep_tensors=False)
        ours, _ = build_tokenizer(read_header(path).metadata)
        ids = [ours.encode(text).ids for text in texts]
        assert ids == isolated.call("native_llama_cpp:tokenize", str(path), texts, library=LIBRARY), pre
        assert [ours.decode(i) for i in ids] == texts
        seen[pre] = ids
    assert seen["qwen35"] != seen["qwen2"]  # the texts tell the two splits apart
