"""Token losses: one class per loss (:mod:`mlx_dft.losses.base`), each in its own module, and the
machinery they share (:mod:`mlx_dft.losses.compute`). ``LOSSES`` maps ``--loss`` names to classes."""

from mlx_dft.losses.asft import ASFT
from mlx_dft.losses.base import (
    LOSSES,
    FunctionLoss,
    Loss,
    LossSums,
    as_loss,
    loss_class,
    make_loss,
    option,
    register,
)
from mlx_dft.losses.bll import BLL
from mlx_dft.losses.compute import (
    DEFAULT_CHUNK_ELEMENTS,
    DEFAULT_KEEP_ELEMENTS,
    auto_chunk_tokens,
    chunked_ce,
    chunked_terms,
    columns_of,
    detached_ce,
    eaft_weights,
    fused_cross_entropy_available,
    keep_tokens,
    keeps_softmax,
    kept_softmax_ce,
    kl_to_reference,
    loss_from_logits,
    loss_sums,
    target_ce,
    token_columns,
)
from mlx_dft.losses.deft import DEFT
from mlx_dft.losses.dft import DFT
from mlx_dft.losses.eaft import EAFT
from mlx_dft.losses.prift import PriFT
from mlx_dft.losses.psft import PSFT
from mlx_dft.losses.sft import SFT

# The built-in losses in the order --loss lists them (and the docs' table).
for _name in ("sft", "dft", "asft", "eaft", "prift", "deft", "bll", "psft"):
    LOSSES[_name] = LOSSES.pop(_name)
LOSS_TYPES = tuple(LOSSES)


def LossConfig(loss: str = "dft", **options) -> Loss:  # noqa: N802  (the old constructor's spelling)
    """The loss ``loss`` with option values named as everywhere else (``asft_alpha=0.2``)."""
    return make_loss(loss, **options)


__all__ = [
    "ASFT", "BLL", "DEFAULT_CHUNK_ELEMENTS", "DEFAULT_KEEP_ELEMENTS", "DEFT", "DFT", "EAFT", "FunctionLoss",
    "LOSSES", "LOSS_TYPES", "Loss", "LossConfig", "LossSums", "PSFT", "PriFT", "SFT", "as_loss",
    "auto_chunk_tokens", "chunked_ce", "chunked_terms", "columns_of", "detached_ce", "eaft_weights",
    "fused_cross_entropy_available", "keep_tokens", "keeps_softmax", "kept_softmax_ce", "kl_to_reference",
    "loss_class", "loss_from_logits", "loss_sums", "make_loss", "option", "register", "target_ce",
    "token_columns",
]  # fmt: skip
