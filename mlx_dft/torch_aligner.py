"""Public spelling of the PyTorch Aligner runner (``from mlx_dft.torch_aligner import attach_aligner``);
it lives with the rest of the Aligner in :mod:`mlx_dft.adapters.aligner.torch_runner`."""

from mlx_dft.adapters.aligner.torch_runner import attach_aligner

__all__ = ["attach_aligner"]
