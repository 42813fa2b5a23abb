"""Experiment trackers (``--report-to wandb,tensorboard``): every record ``metrics.jsonl`` gets
also goes to them, with the run's configuration.

- wandb: a run named after the output folder in ``--project-name`` (default ``mlx_dft``), files
  under ``OUTPUT/wandb``; a resumed run continues the same wandb run (its id is kept in
  ``OUTPUT/wandb_id``). ``WANDB_MODE=offline`` works without an account or network (then
  ``wandb sync OUTPUT/wandb/offline-run-*``).
- tensorboard: event files in ``OUTPUT/tensorboard`` (tensorboardX, else torch's writer), one scalar
  per metric under its ``metrics.jsonl`` name; the configuration as text.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from mlx_dft.errors import UserError


def _scalars(rec: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in rec.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class Tracker:
    def log(self, rec: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(self, output: Path, config: dict, project: str | None):
        try:
            import wandb
        except ImportError:
            raise UserError("--report-to wandb: install wandb (pip install wandb)") from None
        id_file = output / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        (output / "wandb").mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=project or "mlx_dft",
                name=output.name,
                dir=str(output),
                config=config,
                id=run_id,
                resume="allow" if run_id else None,
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as e:  # not logged in, no network in online mode...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"--report-to wandb: cannot start a run ({first}); `wandb login`, or WANDB_MODE=offline"
            ) from None
        if run_id is None:
            id_file.write_text(self.run.id + "\n")

    def log(self, rec: dict) -> None:
        values = _scalars(rec)
        if values:
            self.run.log(values, step=int(rec.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


class TensorBoardTracker(Tracker):
    def __init__(self, output: Path, config: dict):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--report-to tensorboard: pip install tensorboardX") from None
        self.writer = SummaryWriter(str(output / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, rec: dict) -> None:
        step = int(rec.get("step", 0))
        for key, value in _scalars(rec).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def require(names: list[str] | None) -> None:
    """Refuse, before anything is loaded or written, trackers whose library is not installed."""
    for name in names or ():
        if name == "wandb":
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise UserError("--report-to wandb: install wandb (pip install wandb)") from None
        elif name == "tensorboard":
            try:
                import tensorboardX  # noqa: F401
            except ImportError:
                try:
                    import torch.utils.tensorboard  # noqa: F401
                except ImportError:
                    raise UserError("--report-to tensorboard: pip install tensorboardX") from None


def open_trackers(names: list[str] | None, output: Path, config: dict, project: str | None) -> list[Tracker]:
    """The trackers ``names`` ask for, started; an unknown name is refused."""
    trackers: list[Tracker] = []
    try:
        for name in names or ():
            if name == "wandb":
                trackers.append(WandbTracker(output, config, project))
            elif name == "tensorboard":
                trackers.append(TensorBoardTracker(output, config))
            else:
                raise UserError(f"--report-to: unknown tracker {name!r}; choose from wandb, tensorboard")
    except BaseException:
        for t in trackers:
            t.close()
        raise
    return trackers
