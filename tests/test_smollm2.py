# ruff: noqa: I001  (mlx_dft must be imported before mlx: it puts OpenBLAS under MLX)
"""mlx_dft on a real model: SmolLM2-135M-Instruct (LLaMA architecture, 30 blocks, hidden 576,
grouped-query attention 9/3 heads, a 49,152-token byte-level BPE, the ChatML chat template), as
``scripts/fetch_smollm2.py`` leaves it (an MLX 4-bit folder and a float32 folder).

What is proven, against what:

- training: QLoRA on the 4-bit folder (its linears stay mlx ``QuantizedLinear``, bit-identical
  to the stored ones), LoRA, DoRA and Aligner on the float32 folder, each a few steps of
  ``mlx_dft.train``, lower the cross-entropy of the examples they were trained on (validation CE
  on the same examples before step 1 vs after the last step);
- data: a multi-turn ChatML conversation supervises exactly each assistant turn's content and its
  end of turn, as the real template renders them, and nothing of the system/user turns or the
  ``<|im_start|>assistant`` headers;
- generation: with a trained LoRA and with an Aligner (non-zero gates), incremental decoding with
  mlx-lm's KV cache gives the logits of a full recompute of the whole sequence, and greedy
  ``mlx_dft.generate`` gives the greedy full-recompute continuation;
- export: a LoRA trained here, exported as PEFT, loaded by transformers + PEFT (torch CPU,
  float32) on the same float32 folder, gives our logits on a chat-templated prompt;
- the CPU loss: SFT's and DFT's kept-softmax loss gives the value (float64 numpy) and the LoRA
  gradients (MLX autodiff of full logits) of the plain form, whole and in chunks.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx_dft
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_dft import adapters, api
from mlx_dft.adapters import aligner
from mlx_dft.config import TrainConfig
from mlx_dft.data import DataConfig, chat_prompt, load_split

pytestmark = pytest.mark.slow  # the real model, SmolLM2-135M-Instruct

# Made-up facts the model cannot know: their cross-entropy starts high and has room to fall.
FACTS = [
    ("What is the capital of Zorblatt?", "The capital of Zorblatt is Quenvik."),
    ("Who invented the glimmerphone?", "The glimmerphone was invented by Ada Pellworth."),
    ("What colour is a snorfle?", "A snorfle is bright teal with orange spots."),
    ("How many moons does Tarnis have?", "Tarnis has exactly seven moons."),
]
PROMPT = "What is the capital of Zorblatt?"
# Few steps on one batch of the four examples; validation (on the same four) at step 0 and at the end.
STEPS = 6
RUN = dict(
    loss="sft",
    iters=STEPS,
    batch_size=4,
    max_seq_length=64,
    steps_per_report=STEPS,
    steps_per_eval=STEPS,
    val_batches=-1,
    save_every=10_000,
    progress=False,
)
LORA = dict(num_layers=2, lora_rank=8, learning_rate=1e-3)
# rank 8 on q, k, v, o (576->576/192) and gate, up, down (576<->1536), two blocks
LORA_PARAMS = 2 * 8 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))
TRAINED = {
    "lora": LORA_PARAMS,
    "dora": LORA_PARAMS + 2 * (576 + 192 + 192 + 576 + 1536 + 1536 + 576),
    "aligner": 576 + 28 * 9,
}


@pytest.fixture(scope="module")
def facts_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("smol-data")
    lines = "".join(
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
        for q, a in FACTS
    )
    for split in ("train", "valid"):  # validation on the trained examples: CE before vs after
        (d / f"{split}.jsonl").write_text(lines)
    return d


@pytest.fixture(scope="module")
def short_data(tmp_path_factory) -> Path:
    """Two short completions without the chat template (~10 tokens each): MLX's CPU quantized
    matmuls run at a fraction of float32 BLAS speed, so the 4-bit run is kept to few tokens."""
    d = tmp_path_factory.mktemp("smol-short")
    lines = "".join(
        json.dumps({"prompt": p, "completion": c}) + "\n"
        for p, c in (("Zorblatt's capital:", " Quenvik."), ("Snorfle colour:", " teal, orange spots."))
    )
    for split in ("train", "valid"):
        (d / f"{split}.jsonl").write_text(lines)
    return d


def train(model: Path, data: Path, out: Path, **options):
    return mlx_dft.train(model=str(model), data=str(data), output=str(out), **{**RUN, **options})


def ce_before_after(run) -> tuple[float, float]:
    val = [r for r in run.history if "val_ce" in r]
    assert [r["step"] for r in val] == [0, STEPS]
    # metrics.jsonl holds the same records
    written = [json.loads(line) for line in (run.output / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_ce"] for r in written if "val_ce" in r] == [r["val_ce"] for r in val]
    return val[0]["val_ce"], val[-1]["val_ce"]


@pytest.fixture(scope="module")
def lora_run(smollm2, facts_data, tmp_path_factory):
    return train(
        smollm2["float32"], facts_data, tmp_path_factory.mktemp("smol") / "lora", adapter="lora", **LORA
    )


@pytest.fixture(scope="module")
def aligner_run(smollm2, facts_data, tmp_path_factory):
    # Aligner defaults: 1 token, layers 2.., head gates, lr 9e-3
    return train(
        smollm2["float32"], facts_data, tmp_path_factory.mktemp("smol") / "aligner", adapter="aligner"
    )


def chat_ids(tokenizer, text: str) -> list[int]:
    """``text`` as one user turn of the chat template, with the generation prompt (as generate does)."""
    return tokenizer.encode(chat_prompt(tokenizer, text), add_special_tokens=False)


# ------------------------------------------------------------------ training


def test_qlora_on_the_4bit_folder_keeps_it_quantized_and_learns(smollm2, short_data, tmp_path):
    opts = {**LORA, "batch_size": 2, "use_chat_template": False, "keep_quantized": True}
    run = train(smollm2["4bit"], short_data, tmp_path / "qlora", adapter="lora", **opts)
    before, after = ce_before_after(run)
    print(f"QLoRA val CE {before:.4f} -> {after:.4f}")
    assert after < before - 0.5

    from mlx_lm.tuner.lora import LoRALinear

    stored = mx.load(str(smollm2["4bit"] / "model.safetensors"))
    top = len(run.model.layers) - 1
    checked = 0
    for i, block in enumerate(run.model.layers):
        for path, module in block.named_modules():
            if not path.endswith("_proj"):
                continue
            adapted = isinstance(module, LoRALinear)
            assert adapted == (i >= top - 1), (i, path)  # num_layers=2: the last two blocks
            base = module.linear if adapted else module
            assert isinstance(base, nn.QuantizedLinear) and base.bits == 4 and base.group_size == 32
            checked += 1
    assert checked == 30 * 7
    assert adapters.count_parameters(run.model)[0] == LORA_PARAMS
    # the adapted base layers are the stored 4-bit tensors, untouched by training
    q = run.model.layers[top].self_attn.q_proj
    for leaf in ("weight", "scales", "biases"):
        ref = stored[f"model.layers.{top}.self_attn.q_proj.{leaf}"]
        assert mx.array_equal(getattr(q.linear, leaf), ref), leaf
    assert float(mx.abs(q.lora_b).max()) > 0


@pytest.mark.parametrize("kind", ["lora", "dora", "aligner"])
def test_float32_adapters_lower_the_cross_entropy(request, smollm2, facts_data, tmp_path, kind):
    if kind == "lora":
        run = request.getfixturevalue("lora_run")
    elif kind == "aligner":
        run = request.getfixturevalue("aligner_run")
    else:
        run = train(smollm2["float32"], facts_data, tmp_path / kind, adapter=kind, **LORA)
    # what was trained: rank-8 LoRA on the 7 linears of blocks 28-29 (DoRA: plus one magnitude per
    # output), or one 576-wide prefix token and 9 head gates in each of blocks 2-29
    name = "aligner.safetensors" if kind == "aligner" else "adapters.safetensors"
    saved = mx.load(str(run.output / name))
    assert sum(v.size for v in saved.values()) == TRAINED[kind]
    if kind == "aligner":
        gates = [v for k, v in saved.items() if k.endswith(aligner.GATE_LEAF)]
        assert len(gates) == 28 and all(float(mx.abs(g).max()) > 0 for g in gates)
    before, after = ce_before_after(run)
    print(f"{kind} val CE {before:.4f} -> {after:.4f}")
    assert after < before - (0.2 if kind == "aligner" else 0.5)
    train_ce = [r["train_ce"] for r in run.history if "train_ce" in r]
    assert len(train_ce) == 1 and np.isfinite(train_ce[0])


# ------------------------------------------------------------------ data


def test_multi_turn_chatml_supervises_every_assistant_turn_only(smollm2, tmp_path):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(smollm2["float32"])
    turns = [
        ("system", "You answer in one short sentence."),
        ("user", "Name a primary colour."),
        ("assistant", "Red is a primary colour."),
        ("user", "And another one?"),
        ("assistant", "Blue is one too."),
    ]
    messages = [{"role": r, "content": c} for r, c in turns]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    ds = load_split(tmp_path / "chat.jsonl", "train", tok, DataConfig())
    assert ds.format == "chat" and len(ds) == 1
    ids, mask = ds.tokens[0].tolist(), ds.supervised[0].tolist()
    # the tokens are the real template's rendering, tokenized as is
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert (
        rendered.startswith("<|im_start|>system\nYou answer")
        and rendered.count("<|im_start|>assistant\n") == 2
    )
    assert ids == tok.encode(rendered, add_special_tokens=False)

    # contiguous supervised runs
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end == tok.eos_token_id == 2
    # Each assistant turn is supervised as the template renders it: its content, its <|im_end|>
    # and the template's turn separator after it ("\n"), and nothing else.
    expected = [c + "<|im_end|>\n" for r, c in turns if r == "assistant"]
    assert [tok.decode(r) for r in runs] == expected
    assert [r for r in runs] == [tok.encode(e, add_special_tokens=False) for e in expected]
    assert sum(mask) == sum(len(r) for r in runs) and all(r[-2] == end for r in runs)
    unsupervised = tok.decode([t for t, m in zip(ids, mask) if not m])
    assert unsupervised == (
        "<|im_start|>system\nYou answer in one short sentence.<|im_end|>\n"
        "<|im_start|>user\nName a primary colour.<|im_end|>\n<|im_start|>assistant\n"
        "<|im_start|>user\nAnd another one?<|im_end|>\n<|im_start|>assistant\n"
    )


# ------------------------------------------------------------------ generation with the KV cache


def random_gates(net, seed=2, scale=0.1):
    """Every Aligner gate uniform in (-scale, scale): of both signs, away from the zero start."""
    layers = [b for b in net.layers if aligner.GATE_LEAF in b.self_attn]
    assert len(layers) == 28  # layers 2..29
    keys = mx.random.split(mx.random.key(seed), len(layers))
    for k, b in zip(keys, layers):
        g = b.self_attn[aligner.GATE_LEAF]
        b.self_attn[aligner.GATE_LEAF] = mx.random.uniform(-scale, scale, g.shape, key=k)
    mx.eval(net.parameters())


@pytest.fixture(scope="module")
def base_f32(smollm2):
    return api.load(str(smollm2["float32"]))


def check_cache_and_generate(net, tok, base, what: str):
    """Greedy decoding of ``net`` by full recompute vs with mlx-lm's KV cache vs mlx_dft.generate."""
    from mlx_lm.models.cache import make_prompt_cache

    prompt = chat_ids(tok, PROMPT)
    n_new = 8
    # greedy by full recompute: the whole sequence again for every new token
    seq, full = list(prompt), []
    for _ in range(n_new):
        logits = net(mx.array([seq]))[0, -1]
        full.append(np.array(logits))
        seq.append(int(mx.argmax(logits)))
    full = np.stack(full)  # [n_new, vocab]: the logits that chose seq[len(prompt):]
    # incremental: the prompt once, then one token at a time through the cache
    cache = make_prompt_cache(net)
    cached = [np.array(net(mx.array([prompt]), cache=cache)[0, -1])]
    for t in seq[len(prompt) : -1]:
        cached.append(np.array(net(mx.array([[t]]), cache=cache)[0, -1]))
    assert cache[0].offset == len(seq) - 1  # every fed token, nothing else (no Aligner prefix)
    diff = float(np.abs(np.stack(cached) - full).max())
    # The float32 noise floor: one full pass over seq[:-1] gives the same positions' logits, the
    # same maths at other shapes. The base model's is exactly 0 (its rows do not depend on the
    # length); the Aligner's prefix term is not bitwise length-invariant, and through 28 adapted
    # blocks its rounding reaches ~1e-4-3e-4 on logits of magnitude ~40 (measured). A cache bug (a
    # position off, the prefix missing or cached) moves logits by O(1), far above this tolerance.
    one_pass = np.array(net(mx.array([seq[:-1]]))[0, len(prompt) - 1 :])
    floor = float(np.abs(one_pass - full).max())
    tol = 1e-4 + 2 * floor
    print(f"{what}: cached vs full recompute max |diff| {diff:.2e} (noise floor {floor:.2e}, tol {tol:.2e})")
    assert floor <= 5e-4 and diff <= tol
    # the adapter matters on these positions (so the comparison can fail)
    effect = float(np.abs(np.array(base(mx.array([seq[:-1]]))[0, len(prompt) - 1 :]) - full).max())
    assert effect > 1.0, effect
    # greedy mlx_dft.generate (mlx-lm's generate, KV cache) = the full-recompute tokens; each
    # argmax wins by a margin far above the tolerance, so the comparison is well posed
    top2 = np.sort(full, axis=-1)[:, -2:]
    margin = float((top2[:, 1] - top2[:, 0]).min())
    new = seq[len(prompt) :]
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    text = mlx_dft.generate(PROMPT, max_tokens=n_new, loaded=(net, tok), chat=True)
    print(f"{what}: adapter effect {effect:.2f}, smallest argmax margin {margin:.3f}, generated {text!r}")
    assert margin > 2 * tol
    assert len(new) > 0 and text == tok.decode(new)


def test_lora_cached_generation_equals_recompute(smollm2, lora_run, base_f32):
    net, tok = api.load(str(smollm2["float32"]), lora_run.output)
    b = mx.load(str(lora_run.output / "adapters.safetensors"))
    assert all(float(mx.abs(v).max()) > 0 for k, v in b.items() if k.endswith("lora_b"))
    base, _ = base_f32
    check_cache_and_generate(net, tok, base, "LoRA")


def test_aligner_cached_generation_equals_recompute(smollm2, base_f32):
    net, tok = api.load(str(smollm2["float32"]))
    cfg = TrainConfig(adapter="aligner", aligner_tokens=3)  # N > 1: a real softmax over prefix keys
    mx.random.seed(0)  # the prefix's N(0, 1) draw: the same model whichever tests ran before
    adapters.apply_adapter(net, "aligner", aligner.settings(cfg, net))
    random_gates(net)
    net.eval()
    base, _ = base_f32
    check_cache_and_generate(net, tok, base, "Aligner")


# ------------------------------------------------------------------ PEFT export


def test_exported_lora_gives_our_logits_in_transformers_peft(smollm2, lora_run, base_f32, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from mlx_dft.interop import convert

    w = mx.load(str(lora_run.output / "adapters.safetensors"))
    lora_b = [v for k, v in w.items() if k.endswith("lora_b")]
    assert len(lora_b) == 2 * 7 and all(float(mx.abs(v).max()) > 0 for v in lora_b)

    out = convert.export_adapter(lora_run.output, tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 160.0  # scale 20 * r
    assert cfg["layers_to_transform"] == [28, 29] and len(cfg["target_modules"]) == 7

    net, tok = api.load(str(smollm2["float32"]), lora_run.output)
    ids = chat_ids(tok, PROMPT)
    ours = np.array(net(mx.array([ids])))
    base, _ = base_f32
    ours_base = np.array(base(mx.array([ids])))

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2["float32"]), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(hf.eval(), str(out)).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits.numpy()
        with model.disable_adapter():
            theirs_base = model(torch.tensor([ids])).logits.numpy()
    diff = float(np.abs(theirs - ours).max())
    # The float32 noise floor: transformers and MLX on the same base weights, no adapter, differ by
    # ~1.2e-4 on logits up to ~40 (30 blocks of float32 accumulated in different orders; measured),
    # above the 1e-4 the small synthetic models meet. A wrong export (scale, transpose, layers,
    # targets) moves the logits by the adapter's effect, O(10) here, far above this tolerance.
    floor = float(np.abs(theirs_base - ours_base).max())
    effect = float(np.abs(ours - ours_base).max())
    tol = 1e-4 + 2 * floor
    peft_effect = float(np.abs(theirs - theirs_base).max())
    print(
        f"PEFT vs ours max |diff| {diff:.2e} (noise floor {floor:.2e}, tol {tol:.2e}); adapter effect "
        f"{effect:.2f} (PEFT's {peft_effect:.2f}); max |logit| {np.abs(ours).max():.1f}"
    )
    assert effect > 1.0 and floor <= 5e-4
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=tol)


# ------------------------------------------------------------------ the CPU loss


@pytest.mark.parametrize("loss", ["sft", "dft"])
@pytest.mark.parametrize("chunk_tokens", [0, 16])
def test_kept_softmax_loss_equals_full_logits_autodiff(smollm2, facts_data, loss, chunk_tokens):
    """On the CPU, SFT's and DFT's loss keep their softmax for the backward pass
    (:func:`mlx_dft.losses.kept_softmax_ce`; SmolLM2's 49,152-token vocabulary puts the batch on
    that path). Its value and LoRA gradients equal those of the plain form: full logits of
    mlx-lm's own model at every position, the per-token CE and DFT weights in float64 numpy for the
    value, MLX's autodiff of log-softmax for the gradients."""
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_dft.data import collate
    from mlx_dft.losses import LossConfig, keeps_softmax
    from mlx_dft.models import split_model
    from mlx_dft.trainer import model_loss_fn

    net, tok = api.load(str(smollm2["float32"]))
    cfg = TrainConfig(adapter="lora", **LORA)
    method = adapters.method("lora")
    mx.random.seed(3)
    method.apply(net, method.settings(cfg, net))
    # LoRA's B away from zero, so that every LoRA matrix has a gradient
    for name, p in tree_flatten(net.trainable_parameters()):
        if name.endswith("lora_b"):
            net.update(tree_unflatten([(name, mx.random.normal(p.shape) * 0.02)]))
    ds = load_split(facts_data / "train.jsonl", "train", tok, DataConfig())
    batch = collate(ds.tokens, ds.supervised)
    lcfg = LossConfig(loss)
    _, head, _ = split_model(net)
    assert keeps_softmax(head, lcfg), "the CPU path under test is not taken"
    assert batch.n_supervised > 16

    fn = model_loss_fn(net, lcfg, chunk_tokens)
    value, grads = nn.value_and_grad(net, lambda m, *a: fn(m, *a)[0])(net, *batch.arrays())

    b, t = batch.inputs.shape
    n = batch.n_supervised
    pos, tgt = np.array(batch.positions)[:n], np.array(batch.targets)[:n]

    def full(m):
        logits = m(batch.inputs).reshape(b * t, -1)[mx.array(pos)].astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        lp = mx.take_along_axis(logp, mx.array(tgt)[:, None], axis=-1)[:, 0]
        w = mx.stop_gradient(mx.exp(lp)) if loss == "dft" else mx.ones_like(lp)
        return -(w * lp).sum(), logits

    (ref_value, logits), ref_grads = nn.value_and_grad(net, lambda m: full(m))(net)
    z = np.array(logits).astype(np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    ce = lse - z[np.arange(n), tgt]
    expected = (np.exp(-ce) * ce).sum() if loss == "dft" else ce.sum()
    # float32 sums over 49,152 exponentials: ~1e-4 of a nat a token from float64 (the plain form too)
    assert abs(float(value) - expected) <= 2e-4 * n
    assert float(value) == pytest.approx(float(ref_value), rel=1e-5)
    got, ref = dict(tree_flatten(grads)), dict(tree_flatten(ref_grads))
    assert got.keys() == ref.keys() and len(got) == 2 * 7 * 2
    for k in ref:
        r, g = np.array(ref[k]), np.array(got[k])
        assert np.abs(r).max() > 0, k
        assert np.abs(g - r).max() <= 1e-4 * np.abs(r).max() + 1e-7, k
