"""GGUF out: fused models and LoRA adapters written for llama.cpp, checked with readers we did not
write: the ``gguf`` package (llama.cpp's own Python reader and reference quantizers),
transformers' GGUF loader on torch CPU, and llama.cpp itself where its Python bindings load."""

import json
import shutil
import struct

import mlx.core as mx
import numpy as np
import pytest

import isolated
import mlx_dft
import native_llama_cpp
from conftest import BUNDLED, ROOT, llama_config, run_cli, write_model
from mlx_dft import api
from mlx_dft.errors import UserError
from mlx_dft.gguf import quants
from mlx_dft.gguf.export import write_model_gguf
from mlx_dft.gguf.names import to_gguf_name, to_hf_rows
from mlx_dft.gguf.writer import GGUFWriter, ValueType
from mlx_dft.interop import convert
from mlx_dft.interop.fuse import fuse

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TYPES = ("f32", "f16", "q8_0", "q4_0")
# Largest and mean |logit difference| to mlx_dft's float32 model allowed in transformers, per type,
# on the bundled model with a gently trained LoRA (logits up to ~20, standard deviation ~5).
# Measured: f32 2.1e-5 / 1.9e-6, f16 4.8e-3 / 7.0e-4, q8_0 0.16 / 0.020, q4_0 2.6 / 0.21 (a 3M-parameter
# model is far more sensitive to 4 bits than a real one); the bounds leave 2-5x room. The quantized
# files are proven exactly by test_each_quantized_tensor_is_the_reference_encoding_of_the_f32_one.
TOLERANCE = {"f32": (1e-4, 1e-5), "f16": (2e-2, 2e-3), "q8_0": (0.5, 0.05), "q4_0": (6.0, 0.5)}
TEXT = "Question: Mia has 23 apples. She buys 15 more. How many apples does Mia have now?\nAnswer:"
FAST = dict(iters=3, batch_size=4, learning_rate=3e-2, progress=False, steps_per_report=3)
SMOLLM2 = ROOT / "models" / "smollm2-135m-instruct" / "float32"


def fields(path) -> dict:
    """{key: value} of a GGUF file's metadata, as gguf's reader decodes it."""
    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()}


def hf_gguf(path):
    """transformers' model from the GGUF file alone (in a folder of its own)."""
    folder = path.parent / f"{path.stem}-alone"
    folder.mkdir(exist_ok=True)
    shutil.copy(path, folder / path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval(), folder


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.numpy()[0]


def mlx_logits(model_path, ids, adapter=None):
    net, _ = api.load(str(model_path), adapter)
    return np.array(net(mx.array([ids])))[0]


def ids_of(text, folder=BUNDLED):
    return transformers.AutoTokenizer.from_pretrained(str(folder))(text)["input_ids"]


# ------------------------------------------------------------------ the container and the encodings


def test_metadata_of_every_type_reads_back(tmp_path):
    w = GGUFWriter()
    scalars = {
        ValueType.UINT8: 200,
        ValueType.INT8: -100,
        ValueType.UINT16: 60000,
        ValueType.INT16: -30000,
        ValueType.UINT32: 4_000_000_000,
        ValueType.INT32: -2_000_000_000,
        ValueType.FLOAT32: 0.5,
        ValueType.BOOL: True,
        ValueType.STRING: "héllo, wörld",
        ValueType.UINT64: 2**60,
        ValueType.INT64: -(2**60),
        ValueType.FLOAT64: 1e-300,
    }
    for vtype, value in scalars.items():
        w.add(f"s.{vtype.name}", vtype, value)
    arrays = {
        ValueType.INT32: [1, -2, 3],
        ValueType.FLOAT32: [0.25, -1.5],
        ValueType.BOOL: [True, False, True],
        ValueType.STRING: ["a", "Ġb c", ""],
        ValueType.UINT8: [],
    }
    for vtype, values in arrays.items():
        w.add_array(f"a.{vtype.name}", vtype, values)
    w.add_tensor("t", (2, 64), "F32", lambda: np.ones((2, 64)))
    path = w.write(tmp_path / "x.gguf")
    reader = gguf.GGUFReader(str(path))
    for vtype, value in scalars.items():
        field = reader.fields[f"s.{vtype.name}"]
        assert field.types == [gguf.GGUFValueType(int(vtype))]
        assert field.contents() == value
    for vtype, values in arrays.items():
        field = reader.fields[f"a.{vtype.name}"]
        assert field.types[0] == gguf.GGUFValueType.ARRAY
        assert field.contents() == values
    with pytest.raises(ValueError, match="duplicate"):
        w.add("s.UINT8", ValueType.UINT8, 1)


def test_tensors_are_aligned_and_shaped_as_gguf_reads_them(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "odd": (rng.normal(size=(3, 5)), "F32"),  # 60 bytes: the next tensor needs padding
        "half": (rng.normal(size=(7,)), "F16"),
        "q8": (rng.normal(size=(4, 64)), "Q8_0"),
        "q4": (rng.normal(size=(2, 3, 32)), "Q4_0"),
    }
    w = GGUFWriter()
    w.add_string("general.architecture", "llama")
    for name, (a, t) in arrays.items():
        w.add_tensor(name, a.shape, t, lambda a=a: a)
    path = w.write(tmp_path / "t.gguf")
    raw = path.read_bytes()
    assert raw[:4] == b"GGUF" and struct.unpack_from("<IQQ", raw, 4) == (3, 4, 1)
    reader = gguf.GGUFReader(str(path))
    assert reader.data_offset % 32 == 0
    for t in reader.tensors:
        a, kind = arrays[t.name]
        assert t.data_offset % 32 == 0
        assert t.tensor_type.name == kind and tuple(reversed(t.shape.tolist())) == a.shape
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(a.shape)
        np.testing.assert_array_equal(got, quants.decode(bytes(t.data), kind, a.shape))
    with pytest.raises(UserError, match="multiple of 32"):
        w.add_tensor("bad", (2, 40), "Q8_0", lambda: np.zeros((2, 40)))


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "F16"])
def test_encoders_match_llama_cpps_reference_quantizers_bit_for_bit(kind):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 256)).astype(np.float32)
    x[0, :32] = 0  # an all-zero block
    halves = np.resize([0.5, -0.5, 2.5, -3.5, 6.5], 31)
    x[1, :32] = [127, *halves]  # Q8_0 scale 1: exact rounding ties
    x[2, :32] = [-8, *halves]  # Q4_0 scale 1: exact rounding ties
    x[3, :32] = 3.0  # equal magnitudes: the first one sets Q4_0's sign
    x[4, 32:64] = -x[4, 32:64].max() * np.linspace(-1, 1, 32)
    ours = np.frombuffer(quants.encode(x, kind), dtype=np.uint8)
    reference = gguf.quants.quantize(x, gguf.GGMLQuantizationType[kind]).view(np.uint8).reshape(-1)
    np.testing.assert_array_equal(ours, reference)


# ------------------------------------------------------------------ fused models


@pytest.fixture(scope="module")
def trained(arith_data, tmp_path_factory):
    """The bundled tiny LLaMA (byte-level BPE, grouped-query attention) with a LoRA trained on
    every linear layer of every block (it moves the logits by up to ~14)."""
    out = tmp_path_factory.mktemp("gguf") / "run"
    return mlx_dft.train(
        model=str(BUNDLED),
        data=str(arith_data),
        output=str(out),
        lora_rank=4,
        num_layers=-1,
        **{**FAST, "learning_rate": 3e-3},
    ).output


@pytest.fixture(scope="module")
def fused(trained, tmp_path_factory):
    """{type: GGUF file} of the fused model, and the fused Hugging Face folder under "folder"."""
    root = tmp_path_factory.mktemp("fused")
    folder = fuse(trained, root / "fused", gguf="f32")
    files = {"folder": folder, "f32": folder / "model-f32.gguf"}
    for t in TYPES[1:]:
        files[t] = write_model_gguf(folder, root / f"model-{t}.gguf", t)
    return files


@pytest.mark.slow
def test_fused_gguf_reads_back_with_llama_cpp_conventions(fused):
    folder = fused["folder"]
    config = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    meta = fields(fused["q4_0"])
    assert meta["general.architecture"] == "llama" and meta["general.type"] == "model"
    assert meta["general.file_type"] == 2 and meta["general.quantization_version"] == 2
    expected = {
        "llama.block_count": 4,
        "llama.embedding_length": 256,
        "llama.feed_forward_length": 768,
        "llama.attention.head_count": 8,
        "llama.attention.head_count_kv": 4,
        "llama.context_length": 512,
        "llama.rope.dimension_count": 32,
        "llama.vocab_size": 512,
    }
    assert {k: meta[k] for k in expected} == expected
    assert meta["llama.rope.freq_base"] == 10000.0
    assert abs(meta["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-10
    # the tokenizer: every id's text, special tokens typed control, merges as "a b" in rank order
    vocab = {i: t for t, i in tok["model"]["vocab"].items()}
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.ggml.tokens"] == [vocab[i] for i in range(512)]
    assert meta["tokenizer.ggml.token_type"] == [3] * 4 + [1] * 508
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in tok["model"]["merges"]]
    ids = {k: meta[f"tokenizer.ggml.{k}"] for k in ("bos_token_id", "eos_token_id", "padding_token_id")}
    assert ids == {"bos_token_id": 1, "eos_token_id": 2, "padding_token_id": 0}
    assert meta["tokenizer.ggml.unknown_token_id"] == 3
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    # tensors: GGUF names, no output.weight (tied), 1-D in F32, the tied output projection in Q8_0
    weights = mx.load(str(folder / "model.safetensors"))
    reader = gguf.GGUFReader(str(fused["q4_0"]))
    got = {t.name: (t.tensor_type.name, tuple(reversed(t.shape.tolist()))) for t in reader.tensors}
    want = {to_gguf_name(k): tuple(v.shape) for k, v in weights.items()}
    assert {k: s for k, (_, s) in got.items()} == want and "output.weight" not in got
    for name, (kind, shape) in got.items():
        assert kind == ("F32" if len(shape) == 1 else "Q8_0" if name == "token_embd.weight" else "Q4_0")
    assert config["tie_word_embeddings"] is True


@pytest.mark.parametrize("kind", TYPES)
def test_transformers_loads_the_fused_gguf_with_our_logits(fused, kind):
    ids = ids_of(TEXT)
    ours = mlx_logits(fused["folder"], ids)
    model, _ = hf_gguf(fused[kind])
    theirs = torch_logits(model, ids)
    err = np.abs(theirs - ours)
    assert err.max() <= TOLERANCE[kind][0] and err.mean() <= TOLERANCE[kind][1], (kind, err.max(), err.mean())
    if kind != "q4_0":
        assert (theirs.argmax(-1) == ours.argmax(-1)).all()
    else:
        # 4-bit rounding moves some top-1 tokens of a sharp model (the bundled one: ~10% of
        # positions); the file itself must read the same in both: ours from the same GGUF
        same_file = mlx_logits(fused[kind], ids)
        np.testing.assert_allclose(theirs, same_file, atol=1e-3)
        assert (theirs.argmax(-1) == same_file.argmax(-1)).all()


@pytest.mark.parametrize("kind", TYPES[1:])
def test_each_quantized_tensor_is_the_reference_encoding_of_the_f32_one(fused, kind):
    """The f32 file is proven by its logits; every other type holds, byte for byte, what llama.cpp's
    own reference quantizers make of the f32 file's tensors (the type chosen per tensor as
    documented)."""
    f32 = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(fused["f32"])).tensors}
    for t in gguf.GGUFReader(str(fused[kind])).tensors:
        source = f32[t.name]
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            assert source.ndim == 1, t.name  # every matrix here has rows of a multiple of 32
            np.testing.assert_array_equal(np.array(t.data), source)
            continue
        expected = gguf.quants.quantize(source, t.tensor_type)
        np.testing.assert_array_equal(np.array(t.data).reshape(expected.shape), expected, err_msg=t.name)


def test_the_gguf_tokenizer_encodes_as_the_original_in_transformers(fused):
    _, alone = hf_gguf(fused["f32"])
    theirs = transformers.AutoTokenizer.from_pretrained(str(alone), gguf_file="model-f32.gguf")
    ours = transformers.AutoTokenizer.from_pretrained(str(fused["folder"]))
    for text in (TEXT, "  two  spaces\n\nand 12,345 digits; café ½", "<s> x </s>"):
        assert theirs(text)["input_ids"] == ours(text)["input_ids"], text


ARCHS = {
    "llama": llama_config(),
    "mistral": {**llama_config(), "model_type": "mistral", "architectures": ["MistralForCausalLM"]},
    "qwen2": {**llama_config(tie_word_embeddings=False), "model_type": "qwen2"},
    # head_dim 128 as every Qwen3 has: transformers' GGUF loader ignores qwen3.attention.key_length
    "qwen3": {**llama_config(head_dim=128), "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]},
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_architecture_loads_in_transformers_with_our_logits(arch, tmp_path):
    """Grouped-query attention everywhere; qwen2 with k/v biases and an untied head, qwen3 with a
    head size other than hidden / heads and q/k norms; llama/mistral with reordered q/k rows."""
    folder = write_model(tmp_path / f"tiny-{arch}", ARCHS[arch])  # (a GGUF named just "mistral"
    # sends transformers to an architecture gguf-py lacks)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    path = write_model_gguf(folder, tmp_path / "m.gguf", "f32")
    meta = fields(path)
    assert meta["tokenizer.chat_template"] == template
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert ("output.weight" in names) == (arch == "qwen2")
    assert ("blk.0.attn_q.bias" in names) == (arch == "qwen2")
    assert ("blk.0.attn_q_norm.weight" in names) == (arch == "qwen3")
    ids = [1, 40, 41, 42, 43, 44, 45, 46, 47, 300, 20]
    model, _ = hf_gguf(path)
    np.testing.assert_allclose(torch_logits(model, ids), mlx_logits(folder, ids), atol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.is_dir(), reason=f"{SMOLLM2} absent (made by the GGUF import script)")
def test_smollm2_round_trips_through_gguf(tmp_path):
    """A real model that came from a GGUF file goes back with llama.cpp's own tokenizer metadata."""
    path = write_model_gguf(SMOLLM2, tmp_path / "smollm2-f16.gguf", "f16")
    meta = fields(path)
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.ggml.model"] == "gpt2"
    assert len(meta["tokenizer.ggml.tokens"]) == 49152 and meta["tokenizer.ggml.add_bos_token"] is False
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    assert meta["llama.attention.head_count_kv"] == 3 and meta["llama.block_count"] == 30
    tok = transformers.AutoTokenizer.from_pretrained(str(SMOLLM2))
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], tokenize=False)
    model, alone = hf_gguf(path)
    theirs_tok = transformers.AutoTokenizer.from_pretrained(str(alone), gguf_file=path.name)
    for text in (chat, "Tom has 5 apples and buys 3 more. 5 + 3 = 8.", "  spaces  and ünïcode ✓"):
        assert theirs_tok(text)["input_ids"] == tok(text)["input_ids"], text
    ids = tok(chat)["input_ids"]
    ours = mlx_logits(SMOLLM2, ids)
    theirs = torch_logits(model, ids)
    assert np.abs(theirs - ours).max() <= 0.05 and (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.9
    assert len(ids) <= 64  # llama.cpp's context below
    cpp = llama_cpp_logits(path, ids)  # and llama.cpp itself (skips without its bindings)
    # llama.cpp's CPU f16 products also round the activations to f16: measured max 0.079, mean
    # 0.013 on logits of magnitude ~35, the same top token everywhere.
    err = np.abs(cpp - ours)
    assert err.max() <= 0.15 and err.mean() <= 0.02 and (cpp.argmax(-1) == ours.argmax(-1)).mean() >= 0.95


def test_a_qlora_fuses_into_gguf_from_dequantized_weights(tiny_model_4bit, arith_data, tmp_path, capsys):
    run = mlx_dft.train(model=str(tiny_model_4bit), data=str(arith_data), output=str(tmp_path / "q"), **FAST)
    out = fuse(run.output, tmp_path / "fused", gguf="f32")
    assert "the quantized base is dequantized" in capsys.readouterr().err
    assert "quantization" not in json.loads((out / "config.json").read_text())
    ids = [1, 40, 41, 42, 43, 44, 45, 46, 47]
    model, _ = hf_gguf(out / "model-f32.gguf")
    np.testing.assert_allclose(
        torch_logits(model, ids), mlx_logits(tiny_model_4bit, ids, run.output), atol=1e-4
    )


# ------------------------------------------------------------------ LoRA adapters


def lora_check(adapter_gguf, fused_folder, base_folder, config):
    """Rebuild every adapted weight from the GGUF adapter (W + alpha/r * b a, rows back in HF order)
    and compare it with the fused model's weight."""
    reader = gguf.GGUFReader(str(adapter_gguf))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    alpha = meta["adapter.lora.alpha"]
    tensors = {t.name: np.array(t.data).reshape(tuple(reversed(t.shape.tolist()))) for t in reader.tensors}
    base = mx.load(str(next(base_folder.glob("model*.safetensors"))))
    fused = mx.load(str(fused_folder / "model.safetensors"))
    hf_names = {to_gguf_name(k): k for k in fused}
    checked = 0
    for name, a in tensors.items():
        if not name.endswith(".lora_a"):
            continue
        target = name[: -len(".lora_a")]
        b = tensors[target + ".lora_b"]
        hf = hf_names[target]
        w = np.array(base[hf].astype(mx.float32))
        assert a.shape == (a.shape[0], w.shape[1]) and b.shape == (w.shape[0], a.shape[0])
        delta = alpha / a.shape[0] * (b @ a)
        if ".q_proj." in hf or ".k_proj." in hf:
            if config["model_type"] in ("llama", "mistral"):
                key = "num_attention_heads" if ".q_proj." in hf else "num_key_value_heads"
                delta = to_hf_rows(delta, config[key])
        np.testing.assert_allclose(w + delta, np.array(fused[hf]), atol=1e-5, err_msg=hf)
        checked += 1
    return meta, checked


def test_lora_gguf_rebuilds_the_fused_weights(trained, fused):
    out = convert.export_adapter(trained, fused["folder"].parent / "lora-gguf", fmt="gguf")
    assert sorted(p.name for p in out.iterdir()) == ["adapter.gguf", "mlx_dft_run.json"]
    config = json.loads((BUNDLED / "config.json").read_text())
    meta, checked = lora_check(out / "adapter.gguf", fused["folder"], BUNDLED, config)
    assert checked == 4 * 7 and meta["general.architecture"] == "llama"
    assert meta["adapter.lora.alpha"] == 20.0 * 4  # llama.cpp's scale alpha / r = our scale 20


def test_lora_gguf_folds_per_module_scales(arith_data, tmp_path):
    """An adapter whose modules differ in scale (as PEFT alpha patterns import) still computes each
    module's own scale * (x A) B under llama.cpp's one alpha per file."""
    folder = write_model(tmp_path / "qwen2", ARCHS["qwen2"])
    run = mlx_dft.train(model=str(folder), data=str(arith_data), output=str(tmp_path / "run"), **FAST)
    cfg_path = run.output / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    module = "model.layers.1.self_attn.v_proj"
    cfg["lora_parameters"]["module_scales"] = {module: 3.5}
    cfg_path.write_text(json.dumps(cfg))
    out = convert.export_adapter(run.output, tmp_path / "gguf", fmt="gguf")
    fused_dir = fuse(run.output, tmp_path / "fused")
    config = json.loads((folder / "config.json").read_text())
    meta, checked = lora_check(out / "adapter.gguf", fused_dir, folder, config)
    assert checked > 0 and meta["general.architecture"] == "qwen2"


# ------------------------------------------------------------------ llama.cpp itself


def llama_cpp_logits(model_path, ids, lora=None):
    """Logits of every position, as llama.cpp computes them (float32 KV cache, no flash attention,
    plain CPU kernels, so the float32 file can be held to float32 tolerances), in a child process:
    a crash inside llama.cpp fails the calling test with its signal and llama.cpp's version."""
    dist = native_llama_cpp.binding()
    return isolated.call(
        "native_llama_cpp:logits", str(model_path), list(ids), lora and str(lora),
        library=isolated.library_version(dist),
    )


def test_llama_cpp_runs_the_fused_model_and_the_lora_with_our_logits(trained, fused, tmp_path):
    ids = ids_of(TEXT)
    ours = mlx_logits(fused["folder"], ids)
    np.testing.assert_allclose(llama_cpp_logits(fused["f32"], ids), ours, atol=1e-4)
    for kind in TYPES[1:]:  # llama.cpp decodes our f16, q8_0 and q4_0 encodings as we meant them
        err = np.abs(llama_cpp_logits(fused[kind], ids) - ours)
        assert err.max() <= TOLERANCE[kind][0] and err.mean() <= TOLERANCE[kind][1], (kind, err.max())
    base = write_model_gguf(BUNDLED, tmp_path / "base-f32.gguf", "f32")
    lora = convert.export_adapter(trained, tmp_path / "lora", fmt="gguf") / "adapter.gguf"
    np.testing.assert_allclose(llama_cpp_logits(base, ids, lora), ours, atol=1e-4)


# ------------------------------------------------------------------ refusals


def assert_refused(proc, needle, *absent):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlx_dft: error:") and needle in lines[0], proc.stderr
    for path in absent:
        assert not path.exists(), path


@pytest.mark.parametrize(
    "adapter,needle",
    [
        ("dora", "a DoRA adapter has no llama.cpp LoRA (GGUF) form"),
        ("aligner", "a aligner adapter exports as hf or peft"),
        ("full", "use `mlx_dft fuse`"),
    ],
)
def test_adapters_without_a_gguf_lora_form_are_refused(tiny_model, arith_data, tmp_path, adapter, needle):
    extra = {"aligner_start_layer": 0} if adapter == "aligner" else {}
    run = mlx_dft.train(
        model=str(tiny_model),
        data=str(arith_data),
        output=str(tmp_path / "run"),
        adapter=adapter,
        **FAST,
        **extra,
    )
    p = run_cli("export", run.output, "--out", tmp_path / "out", "--format", "gguf")
    assert_refused(p, needle, tmp_path / "out")


def test_bad_gguf_requests_are_one_line_errors(trained, tmp_path):
    p = run_cli("fuse", trained, "--out", tmp_path / "a", "--gguf-type", "q5_k")
    assert_refused(p, "q5_k", tmp_path / "a")
    with pytest.raises(UserError, match="unknown GGUF type 'q5_k'"):
        fuse(trained, tmp_path / "b", gguf="q5_k")
    assert not (tmp_path / "b").exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    for args in (["fuse", trained, "--gguf"], ["export", trained, "--format", "gguf"]):
        assert_refused(run_cli(*args, "--out", taken), "already exists and is not empty")
        assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    ok = run_cli("fuse", trained, "--out", tmp_path / "c", "--gguf-type", "q8_0")
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in (tmp_path / "c").glob("*.gguf")) == ["model-q8_0.gguf"]


def test_tokenizers_gguf_cannot_hold_are_refused_by_name(tiny_model, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    tok = json.loads((folder / "tokenizer.json").read_text())
    (folder / "tokenizer.json").write_text(json.dumps({**tok, "pre_tokenizer": {"type": "Whitespace"}}))
    with pytest.raises(UserError, match="pre-tokenizer .* is not one llama.cpp reproduces"):
        write_model_gguf(folder, tmp_path / "x.gguf")
    tok["model"]["byte_fallback"] = True
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UserError, match="SentencePiece-style BPE tokenizer"):
        write_model_gguf(folder, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))


@pytest.mark.parametrize("module,a_shape,b_shape,message", [
    ("model.layers.0.self_attn.q_proj", (32, 8), (8, 64), r"lora_a reads 32 features, the model's layer 64"),
    ("model.layers.0.mlp.down_proj", (128, 8), (8, 65), r"lora_b writes 65 features, the model's layer 64"),
    ("model.layers.0.self_attn.k_proj", (64, 8), (8, 31), r"not whole heads \(2 in all\)"),
    ("model.layers.7.self_attn.v_proj", (64, 8), (8, 32), r"the model has 2 blocks"),
    ("model.layers.0.self_attn.v_proj", (64, 8), (4, 32), r"do not make a LoRA pair"),
])  # fmt: skip
def test_lora_tensors_that_do_not_fit_the_model_are_refused(module, a_shape, b_shape, message):
    """A crafted adapter whose shapes cannot belong to its base model is refused in one line, not
    written as a GGUF adapter llama.cpp would reject or apply to the wrong rows (mlx stores A as
    (in, rank) and B as (rank, out))."""
    from mlx_dft.gguf.adapter import lora_tensors

    config = llama_config()  # hidden 64, 4 heads of 16, 2 KV heads, intermediate 128, 2 blocks
    weights = {f"{module}.lora_a": mx.zeros(a_shape), f"{module}.lora_b": mx.zeros(b_shape)}
    rank = min(a_shape[1], b_shape[0])
    with pytest.raises(UserError, match=message):
        lora_tensors(weights, {"rank": rank, "scale": 1.0}, config)
