"""Lightning training utilities shared by every histoflow model (baselines, MoLF, FLAG variants).

How a model class trains a :class:`lightning.LightningModule` with them::

    seed_everything(seed)  # before building the module: same seed, same initial weights
    module = MyModule(...)
    train_dl, val_dl = tensor_loaders([X, Y, mask], [Xv, Yv, mask_v], batch_size=128, seed=seed)
    history = fit_module(module, train_dl, val_dl, max_epochs=100, accelerator="auto", devices="auto")
    # `module` now holds the trained weights (also after DDP in spawned processes); `history` is a DataFrame

The module logs its metrics with ``self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)`` (or,
cheaper, ``self.log_epoch_means({"loss": loss}, batch_size)`` with :class:`EpochMeanLogging`) and
``self.log("val_loss", ..., on_epoch=True, sync_dist=True)``; :class:`HistoryCallback` collects every logged scalar
per epoch. ``sync_dist=True`` matters under DDP: early stopping and best-weight selection then see the same value on
every process.

Many devices: ``devices=2`` (or more) picks ``ddp_spawn``, or ``ddp_notebook`` in an interactive session (Jupyter,
``python -i``), where ``ddp_spawn`` cannot run. With spawned or forked processes the calling process gets the
trained weights back from Lightning (loaded into the module it passed), but not the state of callbacks; the history
therefore travels through a file that the rank-0 process writes into a temporary folder created by the calling
process (see :class:`HistoryCallback`). Everything given to ``fit`` (module, data loaders) must be picklable for
``ddp_spawn``: define LightningModules at module level.

This module imports torch and Lightning; import it inside functions from :mod:`histoflow.tl`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
import warnings
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from histoflow._logging import logger

__all__ = [
    "make_trainer",
    "fit_module",
    "HistoryCallback",
    "BestWeightsCallback",
    "EMAWeightsCallback",
    "seed_everything",
    "tensor_loaders",
    "SeededSampler",
    "EpochMeanLogging",
    "adamw",
    "default_strategy",
    "is_interactive",
    "count_devices",
    "atomic_dir",
]

#: Lightning warnings that say nothing useful for in-memory arrays.
_QUIET = (
    r".*does not have many workers.*",
    r".*The number of training batches .* is smaller than the logging interval.*",
    r".*You defined a `validation_step` but have no `val_dataloader`.*",  # make_trainer logs its own message
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning internals with recent torch
)


def is_interactive() -> bool:
    """Whether this is an interactive session (Jupyter, IPython, ``python -i``), where ``ddp_spawn`` cannot run."""
    return hasattr(sys, "ps1") or bool(sys.flags.interactive) or "ipykernel" in sys.modules


def count_devices(accelerator: str | Any = "auto", devices: int | str | Sequence[int] = "auto") -> int:
    """Number of devices ``Trainer(accelerator=..., devices=...)`` would use on one node.

    ``"auto"`` and ``-1`` mean every visible GPU for ``"auto"``/``"gpu"``/``"cuda"`` accelerators (one process on
    CPU, as in Lightning); a list or ``"0,1"`` names device indices.
    """
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        s = devices.strip()
        if "," in s:
            return len([x for x in s.split(",") if x.strip()])
        if s not in ("auto", "-1"):
            return int(s)
        devices = -1
    if isinstance(devices, int) and devices >= 0:
        return devices
    acc = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower()
    if acc in ("auto", "gpu", "cuda") or "cuda" in acc:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n:
            return n
    return 1


def default_strategy(
    accelerator: str | Any = "auto", devices: int | str | Sequence[int] = "auto", num_nodes: int = 1
) -> str:
    """The strategy histoflow uses when ``strategy=None``.

    ``"auto"`` (one process) for one device; ``"ddp"`` for several nodes or when launched by ``torchrun``/SLURM
    (``LOCAL_RANK`` set); otherwise ``"ddp_notebook"`` in interactive sessions and ``"ddp_spawn"`` in scripts. Plain
    ``"ddp"`` would re-run the calling script once per device, which is wrong for a library call.
    """
    if num_nodes > 1 or "LOCAL_RANK" in os.environ:
        return "ddp"
    if count_devices(accelerator, devices) <= 1:
        return "auto"
    return "ddp_notebook" if is_interactive() else "ddp_spawn"


def seed_everything(seed: int) -> int:
    """Seed Python, numpy and torch (and data-loader workers) and ask torch for deterministic algorithms.

    Wraps :func:`lightning.seed_everything` with ``workers=True`` and calls
    ``torch.use_deterministic_algorithms(True, warn_only=True)``, so the same seed gives the same numbers on CPU
    (ops without a deterministic implementation warn instead of failing). The seed also reaches processes spawned
    for DDP (through ``PL_GLOBAL_SEED``). Call it right before building a module so its initial weights are seeded.

    Parameters
    ----------
    seed
        The seed (converted to ``int``).

    Returns
    -------
    The seed, as an ``int``.
    """
    seed = int(seed)
    L.seed_everything(seed, workers=True, verbose=False)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return seed


def _as_tensor(a: Any) -> torch.Tensor:
    t = torch.as_tensor(np.ascontiguousarray(a))
    return t.float() if t.dtype == torch.float64 else t


class SeededSampler(torch.utils.data.RandomSampler):
    """Random order from a generator seeded with ``seed`` and the epoch (``seed + epoch``); picklable.

    Use ``DataLoader(ds, batch_size=..., sampler=SeededSampler(ds, seed))`` instead of ``DataLoader(...,
    shuffle=True, generator=torch.Generator().manual_seed(seed))``: a ``torch.Generator`` held by a DataLoader cannot
    be sent to ``ddp_spawn`` processes (torch 2.x fails with "unable to resize file ... Invalid argument"), so the
    generator is made afresh for every pass here. Being a ``RandomSampler``, Lightning recognises it as shuffling
    and swaps in a shuffling ``DistributedSampler`` under DDP.

    Parameters
    ----------
    data_source
        The dataset (only its length is used).
    seed
        Seed of the first pass; pass ``k`` uses ``seed + k``. Lightning calls :meth:`set_epoch` before every
        training epoch, so a run resumed from a checkpoint draws the same orders as an uninterrupted one.
    """

    def __init__(self, data_source: Any, seed: int):
        super().__init__(data_source)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass the one of ``epoch`` (0-based)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        yield from torch.randperm(len(self.data_source), generator=gen).tolist()


def tensor_loaders(
    train_arrays: Sequence[np.ndarray],
    val_arrays: Sequence[np.ndarray] | None = None,
    *,
    batch_size: int = 128,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader | None]:
    """DataLoaders over numpy arrays whose first axis is the sample (e.g. ``[features, targets, gene_mask]``).

    Each batch is a list of tensors in the order of the arrays (float64 becomes float32, bool and integers are
    kept). The training loader shuffles with a generator seeded with ``seed + epoch`` (so the batch order does not
    depend on the global random state); the validation loader never shuffles. Under DDP, Lightning replaces the
    sampler by a ``DistributedSampler`` seeded from :func:`~histoflow.models.seed_everything`.

    Parameters
    ----------
    train_arrays
        Training arrays, all with the same number of rows.
    val_arrays
        Validation arrays, all with the same number of rows; None: no validation loader.
    batch_size
        Samples per batch.
    shuffle
        Shuffle the training samples (with :class:`~histoflow.models.SeededSampler`); False keeps their order.
    seed
        Seed of the training order (pass ``k`` uses ``seed + k``).
    num_workers
        Data-loader worker processes.
    drop_last
        Drop the last, incomplete training batch.

    Returns
    -------
    ``(train_loader, val_loader)``; ``val_loader`` is None without ``val_arrays``.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")

    def dataset(arrays: Sequence[np.ndarray], name: str) -> torch.utils.data.TensorDataset:
        if not arrays:
            raise ValueError(f"`{name}` is empty; pass at least one array.")
        lengths = {len(a) for a in arrays}
        if len(lengths) != 1:
            raise ValueError(f"The arrays of `{name}` have different lengths {sorted(lengths)}; they must match.")
        if lengths == {0}:
            raise ValueError(f"The arrays of `{name}` have no rows.")
        return torch.utils.data.TensorDataset(*[_as_tensor(a) for a in arrays])

    train_ds = dataset(train_arrays, "train_arrays")
    train = torch.utils.data.DataLoader(
        train_ds,
        batch_size=batch_size,
        sampler=SeededSampler(train_ds, seed) if shuffle else None,
        num_workers=num_workers,
        drop_last=drop_last,
    )
    val = None
    if val_arrays is not None:
        val = torch.utils.data.DataLoader(
            dataset(val_arrays, "val_arrays"), batch_size=batch_size, shuffle=False, num_workers=num_workers
        )
    return train, val


def adamw(params: Any, *, lr: float = 1e-3, weight_decay: float = 1e-2) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with the multi-tensor (``foreach``) update on every device.

    torch picks the multi-tensor update by default only for CUDA parameters; on a CPU it loops over the parameters in
    Python, a dozen small operations each, which for models of many small tensors (MoLF's Stage I has about 40)
    costs more than their arithmetic. The multi-tensor update computes the same numbers (checked bit for bit in the
    test suite). ``params``: parameters or parameter groups, as for ``AdamW``.
    """
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


class EpochMeanLogging:
    """Mixin for a :class:`lightning.LightningModule`: training scalars averaged over the epoch, logged once per key.

    ``self.log_epoch_means({"loss": loss, ...}, batch_size)`` in ``training_step`` gives the history, the progress
    bar and the callbacks the same numbers as ``self.log("train_loss", loss, on_step=False, on_epoch=True,
    batch_size=batch_size, sync_dist=True)`` on every step, at a fraction of the cost: each ``self.log`` call costs
    Lightning about a millisecond of bookkeeping on a CPU, more than a training step of a small model. The mixin
    keeps the sums Lightning keeps (``Σ value · batch_size`` in torch's default float type, or float64 for float64
    values, and ``Σ batch_size``), reduces them over the processes as Lightning reduces a mean under DDP, and logs
    each mean once, on the epoch's last batch. Values are detached; keys get the prefix ``train_``.

    Put it before ``LightningModule`` in the bases (``class M(EpochMeanLogging, L.LightningModule)``); it defines
    ``on_train_epoch_start`` (drops the sums of an interrupted epoch) and ``on_train_epoch_end`` (logs what is left
    when an epoch ended before its last batch, e.g. at ``max_steps``); a subclass that overrides them calls
    ``super()``.
    """

    def log_epoch_means(
        self, values: dict[str, torch.Tensor], batch_size: int, *, prefix: str = "train_", prog_bar: bool = False
    ) -> None:
        """Add this step's ``values`` (scalars) with weight ``batch_size``; log the means on the epoch's last batch."""
        sums = self.__dict__.setdefault("_epoch_sums", {})
        dtype = torch.get_default_dtype()
        for key, value in values.items():
            value = value.detach()
            if value.dtype not in (torch.float32, torch.float64):
                value = value.to(dtype)
            name = prefix + key
            if name not in sums:
                zero = torch.tensor(0.0, dtype=dtype, device=value.device)
                sums[name] = [zero, torch.tensor(0, device=value.device), prog_bar]
            entry = sums[name]
            entry[0] = entry[0] + value * batch_size  # Lightning's accumulation, in its order and types
            entry[1] = entry[1] + batch_size
        if self.trainer.is_last_batch:
            self._log_epoch_sums()

    def _log_epoch_sums(self) -> None:
        sums = self.__dict__.get("_epoch_sums")
        if not sums:
            return
        reduce = self.trainer.strategy.reduce  # identity on one device; DDP: the mean over processes, as Lightning
        for name, (total, count, prog_bar) in sums.items():
            mean = reduce(total.clone(), reduce_op="mean") / reduce(count, reduce_op="mean")
            # logged once with weight 1: Lightning's epoch mean is then `mean` exactly (0 + mean · 1, divided by 1)
            self.log(name, mean, on_step=False, on_epoch=True, batch_size=1, prog_bar=prog_bar)
        sums.clear()

    def on_train_epoch_start(self) -> None:
        self.__dict__.get("_epoch_sums", {}).clear()

    def on_train_epoch_end(self) -> None:
        self._log_epoch_sums()


def _scalar(v: Any) -> float | None:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            return None
        return float(v.detach().cpu().item())
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v)
    return None


def _remove_if_owner(folder: str, pid: int) -> None:
    if os.getpid() == pid:
        shutil.rmtree(folder, ignore_errors=True)


class HistoryCallback(Callback):
    """Collects every scalar metric logged per epoch into :attr:`~histoflow.models.HistoryCallback.history`.

    At the end of each training epoch (after that epoch's validation) it reads ``trainer.callback_metrics``:
    ``train_*`` and any other epoch-level scalars, ``val_*`` only when validation ran in that epoch, never the
    ``*_step`` values. Column ``time_s`` holds the seconds since the start of training.

    Under DDP the rank-0 process also writes the records into ``folder/history.json`` after every epoch; the calling
    process reads that file, which is how the history comes back from ``ddp_spawn``/``ddp_notebook`` processes
    (whose callback objects are copies). By default ``folder`` is a temporary directory created here, in the
    calling process, and removed when the callback is garbage collected. The records are also part of the
    callback's checkpoint state, so resuming from ``last.ckpt`` continues the history.

    Parameters
    ----------
    folder
        Folder for ``history.json``; a temporary directory by default.
    """

    def __init__(self, folder: str | Path | None = None):
        super().__init__()
        if folder is None:
            tmp = tempfile.mkdtemp(prefix="histoflow-history-")
            self._finalizer = weakref.finalize(self, _remove_if_owner, tmp, os.getpid())
            folder = tmp
        self.folder = Path(folder)
        self.path = self.folder / "history.json"
        self._records: dict[int, dict[str, float]] = {}
        self._val_ran = False
        self._t0: float | None = None
        self._offset = 0.0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_finalizer", None)  # only the creating process removes the folder
        return state

    # Lightning hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()
        self._offset = max((r.get("time_s", 0.0) for r in self._records.values()), default=0.0)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_ran = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record: dict[str, float] = {}
        for name, value in trainer.callback_metrics.items():
            if name.endswith("_step") or (name.startswith("val") and not self._val_ran):
                continue
            v = _scalar(value)
            if v is not None:
                record[name.removesuffix("_epoch")] = v
        self._val_ran = False
        if self._t0 is not None:
            record["time_s"] = self._offset + time.perf_counter() - self._t0
        self._records[int(trainer.current_epoch)] = record
        if trainer.is_global_zero:
            self._write()

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint state: the records so far."""
        return {"records": {str(k): v for k, v in self._records.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the records from a checkpoint.

        Parameters
        ----------
        state_dict
            What :meth:`state_dict` returned.
        """
        self._records = {int(k): dict(v) for k, v in state_dict.get("records", {}).items()}

    # reading back
    def _write(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({str(k): v for k, v in self._records.items()}, allow_nan=True))
            tmp.replace(self.path)
        except OSError as e:  # history is a convenience; never fail training over it
            logger.warning("Could not write the training history to %s: %s", self.path, e)

    def collect(self) -> None:
        """Read the records written by the rank-0 process (needed after ``ddp_spawn``/``ddp_notebook``)."""
        if self.path.exists():
            data = json.loads(self.path.read_text())
            self._records.update({int(k): dict(v) for k, v in data.items()})

    @property
    def history(self) -> pd.DataFrame:
        """Metrics per epoch (index ``epoch``), one column per metric (NaN where a metric was not logged)."""
        self.collect()
        if not self._records:
            return pd.DataFrame(index=pd.Index([], name="epoch", dtype=np.int64))
        df = pd.DataFrame.from_dict(self._records, orient="index").sort_index()
        df.index = df.index.astype(np.int64)
        df.index.name = "epoch"
        first = [c for c in df.columns if c.startswith("train")]
        val = [c for c in df.columns if c.startswith("val")]
        rest = [c for c in df.columns if c not in first and c not in val and c != "time_s"]
        return df[first + val + rest + (["time_s"] if "time_s" in df.columns else [])]


class BestWeightsCallback(Callback):
    """Keeps a CPU copy of the weights at the best value of ``monitor`` and loads them when training ends.

    Runs in every process (monitor metrics logged with ``sync_dist=True`` are the same everywhere), so after DDP the
    weights sent back to the calling process are the best ones.

    Parameters
    ----------
    monitor
        Metric to watch, e.g. ``"val_loss"``.
    mode
        ``"min"`` or ``"max"``.
    """

    def __init__(self, monitor: str = "val_loss", mode: Literal["min", "max"] = "min"):
        super().__init__()
        self.monitor, self.mode = monitor, mode
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self._state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        v = _scalar(trainer.callback_metrics.get(self.monitor))
        if v is None or not math.isfinite(v):
            return
        better = self.best_score is None or (v < self.best_score if self.mode == "min" else v > self.best_score)
        if better:
            self.best_score, self.best_epoch = v, int(trainer.current_epoch)
            self._state = {k: t.detach().to("cpu", copy=True) for k, t in pl_module.state_dict().items()}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._state is not None:
            pl_module.load_state_dict(self._state)
            logger.info(
                "Restored the weights of epoch %d (best %s = %.4g).", self.best_epoch, self.monitor, self.best_score
            )


def check_ema_decay(decay: float) -> float:
    """``decay`` as a float in (0, 1), or a :class:`ValueError` naming ``ema_decay``."""
    try:
        value = float(decay)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 < value < 1.0:
        raise ValueError(f"`ema_decay` must be in (0, 1) (e.g. 0.99), got {decay!r}; or None for no averaging.")
    return value


class EMAWeightsCallback(Callback):
    """Exponential moving average (EMA) of the weights, validated and returned in place of the raw weights.

    The first optimiser step copies the weights; after every later step the average moves towards them,
    ``avg ← decay · avg + (1 − decay) · w`` (torch's ``AveragedModel`` with ``get_ema_multi_avg_fn``; buffers are
    averaged too). Validation runs on the averaged weights, so early stopping and ``BestWeightsCallback`` (placed
    before this callback) see and keep them; training continues from the raw weights. At the end of training the
    average replaces the weights unless ``copy_at_end=False`` (set when ``BestWeightsCallback`` restores the best
    averaged weights instead). Checkpoints hold the raw weights and, in the callback's state, the average, so
    ``resume`` continues both.

    Parameters
    ----------
    decay
        Weight of the old average at each step, in (0, 1); the average spans about ``1 / (1 − decay)`` steps.
    copy_at_end
        Load the final average into the module when training ends.
    """

    def __init__(self, decay: float, *, copy_at_end: bool = True):
        super().__init__()
        self.decay, self.copy_at_end = check_ema_decay(decay), copy_at_end
        self._average: torch.optim.swa_utils.AveragedModel | None = None
        self._pending: dict[str, Any] | None = None
        self._swapped = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # here, not in `setup`: the module is on its device by now, so the average lives there too
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self._average = AveragedModel(pl_module, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)
        if self._pending is not None:
            self._average.load_state_dict(self._pending)
            self._pending = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._average is not None:
            self._average.update_parameters(pl_module)

    def _swap(self, pl_module: L.LightningModule) -> None:
        assert self._average is not None
        mine = list(self._average.module.parameters()) + list(self._average.module.buffers())
        theirs = list(pl_module.parameters()) + list(pl_module.buffers())
        with torch.no_grad():
            for a, b in zip(mine, theirs):
                tmp = a.detach().clone()
                a.copy_(b)
                b.copy_(tmp)
        self._swapped = not self._swapped

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._average is not None and not self._swapped:
            self._swap(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swapped:  # after BestWeightsCallback has copied the averaged weights, before checkpoints are saved
            self._swap(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swapped:
            self._swap(pl_module)
        if self.copy_at_end and self._average is not None:
            pl_module.load_state_dict(self._average.module.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {} if self._average is None else {"average": self._average.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        average = state_dict.get("average")
        if average is None:
            return
        if self._average is None:
            self._pending = average
        else:
            self._average.load_state_dict(average)


def make_trainer(
    *,
    max_epochs: int,
    accelerator: str | Any = "auto",
    devices: int | str | Sequence[int] = "auto",
    strategy: str | Any | None = None,
    num_nodes: int = 1,
    has_val: bool = True,
    early_stopping: bool = True,
    patience: int = 10,
    monitor: str = "val_loss",
    mode: Literal["min", "max"] = "min",
    min_delta: float = 0.0,
    restore_best: bool = False,
    ema_decay: float | None = None,
    enable_progress_bar: bool = True,
    default_root_dir: str | Path | None = None,
    checkpoint: bool = False,
    gradient_clip_val: float | None = None,
    deterministic: bool | Literal["warn"] = True,
    callbacks: Sequence[Callback] | None = None,
    **trainer_kwargs: Any,
) -> tuple[L.Trainer, HistoryCallback]:
    """A :class:`lightning.Trainer` set up the histoflow way, and the callback that records its history.

    Parameters
    ----------
    max_epochs
        Maximum number of epochs.
    accelerator
        ``"auto"``, ``"cpu"``, ``"gpu"``, ``"mps"``, ... (Lightning).
    devices
        Number of devices, device indices, or ``"auto"``.
    strategy
        Lightning strategy; None chooses one: ``"auto"`` (one process) for one device, ``"ddp"`` for several
        nodes or under ``torchrun``/SLURM, otherwise ``"ddp_spawn"`` in a script and ``"ddp_notebook"`` in Jupyter.
    num_nodes
        Number of nodes (multi-node jobs are launched by the cluster and use ``ddp``).
    has_val
        Whether ``fit`` gets validation data; early stopping and best-weight restoring on a ``val_*`` metric need it
        (they are skipped, with a log message, without it).
    early_stopping
        Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs.
    patience
        Epochs without improvement before stopping.
    monitor
        Metric for early stopping, checkpoints and best weights (logged by the module).
    mode
        ``"min"`` or ``"max"``: direction in which ``monitor`` improves.
    min_delta
        Smallest change that counts as an improvement.
    restore_best
        Load the weights of the best epoch (by ``monitor``) at the end of training (``BestWeightsCallback``).
    ema_decay
        Train with an exponential moving average of the weights (:class:`~histoflow.models.EMAWeightsCallback`):
        validation, the best weights and the returned module use the average. None: no averaging.
    enable_progress_bar
        Show Lightning's progress bar.
    default_root_dir
        Folder for checkpoints and logs (Lightning's default is the working directory).
    checkpoint
        Save checkpoints in ``default_root_dir/checkpoints``: the best by ``monitor`` and ``last.ckpt`` (pass it as
        ``ckpt_path`` to ``fit`` to resume).
    gradient_clip_val
        Clip gradients to this norm.
    deterministic
        ``True`` asks torch for deterministic algorithms and warns (instead of failing) for ops that have none
        (Lightning's ``"warn"``); ``False`` leaves torch as it is.
    callbacks
        More callbacks.
    trainer_kwargs
        Passed to :class:`lightning.Trainer` (e.g. ``precision``, ``logger``, ``check_val_every_n_epoch``);
        ``logger`` is False unless given: the history is kept by :class:`HistoryCallback`.

    Returns
    -------
    ``(trainer, history_callback)``; after ``trainer.fit`` read ``history_callback.history``.
    """
    if int(max_epochs) < 1:
        raise ValueError(f"`max_epochs` must be at least 1, got {max_epochs}.")
    if patience < 1:
        raise ValueError(f"`patience` must be at least 1, got {patience}.")
    if mode not in ("min", "max"):
        raise ValueError(f"`mode={mode!r}` is not valid; choose 'min' or 'max'.")
    history = HistoryCallback()
    cbs: list[Callback] = [history]
    can_monitor = has_val or not monitor.startswith("val")
    if early_stopping:
        if can_monitor:
            cbs.append(EarlyStopping(monitor=monitor, patience=patience, mode=mode, min_delta=min_delta))
        else:
            logger.info(
                "No validation data: early stopping on %r is off; training runs %d epochs.", monitor, max_epochs
            )
    if restore_best and can_monitor:
        cbs.append(BestWeightsCallback(monitor=monitor, mode=mode))
    if ema_decay is not None:  # after BestWeightsCallback, before ModelCheckpoint (see EMAWeightsCallback)
        cbs.append(EMAWeightsCallback(ema_decay, copy_at_end=not (restore_best and can_monitor)))
    if checkpoint:
        root = Path(default_root_dir) if default_root_dir is not None else Path.cwd()
        cbs.append(
            ModelCheckpoint(
                dirpath=root / "checkpoints",
                filename="best-{epoch}",
                monitor=monitor if can_monitor else None,
                mode=mode,
                save_top_k=1,
                save_last=True,
            )
        )
    cbs.extend(callbacks or [])
    if strategy is None:
        strategy = default_strategy(accelerator, devices, num_nodes)
    trainer_kwargs.setdefault("logger", False)
    trainer = L.Trainer(
        max_epochs=int(max_epochs),
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        num_nodes=num_nodes,
        callbacks=cbs,
        enable_checkpointing=checkpoint,
        enable_progress_bar=enable_progress_bar,
        enable_model_summary=False,
        default_root_dir=default_root_dir,
        gradient_clip_val=gradient_clip_val,
        deterministic="warn" if deterministic is True else deterministic,
        **trainer_kwargs,
    )
    return trainer, history


def fit_module(
    module: L.LightningModule,
    train_loader: Any,
    val_loader: Any | None = None,
    *,
    ckpt_path: str | Path | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """Train ``module`` with :func:`~histoflow.models.make_trainer` and return its history.

    After it returns, ``module`` holds the trained weights (the best ones with ``restore_best=True``), also when
    training ran in spawned DDP processes, and sits on the CPU.

    Parameters
    ----------
    module
        The LightningModule (defined at module level so that DDP can pickle it).
    train_loader
        Training batches.
    val_loader
        Validation batches (early stopping, best weights), or None.
    ckpt_path
        Checkpoint to resume from (e.g. ``last.ckpt`` written with ``checkpoint=True``).
    kwargs
        Passed to :func:`~histoflow.models.make_trainer` (``max_epochs`` is required).

    Returns
    -------
    The history: one row per epoch, one column per logged metric.
    """
    trainer, history = make_trainer(has_val=val_loader is not None, **kwargs)
    with warnings.catch_warnings():
        for pattern in _QUIET:
            warnings.filterwarnings("ignore", message=pattern)
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=ckpt_path)
    module.cpu()
    return history.history


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Write a folder atomically: yields a temporary folder next to ``path`` that replaces ``path`` on success.

    On an error inside the block the temporary folder is removed and ``path`` is left as it was. With
    ``overwrite=True`` an existing ``path`` is replaced (moved aside, then deleted once the new folder is in place).

    Parameters
    ----------
    path
        Target folder.
    overwrite
        Replace an existing ``path``; without it an existing ``path`` raises :class:`FileExistsError`.
    """
    path = Path(path)
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"`{path}` already exists; pass `overwrite=True` to replace it.")
        if not path.is_dir():
            raise NotADirectoryError(f"`{path}` exists and is not a folder; remove it or choose another path.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if path.exists():
        backup = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        path.rename(backup)
    try:
        tmp.rename(path)
    except BaseException:
        if backup is not None:
            backup.rename(path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
