# ruff: noqa: I001  (mlx_dft must be imported before mlx: it puts OpenBLAS under MLX)
"""Pretrain the bundled tiny LLaMA (models/tiny-llama) from scratch, deterministically, on CPU.

    python scripts/make_tiny_model.py [--out models/tiny-llama] [--steps 1800]

1. Generates a corpus (seed 0): short stories about people and their things, arithmetic
   facts in words ("45 plus 17 is 62.") and as equations ("45 + 17 = 62."), and chains of
   equations, on the bundled task's number range. Stories sometimes write their arithmetic
   out and restate earlier facts, which teaches the model to copy names and numbers from its
   context. The corpus never contains the task's question/answer format nor its phrasing
   ("starts with", "The answer is").
2. Trains a byte-level BPE tokenizer (512 tokens, digits split one by one).
3. Pretrains a 4-layer LLaMA (hidden 256, 8 heads, 4 KV heads, 3.3M parameters) with AdamW.
4. Writes a Hugging Face folder (config.json, model.safetensors, tokenizer.json, ...) that
   both ``mlx_lm.load`` and ``transformers.AutoModelForCausalLM`` load, plus the held-out
   perplexity and a few greedy samples in ``pretraining.json``.

Takes about an hour on a 2-core CPU with OpenBLAS.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from functools import partial
from pathlib import Path

import mlx_dft  # noqa: F401  (loads OpenBLAS before MLX)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from mlx_dft.tasks.arith import GAIN, LOSS, NAMES, OBJECTS

PLACES = ["park", "market", "school", "library", "beach", "farm", "garden", "shop", "lake", "zoo"]
ADJ = ["red", "small", "big", "old", "new", "shiny", "green", "blue", "round", "tiny"]
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "vocab_size": 512,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": "float32",
    "initializer_range": 0.02,
}
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def operands(rng: random.Random) -> tuple[int, int]:
    """The number range of the bundled task: a running value up to 600, a change below 100."""
    a = rng.randint(1, 99) if rng.random() < 0.55 else rng.randint(100, 600)
    return a, rng.randint(1, 99)


def fact(rng: random.Random) -> str:
    a, b = operands(rng)
    if rng.random() < 0.5:
        c, sym, word = a + b, "+", rng.choice(["plus", "and"])
    else:
        a, b = max(a, b), min(a, b)
        c, sym, word = a - b, "-", "minus"
    forms = [
        f"{a} {sym} {b} = {c}.",
        f"{a} {sym} {b} = {c}.",
        f"{a} {sym} {b} = {c}.",
        f"{a} {word} {b} is {c}." if word != "and" else f"{a} and {b} make {c}.",
        f"The sum of {a} and {b} is {c}." if sym == "+" else f"If you take {b} away from {a}, you get {c}.",
    ]
    return rng.choice(forms)


def worksheet(rng: random.Random) -> str:
    """A chain of equations, each starting from the previous result (arithmetic practice)."""
    value = rng.randint(1, 99)
    lines = []
    for _ in range(rng.randint(2, 4)):
        n = rng.randint(1, 99)
        if rng.random() < 0.5 and value >= n:
            lines.append(f"{value} - {n} = {value - n}.")
            value -= n
        else:
            lines.append(f"{value} + {n} = {value + n}.")
            value += n
    return " ".join(lines)


def story(rng: random.Random) -> str:
    (name, pron), (name2, _) = rng.sample(NAMES, 2)
    obj, place, adj = rng.choice(OBJECTS), rng.choice(PLACES), rng.choice(ADJ)
    have = rng.randint(1, 99)
    s = [
        f"{name} has {have} {obj}.",
        rng.choice(
            [
                f"{pron} went to the {place} with {name2}.",
                f"{pron} keeps them in a {adj} box.",
                f"{name2} likes {obj} too.",
                f"{pron} counts the {obj} every day.",
                f"One day {name} and {name2} went to the {place}.",
            ]
        ),
    ]
    for _ in range(rng.randint(0, 3)):
        before = have
        if rng.random() < 0.5 and have > 1:
            n = rng.randint(1, min(have, 99))
            verb = rng.choice(LOSS).format(n=n)
            have -= n
            equation = f"{before} - {n} = {have}."
        else:
            n = rng.randint(1, 99)
            verb = rng.choice(GAIN).format(n=n)
            have += n
            equation = f"{before} + {n} = {have}."
        s.append(f"{pron} {verb} {obj}.")
        if rng.random() < 0.6:  # the arithmetic written out, numbers copied from the story
            s.append(equation)
        s.append(rng.choice([f"Now {pron.lower()} has {have} {obj}.", f"{name} has {have} {obj} now."]))
    if rng.random() < 0.5:  # restating a fact from earlier in the story
        s.append(
            rng.choice(
                [
                    f"{name} still has {have} {obj}.",
                    f"So {name} has {have} {obj}.",
                    f"{name2} sees that {name} has {have} {obj}.",
                ]
            )
        )
    s.append(
        rng.choice(
            [
                f"{name} is happy.",
                f"It was a good day at the {place}.",
                f"{name2} says thank you.",
                f"The {obj} are {adj}.",
                "Then they went home.",
            ]
        )
    )
    return " ".join(s)


def document(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(3, 8)):
        r = rng.random()
        if r < 0.4:
            parts.append(story(rng))
        elif r < 0.7:
            parts.append(" ".join(fact(rng) for _ in range(rng.randint(2, 6))))
        else:
            parts.append(worksheet(rng))
    return "\n".join(parts)


def make_tokenizer(texts: list[str], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=CONFIG["vocab_size"],
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2, 3]
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
                "add_bos_token": True,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": CONFIG["max_position_embeddings"],
            },
            indent=2,
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}, indent=2
        )
    )
    return tok


def pack(tok, docs: list[str], seq: int) -> np.ndarray:
    ids: list[int] = []
    for d in docs:
        ids.extend(tok.encode(d).ids + [2])  # <s> doc </s>
    n = len(ids) // (seq + 1)
    return np.array(ids[: n * (seq + 1)], dtype=np.int32).reshape(n, seq + 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "models" / "tiny-llama"))
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rng = random.Random(0)
    t0 = time.perf_counter()
    n_docs = args.steps * args.batch_size * args.seq // 230 + 400
    docs = [document(rng) for _ in range(n_docs)]
    tok = make_tokenizer(docs[:4000], out)
    data = pack(tok, docs, args.seq)
    valid, train = data[:64], data[64:]
    print(
        f"corpus: {len(docs)} documents, {data.size:,} tokens, "
        f"{len(train)} training rows ({time.perf_counter() - t0:.0f}s)",
        flush=True,
    )

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(CONFIG))
    # GPT-2-style init: N(0, 0.02), residual projections scaled down by depth.
    params = {}
    for k, v in tree_flatten(model.parameters()):
        if k.endswith("norm.weight"):
            params[k] = mx.ones(v.shape)
        else:
            std = (
                0.02 / math.sqrt(2 * CONFIG["num_hidden_layers"])
                if k.endswith(("o_proj.weight", "down_proj.weight"))
                else 0.02
            )
            params[k] = mx.random.normal(v.shape) * std
    model.load_weights(list(params.items()))
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"model: {n_params:,} parameters", flush=True)

    warmup = min(100, args.steps // 10)
    sched = optim.join_schedules(
        [
            optim.linear_schedule(1e-5, args.lr, warmup),
            optim.cosine_decay(args.lr, args.steps - warmup, args.lr * 0.05),
        ],
        [warmup],
    )
    opt = optim.AdamW(learning_rate=sched, betas=[0.9, 0.95], weight_decay=0.1)

    def loss_fn(model, x):
        logits = model(x[:, :-1])
        return nn.losses.cross_entropy(logits, x[:, 1:], reduction="mean")

    state = [model.state, opt.state]
    grad_fn = nn.value_and_grad(model, loss_fn)

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x):
        loss, g = grad_fn(model, x)
        g, _ = optim.clip_grad_norm(g, 1.0)
        opt.update(model, g)
        return loss

    order = np.random.default_rng(0).permutation(len(train))
    t0 = time.perf_counter()
    for it in range(args.steps):
        idx = order[(it * args.batch_size) % len(order) :][: args.batch_size]
        if len(idx) < args.batch_size:
            idx = order[: args.batch_size]
        loss = step(mx.array(train[idx]))
        mx.eval(state, loss)
        if (it + 1) % 100 == 0 or it == 0:
            print(
                f"step {it + 1}/{args.steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )

    model.eval()
    val = mx.array(valid)
    val_loss = sum(loss_fn(model, val[i : i + 16]).item() for i in range(0, len(val), 16)) / (len(val) // 16)
    print(f"held-out loss {val_loss:.3f}, perplexity {math.exp(val_loss):.2f}", flush=True)

    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2))

    from mlx_lm import generate, load

    m, t = load(str(out))
    samples = {}
    for prompt in ["Mia has 23 apples.", "45 plus 17 is", "The sum of 12 and 30 is", "Leo has 50 coins. He"]:
        samples[prompt] = generate(m, t, prompt, max_tokens=40, verbose=False)
        print(repr(prompt), "->", repr(samples[prompt]), flush=True)
    probe, correct = random.Random(12345), 0
    for _ in range(100):
        a, b = operands(probe)
        if probe.random() < 0.5:
            q, c = f"{a} + {b} =", a + b
        else:
            a, b = max(a, b), min(a, b)
            q, c = f"{a} - {b} =", a - b
        got = generate(m, t, q, max_tokens=5, verbose=False).strip().split(".")[0]
        correct += got == str(c)
    print(f"arithmetic probe: {correct}/100 equations completed correctly", flush=True)
    (out / "pretraining.json").write_text(
        json.dumps(
            {
                "steps": args.steps,
                "batch_size": args.batch_size,
                "seq_len": args.seq,
                "train_tokens": args.steps * args.batch_size * args.seq,
                "parameters": n_params,
                "heldout_loss": round(val_loss, 4),
                "heldout_perplexity": round(math.exp(val_loss), 3),
                "arithmetic_probe_accuracy": correct / 100,
                "samples": samples,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
