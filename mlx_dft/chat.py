"""`mlx_dft chat`: a multi-turn conversation with a model and its adapter, as ``mlx_lm.chat``.

Each turn renders the **whole** conversation with the chat template (the adapter's, when it was
trained with one) and feeds the model only the tokens its KV cache does not hold yet: the cache
keeps every earlier turn, and where a template renders the history differently from what the
cache holds (some drop earlier reasoning, some date the system prompt), the cache is trimmed to the
longest common prefix and the rest is fed again. So a reply is exactly what the model would say
to the full rendered conversation, and a turn costs only its new tokens.

    chat = Chat.load(adapter="runs/my-run")
    for piece in chat.send("What is 12 + 7?"):
        print(piece, end="")
"""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx

from mlx_dft import data
from mlx_dft.errors import UserError
from mlx_dft.evaluation.options import check_decoding


class Chat:
    """A conversation: ``send`` a user message, iterate over the reply's text as it is generated."""

    def __init__(
        self,
        model,
        tokenizer,
        system: str | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ):
        if not data.has_chat_template(tokenizer):
            raise UserError("chat: this model has no chat template; pass --chat-template FILE.jinja")
        check_decoding(temperature, top_p, seed, max_tokens)
        self.model, self.tokenizer = model, tokenizer
        self.system, self.max_tokens = system, max_tokens
        self.temperature, self.top_p = temperature, top_p
        mx.random.seed(seed)
        self.reset()

    @classmethod
    def load(
        cls,
        model: str | None = None,
        adapter: str | None = None,
        chat_template: str | None = None,
        keep_quantized: bool = False,
        **options,
    ) -> Chat:
        """A chat with ``model`` and ``adapter`` as :func:`mlx_dft.load` gives them."""
        from mlx_dft.api import load

        check_decoding(  # before the model loads
            options.get("temperature", 0.0), options.get("top_p", 1.0), options.get("seed", 0),
            options.get("max_tokens", 1),
        )  # fmt: skip
        loaded = load(model, adapter, chat_template=chat_template, keep_quantized=keep_quantized)
        return cls(*loaded, **options)

    def reset(self) -> None:
        """Forget the conversation (and the cache)."""
        from mlx_lm.models.cache import make_prompt_cache

        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = make_prompt_cache(self.model)
        self.cached: list[int] = []  # the tokens whose keys and values the cache holds
        self.fed = 0  # tokens fed to the model for the last prompt (the rest came from the cache)

    def _tokens(self) -> list[int]:
        text = data.render_chat(self.tokenizer, self.messages, add_generation_prompt=True)
        bos = getattr(self.tokenizer, "bos_token", None)
        return self.tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))

    def _held(self) -> int | None:
        """How many tokens the cache holds, or None where its layers do not count them alike
        (recurrent state of hybrid models): then every turn starts from an empty cache."""
        offsets = {getattr(c, "offset", None) for c in self.cache}
        return offsets.pop() if len(offsets) == 1 and None not in offsets else None

    def _reuse(self, tokens: list[int]) -> list[int]:
        """Trim the cache to its longest common prefix with ``tokens``; the tokens left to feed."""
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

        if self._held() != len(self.cached):  # a reply not read to its end, or an uncountable cache
            self.cache, self.cached = make_prompt_cache(self.model), []
        common = 0
        for a, b in zip(self.cached, tokens):
            if a != b:
                break
            common += 1
        common = min(common, len(tokens) - 1)  # always feed at least one token
        extra = len(self.cached) - common
        if extra and can_trim_prompt_cache(self.cache):
            trim_prompt_cache(self.cache, extra)
        elif extra:
            self.cache, common = make_prompt_cache(self.model), 0
        self.cached = tokens[:common]
        return tokens[common:]

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and generate the reply, yielding its text as it comes; the reply
        joins the conversation when the generation ends."""
        from mlx_lm.generate import stream_generate
        from mlx_lm.sample_utils import make_sampler

        self.messages.append({"role": "user", "content": text})
        tokens = self._tokens()
        todo = self._reuse(tokens)
        self.fed = len(todo)
        sampler = make_sampler(temp=self.temperature, top_p=self.top_p)
        reply, generated = [], []
        try:
            for response in stream_generate(
                self.model,
                self.tokenizer,
                mx.array(todo),
                max_tokens=self.max_tokens,
                sampler=sampler,
                prompt_cache=self.cache,
            ):
                generated.append(response.token)
                reply.append(response.text)
                yield response.text
        finally:  # also when the caller stops reading: the conversation holds what was said
            self.messages.append({"role": "assistant", "content": "".join(reply)})
            held = self._held()
            self.cached = (tokens + generated)[:held] if held is not None else []
