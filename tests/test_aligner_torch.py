"""The PyTorch Aligner runner and the Hugging Face Aligner format on the architectures transformers
has: an Aligner applied in MLX (random non-zero gates and prefix) on a model made by transformers,
exported in our HF format and attached to the transformers model, gives MLX's logits (float32);
zero gates give transformers' own logits bitwise; a mismatched base is refused in one line."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_dft import adapters, api
from mlx_dft.adapters import aligner
from mlx_dft.adapters.aligner import hf as aligner_hf
from mlx_dft.adapters.aligner.torch_runner import STATE
from mlx_dft.config import TrainConfig
from mlx_dft.errors import UserError
from mlx_dft.interop import convert
from mlx_dft.models import model_signature
from tests import arch_models
from tests.arch_models import TYPES, mlx_gpt_oss, write_hf_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IDS = [[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [1, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70]]
# float32 on CPU: torch and MLX agree to ~3e-6 on these logits (scale ~1) on every type; the base
# models alone agree to 1e-4 (tests/test_architectures_peft.py), the bound used here
ATOL = 1e-4
# variants beyond tests/arch_models.py's configs: gemma4's full-attention layers with keys as values
# (attention_k_eq_v) and their own KV-head count
VARIANTS = {
    "gemma4_text-k_eq_v": ("gemma4_text", {"attention_k_eq_v": True, "num_global_key_value_heads": 2})
}
# model types beyond tests/arch_models.py: gemma2, whose attention soft-caps its scores
EXTRA = {
    "gemma2": {
        "model_type": "gemma2", **arch_models.BASE, "num_hidden_layers": 2, "head_dim": 16,
        "query_pre_attn_scalar": 16, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 30.0,
    },
}  # fmt: skip
CASES = [*TYPES, *VARIANTS, *EXTRA]


def _write(tmp_path, case, monkeypatch):
    """(transformers folder, the folder mlx-lm reads) of a tiny random model of ``case``."""
    model_type, extra = VARIANTS.get(case, (case, {}))
    if model_type in EXTRA:
        monkeypatch.setitem(arch_models.CONFIGS, model_type, EXTRA[model_type])
    if extra:
        monkeypatch.setitem(
            arch_models.HF_OVERRIDES, model_type, {**arch_models.HF_OVERRIDES.get(model_type, {}), **extra}
        )
    hf_path = write_hf_model(tmp_path / "base", model_type)
    # gpt_oss: mlx-lm reads the experts split (as mlx-community converts them), transformers fused
    return hf_path, (mlx_gpt_oss(hf_path, tmp_path / "mlx") if model_type == "gpt_oss" else hf_path)


def _with_aligner(path, tokens=3, start=0, gate="head", seed=1, gate_scale=1.0):
    """The MLX model at ``path`` with an Aligner: random prefix, random gates of both signs (up to
    ``gate_scale``)."""
    net, _ = api.load(str(path))
    cfg = TrainConfig(adapter="aligner", aligner_tokens=tokens, aligner_start_layer=start, aligner_gate=gate)
    settings = aligner.settings(cfg, net)
    adapters.apply_adapter(net, "aligner", settings)
    params = dict(tree_flatten(net.trainable_parameters()))
    new = {}
    for i, (k, v) in enumerate(sorted(params.items())):
        r = mx.random.uniform(-1, 1, v.shape, key=mx.random.key(seed * 1000 + i))
        new[k] = gate_scale * r if aligner.GATE_LEAF in k else 2 * r
    net.load_weights(list(new.items()), strict=False)
    return net, settings, new


def _save(path, settings, weights, out):
    """An mlx_dft adapter folder, as a run writes it."""
    out.mkdir()
    config = json.loads((path / "config.json").read_text())
    signature = model_signature(config)
    cfg = {**settings, "adapter": "aligner", "base_model": str(path), "model_signature": signature}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    mx.save_safetensors(str(out / aligner.WEIGHTS_FILE), weights)
    return out


def _export(path, tmp_path, parts):
    """(MLX model, settings, weights) -> our HF Aligner folder, through an adapter folder."""
    _, settings, weights = parts
    return convert.export_adapter(_save(path, settings, weights, tmp_path / "run"), tmp_path / "hf")


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy()


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("case", CASES)
def test_exported_aligner_gives_mlx_logits_in_transformers(case, tmp_path, monkeypatch):
    check_parity(case, tmp_path, monkeypatch)


# later start layers: gemma4's last layer shares its keys and values with a layer without a gate;
# qwen3_5 and lfm2 from a block that is not attention; one token (the softmax is 1), layer gates
@pytest.mark.parametrize(
    ("case", "tokens", "start", "gate"),
    [
        ("gemma4_text", 2, 3, "head"),
        ("qwen3_5", 1, 2, "layer"),
        ("lfm2", 4, 1, "layer"),
        ("phi3", 1, 1, "head"),
    ],
)
def test_later_start_layers_layer_gates_and_one_token(case, tokens, start, gate, tmp_path, monkeypatch):
    check_parity(case, tmp_path, monkeypatch, tokens=tokens, start=start, gate=gate)


def check_parity(case, tmp_path, monkeypatch, **aligner_kw):
    from mlx_dft.torch_aligner import attach_aligner

    hf_path, path = _write(tmp_path, case, monkeypatch)
    net, settings, weights = _with_aligner(path, **aligner_kw)
    ours = np.array(net(mx.array(IDS)))
    exported = _export(path, tmp_path, (net, settings, weights))
    run = tmp_path / "run"
    spec = json.loads((exported / aligner_hf.HF_CONFIG).read_text())
    assert spec["format_version"] == 2 and spec["layers"] == aligner_hf.gated_layers(settings["aligner"])
    model = attach_aligner(_hf(hf_path), exported)
    theirs = _torch_logits(model)
    print(f"{case}: max |logit difference| torch vs MLX {np.abs(theirs - ours).max():.2e}")
    np.testing.assert_allclose(theirs, ours, atol=ATOL, rtol=0)
    model.aligner.enabled = False
    assert np.abs(ours - _torch_logits(model)).max() > 1e-2  # the Aligner matters
    back = convert.import_adapter(str(exported), tmp_path / "back")  # mlx -> HF -> mlx, bitwise
    a, b = (mx.load(str(p / aligner.WEIGHTS_FILE)) for p in (run, back))
    assert set(a) == set(b) and all(mx.array_equal(a[k], b[k]) for k in a)
    ca, cb = (json.loads((p / "adapter_config.json").read_text())["aligner"] for p in (run, back))
    assert ca == cb
    again, _ = api.load(str(path), str(back))  # and MLX runs the imported folder with the same logits
    np.testing.assert_array_equal(np.array(again(mx.array(IDS))), ours)


# ------------------------------------------------------------------ transformers alone


def _attention_blocks(model) -> list[int]:
    from mlx_dft.adapters.aligner.torch_runner import _attention, _blocks

    return [i for i, b in enumerate(_blocks(model)) if _attention(b) is not None]


def _hand_made(model, model_type, out, gates="random", tokens=3, version=2):
    """Our HF Aligner folder for a transformers model, written here (no MLX): every attention
    block gated."""
    from safetensors.torch import save_file

    from mlx_dft.adapters.aligner.torch_runner import _blocks, _shapes

    layers = _attention_blocks(model)
    shapes = _shapes(model, _blocks(model))  # the sizes as the runner reads them
    heads, hidden = shapes["num_attention_heads"], shapes["hidden_size"]
    spec = {"format": "mlx_dft.aligner", "format_version": version, "model_type": model_type}
    spec |= {"num_tokens": tokens, "start_layer": layers[0], "gate": "head", **shapes}
    if version >= 2:
        spec["layers"] = layers
    g = torch.Generator().manual_seed(0)
    tensors = {"prefix": torch.randn(tokens, hidden, generator=g)}
    for i in layers if version >= 2 else range(layers[0], shapes["num_hidden_layers"]):
        tensors[f"layers.{i}.gate"] = (
            torch.zeros(heads) if gates == "zero" else torch.rand(heads, generator=g) * 2 - 1
        )
    out.mkdir()
    save_file(tensors, str(out / aligner_hf.HF_WEIGHTS))
    (out / aligner_hf.HF_CONFIG).write_text(json.dumps(spec))
    return out


@pytest.mark.parametrize("case", CASES)
def test_zero_gates_give_the_transformers_base_model_bitwise(case, tmp_path, monkeypatch):
    from mlx_dft.torch_aligner import attach_aligner

    model_type = VARIANTS.get(case, (case,))[0]
    hf_path, _ = _write(tmp_path, case, monkeypatch)
    plain = _hf(hf_path)
    base = _torch_logits(plain)
    with torch.no_grad():  # the head on 3 rows: BLAS may block it otherwise than on all (AMD EPYC did)
        last = plain(torch.tensor(IDS), logits_to_keep=3).logits.numpy()
    model = _hf(hf_path)
    own = model.config._attn_implementation
    attach_aligner(model, _hand_made(model, model_type, tmp_path / "zero", gates="zero"))
    gated = [model.model.layers[i].self_attn for i in _attention_blocks(model)]
    assert all(a.config._attn_implementation == "mlx_dft_aligner" for a in gated)
    assert model.config._attn_implementation == own  # the model's masks stay its own
    np.testing.assert_array_equal(_torch_logits(model), base)
    with torch.no_grad():  # gemma4 slices its last layers' queries when the model runs sdpa
        np.testing.assert_array_equal(model(torch.tensor(IDS), logits_to_keep=3).logits.numpy(), last)
    with torch.no_grad():  # non-zero gates move every gated layer's output
        for g in model.aligner.gates.values():
            g.fill_(0.5)
    assert np.abs(_torch_logits(model) - base).max() > 1e-2


@pytest.mark.parametrize("model_type", ["gemma4_text", "qwen3_5", "gpt_oss", "lfm2"])
def test_generation_with_the_kv_cache_equals_recomputation(model_type, tmp_path):
    """The prefix is not in the cache: each decoding step's queries read it afresh."""
    from mlx_dft.torch_aligner import attach_aligner

    hf_path = write_hf_model(tmp_path / "base", model_type)
    model = _hf(hf_path)
    attach_aligner(model, _hand_made(model, model_type, tmp_path / "al"))
    ids = torch.tensor(IDS[:1])
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        full = ids
        for _ in range(6):  # greedy by hand, the whole sequence each step
            full = torch.cat([full, model(full).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, full)


def test_a_version_1_folder_still_runs_and_imports(tmp_path):
    from mlx_dft.torch_aligner import attach_aligner

    hf_path = write_hf_model(tmp_path / "base", "llama")
    v1 = _hand_made(_hf(hf_path), "llama", tmp_path / "v1", version=1)
    model = attach_aligner(_hf(hf_path), v1)
    assert sorted(model.aligner.gates) == ["0", "1"]
    cfg = aligner_hf.import_hf(v1)
    assert cfg["aligner"]["layers"] == [0, 1] and cfg["aligner"]["layers_prefix"] == "model.layers"
    assert sorted(cfg["weights"]["aligner.safetensors"]) == [
        "aligner.prefix", "model.layers.0.self_attn.aligner_gate", "model.layers.1.self_attn.aligner_gate",
    ]  # fmt: skip


# ------------------------------------------------------------------ refusals


def test_a_mismatched_base_is_refused_in_one_line_naming_both(tmp_path, monkeypatch):
    from mlx_dft.torch_aligner import attach_aligner

    folder = _hand_made(_hf(write_hf_model(tmp_path / "base", "llama")), "llama", tmp_path / "al")
    # another architecture of the very same sizes (ministral3's tiny model), and a llama of other sizes
    other = _hf(write_hf_model(tmp_path / "other", "ministral3"))
    with pytest.raises(
        ValueError, match=r"this Aligner is for a llama with .*; this model is a ministral3 with"
    ) as e:
        attach_aligner(other, folder)
    monkeypatch.setitem(arch_models.HF_OVERRIDES, "llama", {"num_key_value_heads": 4})
    wider = _hf(write_hf_model(tmp_path / "wider", "llama"))
    with pytest.raises(
        ValueError, match=r"num_key_value_heads=2.*; this model is a llama .*num_key_value_heads=4"
    ) as f:
        attach_aligner(wider, folder)
    for err, model in ((e, other), (f, wider)):
        assert isinstance(err.value, UserError) and "\n" not in str(err.value)
        assert not hasattr(model, "aligner") and not any(STATE in m.__dict__ for m in model.modules())


def test_an_attention_it_cannot_read_is_refused_naming_the_layer(tmp_path):
    from mlx_dft.torch_aligner import attach_aligner

    hf_path = write_hf_model(tmp_path / "base", "llama")
    folder = _hand_made(_hf(hf_path), "llama", tmp_path / "al")
    model = _hf(hf_path)
    attn = model.model.layers[1].self_attn
    attn.key_map, attn.k_proj = attn.k_proj, None
    with pytest.raises(
        ValueError, match=r"^layer 1's attention \(LlamaAttention\) has no k_proj/v_proj or qkv_proj"
    ):
        attach_aligner(model, folder)
    assert not hasattr(model, "aligner")


def test_an_attention_that_computes_its_scores_itself_is_refused(tmp_path):
    """It would never call the Aligner's attention function: refused, not silently left out."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    from mlx_dft.torch_aligner import attach_aligner

    class OwnScores(LlamaAttention):
        def forward(self, hidden_states, *args, **kwargs):
            return self.o_proj(self.v_proj(hidden_states).repeat(1, 1, 2)), None

    hf_path = write_hf_model(tmp_path / "base", "llama")
    folder = _hand_made(_hf(hf_path), "llama", tmp_path / "al")
    model = _hf(hf_path)
    own = OwnScores(model.config, 0)
    own.load_state_dict(model.model.layers[0].self_attn.state_dict())
    model.model.layers[0].self_attn = own
    with pytest.raises(ValueError, match=r"^layer 0's attention \(OwnScores\) computes its scores without"):
        attach_aligner(model, folder)
    assert not hasattr(model, "aligner")


def _edit(folder, **changes):
    spec = json.loads((folder / aligner_hf.HF_CONFIG).read_text())
    (folder / aligner_hf.HF_CONFIG).write_text(json.dumps({**spec, **changes}))


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"format_version": 3}, "Aligner format version 3 is not one this mlx_dft reads"),
        ({"layers": [1, 0]}, "layers must be increasing block indices from 0 to 1"),
        ({"layers": [0, 2]}, "layers must be increasing block indices from 0 to 1"),
        ({"layers": [0]}, r"unexpected tensors \['layers.1.gate'\]"),
        ({"layers": "0,1"}, "layers must be increasing block indices"),
        ({"gate": "layer"}, "layers.0.gate has 4 values, expected 1"),
        ({"num_tokens": 2}, r"prefix shape \(3, 64\) disagrees with the config"),
        (
            {"mlx_layers_prefix": "model.layers/../x"},
            "mlx_layers_prefix 'model.layers/../x' is not a module path",
        ),
        ({"model_type": ["llama"]}, "model_type \\['llama'\\] is not a string"),
    ],
)
def test_a_damaged_folder_is_refused_in_one_line_by_both_readers(tmp_path, changes, why):
    from mlx_dft.torch_aligner import attach_aligner

    hf_path = write_hf_model(tmp_path / "base", "llama")
    folder = _hand_made(_hf(hf_path), "llama", tmp_path / "al")
    _edit(folder, **changes)
    with pytest.raises(UserError, match=why):
        aligner_hf.import_hf(folder)
    model = _hf(hf_path)
    with pytest.raises(UserError, match=why):
        attach_aligner(model, folder)
    assert not hasattr(model, "aligner")


@pytest.mark.slow
def test_on_smollm2_the_real_model_torch_gives_mlx_logits(smollm2, tmp_path):
    """SmolLM2-135M-Instruct (llama, 30 blocks, 9 heads in 3 KV groups): ten prefix tokens from
    block 2 on, gates up to 0.1 (the official checkpoints' are within 0.14), exported and attached
    in transformers. A random prefix moves these logits by ~30 through 28 blocks, and float32
    rounding alone then moves them by ~5e-4 (torch float32 against torch float64); MLX must be as
    close to the float64 logits as torch's own float32 is."""
    from mlx_dft.torch_aligner import attach_aligner

    path = smollm2["float32"]
    net, settings, weights = _with_aligner(path, tokens=10, start=2, gate_scale=0.1)
    ours = np.array(net(mx.array(IDS)))
    exported = _export(path, tmp_path, (net, settings, weights))
    theirs = _torch_logits(attach_aligner(_hf(path), exported))
    exact = attach_aligner(_hf(path).double(), exported)
    with torch.no_grad():
        exact = exact(torch.tensor(IDS)).logits.numpy()
    torch_error, mlx_error = np.abs(theirs - exact).max(), np.abs(ours - exact).max()
    print(f"SmolLM2: |torch - MLX| {np.abs(theirs - ours).max():.2e}; from float64: torch {torch_error:.2e}, "
          f"MLX {mlx_error:.2e}")  # fmt: skip
    assert mlx_error <= 3 * torch_error + 1e-4


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_the_prefix_term_is_the_papers_formula_per_head(softcap):
    """Against per-head loops in numpy: grouped queries (head h reads group h // (H / n_kv)), the
    layer's scaling, soft-capped scores where the layer soft-caps (gemma2 passes ``softcap``)."""
    from mlx_dft.adapters.aligner.torch_runner import prefix_term

    rng = np.random.default_rng(0)
    b, h, n_kv, length, n, d, scaling = 2, 6, 2, 5, 4, 8, 0.3
    q, k, v = rng.normal(size=(b, h, length, d)), rng.normal(size=(n_kv, n, d)), rng.normal(size=(n_kv, n, d))
    g = rng.uniform(-1, 1, h)
    got = prefix_term(*(torch.tensor(x) for x in (q, k, v, g)), scaling, softcap).numpy()  # [B, L, H, d]
    for bi in range(b):
        for hi in range(h):
            kv = hi // (h // n_kv)
            s = q[bi, hi] @ k[kv].T * scaling
            if softcap is not None:
                s = np.tanh(s / softcap) * softcap
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            np.testing.assert_allclose(got[bi, :, hi], g[hi] * p @ v[kv], rtol=1e-12, atol=1e-12)


def test_a_gate_on_a_block_without_attention_is_refused(tmp_path):
    """lfm2's block 0 is a convolution: a folder that gates it is not from this model."""
    from safetensors.torch import load_file, save_file

    from mlx_dft.torch_aligner import attach_aligner

    hf_path = write_hf_model(tmp_path / "base", "lfm2")
    folder = _hand_made(_hf(hf_path), "lfm2", tmp_path / "al")
    tensors = load_file(str(folder / aligner_hf.HF_WEIGHTS))
    tensors["layers.0.gate"] = tensors.pop("layers.1.gate")
    save_file(tensors, str(folder / aligner_hf.HF_WEIGHTS))
    _edit(folder, layers=[0], start_layer=0)
    model = _hf(hf_path)
    with pytest.raises(
        ValueError, match=r"^layer 0 \(Lfm2DecoderLayer\) has no attention module, yet the Aligner gates"
    ):
        attach_aligner(model, folder)
    assert not hasattr(model, "aligner")


def test_the_attached_aligner_trains_in_pytorch(tmp_path):
    """``model.aligner``'s prefix and gates take gradients once made trainable (the base stays frozen)."""
    from mlx_dft.torch_aligner import attach_aligner

    hf_path = write_hf_model(tmp_path / "base", "qwen3_5")
    model = _hf(hf_path)
    attach_aligner(model, _hand_made(model, "qwen3_5", tmp_path / "al"))
    model.requires_grad_(False)
    model.aligner.requires_grad_(True)
    ids = torch.tensor(IDS)
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.aligner.named_parameters()}
    assert sorted(grads) == ["gates.1", "gates.3", "prefix"]
    assert all(g is not None and float(g.abs().max()) > 0 for g in grads.values())
