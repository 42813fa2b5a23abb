"""The output folder of a run, its resumable checkpoints, and restoring from one.

Layout of an output folder::

    adapter_config.json        everything needed to reload the adapter and to resume
    adapters.safetensors       the newest adapter weights (final ones when the run ends)
    metrics.jsonl              one JSON object per report
    checkpoints/step-0000100/  adapter weights + optimizer.safetensors + trainer_state.json
                               + adapter_config.json (so a checkpoint is itself an adapter folder)
                               [+ previous_policy.safetensors: PSFT's, inside a group of steps]

Every file is written to a temporary name and renamed into place, and a checkpoint
folder is assembled under a temporary name and renamed whole, so a run killed at any
moment leaves the previous checkpoint intact and loadable.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from mlx_dft import adapters
from mlx_dft._version import __version__
from mlx_dft.adapters import CONFIG_FILE, AdapterMethod
from mlx_dft.data import read_chat_template
from mlx_dft.errors import UserError
from mlx_dft.files import (
    LOCK_FILE,
    TMP_PREFIX,
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    foreign_entries,
    lock_folder,
    remove_temporaries,
    save_safetensors,
    staged_folder,
)
from mlx_dft.models import model_signature

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
# The previous policy's per-token cross-entropy of the group's steps still to come (a loss that
# needs one, PSFT, checkpointed inside a group): ``step.micro.rank`` -> [N] float32.
PREVIOUS_FILE = "previous_policy.safetensors"
CHECKPOINTS = "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def save_checkpoint(
    output: Path,
    step: int,
    weight_files: dict[str, dict[str, mx.array]],
    optimizer_state: dict,
    state: dict,
    adapter_config: dict,
    keep: int = 0,
    protect: Path | None = None,
    previous: dict[str, mx.array] | None = None,
) -> Path:
    """Write ``checkpoints/step-N`` atomically; returns its path. With ``keep``, older checkpoints
    beyond the newest ``keep`` are removed, except ``protect`` (the newest one known to be good).
    ``previous``: the previous policy's arrays, where the loss has one pending (PSFT)."""
    final = Path(output) / CHECKPOINTS / checkpoint_name(step)
    with staged_folder(final, overwrite=True) as tmp:
        for fname, arrays in weight_files.items():
            save_safetensors(tmp / fname, arrays)
        save_safetensors(tmp / OPTIMIZER_FILE, dict(tree_flatten(optimizer_state)))
        if previous:
            save_safetensors(tmp / PREVIOUS_FILE, previous)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        (tmp / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")
    if keep > 0:
        for old in list_checkpoints(output)[:-keep]:
            if protect is None or old != Path(protect):
                shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output: Path) -> list[Path]:
    root = Path(output) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the newest checkpoint of an output folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"resume path not found: {p}")
    if (p / STATE_FILE).is_file():
        return p
    found = list_checkpoints(p)
    if not found and (p / CONFIG_FILE).is_file():
        raise UserError(
            f"{p} holds a run stopped before its first checkpoint: nothing to resume; run it again with "
            "the same options and --overwrite"
        )
    if not found:
        raise UserError(f"{p} holds no checkpoint to resume from (no checkpoints/step-*/{STATE_FILE})")
    return found[-1]


def read_state(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{checkpoint / STATE_FILE}: unreadable checkpoint state ({e})") from None


def load_optimizer_state(checkpoint: Path) -> dict:
    path = checkpoint / OPTIMIZER_FILE
    if not path.is_file():
        raise UserError(f"checkpoint {checkpoint} has no {OPTIMIZER_FILE}")
    try:
        flat = mx.load(str(path))
    except Exception as e:
        raise UserError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
    return tree_unflatten(list(flat.items()))


def load_previous(checkpoint: Path) -> dict[str, mx.array] | None:
    """A checkpoint's previous-policy arrays (:data:`PREVIOUS_FILE`), None where it has none."""
    path = Path(checkpoint) / PREVIOUS_FILE
    if not path.is_file():
        return None
    try:
        return mx.load(str(path))
    except Exception as e:
        raise UserError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None


def check_optimizer_state(fresh: dict, loaded: dict, checkpoint: Path) -> None:
    """Refuse a checkpoint's optimizer state that does not fit the model being trained: every
    entry the optimizer keeps, of the same shape (MLX would broadcast a wrong-shaped moment
    silently), and nothing else."""
    where = checkpoint / OPTIMIZER_FILE
    missing = sorted(set(fresh) - set(loaded))
    extra = sorted(set(loaded) - set(fresh))
    if missing or extra:
        which = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which this model does not train"
        raise UserError(f"{where}: the optimizer state {which} ({len(missing)} missing, {len(extra)} extra)")
    for key, value in fresh.items():
        if tuple(loaded[key].shape) != tuple(value.shape):
            raise UserError(
                f"{where}: optimizer state {key} has shape {tuple(loaded[key].shape)}, "
                f"the model needs {tuple(value.shape)}"
            )


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records after ``step`` (a resumed run writes them again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    atomic_write_text(path, "".join(line + "\n" for line in kept))


# ------------------------------------------------------------------ the output folder

def _same(a: Path, b: Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def remove_leftovers(folder: Path) -> None:
    """Delete the temporary files and folders a run killed mid-write left in its folder and its
    checkpoints (names mlx_dft gives its temporaries, nothing else: see files.TMP_PREFIX)."""
    for place in (folder, folder / CHECKPOINTS):
        remove_temporaries(place)


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` is an mlx_dft run's (its lock file, or a config that mlx_dft wrote)."""
    folder = Path(folder)
    if (folder / LOCK_FILE).is_file():
        return True
    try:
        return "mlx_dft_version" in json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return False


def absolute(value: str | None) -> str | None:
    """A path that exists, made absolute (so the run resumes and loads from any folder); anything
    else (a Hub repo id, a template string, None) as it is."""
    if not value or "\n" in value or len(value) > 4096:
        return value
    try:
        p = Path(value).expanduser()
        return str(p.resolve()) if p.exists() else value
    except OSError:  # e.g. a name too long to be a path: not a path
        return value


def run_config(
    cfg, settings: dict, model: nn.Module, model_config: dict, output: Path, total_steps: int
) -> dict:
    """``adapter_config.json`` of a run: the adapter's settings (so stock mlx-lm loads the folder),
    what it was trained on, and every training option (so a resume needs nothing else); paths
    absolute, and a chat template as its text."""
    trainable, total = adapters.count_parameters(model)
    training = cfg.to_dict()
    for key in ("model", "data", "adapter_from"):
        training[key] = absolute(training.get(key))
    if cfg.chat_template:  # its text, so every later use of the adapter renders prompts the same way
        training["chat_template"] = read_chat_template(cfg.chat_template)
    return {
        **settings,
        "adapter": cfg.adapter,
        "base_model": absolute(cfg.model),
        "model_signature": model_signature(model_config),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "mlx_dft_version": __version__,
        "training": {
            **training,
            "output": str(Path(output).resolve()),
            "learning_rate": cfg.resolved_learning_rate(),
            "weight_decay": cfg.resolved_weight_decay(),
            "total_steps": total_steps,
        },
    }


def check_output_folder(path: Path) -> None:
    """A run's output is a new folder, an empty one, or an mlx_dft run's: never a folder holding
    anything else (a project with its .git and .venv), which a run would mix its files into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--output {path} exists and is not a folder")
    others = foreign_entries(path)
    if others and not is_run_folder(path):
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise UserError(
            f"--output {path} holds files that are not an mlx_dft run ({shown}): choose a new or empty folder"
        )


class OutputFolder:
    """Where a run writes: ``adapter_config.json``, ``metrics.jsonl``, checkpoints and the newest
    adapter weights. Only the writer (rank 0 of a data-parallel run) touches the disk."""

    def __init__(self, path: str | Path, writer: bool = True):
        self.path = Path(path)
        self.writer = writer
        self.listeners: list = []  # called with every record (experiment trackers)

    def check(
        self, overwrite: bool, resuming: Path | None = None, world: mx.distributed.Group | None = None
    ) -> None:
        """Refuse a path that is a file, a folder held by another running process, or a folder
        holding a run other than the one being resumed (``resuming``: that run's folder) unless
        overwriting. The writer then locks the folder for the life of the process and removes the
        temporary files a killed run may have left. With several workers, all of them check before
        the writer writes anything."""
        check_output_folder(self.path)
        same_run = resuming is not None and _same(resuming, self.path)
        if (self.path / CONFIG_FILE).exists() and not (overwrite or same_run):
            hint = f"--resume {self.path} to continue it" if resuming is None else "another --output"
            raise UserError(
                f"--output {self.path} already holds a run: pass {hint}, --overwrite to replace it, "
                "or choose another --output"
            )
        if self.writer:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"--output {self.path}: cannot create it ({e.strerror})") from None
            self._lock = lock_folder(self.path)
            remove_leftovers(self.path)
        if world is not None and world.size() > 1:
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=world, stream=mx.cpu))

    def release(self) -> None:
        """Unlock the folder (the run is over)."""
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.close()
            self._lock = None

    def begin(self, adapter_config: dict, resumed_step: int | None) -> None:
        """Write the run's config; keep the metrics up to ``resumed_step`` (None: a new run, whose
        metrics start afresh)."""
        self.adapter_config = adapter_config
        if not self.writer:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path / CONFIG_FILE, adapter_config)
        metrics = self.path / "metrics.jsonl"
        if resumed_step is not None:
            truncate_metrics(metrics, resumed_step)
        elif metrics.exists():
            metrics.unlink()

    def save_records(self, records: Path) -> None:
        """Data given to ``mlx_dft.train`` as records (the folder of jsonl splits they were written
        to) as ``data/`` in the output folder, the run's ``--data`` from then on: copied beside and
        renamed in as one folder."""
        if not self.writer:
            return
        tmp = Path(tempfile.mkdtemp(dir=self.path, prefix=f"{TMP_PREFIX}data."))
        try:
            for f in records.glob("*.jsonl"):
                shutil.copyfile(f, tmp / f.name)
            old = self.path / "data"
            if old.exists():
                shutil.rmtree(old)
            os.replace(tmp, old)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def save_tokenizer(self, tokenizer) -> None:
        """The tokenizer files and chat template beside the adapter (as PEFT folders on the Hub have
        them), each file replaced in one rename: the folder is self-contained for generate/eval/chat."""
        if not self.writer:
            return
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        tmp = Path(tempfile.mkdtemp(dir=self.path, prefix=f"{TMP_PREFIX}tokenizer."))
        try:
            hf.save_pretrained(str(tmp))
            for f in sorted(tmp.iterdir()):
                if f.is_file():
                    os.replace(f, self.path / f.name)
        except Exception as e:  # a tokenizer transformers cannot save: the run goes on without the copy
            print(f"note: the tokenizer was not saved beside the adapter ({type(e).__name__}: {e})")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def finish(self, checkpoint: Path, method: AdapterMethod) -> None:
        """Make the top-level adapter weights the final ``checkpoint``'s (a run killed between its
        final checkpoint and the top-level write is finished by its resume)."""
        if not self.writer:
            return
        for fname, arrays in adapters.read_weights(method, checkpoint).items():
            atomic_save_safetensors(self.path / fname, arrays)

    def recorded(self, key: str) -> bool:
        """Whether ``metrics.jsonl`` holds a report with ``key``."""
        metrics = self.path / "metrics.jsonl"
        if not metrics.is_file():
            return False
        return any(f'"{key}"' in line for line in metrics.read_text().splitlines())

    def recorded_value(self, key: str, step: int | None = None):
        """The newest value of ``key`` in ``metrics.jsonl`` (at ``step`` if given), else None."""
        metrics = self.path / "metrics.jsonl"
        found = None
        for line in metrics.read_text().splitlines() if metrics.is_file() else ():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if key in rec and (step is None or rec.get("step") == step):
                found = rec[key]
        return found

    def record(self, rec: dict) -> None:
        """Append one report to ``metrics.jsonl``."""
        if self.writer:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            for listen in self.listeners:
                listen(rec)

    def saver(
        self,
        model: nn.Module,
        method: AdapterMethod,
        optimizer: optim.Optimizer,
        total_steps: int,
        grad_accumulation_steps: int,
        keep: int = 0,
    ) -> Callable[[int], Path | None]:
        """``save(step, protect=None, previous=None)``: a checkpoint of everything a resume needs, then
        the top-level weights; returns the checkpoint's path on every worker (only the writer writes
        it). ``protect``: a checkpoint ``keep`` must not remove; ``previous``: the previous policy's
        arrays of a loss that has one pending (PSFT inside a group of steps)."""

        def save(step: int, protect: Path | None = None, previous: dict | None = None) -> Path:
            if not self.writer:
                return self.path / CHECKPOINTS / checkpoint_name(step)
            files = method.weights(model)
            state = {
                "step": step,
                "rng": mx.random.state[0].tolist(),
                "total_steps": total_steps,
                "micro_batches": step * grad_accumulation_steps,
                "time": time.time(),
            }
            path = save_checkpoint(
                self.path, step, files, optimizer.state, state, self.adapter_config, keep, protect, previous
            )
            for fname, arrays in files.items():
                atomic_save_safetensors(self.path / fname, arrays)
            return path

        return save


# ------------------------------------------------------------------ resuming


@dataclass
class Resume:
    """A checkpoint to continue from, and the ``adapter_config.json`` saved with it."""

    checkpoint: Path
    config: dict

    @classmethod
    def find(cls, path: str | Path) -> Resume:
        checkpoint = find_checkpoint(path)
        return cls(checkpoint, adapters.read_adapter_config(checkpoint))

    @property
    def run_folder(self) -> Path:
        return self.checkpoint.parent.parent

    def check_compatible(self, adapter: str, settings: dict, model_config: dict) -> None:
        """Refuse to continue on another model, method or adapter settings."""
        sig_then, sig_now = self.config.get("model_signature", {}), model_signature(model_config)
        if sig_then and sig_then != sig_now:
            diff = ", ".join(
                f"{k} {sig_then.get(k)} vs {sig_now.get(k)}"
                for k in sig_now
                if sig_then.get(k) != sig_now.get(k)
            )
            raise UserError(f"checkpoint {self.checkpoint} was trained on a different model ({diff})")
        then = self.config.get("adapter") or self.config.get("fine_tune_type")
        if then != adapter:
            raise UserError(f"checkpoint {self.checkpoint} holds a {then} adapter, this run trains {adapter}")
        for key, value in settings.items():
            if self.config.get(key) != value and json.loads(json.dumps(value)) != self.config.get(key):
                raise UserError(
                    f"checkpoint {self.checkpoint} has {key}={self.config.get(key)}, this run has {value}"
                )

    def restore(
        self, model: nn.Module, method: AdapterMethod, optimizer: optim.Optimizer, total_steps: int
    ) -> int:
        """Load the adapter weights, optimizer state and random state; returns the step reached."""
        adapters.load_weights(model, adapters.read_weights(method, self.checkpoint), self.checkpoint)
        state = read_state(self.checkpoint)
        try:
            step = int(state["step"])
            hi, lo = state["rng"]
            key = (int(hi) << 32) | int(lo)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{self.checkpoint / STATE_FILE}: incomplete checkpoint state ({e!r})") from None
        optimizer.init(model.trainable_parameters())
        loaded = load_optimizer_state(self.checkpoint)
        fresh = dict(tree_flatten(optimizer.state))
        check_optimizer_state(fresh, dict(tree_flatten(loaded)), self.checkpoint)
        optimizer.state = loaded
        mx.random.seed(key)  # restores the exact key (dropout stream)
        return step

    def check_unfinished(self, step: int, total_steps: int, output: Path) -> bool:
        """Whether the run still has steps to go. A checkpoint exactly at the end is accepted only
        in its own run folder, which it finishes (:meth:`OutputFolder.finish`: a kill after the
        final checkpoint may have left the top-level adapter at an earlier one); one past the end,
        or elsewhere, is refused."""
        if step < total_steps:
            return True
        if step == total_steps and _same(self.run_folder, output):
            return False
        raise UserError(
            f"checkpoint {self.checkpoint} is at step {step}, already at or past --iters {total_steps}"
        )
