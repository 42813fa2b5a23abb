# ruff: noqa: I001  (mlx_dft must be imported before mlx: it puts OpenBLAS under MLX)
"""Pretrain the bundled tiny LLaMA (models/tiny-llama) from scratch, deterministically, on CPU.

    python scripts/make_tiny_model.py [--out models/tiny-llama] [--steps 1500]

1. Generates a corpus (seed 0) on the bundled task's number range:
   - practice (40% of documents): short stories about people and their things that sometimes
     write their arithmetic out right after each action and restate earlier facts, arithmetic
     facts in words ("45 plus 17 is 62.") and as equations ("45 + 17 = 62."), and worksheets
     (chains of equations);
   - recaps (50%): a story of 1 to 4 actions, then its arithmetic worked again from the start
     ("Let us count. She uses 20 toys. 26 - 20 = 6. ..." or the equations alone) and the result
     ("So Lucy has 6 toys.", "The answer is 6."): the model learns to fetch the numbers of earlier
     sentences in order (its recap probe: 34 of 50 test-split stories exact), which the first
     corpus did not teach (its model copied a number only from the sentence just before, 0 of
     50, and a fine-tune could not make it do more);
   - repeats (10%): a story told twice, word for word (copying a span from the context).
   No story the bundled task asks about is in the corpus, and the corpus never contains the
   task's framing ("Question:", "How many ...", "Answer:"): fine-tuning teaches the model to
   answer a question in the form of its recaps, the DFT paper's setting of a base model that
   already knows the solution format.
2. Trains a byte-level BPE tokenizer (512 tokens, digits split one by one).
3. Pretrains a 4-layer LLaMA (hidden 256, 8 heads, 4 KV heads, 3.3M parameters) with AdamW.
4. Writes a Hugging Face folder (config.json, model.safetensors, tokenizer.json, ...) that
   both ``mlx_lm.load`` and ``transformers.AutoModelForCausalLM`` load, plus the held-out
   perplexity and a few greedy samples in ``pretraining.json``.

Takes about 40 minutes on a 2-core CPU with OpenBLAS.
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

from mlx_dft.tasks import ARITH_DIR
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


def practice(rng: random.Random) -> str:
    """Stories, facts and worksheets: the first bundled model's whole corpus."""
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


RECAP_FRAMES = [
    "Let us count.",
    "Let us go through it again.",
    "Step by step:",
    "Here is what happened.",
    "We can work it out.",
]
REPEAT_FRAMES = ["Once more:", "Again:", "I said:", "Read it again."]


def episode(rng: random.Random, exclude: set[str]) -> tuple:
    """A story of 1 to 4 actions, one sentence each (no story the bundled task asks about):
    (name, pronoun, object, story, actions each followed by its equation, the equations, result)."""
    while True:
        name, pron = rng.choice(NAMES)
        obj = rng.choice(OBJECTS)
        value = rng.randint(10, 99)
        sents, worked, equations = [f"{name} has {value} {obj}."], [], []
        for _ in range(rng.choice((1, 2, 3, 4))):
            if value >= 2 and rng.random() < 0.5:
                n = rng.randint(1, min(99, value))
                verb = rng.choice(LOSS).format(n=n)
                equation = f"{value} - {n} = {value - n}."
                value -= n
            else:
                n = rng.randint(1, min(99, 999 - value))
                verb = rng.choice(GAIN).format(n=n)
                equation = f"{value} + {n} = {value + n}."
                value += n
            sents.append(f"{pron} {verb} {obj}.")
            worked += [sents[-1], equation]
            equations.append(equation)
        story = " ".join(sents)
        if story not in exclude:
            return name, pron, obj, story, worked, equations, value


def recap(rng: random.Random, exclude: set[str]) -> str:
    """A story, then its arithmetic worked again from the start (each action restated before its
    equation, or the equations alone) and the result: retrieval of earlier numbers, in order."""
    name, pron, obj, story, worked, equations, value = episode(rng, exclude)
    body = worked if rng.random() < 0.6 else equations
    frame = rng.choice(RECAP_FRAMES)
    end = rng.choice(
        [f"So {name} has {value} {obj}.", f"Now {pron.lower()} has {value} {obj}.", f"The answer is {value}."]
    )
    return " ".join([story, frame, *body, end])


def repeat(rng: random.Random, exclude: set[str]) -> str:
    """A story told twice, word for word: copying a span from the context."""
    story = episode(rng, exclude)[3]
    return " ".join([story, rng.choice(REPEAT_FRAMES), story])


def document(rng: random.Random, exclude: set[str] = frozenset()) -> str:
    """One pretraining document: 40% practice (stories, facts, worksheets), 10% repeated stories,
    20% a single recap (it ends the document, before </s>), 30% two to four recaps."""
    r = rng.random()
    if r < 0.4:
        return practice(rng)
    if r < 0.5:
        return "\n".join(repeat(rng, exclude) for _ in range(rng.randint(2, 4)))
    if r < 0.7:
        return recap(rng, exclude)
    return "\n".join(recap(rng, exclude) for _ in range(rng.randint(2, 4)))


def task_stories() -> set[str]:
    """The stories of every bundled task problem (its question without "How many ...?")."""
    stories = set()
    for path in sorted(ARITH_DIR.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            question = json.loads(line)["prompt"].removeprefix("Question: ")
            stories.add(question.rsplit(" How many", 1)[0])
    return stories


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
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument(
        "--describe-only",
        action="store_true",
        help="only (re)write pretraining.json of the model already in --out (made with these options)",
    )
    args = ap.parse_args()
    out = Path(args.out)
    if args.describe_only:
        needed = ("tokenizer.json", "config.json", "model.safetensors")
        missing = [n for n in needed if not (out / n).is_file()]
        if missing:  # one line, not a traceback: there is no model to describe
            raise SystemExit(f"error: --describe-only: {out} has no {', '.join(missing)} (no model there)")
    out.mkdir(parents=True, exist_ok=True)

    rng = random.Random(0)
    t0 = time.perf_counter()
    n_docs = args.steps * args.batch_size * args.seq // 230 + 400
    exclude = task_stories()
    docs = [document(rng, exclude) for _ in range(n_docs)]
    if args.describe_only:
        from tokenizers import Tokenizer

        valid = pack(Tokenizer.from_file(str(out / "tokenizer.json")), docs, args.seq)[:64]
        describe(out, args, valid)
        return
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

    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2))
    describe(out, args, valid)


def recap_probe(m, t, n: int = 50) -> tuple[int, dict]:
    """How many of the first ``n`` stories of the task's test split (never in the corpus) the model
    recaps exactly, in its own format: story + "Let us count." -> each action and its equation."""
    from mlx_lm import generate

    correct, example = 0, {}
    for line in (ARITH_DIR / "test.jsonl").read_text().splitlines()[:n]:
        rec = json.loads(line)
        story = rec["prompt"].removeprefix("Question: ").rsplit(" How many", 1)[0]
        want = rec["completion"].rsplit(" The answer is", 1)[0].strip()
        got = generate(m, t, story + " Let us count.", max_tokens=len(t.encode(want)) + 4, verbose=False)
        correct += got.strip().startswith(want)
        example = example or {story + " Let us count.": got}
    return correct, example


def describe(out: Path, args, valid: np.ndarray) -> None:
    """Held-out loss, greedy samples and probes of the model in ``out``: pretraining.json."""
    from mlx_lm import generate, load

    m, t = load(str(out))
    n_params = sum(v.size for _, v in tree_flatten(m.parameters()))
    val = mx.array(valid)
    losses = [
        nn.losses.cross_entropy(m(val[i : i + 16, :-1]), val[i : i + 16, 1:], reduction="mean").item()
        for i in range(0, len(val), 16)
    ]
    val_loss = sum(losses) / len(losses)
    print(f"held-out loss {val_loss:.3f}, perplexity {math.exp(val_loss):.2f}", flush=True)
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
    recaps, recap_sample = recap_probe(m, t)
    print(f"recap probe: {recaps}/50 test-split stories recapped exactly", flush=True)
    samples.update(recap_sample)
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
                "recap_probe_accuracy": recaps / 50,
                "samples": samples,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
