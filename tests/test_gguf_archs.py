"""GGUF beyond the llama family: smollm3, phi3, gemma3_text, qwen3_moe, olmo2, granite,
ministral3, lfm2 and gpt_oss, written and read here, proven by llama.cpp itself
(llama-cpp-python, in a child process).

Per architecture, on tests/arch_models.py's tiny random models (mlx-lm's own classes):
- written: a random LoRA fused with ``fuse(..., gguf="f32")`` (and ``f16`` from the same folder)
  runs in llama.cpp with mlx_dft's logits of the model plus adapter; the LoRA itself exported as
  llama.cpp's LoRA GGUF and applied by llama.cpp to the f32 base gives them too;
- read: that file converted back computes the same logits (exactly; Gemma's norms within 2^-24);
- llama.cpp's files: its own quantizer makes Q4_K_M and Q6_K from our F32 file; every tensor
  we read equals ggml's own dequantization of it, and our logits are llama.cpp's to the
  precision llama.cpp computes quantized products at;
- refused: a GGUF of an architecture we do not cover, and a model llama.cpp would compute
  differently, each in one line naming it.
"""

import json
import re

import mlx.core as mx
import numpy as np
import pytest
from arch_models import CONFIGS, write_arch_model
from mlx.utils import tree_flatten

import isolated
import native_llama_cpp
from mlx_dft import api
from mlx_dft.errors import UserError
from mlx_dft.gguf.archs import ARCHS
from mlx_dft.gguf.convert import convert_gguf
from mlx_dft.gguf.export import write_model_gguf
from mlx_dft.gguf.names import plus_one, reordered_heads, stored_shape, to_gguf_name, to_gguf_rows
from mlx_dft.interop.fuse import fuse

gguf = pytest.importorskip("gguf")

COVERED = ["smollm3", "phi3", "gemma3_text", "qwen3_moe", "olmo2", "granite", "ministral3", "lfm2", "gpt_oss"]
# llama.cpp's smollm3 leaves RoPE out of every 4th layer (fixed in its loader, not in the file);
# its mistral3 has no sliding-window layers (ministral3 keeps Llama 4's attention temperature,
# which the 20 positions of IDS reach: original_max_position_embeddings is 8).
OVERRIDES = {
    "smollm3": {"no_rope_layer_interval": 4},
    "ministral3": {"layer_types": None, "sliding_window": None},
}
# K-quants are blocks of 256 values along a row: a width of 256 makes llama.cpp use them.
WIDE = {"hidden_size": 256, "intermediate_size": 256}
WIDE_EXTRA = {"qwen3_moe": {"moe_intermediate_size": 256}, "lfm2": {"block_dim": 256, "block_ff_dim": 256}}
IDS = [1, 5, 70, 256, 300, 301, 12, 99, 180, 7, 33, 41, 2, 77, 400, 3, 18, 250, 9, 64]
LIBRARY = isolated.library_version(native_llama_cpp.binding())

# Largest |logit difference| between llama.cpp and mlx_dft on our files (logits up to ~3).
# float32: measured 2e-7 to 1e-6, except Gemma 3: 2.5e-3, because llama.cpp's CPU GELU reads a
# float16 table (ggml-cpu/vec.h, GGML_GELU_FP16: input and output rounded to float16; emulating
# that table in mlx-lm's model brings it to 2.3e-4). float16: measured 1e-3 to 5e-3 (Gemma 1.4e-2),
# the rounding of the weights to float16 against our float32 model.
F32_TOL = {"gemma3_text": 1e-2}
F16_TOL = {"gemma3_text": 5e-2}
# llama.cpp's quantized files: llama.cpp multiplies K-quant blocks with 8-bit quantized activations
# (Q8_K), we with float32 ones, on the same weights (checked exactly against ggml's dequantizer).
# Measured (max |diff| / max |logit|, Q4_K_M / Q6_K): smollm3 2.1/2.1%, phi3 2.0/2.3%, olmo2
# 2.3/3.0%, granite 0.9/0.7%, ministral3 3.0/3.2%, lfm2 5.6/5.1%, gemma3 5.7/7.7% (its GELU table
# too); the mixtures of experts qwen3_moe 2.9/45% and gpt_oss 46/2.6%: the rounded activations
# send a token with two near-tied router scores to another expert. So the proof is the weights
# (equal to ggml's dequantization) and llama.cpp's own run of an f32 file of them, which gives
# our logits to the float32 tolerances above; this bound only says nothing else went wrong.
QUANT_REL_TOL = {"gemma3_text": 0.12, "lfm2": 0.12, "qwen3_moe": 0.6, "gpt_oss": 0.6}
QUANT_REL_TOL_DEFAULT = 0.06


def llama_cpp_logits(path, ids=IDS):
    # (a GGML_ASSERT on several threads can hang rather than abort: 2 minutes, not isolated's 10)
    return isolated.call("native_llama_cpp:logits", str(path), list(ids), None, library=LIBRARY, timeout=120)


def mlx_logits(model_path, adapter=None, ids=IDS):
    net, _ = api.load(str(model_path), adapter and str(adapter))
    return np.array(net(mx.array([ids]))[0].astype(mx.float32))


def random_lora(folder, out, seed=1):
    """An mlx-lm LoRA adapter (rank 4, every linear layer of every block, experts included) with
    random B, so that the fused model differs from the base by ~the base's own logit scale."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import SwitchLinear
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    model, _ = load(str(folder))
    model.freeze()
    # every linear layer of every kind of block (hybrids: lfm2, qwen3_5) but a router (mlx_dft
    # leaves routers frozen)
    linear = (nn.Linear, SwitchLinear)
    keys = sorted({k for layer in model.layers for k, m in layer.named_modules()
                   if isinstance(m, linear) and k != "mlp.gate"})  # fmt: skip
    params = {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": keys}
    n = len(model.layers)
    linear_to_lora_layers(model, n, params)
    rng = np.random.default_rng(seed)
    weights = {}
    for name, p in tree_flatten(model.trainable_parameters()):
        weights[name] = mx.array(rng.normal(0, 0.05, p.shape).astype(np.float32)) if "lora_b" in name else p
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    config = {"fine_tune_type": "lora", "num_layers": n, "lora_parameters": params, "base_model": str(folder)}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module", params=COVERED)
def fused(request, tmp_path_factory):
    """(model type, fused folder with model-f32.gguf, f16 GGUF, the mlx logits of base + LoRA)."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    base = write_arch_model(root / "base", kind, **OVERRIDES.get(kind, {}))
    adapter = random_lora(base, root / "adapter")
    ours = mlx_logits(base, adapter)
    assert np.abs(ours - mlx_logits(base)).max() > 0.05  # the adapter moves the logits (~0.1-1)
    folder = fuse(adapter, root / "fused", model=str(base), gguf="f32")
    f16 = write_model_gguf(folder, root / "model-f16.gguf", "f16")
    return kind, folder, f16, ours


def test_llama_cpp_runs_our_fused_gguf_with_our_logits(fused):
    kind, folder, f16, ours = fused
    f32 = folder / "model-f32.gguf"
    assert gguf.GGUFReader(str(f32)).fields["general.architecture"].contents() == ARCHS[kind].gguf
    np.testing.assert_allclose(llama_cpp_logits(f32), ours, rtol=0, atol=F32_TOL.get(kind, 1e-5))
    np.testing.assert_allclose(llama_cpp_logits(f16), ours, rtol=0, atol=F16_TOL.get(kind, 1e-2))


# llama.cpp applying our LoRA file (``export --format gguf``) to the f32 base, against mlx_dft's
# base + adapter: measured 2.4e-7 (granite) to 1.2e-6 (olmo2), Gemma 3 1.9e-3 (its GELU table);
# phi3's fused qkv_proj / gate_up_proj, qwen3_moe's and gpt_oss's experts (3-D LoRA tensors) and
# gpt_oss's router included.
def test_llama_cpp_applies_our_lora_gguf_to_the_base_with_our_logits(fused, tmp_path):
    from conftest import run_cli

    kind, folder, _, ours = fused
    base, adapter = folder.parent / "base", folder.parent / "adapter"  # (the fixture's folders)
    done = run_cli("export", adapter, "--out", tmp_path / "lora", "--format", "gguf")
    assert done.returncode == 0, done.stderr
    lora = tmp_path / "lora" / "adapter.gguf"
    reader = gguf.GGUFReader(str(lora))
    assert reader.fields["general.architecture"].contents() == ARCHS[kind].gguf
    trained = {name.rsplit(".", 1)[0] for name in mx.load(str(adapter / "adapters.safetensors"))}
    assert len(reader.tensors) == 2 * len(trained)  # every module's A and B, named for llama.cpp
    f32 = write_model_gguf(base, tmp_path / "base-f32.gguf", "f32")
    theirs = isolated.call("native_llama_cpp:logits", str(f32), IDS, str(lora), library=LIBRARY, timeout=120)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=F32_TOL.get(kind, 1e-5))


def test_our_gguf_reads_back_to_the_same_model(fused, tmp_path):
    kind, folder, _, ours = fused
    out = convert_gguf(folder / "model-f32.gguf", tmp_path / "back", dequantize=True)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == kind
    want, got = mx.load(str(folder / "model.safetensors")), mx.load(str(out / "model.safetensors"))
    assert set(got) == set(want)
    for name, w in want.items():
        if plus_one(name, config):  # stored as 1 + w in float32, read back as (1 + w) - 1
            np.testing.assert_allclose(np.array(got[name]), np.array(w), rtol=0, atol=2**-23)
        else:
            np.testing.assert_array_equal(np.array(got[name]), np.array(w), err_msg=name)
    fused_logits = mlx_logits(folder)  # (the fused weights, so float32 rounding apart from ``ours``)
    np.testing.assert_allclose(fused_logits, ours, rtol=0, atol=3e-5)  # gemma3: 1.3e-5 on an AMD EPYC
    atol = 1e-5 if ARCHS[kind].norm_plus_one else 0
    np.testing.assert_allclose(mlx_logits(out), fused_logits, rtol=0, atol=atol)


@pytest.fixture(scope="module", params=COVERED)
def wide_f32(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(f"{kind}-wide")
    sizes = {**WIDE, **WIDE_EXTRA.get(kind, {}), **OVERRIDES.get(kind, {})}
    base = write_arch_model(root / "base", kind, **sizes)
    return kind, base, write_model_gguf(base, root / "model-f32.gguf", "f32")


def to_gguf_space(hf_weights: dict, config: dict) -> dict:
    """Our converted weights as llama.cpp stores them (names, q/k row order, Gemma's 1 + w)."""
    out = {}
    for name, w in hf_weights.items():
        a = np.array(w.astype(mx.float32)).reshape(stored_shape(name, w.shape, config["model_type"]))
        if plus_one(name, config):
            a = a + np.float32(1)
        heads = reordered_heads(name, config)
        out[to_gguf_name(name, config["model_type"])] = a if heads is None else to_gguf_rows(a, heads)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q6_K"])
def test_llama_cpp_quantized_files_read_as_llama_cpp_reads_them(wide_f32, ftype, tmp_path):
    kind, base, f32 = wide_f32
    path = isolated.call("native_llama_cpp:quantize", str(f32), str(tmp_path / f"m.{ftype}.gguf"), ftype,
                         library=LIBRARY)  # fmt: skip
    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert {"Q6_K"} <= types and (ftype == "Q6_K" or "Q4_K" in types), types
    out = convert_gguf(path, tmp_path / "model", dequantize=True)
    config = json.loads((out / "config.json").read_text())
    # every tensor is ggml's own dequantization of the file's blocks (float32 arithmetic apart)
    reference = isolated.call("native_llama_cpp:dequantize", path, library=LIBRARY)
    ours = to_gguf_space(mx.load(str(out / "model.safetensors")), config)
    assert set(ours) == set(reference)
    for name, ref in reference.items():
        np.testing.assert_allclose(ours[name], ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max(), err_msg=name)
    # llama.cpp computes our logits from the weights we read (an f32 file of them)...
    logits = mlx_logits(out)
    again = write_model_gguf(out, tmp_path / "read-f32.gguf", "f32")
    np.testing.assert_allclose(llama_cpp_logits(again), logits, rtol=0, atol=F32_TOL.get(kind, 1e-5))
    # ...and from the quantized file, to the precision of its quantized products
    theirs = llama_cpp_logits(path)
    err = np.abs(logits - theirs).max() / np.abs(theirs).max()
    assert err <= QUANT_REL_TOL.get(kind, QUANT_REL_TOL_DEFAULT), (kind, ftype, err)
    # re-quantized to MLX's affine layers (--model FILE.gguf on a GPU): the function of the file's
    # weights up to the error said (Q4_K keeps its codes, Q6_K is fitted at 8 bits): measured 0.4-1.7%
    # of the logits' scale for Q4_K_M, 0.6-7.4% for Q6_K files (gemma3_text the most)
    req = mlx_logits(convert_gguf(path, tmp_path / "requantized", requantize=True))
    drift = np.abs(req - logits).max() / np.abs(logits).max()
    assert drift <= 0.1, (kind, ftype, drift)


def test_the_cli_and_model_file_paths_read_a_new_architecture(fused, tmp_path, monkeypatch):
    """``mlx_dft convert FILE.gguf`` and ``--model FILE.gguf`` (mlx_dft.load through the cache)
    give the fused model's logits (float32 conversion on this CPU)."""
    from conftest import run_cli

    kind, folder, _, _ = fused
    expected = mlx_logits(folder)
    done = run_cli("convert", folder / "model-f32.gguf", "--out", tmp_path / "out", "--dequantize")
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(mlx_logits(tmp_path / "out"), expected, rtol=0, atol=1e-5)
    monkeypatch.setenv("MLX_DFT_CACHE", str(tmp_path / "cache"))
    if mx.default_device() == mx.cpu:  # (a GPU keeps quantized types quantized: not these f32 ones)
        np.testing.assert_allclose(mlx_logits(folder / "model-f32.gguf"), expected, rtol=0, atol=1e-5)


# transformers' GGUF loader (an independent reader) takes a gemma3 file's query scale and layer
# pattern from its defaults (256, every 6th layer global), not the file: a Gemma 3 1B-shaped head.
HF_SHAPES = {"gemma3_text": {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window_pattern": 6,
                             "num_hidden_layers": 6, "sliding_window": 5}}  # fmt: skip


@pytest.mark.parametrize("kind", ["phi3", "lfm2", "gemma3_text"])
def test_transformers_gguf_loader_reads_our_file_as_our_model(kind, tmp_path):
    """Where transformers (pinned) reads the architecture's GGUF: our model's logits within 1e-4
    (measured 7e-7 phi3, 1e-6 lfm2, 1.3e-5 gemma3). Its qwen3moe and gpt-oss readers leave the
    expert width at their defaults (the file's expert_feed_forward_length unread), so not those."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = write_arch_model(tmp_path / "m", kind, **HF_SHAPES.get(kind, {}))
    (tmp_path / "g").mkdir()
    write_model_gguf(folder, tmp_path / "g" / "m.gguf", "f32")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "g"), gguf_file="m.gguf", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([IDS])).logits[0].numpy()
    np.testing.assert_allclose(theirs, mlx_logits(folder), rtol=0, atol=1e-4)


# YaRN as the published gpt-oss checkpoints have it (truncate false: mlx-lm and llama.cpp both
# truncate the correction range), an original context short enough to matter on these shapes.
YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "original_max_position_embeddings": 16, "truncate": False}  # fmt: skip


# as the published Ministral 3 checkpoints have it (mscale 1, mscale_all_dim 1: magnitude 1), and a
# value where mlx-lm's magnitude m(1) / m(mscale_all_dim) is neither 1 nor m(1) (llama.cpp reads
# mscale_all_dim for mistral3 only: llama and qwen3 files with it gave other logits, and are refused)
ALL_DIMS = {"mscale": 1.0, "mscale_all_dim": 1.0}


@pytest.mark.parametrize(
    "kind,extra",
    [("llama", {}), ("qwen3", {}), ("gpt_oss", {}), ("ministral3", {}), ("ministral3", ALL_DIMS),
     ("ministral3", {"mscale": 1.0, "mscale_all_dim": 0.5})],
)  # fmt: skip
def test_yarn_rope_scaling_is_written_and_read_as_llama_cpp_computes_it(kind, extra, tmp_path):
    yarn = {**YARN, **extra}
    if kind == "ministral3":  # (its RoPE, scaling included, is read from rope_parameters)
        overrides = {**OVERRIDES[kind], "rope_parameters": {**CONFIGS[kind]["rope_parameters"], **yarn}}
    else:
        overrides = {"rope_scaling": yarn}
    folder = write_arch_model(tmp_path / "yarn", kind, **overrides)
    plain = mlx_logits(write_arch_model(tmp_path / "plain", kind, **OVERRIDES.get(kind, {})))
    ours = mlx_logits(folder)
    assert np.abs(ours - plain).max() > 0.1  # YaRN changes these logits
    path = write_model_gguf(folder, tmp_path / "m.gguf", "f32")
    meta = {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()}
    arch = ARCHS[kind].gguf
    assert meta[f"{arch}.rope.scaling.type"] == "yarn" and meta[f"{arch}.rope.scaling.factor"] == 32.0
    assert meta.get(f"{arch}.rope.scaling.yarn_log_multiplier") == extra.get("mscale_all_dim")
    if extra:  # the magnitude moves these logits: the key is needed
        key = "rope_parameters" if kind == "ministral3" else "rope_scaling"
        without = {k: v for k, v in overrides[key].items() if k != "mscale_all_dim"}
        other = write_arch_model(tmp_path / "m1", kind, **{**overrides, key: without})
        assert np.abs(mlx_logits(other) - ours).max() > 1e-2
    np.testing.assert_allclose(llama_cpp_logits(path), ours, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(mlx_logits(convert_gguf(path, tmp_path / "back", dequantize=True)), ours)


def test_a_yarn_file_llama_cpp_would_read_otherwise_is_refused(tmp_path, monkeypatch):
    """A file whose YaRN names another beta than llama.cpp's default (mistral3 reads it) is
    refused when read: mlx-lm's YaRN would compute another correction range."""
    import dataclasses

    from mlx_dft.gguf import archs

    beta = {"{arch}.rope.scaling.yarn_beta_fast": 16.0}
    monkeypatch.setitem(archs.ARCHS, "llama", dataclasses.replace(archs.ARCHS["llama"], write=lambda c: beta))
    path = write_model_gguf(write_arch_model(tmp_path / "m", "llama", rope_scaling=YARN), tmp_path / "m.gguf")
    monkeypatch.undo()
    with pytest.raises(UserError, match=r"^GGUF YaRN with rope.scaling.yarn_beta_fast = 16.0 is not"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ refusals


def test_an_architecture_we_do_not_cover_is_refused_in_one_line(tmp_path):
    from test_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "m.gguf", file_arch="gemma3n")
    with pytest.raises(UserError, match=r"^GGUF architecture 'gemma3n' is not supported \(supported: ") as e:
        convert_gguf(path, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def uncovered_model(path):
    """A model of a type mlx-lm loads and GGUF does not cover (helium: llama's layout)."""
    from conftest import write_model

    return write_model(path, {**CONFIGS["llama"], "model_type": "helium", "attention_bias": False,
                              "mlp_bias": False, "head_dim": 16}, 0)  # fmt: skip


def test_a_model_type_we_do_not_write_is_refused_in_one_line(tmp_path):
    folder = uncovered_model(tmp_path / "m")
    refusal = r"^GGUF export supports model types .*; this model is 'helium'$"
    with pytest.raises(UserError, match=refusal):
        write_model_gguf(folder, tmp_path / "m.gguf", "f32")
    assert not list(tmp_path.glob("*.gguf*"))


@pytest.mark.parametrize("a_shape, b_shape, message", [
    ((4, 2, 64), (3, 32, 2), r"lora_a \(4, 2, 64\) and lora_b \(3, 32, 2\) do not make a LoRA pair"),
    ((4, 2, 64), (32, 2), r"do not make a LoRA pair"),
    ((4, 2, 64), (4, 32, 3), r"do not make a LoRA pair"),
])  # fmt: skip
def test_expert_lora_tensors_that_do_not_pair_are_refused(a_shape, b_shape, message):
    """Stacked experts' A (experts, rank, in) and B (experts, out, rank): as many experts in both,
    one rank, in a block the model has."""
    from mlx_dft.gguf.adapter import lora_tensors

    config = {**CONFIGS["qwen3_moe"], "num_hidden_layers": 2}
    module = "model.layers.0.mlp.switch_mlp.gate_proj"
    weights = {f"{module}.lora_a": mx.zeros(a_shape), f"{module}.lora_b": mx.zeros(b_shape)}
    with pytest.raises(UserError, match=message):
        lora_tensors(weights, {"rank": 2, "scale": 1.0}, config)
    far = {k.replace("layers.0.", "layers.2."): mx.zeros((4, 2, 64) if k.endswith("a") else (4, 32, 2))
           for k in weights}  # fmt: skip
    with pytest.raises(UserError, match=r"switch_mlp.gate_proj: the model has 2 blocks"):
        lora_tensors(far, {"rank": 2, "scale": 1.0}, config)


def test_a_lora_of_a_model_type_we_do_not_write_is_refused_in_one_line(tmp_path):
    from conftest import run_cli

    folder = uncovered_model(tmp_path / "m")
    adapter = random_lora(folder, tmp_path / "adapter")
    done = run_cli("export", adapter, "--out", tmp_path / "lora", "--format", "gguf")
    assert done.returncode != 0
    line = r"GGUF LoRA export supports model types .*qwen3, smollm3.*; this model is 'helium'$"
    assert re.search(line, done.stderr.strip().splitlines()[-1]), done.stderr
    assert not (tmp_path / "lora").exists()


@pytest.mark.parametrize(
    "kind, overrides, message",
    [
        ("smollm3", {"no_rope_layer_interval": 2}, "llama.cpp's smollm3 leaves RoPE out of every 4th layer"),
        ("gemma3_text", {"query_pre_attn_scalar": 32}, "llama.cpp's gemma3 scales queries by the head size"),
        ("qwen3_moe", {"norm_topk_prob": False}, "renormalises the top-k expert weights"),
        ("qwen3_moe", {"mlp_only_layers": [1]}, r"has experts in every layer; layers \[1\] are dense"),
        ("ministral3", {}, r"llama.cpp's mistral3 has no sliding-window attention; layers \[0\] slide"),
        ("gpt_oss", {"layer_types": ["full_attention", "sliding_attention"]}, r"sliding first; this model's"),
        ("llama", {"rope_scaling": {**YARN, "beta_fast": 16.0}}, r"YaRN with \{'beta_fast': 16.0\} is not"),
        ("qwen3", {"rope_scaling": {**YARN, **ALL_DIMS}},
         r"YaRN with mscale_all_dim 1.0 is not written to GGUF for qwen3 \(llama.cpp reads its magnitude"),
    ],
)
def test_models_llama_cpp_would_compute_differently_are_refused(tmp_path, kind, overrides, message):
    folder = write_arch_model(tmp_path / "m", kind, **overrides)
    with pytest.raises(UserError, match=message) as e:
        write_model_gguf(folder, tmp_path / "m.gguf", "f32")
    assert "\n" not in str(e.value) and not list(tmp_path.glob("*.gguf*"))


def test_tensor_names_are_gguf_pys_for_the_architecture():
    """Every parameter of each covered model has a name in gguf-py's tables for its GGUF
    architecture (what llama.cpp's loader looks up), and no two share one."""
    from arch_models import CONFIGS
    from mlx_lm.utils import _get_classes

    for kind in COVERED:
        cfg = {**CONFIGS[kind], **OVERRIDES.get(kind, {})}
        model_cls, args_cls = _get_classes(cfg)
        params = dict(tree_flatten(model_cls(args_cls.from_dict(cfg)).parameters()))
        arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == ARCHS[kind].gguf)
        allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
        names = [to_gguf_name(p, kind) for p in params]
        assert None not in names and len(set(names)) == len(names), (kind, names)
        for name in names:
            stem = name.rsplit(".", 1)[0]
            assert any(stem == t.format(bid=i) for t in allowed for i in range(8)), (kind, name)
