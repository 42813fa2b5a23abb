"""`mlx_dft chat`: every reply is what the model says to the whole rendered conversation, while
earlier turns come from the KV cache (only the new tokens are fed)."""

from __future__ import annotations

import mlx.core as mx
import pytest

import mlx_dft
from conftest import BUNDLED, run_cli
from mlx_dft.chat import Chat
from mlx_dft.data import render_chat
from mlx_dft.errors import UserError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _reference(model, tokenizer, messages, max_tokens):
    """Greedy reply by full recompute over the rendered conversation (no cache at all)."""
    ids = tokenizer.encode(render_chat(tokenizer, messages), add_special_tokens=True)
    out = []
    for _ in range(max_tokens):
        logits = model(mx.array([ids + out]))[0, -1]
        token = int(mx.argmax(logits).item())
        if token in tokenizer.eos_token_ids:
            break
        out.append(token)
    return tokenizer.decode(out)


@pytest.fixture(scope="module")
def trained(arith_data, tmp_path_factory):
    """A LoRA on the bundled (pretrained) tiny model, trained with a ChatML template it stores."""
    out = tmp_path_factory.mktemp("chat") / "run"
    mlx_dft.train(model=str(BUNDLED), data=str(arith_data), output=str(out), iters=4, batch_size=4,
                  chat_template=CHATML, progress=False)  # fmt: skip
    return out


@pytest.mark.slow
@pytest.mark.parametrize("system", [None, "You answer word problems."])
def test_each_reply_is_the_full_recompute_reply_and_earlier_turns_come_from_the_cache(trained, system):
    chat = Chat.load(adapter=str(trained), max_tokens=12, system=system)  # the adapter's template
    assert chat.tokenizer.chat_template == CHATML
    turns = ["Question: Mia has 23 apples. She buys 15 more.", "And then she eats 4?", "Thanks"]
    replies = []
    for i, text in enumerate(turns):
        reply = "".join(chat.send(text))
        replies.append(reply)
        expected = _reference(chat.model, chat.tokenizer, chat.messages[:-1], 12)
        assert reply == expected, (i, reply, expected)
        full = len(chat.tokenizer.encode(render_chat(chat.tokenizer, chat.messages[:-1])))
        if i == 0:
            assert chat.fed == full
        else:  # only the new turn (and what the cache could not keep) was fed
            assert 0 < chat.fed < full, (chat.fed, full)
    assert len(set(replies)) == len(replies) and all(replies), replies  # replies that depend on the turn
    chat.reset()
    assert chat.messages == ([{"role": "system", "content": system}] if system else []) and chat.cached == []


@pytest.mark.slow
def test_a_real_chat_template_on_smollm2(smollm2):
    """ChatML with SmolLM2's default system prompt: turn two feeds only its own tokens."""
    chat = Chat.load(model=str(smollm2["float32"]), max_tokens=12)
    first = "".join(chat.send("What is the capital of France?"))
    assert "Paris" in first
    second = "".join(chat.send("And of Italy?"))
    assert second == _reference(chat.model, chat.tokenizer, chat.messages[:-1], 12)
    assert "Rome" in second and chat.fed < 20


def test_the_cli_chats_over_standard_input(trained):
    turns = "Hello\n/reset\nHello again\n/exit\n"
    p = run_cli("chat", "--adapter-path", trained, "--max-tokens", 6, input_text=turns)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("\n") == 2 and "(conversation reset)" in p.stderr
    first, second = p.stdout.splitlines()
    chat = Chat.load(adapter=str(trained), max_tokens=6)
    assert first == "".join(chat.send("Hello"))  # the reset made the second turn a first turn too
    chat.reset()
    assert second == "".join(chat.send("Hello again"))


def test_a_model_without_a_chat_template_is_refused_in_one_line(tiny_model):
    with pytest.raises(UserError, match="no chat template"):
        Chat.load(model=str(tiny_model))
    p = run_cli("chat", "--model", tiny_model, input_text="hi\n")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "no chat template" in p.stderr, p.stderr


def test_a_reply_not_read_to_its_end_leaves_the_next_turn_exact(trained):
    chat = Chat.load(adapter=str(trained), max_tokens=12)
    pieces = chat.send("Question: Lucy has 44 marbles. She loses 13.")
    next(pieces)
    pieces.close()  # the caller stopped reading after one piece
    reply = "".join(chat.send("How many are left?"))
    assert reply == _reference(chat.model, chat.tokenizer, chat.messages[:-1], 12)
