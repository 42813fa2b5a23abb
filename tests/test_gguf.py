# ruff: noqa: I001  (mlx_dft must be imported before mlx: it puts OpenBLAS under MLX)
"""GGUF in: the reader, the tokenizer, the conversion, against implementations we did not write.

- SmolLM2-135M-Instruct (Q4_1, written by llama.cpp): transformers' own GGUF loader gives the
  logits of our dequantized conversion, and its tokenizer our token ids; the 4-bit conversion
  loads as MLX-quantized layers and answers a question.
- Small synthetic llama/qwen2/qwen3 files written with the ``gguf`` package (llama.cpp's
  writer): again transformers' GGUF loader as the reference.
- Bad files: one line on stderr, exit status 1, no output folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
import subprocess
import unicodedata
from pathlib import Path

import mlx_dft  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import ROOT, run_cli
from mlx_dft.errors import UserError
from mlx_dft.gguf import names
from mlx_dft.gguf.convert import cached_conversion, convert_gguf
from mlx_dft.gguf.reader import read_header

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
Q = gguf.GGMLQuantizationType

# ------------------------------------------------------------------ SmolLM2 fixtures


@pytest.fixture(scope="session")
def smol_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf-cache")


@pytest.fixture(scope="session")
def smol_float32(smollm2, smol_cache) -> Path:
    """The SmolLM2 file converted now (float32), in the cache ``--model FILE.gguf`` uses on CPU."""
    return cached_conversion(smollm2["gguf"], dequantize=True, root=smol_cache / "gguf")


@pytest.fixture(scope="session")
def smol_4bit(smollm2, tmp_path_factory) -> Path:
    return convert_gguf(smollm2["gguf"], tmp_path_factory.mktemp("smol") / "4bit")


@pytest.fixture(scope="session")
def hf_reference(smollm2):
    """transformers' GGUF loader on the SmolLM2 file: (model in float32, tokenizer)."""
    folder, name = str(smollm2["gguf"].parent), smollm2["gguf"].name
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def our_tokenizer(smol_float32):
    return transformers.AutoTokenizer.from_pretrained(str(smol_float32))


def _mlx_model(folder: Path) -> nn.Module:
    from mlx_lm.utils import load_model

    return load_model(Path(folder))[0]


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n",
]

# ------------------------------------------------------------------ SmolLM2 vs transformers


@pytest.mark.slow
def test_float32_logits_match_transformers_gguf_loader(smol_float32, hf_reference, our_tokenizer):
    ours = _mlx_model(smol_float32)
    ref, _ = hf_reference
    # transformers loading our folder must agree too: the folder is a real Hugging Face model.
    theirs_of_ours = transformers.AutoModelForCausalLM.from_pretrained(str(smol_float32), dtype=torch.float32)
    worst = 0.0
    for prompt in PROMPTS:
        ids = our_tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            expected = ref(torch.tensor([ids])).logits[0].numpy()
            via_folder = theirs_of_ours(torch.tensor([ids])).logits[0].numpy()
        got = np.array(ours(mx.array([ids]))[0].astype(mx.float32))
        assert np.abs(expected).max() > 10  # real logits, not a degenerate model
        worst = max(worst, np.abs(got - expected).max(), np.abs(via_folder - expected).max())
    assert worst <= 2e-4, worst


# About 4 KB of varied text. Whitespace before numerals is checked separately
# (test_digit_split_follows_llama_cpp): transformers does not split it as llama.cpp does.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's, isn't it? They'll say we'd've known.",
    "Ünïcödé: café, naïve, façade, Ångström, straße, œuvre. Ελληνικά, русский язык, עברית, العربية.",
    "日本語のテキスト、中文文本，한국어 텍스트. Emoji: 🤗🚀👍🏽 👨‍👩‍👧‍👦 ❤️ and flags 🇫🇷🇯🇵.",
    "Combining: e\u0301 a\u0308 n\u0303; zero-width: a\u200bb\u200dc; nbsp:\u00a0x; tabs:\tend.",
    "def f(x: int) -> int:\n    return x ** 2 + 3 * x - 7  # a comment\n\nclass A:\n    pass\n",
    '{"name": "mlx_dft", "version": "0.1.0", "tags": ["dft", "lora"], "ok": true, "n": null}',
    '<html><body><div class="x">Hello &amp; goodbye</div></body></html>\n',
    'for i in $(seq 1 10); do echo "$i" >> out.txt; done && cat out.txt | wc -l',
    "Numbers: 0 1 12 123 1234 12345 3.14159 -42 +7 1e-10 6.022e23 1,000,000 0x1F 0b1010 42nd 3rd.",
    "Dates and times: 2024-11-25T07:15:00Z, 25/11/2024, 11:59pm, 1999, $19.99, 50%, 3/4 cup.",
    "Whitespace runs:   three spaces,\t\ttwo tabs,    four, trailing   \n\n\nthree newlines\r\nCRLF",
    "   leading spaces and a line that ends with spaces   ",
    "Markdown:\n# Title\n\n- item one\n- item two\n\n```python\nprint('hi')\n```\n> quote\n",
    "URLs: https://example.com/path?q=1&r=two#frag, mail: someone@example.org, path C:\\Users\\x.",
    "Punctuation!!! ??? ... --- *** ___ ((())) [[[]]] {{{}}} <<<>>> ~~~ ``` ''' \"\"\" ;;; :::",
    "Mixed scripts inline: data科学 and Straße-42b, x²+y²=z², ∑∫√∞≈≠≤≥, → ← ↑ ↓.",
]


def _digit_split_matters(text: str) -> bool:
    """Whether splitting numerals off first (llama.cpp's ``smollm`` rule) can change the pieces:
    a numeral after two or more whitespace characters, or a non-ASCII numeral after whitespace
    or another numeral (its first UTF-8 byte can merge with what precedes it)."""
    for i, c in enumerate(text):
        if i and unicodedata.category(c).startswith("N"):
            before = text[i - 1]
            if before.isspace() and (i > 1 and text[i - 2].isspace() or not c.isascii()):
                return True
            if not c.isascii() and unicodedata.category(before).startswith("N"):
                return True
    return False


def test_token_ids_match_transformers(our_tokenizer, hf_reference):
    _, ref = hf_reference
    text = "\n".join(CORPUS * 3)
    assert len(text.encode()) > 4000
    assert not _digit_split_matters(text)  # (see test_digit_split_follows_llama_cpp)
    agreed = 0
    for piece in [*CORPUS, text]:
        ours, theirs = our_tokenizer(piece)["input_ids"], ref(piece)["input_ids"]
        assert ours == theirs, piece
        agreed += len(ours)
    assert agreed > 2000


def test_special_tokens_match_transformers(our_tokenizer, hf_reference):
    _, ref = hf_reference
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(our_tokenizer, name) == getattr(ref, name), name
    added = {i: (t.content, t.special) for i, t in our_tokenizer.added_tokens_decoder.items()}
    assert added == {i: (t.content, t.special) for i, t in ref.added_tokens_decoder.items()}
    controls = [content for content, special in added.values() if special]
    assert len(controls) == 17  # the file's control tokens
    text = "x".join(controls) + " <|im_start|>user<|im_end|><jupyter_code>"
    assert our_tokenizer(text)["input_ids"] == ref(text)["input_ids"]
    assert our_tokenizer.decode(our_tokenizer(text)["input_ids"]) == text


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of Japan?"},
        {"role": "assistant", "content": "Tokyo."},
        {"role": "user", "content": "And of Italy? Ünïcödé 🤗"},
    ],
    [
        {"role": "user", "content": "Write code:\n```python\nx = [1, 2, 3]\n```"},
        {"role": "assistant", "content": "def f():\n    return 42\n"},
        {"role": "user", "content": "Thanks!"},
    ],
]


def test_chat_template_matches_transformers(our_tokenizer, hf_reference):
    _, ref = hf_reference
    for messages in CONVERSATIONS:
        for gen in (True, False):
            ours = our_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            theirs = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours == theirs
            assert our_tokenizer(ours)["input_ids"] == ref(theirs)["input_ids"]


def test_digit_split_follows_llama_cpp(smol_float32, our_tokenizer, hf_reference):
    """llama.cpp's ``smollm`` split puts every digit on its own *before* GPT-2's split (the model's
    original tokenizer: Digits, then ByteLevel), so a whitespace run before a digit stays one
    piece ("  12" -> "ĠĠ", "1", "2"); transformers' GGUF tokenizer applies GPT-2's split alone
    ("Ġ", "Ġ", "1", "2"). Both decode to the same text; the model itself, trained on one of
    them, is the judge: it must find our ids far more likely."""
    ours_model, (_, ref) = _mlx_model(smol_float32), hf_reference
    texts = [
        "| year | sales |\n|------|-------|\n| 2021 |   120 |\n| 2022 |   340 |\n| 2023 |  1020 |\n",
        "Total:  42 apples and  17 pears.\n\n1. First\n\n2. Second\n",
        "Fractions and powers: ½ cup, ¼ teaspoon, ¾ of it; area 5 m² and ² alone; Arabic ١٢٣.",
    ]

    def nll(ids: list[int]) -> float:
        x = mx.array([[1, *ids]])
        logits = ours_model(x)[0, :-1].astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return -float(mx.take_along_axis(logp, mx.array(ids)[:, None], axis=-1).sum())

    margins = []
    for text in texts:
        ours, theirs = our_tokenizer(text)["input_ids"], ref(text)["input_ids"]
        assert _digit_split_matters(text) and ours != theirs
        assert our_tokenizer.decode(ours) == ref.decode(theirs) == text
        # every ASCII digit is a token of its own
        pieces = our_tokenizer.convert_ids_to_tokens(ours)
        assert all(len(t) == 1 for t in pieces if any(c in "0123456789" for c in t))
        margins.append(nll(theirs) - nll(ours))
    assert min(margins) > 5, margins


# ------------------------------------------------------------------ tokenizers of other models

TOKENIZER_LINES = [
    "The year 2024 had 365 days; 1,234,567 people said 'it's fine'. HELLO World's DON'T we've",
    "def f(x):\n    return x*2  # I'll\n\n\n\tindented\r\nCRLF",
    "Ünïcödé 日本語 ١٢٣ ½ café  and   spaces\t\ttabs 🤗 a1b2c3 12345678",
]
TOKENIZER_TEXTS = [
    "The year 2024 had 365 days; it's fine.",
    "  lead\n\n\n  x = 12345678 // 3\r\n",
    "DON'T We'VE 日本語 ١٢٣ ½ café 🚀",
    "a1b2c3   \t\t  end  ",
    "HELLO World's",
]


def _write_tokenizer_gguf(path: Path, model: str, tokens: list[str], types: list[int], **extra) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_token_types(types)
    for key, value in extra.items():
        getattr(w, f"add_{key}")(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def byte_level_vocab() -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary trained *without* any split, so that its merges cross words,
    digits and spaces: a tokenizer that splits text differently gives different ids."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=700, initial_alphabet=alphabet, special_tokens=["<|endoftext|>"], show_progress=False
    )
    tok.train_from_iterator(TOKENIZER_LINES * 50, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def test_byte_level_splits_match_transformers(tmp_path, byte_level_vocab):
    """gpt-2, llama-bpe and qwen2 splits (transformers implements these like llama.cpp)."""
    from mlx_dft.gguf.tokenizer import build_tokenizer

    tokens, merges = byte_level_vocab
    types = [3 if t == "<|endoftext|>" else 1 for t in tokens]
    seen = set()
    for pre in ("gpt-2", "llama-bpe", "qwen2"):
        path = _write_tokenizer_gguf(
            tmp_path / f"{pre}.gguf", "gpt2", tokens, types, tokenizer_pre=pre, token_merges=merges,
            eos_token_id=0, add_bos_token=False,
        )  # fmt: skip
        ours, _ = build_tokenizer(read_header(path).metadata)
        ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
        ids = [ours.encode(text).ids for text in TOKENIZER_TEXTS]
        assert ids == [ref(text)["input_ids"] for text in TOKENIZER_TEXTS], pre
        assert [ours.decode(i) for i in ids] == TOKENIZER_TEXTS
        seen.add(str(ids))
    assert len(seen) == 3  # the three splits differ on these texts: the comparison can tell them apart


def test_sentencepiece_tokenizer_matches_sentencepiece(tmp_path):
    """``tokenizer.ggml.model = llama``: a SentencePiece BPE model trained here (Llama 2's
    settings: byte fallback, digits split, space prefix) written as llama.cpp's converter writes
    it, against SentencePiece itself, through the folder transformers and mlx-lm load."""
    import io

    import sentencepiece as spm

    from mlx_dft.gguf.tokenizer import write_tokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_LINES * 30), model_writer=buf, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True, allow_whitespace_only_pieces=True,
        minloglevel=2,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()

    def kind(i: int) -> int:
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1

    path = _write_tokenizer_gguf(
        tmp_path / "spm.gguf", "llama", [sp.id_to_piece(i) for i in range(n)], [kind(i) for i in range(n)],
        token_scores=[sp.get_score(i) for i in range(n)], bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(),
        unk_token_id=sp.unk_id(), add_bos_token=True, add_space_prefix=True,
    )  # fmt: skip
    write_tokenizer(read_header(path).metadata, tmp_path)
    ours = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    texts = [*TOKENIZER_TEXTS, "   ", "x", "zebra ☃ ünseen wörds"]
    for text in texts:
        assert ours(text)["input_ids"] == [sp.bos_id(), *sp.encode(text)], text
        assert ours.decode(ours(text)["input_ids"], skip_special_tokens=True) == text


def test_unknown_tokenizers_are_refused_by_name(tmp_path):
    from mlx_dft.gguf.tokenizer import build_tokenizer

    tokens = ["a", "b", "ab"]
    path = _write_tokenizer_gguf(tmp_path / "a.gguf", "gpt2", tokens, [1, 1, 1], tokenizer_pre="mystery-pre")
    with pytest.raises(
        UserError, match="tokenizer.ggml.pre = 'mystery-pre', a text split mlx_dft does not know"
    ):
        build_tokenizer(read_header(path).metadata)
    path = _write_tokenizer_gguf(tmp_path / "b.gguf", "bert", tokens, [1, 1, 1])
    with pytest.raises(UserError, match="tokenizer is of type 'bert'"):
        build_tokenizer(read_header(path).metadata)


# ------------------------------------------------------------------ SmolLM2, 4-bit


def test_4bit_conversion_is_mlx_quantized_and_close_to_float(smol_4bit, smol_float32, our_tokenizer):
    q4, f32 = _mlx_model(smol_4bit), _mlx_model(smol_float32)
    assert isinstance(q4.model.embed_tokens, nn.QuantizedEmbedding) and q4.model.embed_tokens.bits == 8
    linears = [m for _, m in q4.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    assert len(linears) == 30 * 7 and all(isinstance(m, nn.QuantizedLinear) and m.bits == 4 for m in linears)
    assert all(m.group_size == 32 for m in [*linears, q4.model.embed_tokens])
    ids = our_tokenizer(PROMPTS[0] + " " + PROMPTS[1])["input_ids"]
    a = np.array(q4(mx.array([ids]))[0].astype(mx.float32))
    b = np.array(f32(mx.array([ids]))[0].astype(mx.float32))
    # Same weights; the quantized products round through float16 scales: small differences only.
    assert np.abs(a - b).max() < 0.15, np.abs(a - b).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9


@pytest.mark.slow
def test_4bit_model_answers_through_our_pipeline(smol_4bit):
    answer = mlx_dft.generate(
        "What is the capital of France?", model=str(smol_4bit), max_tokens=10, chat=True
    )
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_model_gguf_file_everywhere_via_the_cache(smollm2, smol_float32, smol_cache):
    """``--model FILE.gguf``: converted once into the cache (float32 on CPU), reused after."""
    weights = smol_float32 / "model.safetensors"
    before = weights.stat().st_mtime_ns
    question = "What is the capital of France?"
    args = ("generate", "--model", smollm2["gguf"], "--prompt", question, "--max-tokens", "12")
    done = run_cli(*args, env={"MLX_DFT_CACHE": str(smol_cache)})
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert [p.name for p in (smol_cache / "gguf").iterdir()] == [smol_float32.name]
    assert weights.stat().st_mtime_ns == before  # reused, not converted again


def test_fetch_script_is_idempotent_offline(smollm2, monkeypatch):
    spec = importlib.util.spec_from_file_location("fetch_smollm2", ROOT / "scripts" / "fetch_smollm2.py")
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)

    def no_network(*args, **kwargs):
        raise AssertionError("a finished fetch must not run pip")

    monkeypatch.setattr(subprocess, "run", no_network)
    assert fetch.convert() == smollm2


# ------------------------------------------------------------------ synthetic files, other architectures


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (the byte-level BPE alphabet)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in kept else chr(next(extra)) for b in range(256)]


def _add_tokenizer(w, vocab_rows: int) -> None:
    tokens = [*_byte_alphabet(), "Ġt", "he", "Ġthe", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += [f"<unused{i}>" for i in range(vocab_rows - len(tokens))]
    types = [3 if t.startswith("<|") else 1 for t in tokens]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")


SHAPES = {
    "llama": {"head_dim": 16, "tie_word_embeddings": True},
    "qwen2": {"head_dim": 16, "tie_word_embeddings": True},
    # head_dim 128, not hidden/heads: as real Qwen3 models (transformers reads no key_length for qwen3)
    "qwen3": {"head_dim": 128, "tie_word_embeddings": False},
}


def write_tiny_gguf(
    path: Path, arch: str = "llama", tokenizer: bool = True, qtype=Q.Q8_0, override=None, file_arch=None,
    hidden: int = 64, blocks=None,
) -> Path:
    """A 2-layer random model as llama.cpp would write it: its tensor names, q/k rows in rotary
    order for llama, linear layers in ``qtype``, norms in F32; ``override`` {name: (array, type)};
    ``file_arch`` names another general.architecture; ``blocks(name, shape) -> (array, type) or
    None`` gives a linear layer's stored form."""  # fmt: skip
    from mlx_lm.utils import _get_classes

    shape = SHAPES[arch]
    cfg = {
        "model_type": arch, "hidden_size": hidden, "num_hidden_layers": 2, "intermediate_size": 2 * hidden,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": 320,
        "rope_theta": 10000.0, "max_position_embeddings": 256, **shape,
    }  # fmt: skip
    model_cls, args_cls = _get_classes(cfg)
    model = model_cls(args_cls.from_dict(cfg))
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), file_arch or arch)
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(2 * hidden)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_key_length(shape["head_dim"])
    w.add_value_length(shape["head_dim"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(shape["head_dim"])
    if tokenizer:
        _add_tokenizer(w, 320)
    for hf, p in tree_flatten(model.parameters()):
        value = rng.standard_normal(p.shape).astype(np.float32) * (0.3 if p.ndim > 1 else 0.1)
        if p.ndim == 1 and "norm" in hf:
            value += 1.0
        heads = names.reordered_heads(hf, cfg)
        if heads:
            value = names.to_gguf_rows(value, heads)
        name = names.to_gguf_name(hf, arch)
        stored = blocks(name, value.shape) if blocks and p.ndim > 1 else None
        if override and name in override:
            data, kind = override[name]
            w.add_tensor(name, data, raw_dtype=kind)
        elif stored is not None:
            w.add_tensor(name, stored[0], raw_dtype=stored[1])
        elif p.ndim > 1:
            w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _converted_and_transformers(path: Path, tmp_path: Path):
    """(float32 conversion, ids, transformers' GGUF loader's logits, ours) for a tiny file."""
    out = convert_gguf(path, tmp_path / "float32", dequantize=True)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    )
    ids = [[5, 70, 256, 300, 301, 12, 99, 180, 7, 33]]
    with torch.no_grad():
        expected = ref(torch.tensor(ids)).logits[0].numpy()
    return out, ids, expected, np.array(_mlx_model(out)(mx.array(ids))[0].astype(mx.float32))


@pytest.mark.parametrize(
    "arch,qtype",
    [("llama", Q.Q4_0), ("llama", Q.BF16), ("qwen2", Q.Q4_1), ("qwen3", Q.Q8_0), ("qwen3", Q.F16)],
    ids=lambda v: getattr(v, "name", v),
)
def test_synthetic_models_match_transformers_gguf_loader(tmp_path, arch, qtype):
    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, qtype=qtype)
    out, ids, expected, got = _converted_and_transformers(path, tmp_path)
    assert np.abs(expected).max() > 1
    assert np.abs(got - expected).max() <= 2e-4
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0):  # the quantized conversion computes the same function
        q = convert_gguf(path, tmp_path / "quantized")
        got_q = np.array(_mlx_model(q)(mx.array(ids))[0].astype(mx.float32))
        assert np.abs(got_q - expected).max() < 0.05 * np.abs(expected).max()


# The block layouts of llama.cpp's types read through gguf-py: (values, bytes, offsets of the
# float16 scales, or of the E8M0 exponent byte for MXFP4). Random bytes with small scales are
# valid blocks of a file as llama.cpp writes them.
BLOCKS = {
    Q.Q2_K: (256, 84, (80, 82)), Q.Q3_K: (256, 110, (108,)), Q.Q4_K: (256, 144, (0, 2)),
    Q.Q5_K: (256, 176, (0, 2)), Q.Q6_K: (256, 210, (208,)), Q.Q5_0: (32, 22, (0,)), Q.Q5_1: (32, 24, (0, 2)),
    Q.IQ4_NL: (32, 18, (0,)), Q.MXFP4: (32, 17, ()),
}  # fmt: skip


def random_blocks(shape, qtype, rng):
    values, nbytes, scales = BLOCKS[qtype]
    rows, cols = shape
    data = rng.integers(0, 256, size=(rows * cols // values, nbytes), dtype=np.uint8)
    for at in scales:
        data[:, at : at + 2] = np.frombuffer(np.float16(2e-4).tobytes(), np.uint8)
    if qtype == Q.MXFP4:
        data[:, 0] = 120  # E8M0: 2^(120 - 127) times the FP4 values (at most 6)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("qtype", list(BLOCKS), ids=lambda q: q.name)
def test_files_of_llama_cpps_other_types_read_as_transformers_reads_them(tmp_path, qtype, capsys):
    """K-quants (rows of 256), Q5_x, IQ4_NL and MXFP4 tensors, dequantized with gguf-py: the model
    computes transformers' GGUF loader's logits (its own dequantization of the same file);
    tensors whose rows do not fit the block stay Q8_0 (as llama.cpp falls back), so a file mixes
    types as real ones do. Default: float16 weights, said in one line."""
    rng = np.random.default_rng(1)
    values = BLOCKS[qtype][0]
    path = write_tiny_gguf(tmp_path / "m.gguf", "llama", hidden=256,
                           blocks=lambda name, shp: (random_blocks(shp, qtype, rng), qtype)
                           if shp[-1] % values == 0 and "token_embd" not in name else None)  # fmt: skip
    types = {t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert qtype in types and Q.Q8_0 in types
    out, ids, expected, got = _converted_and_transformers(path, tmp_path)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, atol=2e-4 * max(1.0, np.abs(expected).max()))
    assert f"{qtype.name}" in capsys.readouterr().err  # the line that says what was dequantized
    half = convert_gguf(path, tmp_path / "float16")
    assert '"torch_dtype": "float16"' in (half / "config.json").read_text()
    w32, w16 = (mx.load(str(folder / "model.safetensors")) for folder in (out, half))
    assert w32.keys() == w16.keys()
    for k, v in w32.items():  # the default keeps each weight as float16 of the exact value
        if w16[k].dtype == mx.float16:
            assert mx.array_equal(w16[k], v.astype(mx.float16)).item(), k


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.MXFP4], ids=lambda q: q.name)
def test_requantized_block_types_become_mlx_affine_at_their_bits(tmp_path, qtype, capsys):
    """--requantize: a block type MLX has no layout for becomes MLX's affine layout at its bits
    (4 at least), a Q8_0 tensor of the same file stays as MLX reads it; the error said in one line
    is the relative RMS difference from the file's values (recomputed here from both folders), and
    the model computes the float model's function up to that error."""
    from mlx_dft.gguf.requant import AFFINE, requantize_bits

    rng = np.random.default_rng(2)
    values = BLOCKS[qtype][0]
    path = write_tiny_gguf(tmp_path / "m.gguf", "llama", hidden=256,
                           blocks=lambda name, shp: (random_blocks(shp, qtype, rng), qtype)
                           if shp[-1] % values == 0 and "token_embd" not in name else None)  # fmt: skip
    exact = convert_gguf(path, tmp_path / "float32", dequantize=True)
    capsys.readouterr()
    out = convert_gguf(path, tmp_path / "requantized", requantize=True)
    err = capsys.readouterr().err
    kept = qtype.name in AFFINE  # an affine type keeps its codes: only float16 scales move a value
    bits = AFFINE[qtype.name][2] if kept else requantize_bits(qtype.name)
    line = next(x for x in err.splitlines() if "re-quantized" in x)
    assert "Q8_0 8-bit (codes kept" in line and "dequantized" not in err
    found = re.search(rf"{qtype.name} {bits}-bit \((codes kept, )?error ([0-9.e+-]+)\)", line)
    assert found and bool(found.group(1)) == kept, line
    said = float(found.group(2))
    config = json.loads((out / "config.json").read_text())
    q = config["quantization"]
    w, w32 = mx.load(str(out / "model.safetensors")), mx.load(str(exact / "model.safetensors"))
    num = den = 0.0
    kinds = set()
    for name in w32:
        module = name[: -len(".weight")]
        if f"{module}.scales" not in w:
            continue
        b = q.get(module, q)["bits"]
        back = mx.dequantize(w[name], w[f"{module}.scales"], w[f"{module}.biases"], 32, b)
        kinds.add(b)
        if "embed_tokens" in module or w32[name].shape[-1] % values:
            continue  # (the file's Q8_0 tensors, as the blocks function above laid them out)
        assert b == bits, (module, b)
        num += float(((back - w32[name]) ** 2).sum())
        den += float((w32[name] ** 2).sum())
    assert bits in kinds
    measured = (num / den) ** 0.5
    assert 0 < measured < (1e-3 if kept else 0.2) and abs(measured - said) <= 0.051 * said, (measured, said)
    ids = mx.array([[5, 70, 256, 300, 301, 12, 99, 180, 7, 33]])
    got, want = (np.array(_mlx_model(f)(ids)[0].astype(mx.float32)) for f in (out, exact))
    # the logits' relative RMS difference: 0.1x (IQ4_NL) to 6.6x (Q6_K, whose random sub-block scales
    # an affine group of 32 fits worst) the weights' on these random two-layer models (measured)
    rel = np.sqrt(((got - want) ** 2).mean() / (want**2).mean())
    assert rel <= 10 * measured


def test_requantize_and_dequantize_together_are_refused(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", "llama", qtype=Q.Q8_0)
    with pytest.raises(UserError, match="--dequantize and --requantize"):
        convert_gguf(path, tmp_path / "x", dequantize=True, requantize=True)
    r = run_cli("convert", str(path), "--out", str(tmp_path / "x"), "--requantize", "--dequantize")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "--requantize" in r.stderr
    assert not (tmp_path / "x").exists()
    # a file MLX reads as it is: --requantize has nothing to do, and says so
    r = run_cli("convert", str(path), "--out", str(tmp_path / "y"), "--requantize")
    assert r.returncode == 0 and "nothing to re-quantize" in r.stderr, r.stderr


def test_a_float64_tensor_reads_as_float32(tmp_path):
    norm = np.linspace(0.5, 1.5, 256)
    path = write_tiny_gguf(tmp_path / "m.gguf", "llama", hidden=256,
                           override={"blk.0.attn_norm.weight": (norm, Q.F64)})  # fmt: skip
    out = convert_gguf(path, tmp_path / "model")
    got = mx.load(str(out / "model.safetensors"))["model.layers.0.input_layernorm.weight"]
    assert got.dtype == mx.float32
    np.testing.assert_array_equal(np.array(got), norm.astype(np.float32))


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q5_K_M", "Q6_K"])
def test_a_k_quant_smollm2_made_by_llama_cpp_computes_llama_cpps_logits(smollm2, tmp_path, ftype):
    """SmolLM2 requantized by llama.cpp's own quantizer (as the files Ollama and LM Studio users
    have), converted here: transformers' GGUF loader's logits on the same file (2e-4 of their
    scale), and llama.cpp's to the precision llama.cpp computes them at (its top 3 holds our top
    token everywhere; within twice the difference of the Q4_1 original, which MLX reads itself)."""
    import isolated
    import native_llama_cpp
    from test_gguf_export import llama_cpp_logits

    lib = isolated.library_version(native_llama_cpp.binding())
    path = isolated.call("native_llama_cpp:quantize", str(smollm2["gguf"]), str(tmp_path / f"s.{ftype}.gguf"),
                         ftype, library=lib)  # fmt: skip
    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert {"Q6_K"} <= types and (ftype == "Q6_K" or ftype[:2] + "_K" in types), types
    out = convert_gguf(path, tmp_path / "model", dequantize=True)
    ids = [1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 2, 7, 12, 8844, 30, 33]
    theirs = llama_cpp_logits(path, ids)
    ours = np.array(_mlx_model(out)(mx.array([ids]))[0].astype(mx.float32))
    top3 = np.argsort(-theirs, axis=-1)[:, :3]
    agree = [ours[i].argmax() in top3[i] for i in range(len(ids))]
    assert all(agree), agree  # our top token is among llama.cpp's top 3 at every position
    # As close as the original Q4_1 file, which MLX reads itself, is to llama.cpp's run of it.
    base = np.array(_mlx_model(smollm2["float32"])(mx.array([ids]))[0].astype(mx.float32))
    baseline = np.abs(base - llama_cpp_logits(smollm2["gguf"], ids)).max()
    err = np.abs(ours - theirs).max()
    # llama.cpp multiplies K-quant blocks with 8-bit K-quantized activations (Q6_K, almost
    # lossless as weights, is as far off as Q4_K_M): 1.7x the Q4_1 path's difference, measured
    assert err <= 2.0 * baseline, (err, baseline)
    # transformers' GGUF loader, which dequantizes the same file in float32: our weights exactly
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=Path(path).name,
                                                            dtype=torch.float32).eval()  # fmt: skip
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - expected).max() <= 2e-4 * np.abs(expected).max()


@pytest.mark.slow
def test_a_q4_k_m_smollm2_requantized_stays_4_bit_and_close(smollm2, tmp_path, capsys):
    """The Q4_K_M file llama.cpp's quantizer makes of SmolLM2, re-quantized (--model FILE.gguf on
    a GPU): its Q4_K tensors MLX 4-bit with their codes, its Q6_K ones fitted at 8 bits, at about
    the file's size (1.09x measured); the error said in one line (measured: Q4_K 8.3e-4, Q6_K
    4.8e-3); logits within 0.1 of their scale of the exact (float32) conversion of the same file
    (0.013 measured), top token the same at 90% of positions at least (100% measured)."""
    import isolated
    import native_llama_cpp

    lib = isolated.library_version(native_llama_cpp.binding())
    path = isolated.call("native_llama_cpp:quantize", str(smollm2["gguf"]), str(tmp_path / "s.Q4_K_M.gguf"),
                         "Q4_K_M", library=lib)  # fmt: skip
    exact = convert_gguf(path, tmp_path / "float32", dequantize=True)
    capsys.readouterr()
    out = convert_gguf(path, tmp_path / "requantized", requantize=True)
    line = next(x for x in capsys.readouterr().err.splitlines() if "re-quantized" in x)
    assert "Q4_K 4-bit (codes kept" in line and "Q6_K 8-bit (error" in line, line
    q = json.loads((out / "config.json").read_text())["quantization"]
    widths = {q["bits"]} | {v["bits"] for v in q.values() if isinstance(v, dict)}
    assert widths <= {4, 5, 6, 8}  # (llama.cpp falls back to Q5_0 and Q8_0 for rows of 576)
    size = (out / "model.safetensors").stat().st_size
    assert size < 1.4 * Path(path).stat().st_size, (size, Path(path).stat().st_size)
    ids = [1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 2, 7, 12, 8844, 30, 33]
    got, want = (np.array(_mlx_model(f)(mx.array([ids]))[0].astype(mx.float32)) for f in (out, exact))
    assert np.abs(got - want).max() <= 0.1 * np.abs(want).max()
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.9


# ------------------------------------------------------------------ bad input


def _q8k_tensor() -> tuple[np.ndarray, object]:
    return np.zeros((4, 292), np.uint8), Q.Q8_K  # 4 rows of one 256-value Q8_K block (not a weight type)


BAD = {
    "truncated": r"truncated GGUF file \(tensor .* ends at byte \d+, the file has \d+ bytes\)",
    "architecture": r"GGUF architecture 'gpt2' is not supported \(supported: gemma3, gemma4, gpt-oss, ",
    "tensor type": r"tensor blk\.0\.attn_q\.weight has type Q8_K, which mlx_dft does not read \(it reads F",
    "no tokenizer": r"the GGUF file has no tokenizer metadata",
    "not gguf": r"is not a GGUF file \(it does not start with 'GGUF'\)",
    "lying K-quant shape": r"attn_q\.weight of type Q4_K has rows of 255 values, not a multiple of 256",
    "lying block count": r"tensors blk\.0\.attn_q\.weight and blk\.0\.attn_k\.weight overlap",
    "truncated super-block": r"truncated GGUF file \(tensor blk\.0\.attn_q\.weight ends at byte \d+",
}


def _bad_file(kind: str, tmp: Path) -> Path:
    if kind == "not gguf":
        (tmp / "model.gguf").write_text("this is not a model\n")
        return tmp / "model.gguf"
    if kind == "architecture":
        return write_tiny_gguf(tmp / "m.gguf", file_arch="gpt2")
    if kind == "tensor type":
        return write_tiny_gguf(tmp / "m.gguf", override={"blk.0.attn_q.weight": _q8k_tensor()})
    if kind == "no tokenizer":
        return write_tiny_gguf(tmp / "m.gguf", tokenizer=False)
    if kind in ("lying K-quant shape", "lying block count", "truncated super-block"):
        rng = np.random.default_rng(0)
        path = write_tiny_gguf(tmp / "m.gguf", hidden=256,
                               blocks=lambda name, shp: (random_blocks(shp, Q.Q4_K, rng), Q.Q4_K)
                               if name == "blk.0.attn_q.weight" else None)  # fmt: skip
        data = bytearray(path.read_bytes())
        dims = data.index(b"blk.0.attn_q.weight") + len(b"blk.0.attn_q.weight") + 4  # after n_dims
        if kind == "lying K-quant shape":  # a row of 255 values: no whole number of super-blocks
            struct.pack_into("<Q", data, dims, 255)
        elif kind == "lying block count":  # 4096 rows more than its bytes, over the next tensors
            struct.pack_into("<Q", data, dims + 8, 64 + 4096)
        else:  # the file ends in the middle of the tensor's third super-block
            start = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.attn_q.weight")
            data = data[: start.data_offset + 2 * 144 + 50]
        path.write_bytes(bytes(data))
        return path
    path = write_tiny_gguf(tmp / "m.gguf")
    path.write_bytes(path.read_bytes()[:-100])
    return path


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_is_one_line_exit_1_and_no_folder(tmp_path, capsys, kind):
    from mlx_dft.cli import main

    path = _bad_file(kind, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["convert", str(path), "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert len(err.strip().splitlines()) == 1 and err.startswith("mlx_dft: error: "), err
    assert re.search(BAD[kind], err), err
    assert "Traceback" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_bad_input_through_the_real_entry_point(tmp_path):
    path = _bad_file("truncated", tmp_path)
    done = run_cli("convert", path, "--out", tmp_path / "out")
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and "truncated GGUF file" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def _header(*parts: bytes) -> bytes:
    return b"GGUF" + b"".join(parts)


ONE_KEY = struct.pack("<IQQ", 3, 0, 1)  # version 3, no tensor, one key/value pair


def _key(name: bytes) -> bytes:
    return struct.pack("<Q", len(name)) + name


@pytest.mark.parametrize(
    "data,message",
    [
        (_header(struct.pack("<I", 1)), "GGUF version 1, which mlx_dft does not read"),
        (_header(struct.pack("<IQQ", 3, 0, 2**62)), "corrupt GGUF file"),
        # an array claiming 2^40 uint32 values: refused before anything is allocated
        (_header(ONE_KEY, _key(b"k"), struct.pack("<IIQ", 9, 4, 2**40)), "truncated or corrupt GGUF file"),
        (_header(ONE_KEY, struct.pack("<Q", 2**50), b"k"), "truncated or corrupt GGUF file"),
        (_header(ONE_KEY, _key(b"k"), struct.pack("<IB", 7, 2)), "is a bool of value 2"),
        (_header(ONE_KEY, _key(b"general.alignment"), struct.pack("<II", 4, 48)), "not a power of two"),
    ],
)
def test_reader_refuses_corrupt_headers(tmp_path, data, message):
    path = tmp_path / "x.gguf"
    path.write_bytes(data)
    with pytest.raises(UserError, match=re.escape(message)):
        read_header(path)


def test_reader_checks_offsets_before_reading(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf")
    header = read_header(path)
    last = max(header.tensors.values(), key=lambda t: t.offset)
    assert last.offset + last.nbytes <= path.stat().st_size
    raw = bytearray(path.read_bytes())
    # Move the first tensor's offset (the last field of its table entry) off its alignment.
    name = next(iter(header.tensors)).encode()
    at = raw.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", raw, at)[0]
    struct.pack_into("<Q", raw, at + 4 + 8 * n_dims + 4, 8)
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="is not aligned to 32 bytes"):
        read_header(path)


def test_gguf_model_files_resolve_to_cached_folders(tmp_path, monkeypatch):
    from mlx_dft import models

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setenv("MLX_DFT_CACHE", str(tmp_path / "cache"))
    first = models.resolve_model_path(str(path))
    assert first.parent == tmp_path / "cache" / "gguf" and (first / "config.json").is_file()
    assert first.name.endswith("-float32" if mx.default_device() == mx.cpu else "-requantized")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert models.resolve_model_path(str(path)) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    net, tokenizer = mlx_dft.load(str(path))
    assert tokenizer.encode("the") and net(mx.array([[1, 2, 3]])).shape == (1, 3, 320)
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))  # a new version of the file converts again
    assert models.resolve_model_path(str(path)) != first
    # on a GPU block types are re-quantized (a 4-bit file stays 4-bit): the device picks the variant
    monkeypatch.setattr(models.mx, "default_device", lambda: mx.gpu)
    assert models.resolve_model_path(str(path)).name.endswith("-requantized")
