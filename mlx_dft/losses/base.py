"""What a token loss is: one small class, registered by name.

A loss is a frozen dataclass whose fields are its options. Field ``floor`` of the loss named
``dft`` is the option ``dft_floor``: ``--dft-floor`` on the command line, ``dft_floor`` (or
``dft-floor``) in YAML, ``mlx_dft.train(dft_floor=...)`` from Python; its ``help`` is the flag's help.
The class says what the trainer must give it and computes its per-token terms; the trainer does
the rest for every loss (chunked logits at supervised positions, masking, normalisation over the
optimizer step, gradient accumulation, data parallelism, reports, model card, resume)::

    @register
    @dataclass(frozen=True)
    class Focal(Loss):
        name: ClassVar[str] = "focal"
        summary: ClassVar[str] = "cross-entropy scaled by (1 - p)^gamma"
        uses_logits: ClassVar[bool] = False  # a function of the target's cross-entropy only
        gamma: float = option(2.0, "Focal: weight = (1 - p)^gamma.")

        def token_loss(self, ce, logits=None, targets=None, ref_logits=None):
            w = mx.stop_gradient(1 - mx.exp(-ce)) ** self.gamma
            return w * ce, ()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import mlx.core as mx

from mlx_dft.errors import UserError
from mlx_dft.options import option

__all__ = [
    "LOSSES", "FunctionLoss", "Loss", "LossSums", "as_loss", "loss_class", "make_loss", "option", "register",
]  # fmt: skip


class LossSums(NamedTuple):
    """What a loss function returns for a batch: sums over its supervised tokens (the trainer
    divides by the token count of the whole optimizer step). ``objective`` carries the gradient;
    the others are detached reports: the targets' cross-entropy and probability, the token count,
    and the loss's own ``parts`` (named by its class)."""

    objective: mx.array
    ce: mx.array
    prob: mx.array
    tokens: mx.array
    parts: tuple[mx.array, ...] = ()

    def stacked(self) -> mx.array:
        """[objective, ce, prob, tokens, *parts]: one array, for sums across batches."""
        return mx.stack([self.objective, self.ce, self.prob, self.tokens, *self.parts])


@dataclass(frozen=True)
class Loss:
    """A token loss (see the module's docstring). Class attributes describe it; the dataclass
    fields are its options; :meth:`token_loss` is its maths."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line: the formula in words (--help, the docs' table)
    source: ClassVar[str] = ""  # where the formula comes from
    # Per-token quantities reported next to the objective (means over tokens): name -> short label.
    parts: ClassVar[dict[str, str]] = {}
    # The reference model's logits (the adapter switched off, or a frozen copy) at the same tokens.
    needs_reference: ClassVar[bool] = False
    # False: a function of the target's cross-entropy alone, so the trainer may compute that with a
    # fused or softmax-keeping kernel (and never hands over logits).
    uses_logits: ClassVar[bool] = True
    # Other losses whose options this one also reads (ASFT's DFT term): their fields stay theirs.
    borrows: ClassVar[tuple[str, ...]] = ()
    # The previous policy's per-token cross-entropy (``old_ce``, PSFT): the trainer computes it,
    # without gradient, at the start of each group of :attr:`group_steps` optimizer steps for the
    # micro-batches of the group's later steps, and passes it to :meth:`token_loss`.
    needs_previous: ClassVar[bool] = False

    @property
    def group_steps(self) -> int:
        """Optimizer steps per previous policy (for a loss that :attr:`needs_previous`)."""
        return 1

    @property
    def ce_only(self) -> bool:
        """A function of the target's cross-entropy alone (no logits, no reference)."""
        return not self.uses_logits and not self.needs_reference

    @property
    def loss(self) -> str:
        """The loss's name (what ``--loss`` says)."""
        return self.name

    def token_loss(
        self,
        ce: mx.array,
        logits: mx.array | None = None,
        targets: mx.array | None = None,
        ref_logits: mx.array | None = None,
        old_ce: mx.array | None = None,
    ) -> tuple[mx.array, tuple[mx.array, ...]]:
        """Per-token objective [N] (float32, with its gradient) and the per-token parts (one [N]
        array per name in :attr:`parts`, detached), from the targets' cross-entropy ``ce`` [N]
        (with gradient) and, where :attr:`uses_logits`, the chunk's float32 ``logits`` [N, V],
        ``targets`` [N] and, where :attr:`needs_reference`, the reference's ``ref_logits``; where
        :attr:`needs_previous`, ``old_ce`` [N] is the previous policy's cross-entropy of the same
        targets (None: the previous policy is the current one, ``sg(ce)``). Only a loss that
        :attr:`needs_previous` is given ``old_ce``: the others may leave it out of their signature."""
        raise NotImplementedError

    def check_vocabulary(self, vocab_size: int) -> str:
        """'' when the loss can run at this vocabulary size, else why not (one line)."""
        return ""

    # ---------------------------------------------------------------- options

    @classmethod
    def option_fields(cls) -> list[dataclasses.Field]:
        """The fields that are options (``borrowed`` ones belong to another loss)."""
        return [f for f in dataclasses.fields(cls) if not f.metadata.get("borrowed")]

    @classmethod
    def option_name(cls, field: str) -> str:
        """``floor`` of ``dft`` -> ``dft_floor``: the option's name everywhere."""
        return f"{cls.name}_{field}"

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Loss:
        """The loss built from option values named as :meth:`option_name` says (missing ones take
        their defaults); borrowed fields are built from their own loss's options."""
        kw = {f.name: options[cls.option_name(f.name)] for f in cls.option_fields()
              if cls.option_name(f.name) in options}  # fmt: skip
        for f in dataclasses.fields(cls):
            if f.metadata.get("borrowed"):
                kw[f.name] = LOSSES[f.metadata["borrowed"]].from_options(options)
        return cls(**kw)

    def _require(self, ok: bool, field: str, what: str) -> None:
        if not ok:
            flag = "--" + self.option_name(field).replace("_", "-")
            raise ValueError(f"{flag} {what}, got {getattr(self, field)}")

    def settings(self) -> dict[str, Any]:
        """Every option of the loss (borrowed ones included), by option name."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Loss):
                out.update(value.settings())
            else:
                out[self.option_name(f.name)] = value
        return out

    def describe(self) -> str:
        """``asft loss (alpha 0.2, dft floor 0.1)``: the loss and its options off their defaults."""
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Loss):
                shown += [f"{value.name} {s}" for s in value._changed()]
            elif value != f.default:
                shown.append(f"{f.name.replace('_', '-')} {_show(value)}")
        return f"{self.name} loss" + (f" ({', '.join(shown)})" if shown else "")

    def _changed(self) -> list[str]:
        return [f"{f.name.replace('_', '-')} {_show(getattr(self, f.name))}" for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default]  # fmt: skip


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


LOSSES: dict[str, type[Loss]] = {}


def register(cls: type[Loss]) -> type[Loss]:
    """Make a loss class known by its ``name`` (``--loss NAME``); its options join every
    command, config file and keyword that sets training options once :mod:`mlx_dft.config` is
    imported after it. Register a user's loss before that to give it flags; from Python,
    ``mlx_dft.train(loss=MyLoss(...))`` needs no registration."""
    if not cls.name or not cls.name.isidentifier():
        raise ValueError(f"a loss needs a name that is an identifier, got {cls.name!r}")
    if cls.name in LOSSES and LOSSES[cls.name] is not cls:
        raise ValueError(f"a loss named {cls.name!r} is already registered ({LOSSES[cls.name].__qualname__})")
    LOSSES[cls.name] = cls
    return cls


def loss_class(name: str) -> type[Loss]:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]


def make_loss(name: str, **options: Any) -> Loss:
    """The loss ``name`` with option values named as everywhere else (``dft_floor=0.1``);
    options of other losses are ignored here (the configuration refuses them)."""
    return loss_class(name).from_options(options)


@dataclass(frozen=True)
class FunctionLoss(Loss):
    """A user's per-token loss as a function ``fn(logits [N, V] float32, targets [N]) -> [N]``
    (with its gradient), trained like any loss: chunked, masked, summed over the optimizer step."""

    uses_logits: ClassVar[bool] = True
    fn: Callable = None  # type: ignore[assignment]
    label: str = "custom"

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.label

    def token_loss(self, ce, logits=None, targets=None, ref_logits=None):
        out = self.fn(logits, targets)
        if not isinstance(out, mx.array) or out.shape != ce.shape:
            shape = getattr(out, "shape", type(out).__name__)
            raise UserError(
                f"the {self.label} loss returned {shape} for {ce.shape[0]} tokens; a per-token loss "
                f"returns an array of shape ({ce.shape[0]},)"
            )
        return out.astype(mx.float32), ()

    def describe(self) -> str:
        return f"{self.label} loss (a Python function)"

    def settings(self) -> dict[str, Any]:
        return {}


def as_loss(obj: Loss | type[Loss] | Callable) -> Loss:
    """A :class:`Loss` from what ``mlx_dft.train(loss=...)`` accepts besides a name: a loss, a loss
    class (its defaults), or a per-token function of (chunk logits, targets) (:class:`FunctionLoss`,
    named after the function)."""
    if isinstance(obj, Loss):
        return obj
    if isinstance(obj, type) and issubclass(obj, Loss):
        return obj()
    if callable(obj):
        name = getattr(obj, "__name__", "")
        return FunctionLoss(fn=obj, label=name if name.isidentifier() and name != "<lambda>" else "custom")
    raise TypeError(f"loss must be a name, a Loss, a Loss class or a function, not {type(obj).__name__}")
