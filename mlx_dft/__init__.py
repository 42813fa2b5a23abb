"""mlx_dft: DFT, SFT and parameter-efficient fine-tuning of mlx-lm models.

import mlx_dft
run = mlx_dft.train(loss="dft", adapter="lora", iters=100)
print(mlx_dft.generate("Question: ...", adapter=run.output))

A run in two calls, to change a part between: ``run = mlx_dft.prepare(...)``, then
``mlx_dft.fit(run)``.
"""

import os

from mlx_dft import _blas

# transformers (imported by mlx-lm for tokenizers) warns on stderr that PyTorch is absent.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

_blas.setup()  # must precede the first `import mlx.core`

from mlx_dft._version import __version__  # noqa: E402

__all__ = [
    "__version__", "train", "prepare", "fit", "generate", "load", "evaluate", "Callback", "Loss", "Prepared",
    "Run", "TrainConfig", "UserError", "register_loss",
]  # fmt: skip


def __getattr__(name):  # lazy: `mlx_dft --help` need not import MLX
    if name in ("train", "prepare", "fit", "Prepared", "generate", "load"):
        from mlx_dft import api

        return getattr(api, name)
    if name in ("Callback", "evaluate", "Run"):
        from mlx_dft import trainer

        return getattr(trainer, name)
    if name in ("Loss", "register_loss"):
        from mlx_dft import losses

        return losses.Loss if name == "Loss" else losses.register
    if name == "TrainConfig":
        from mlx_dft.config import TrainConfig

        return TrainConfig
    if name == "UserError":
        from mlx_dft.errors import UserError

        return UserError
    raise AttributeError(f"module 'mlx_dft' has no attribute {name!r}")
