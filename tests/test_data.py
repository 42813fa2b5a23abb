"""Data formats, supervision masks, truncation, batching and its determinism."""

import json
from itertools import islice

import numpy as np
import pytest
from mlx_lm.utils import load_tokenizer

from conftest import BUNDLED
from mlx_dft.data import (
    DataConfig,
    collate,
    epoch_batches,
    find_splits,
    iterate_batches,
    load_split,
    set_chat_template,
)
from mlx_dft.errors import UserError

TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(BUNDLED)


@pytest.fixture()
def chat_tok():
    t = load_tokenizer(BUNDLED)
    set_chat_template(t, TEMPLATE)
    return t


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def supervised_text(tok, ds, i=0):
    ids, mask = ds.tokens[i], ds.supervised[i]
    return tok.decode([int(t) for t, m in zip(ids, mask) if m])


def test_completions_train_on_completion_and_eos(tmp_path, tok):
    p = write(tmp_path / "train.jsonl", [{"prompt": "Mia has 3 apples.", "completion": " She eats 1."}])
    ds = load_split(p, "train", tok, DataConfig())
    assert ds.format == "completions"
    ids, mask = ds.tokens[0], ds.supervised[0]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and mask[-1] == 1
    assert tok.decode([int(t) for t, m in zip(ids, mask) if m]).startswith(" She eats 1.")
    assert tok.decode([int(t) for t, m in zip(ids, mask) if not m]).endswith("Mia has 3 apples.")
    everything = load_split(p, "train", tok, DataConfig(mask_prompt=False))
    assert everything.supervised[0].all()


def test_text_trains_on_every_token(tmp_path, tok):
    ds = load_split(write(tmp_path / "t.jsonl", [{"text": "Leo has 5 coins."}]), "train", tok, DataConfig())
    assert ds.format == "text" and ds.supervised[0][1:].all() and ds.tokens[0][-1] == tok.eos_token_id


def test_chat_trains_on_every_assistant_turn(tmp_path, chat_tok):
    conv = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "Count"},
            {"role": "assistant", "content": "one two"},
        ]
    }
    ds = load_split(write(tmp_path / "c.jsonl", [conv]), "train", chat_tok, DataConfig())
    assert ds.format == "chat"
    sup = supervised_text(chat_tok, ds)
    assert "Hello there" in sup and "one two" in sup
    assert "Hi" not in sup and "Count" not in sup and "Be brief" not in sup
    assert sup.count("</s>") == 2  # each turn's end token is learned


def test_chat_without_template_says_how_to_pass_one(tmp_path, tok):
    p = write(
        tmp_path / "c.jsonl",
        [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
    )
    with pytest.raises(UserError, match="--chat-template"):
        load_split(p, "train", tok, DataConfig())


def test_completions_use_chat_template_when_present(tmp_path, chat_tok):
    p = write(tmp_path / "train.jsonl", [{"prompt": "Q", "completion": "A!"}])
    ds = load_split(p, "train", chat_tok, DataConfig())
    assert "user: Q" in chat_tok.decode(ds.tokens[0].tolist())
    assert supervised_text(chat_tok, ds).startswith(" A!")


@pytest.mark.parametrize(
    "lines,msg",
    [
        (['{"text": "a"}', '{"text": "b"'], "line 2: invalid JSON"),
        (['{"text": "a"}', '{"prompt": "p", "completion": "c"}'], "line 2: mixed record formats"),
        (['{"question": "a"}'], "line 1: unknown record format"),
        (["[1, 2]"], "line 1: expected a JSON object"),
        ([], "empty"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, tok, lines, msg):
    p = write(tmp_path / "train.jsonl", lines)
    with pytest.raises(UserError, match=msg):
        load_split(p, "train", tok, DataConfig())


def test_missing_paths(tmp_path):
    with pytest.raises(UserError, match="data not found"):
        find_splits(tmp_path / "nope")
    with pytest.raises(UserError, match="no train.jsonl"):
        find_splits(tmp_path)


def test_truncation_is_counted(tmp_path, tok):
    long = {"prompt": "Q:", "completion": " A" * 80}
    p = write(tmp_path / "train.jsonl", [long, {"prompt": "Q", "completion": " A"}])
    ds = load_split(p, "train", tok, DataConfig(max_seq_length=64))
    assert ds.n_truncated == 1 and ds.longest > 64 and max(len(t) for t in ds.tokens) == 64


def test_examples_left_with_nothing_to_learn_are_dropped(tmp_path, tok):
    p = write(
        tmp_path / "train.jsonl",
        [{"prompt": "Q " * 40, "completion": " A"}, {"prompt": "Q", "completion": " A"}],
    )
    ds = load_split(p, "train", tok, DataConfig(max_seq_length=16))
    assert len(ds) == 1 and ds.n_dropped == 1


def make_ds(tmp_path, tok, n=40):
    rng = np.random.default_rng(0)
    recs = [
        {"prompt": "Q" + " 1" * int(rng.integers(1, 30)), "completion": " A" * int(rng.integers(1, 10))}
        for _ in range(n)
    ]
    return load_split(write(tmp_path / "train.jsonl", recs), "train", tok, DataConfig())


def test_batches_are_deterministic_and_resumable(tmp_path, tok):
    ds = make_ds(tmp_path, tok)
    a = [b.inputs.tolist() for b in islice(iterate_batches(ds, 4, seed=3), 25)]
    b = [b.inputs.tolist() for b in islice(iterate_batches(ds, 4, seed=3), 25)]
    c = [b.inputs.tolist() for b in islice(iterate_batches(ds, 4, seed=4), 25)]
    assert a == b and a != c
    resumed = [b.inputs.tolist() for b in islice(iterate_batches(ds, 4, seed=3, start=13), 12)]
    assert resumed == a[13:]  # crosses the epoch boundary at 10


def test_batches_group_lengths_and_cover_the_epoch(tmp_path, tok):
    ds = make_ds(tmp_path, tok, n=400)
    batches = epoch_batches(ds, 8, seed=0, epoch=0)
    seen = np.concatenate(batches)
    assert len(batches) == 50 and len(set(seen.tolist())) == 400
    lengths = np.array([len(t) for t in ds.tokens])
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    random_spread = np.mean([np.ptp(lengths[np.random.default_rng(i).choice(400, 8)]) for i in range(50)])
    assert spread < random_spread / 3


def test_workers_split_each_global_batch(tmp_path, tok):
    ds = make_ds(tmp_path, tok)
    whole = next(iterate_batches(ds, 4, seed=1))
    parts = [next(iterate_batches(ds, 4, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert sum(p.inputs.shape[0] for p in parts) == 4
    assert sum(p.n_supervised for p in parts) == whole.n_supervised
    with pytest.raises(UserError, match="divisible"):
        next(iterate_batches(ds, 3, world_size=2))
    with pytest.raises(UserError, match="fewer than --batch-size"):
        next(iterate_batches(ds, 100))


def test_collate_positions_point_at_the_token_before_each_target():
    toks = [np.array([1, 5, 6, 7, 2], np.int32), np.array([1, 8, 2], np.int32)]
    sup = [np.array([0, 0, 1, 1, 1], np.uint8), np.array([0, 1, 1], np.uint8)]
    b = collate(toks, sup)
    flat = np.array(b.inputs).reshape(-1)
    n = b.n_supervised
    assert n == 5 and np.array(b.valid).sum() == 5 and b.valid.shape[0] % 32 == 0
    assert np.array(b.targets)[:n].tolist() == [6, 7, 2, 8, 2]
    assert flat[np.array(b.positions)[:n]].tolist() == [5, 6, 7, 1, 8]
