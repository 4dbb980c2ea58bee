from __future__ import annotations

import sys

import lightning as L
import numpy as np
import pytest
import torch
from _model_data import tiny_mlp_fit

from histoflow.models._train import (
    EMAWeightsCallback,
    EpochMeanLogging,
    HistoryCallback,
    adamw,
    atomic_dir,
    count_devices,
    default_strategy,
    fit_module,
    make_trainer,
    seed_everything,
    tensor_loaders,
)

QUIET = {"enable_progress_bar": False}


class _Linear(L.LightningModule):
    """y = W x + b with MSE; logs train_loss / val_loss per epoch."""

    def __init__(self, d: int = 4, g: int = 2, lr: float = 0.05):
        super().__init__()
        self.lin = torch.nn.Linear(d, g)
        self.lr = lr

    def forward(self, x):
        return self.lin(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(x))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y), on_epoch=True, batch_size=len(x))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _data(n=200, d=4, g=2, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    W = rng.normal(size=(d, g)).astype(np.float32)
    return X, (X @ W + 0.1 * rng.normal(size=(n, g))).astype(np.float32)


def _val_loss(module, X, Y):
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(module(torch.from_numpy(X)), torch.from_numpy(Y)))


def test_history_has_train_and_val_loss_per_epoch():
    X, Y = _data()
    seed_everything(0)
    module = _Linear()
    # one validation batch, so the logged val_loss is the loss over the whole validation set
    train, val = tensor_loaders([X[:150], Y[:150]], [X[150:], Y[150:]], batch_size=64, seed=0)
    val = torch.utils.data.DataLoader(val.dataset, batch_size=50)
    hist = fit_module(module, train, val, max_epochs=4, early_stopping=False, accelerator="cpu", **QUIET)
    assert list(hist.index) == [0, 1, 2, 3]
    assert hist.index.name == "epoch"
    assert list(hist.columns) == ["train_loss", "val_loss", "time_s"]
    assert np.isfinite(hist.to_numpy()).all()
    assert hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]
    assert np.all(np.diff(hist["time_s"]) > 0)
    # the last record is the validation loss of the final weights: recorded after that epoch's validation
    assert hist["val_loss"].iloc[-1] == pytest.approx(_val_loss(module, X[150:], Y[150:]), rel=1e-5)


def test_history_records_val_only_in_epochs_with_validation():
    X, Y = _data()
    seed_everything(0)
    train, val = tensor_loaders([X[:150], Y[:150]], [X[150:], Y[150:]], batch_size=64, seed=0)
    trainer, cb = make_trainer(
        max_epochs=4, accelerator="cpu", early_stopping=False, check_val_every_n_epoch=2, **QUIET
    )
    trainer.fit(_Linear(), train, val)
    hist = cb.history
    assert hist["val_loss"].isna().tolist() == [True, False, True, False]
    assert hist["train_loss"].notna().all()


def test_early_stopping_stops_when_val_loss_rises_and_restores_best():
    X, Y = _data()
    seed_everything(0)
    module = _Linear(lr=0.1)
    # validation targets are the negated training targets: fitting the training data makes val loss rise
    train, _ = tensor_loaders([X[:150], Y[:150]], batch_size=50, seed=0)
    val = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(X[150:]), torch.from_numpy(-Y[150:])), 50
    )
    hist = fit_module(module, train, val, max_epochs=50, patience=3, restore_best=True, accelerator="cpu", **QUIET)
    assert len(hist) < 10  # stopped long before max_epochs
    best = int(hist["val_loss"].idxmin())
    assert len(hist) == best + 1 + 3  # patience epochs after the best one
    assert hist["val_loss"].iloc[-1] > hist["val_loss"].min()
    # restore_best: the module holds the weights of the best epoch
    assert _val_loss(module, X[150:], -Y[150:]) == pytest.approx(hist["val_loss"].min(), rel=1e-5)


def test_early_stopping_off_without_validation_data():
    X, Y = _data()
    train, _ = tensor_loaders([X, Y], batch_size=64)
    hist = fit_module(_Linear(), train, None, max_epochs=3, early_stopping=True, accelerator="cpu", **QUIET)
    assert len(hist) == 3
    assert "val_loss" not in hist


def _train_once(seed):
    X, Y = _data()
    seed_everything(seed)
    module = _Linear()
    train, val = tensor_loaders([X[:150], Y[:150]], [X[150:], Y[150:]], batch_size=32, shuffle=True, seed=seed)
    fit_module(module, train, val, max_epochs=3, early_stopping=False, accelerator="cpu", **QUIET)
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_same_seed_gives_identical_weights():
    a, b, c = _train_once(0), _train_once(0), _train_once(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


class _BothWays(EpochMeanLogging, _Linear):
    """Logs each training scalar twice: per step with ``self.log`` (``train_*``) and with the mixin (``mix_*``)."""

    def __init__(self):
        super().__init__()
        self.log_calls: list[str] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        values = {
            "loss": loss,
            "double": loss.double() * 3,  # float64 is kept in float64, as Lightning keeps it
            "count": torch.tensor(batch_idx + 1),  # integers become floats
        }
        for k, v in values.items():
            self.log(f"train_{k}", v, on_step=False, on_epoch=True, batch_size=len(x), sync_dist=True)
        self.log_epoch_means(values, len(x), prefix="mix_", prog_bar=True)
        return loss

    def log(self, name, *args, **kwargs):
        self.log_calls.append(name)
        super().log(name, *args, **kwargs)


@pytest.mark.parametrize("limit", [None, 2])
def test_epoch_mean_logging_gives_the_numbers_of_per_step_logging(limit):
    X, Y = _data(n=190)
    seed_everything(0)
    module = _BothWays()
    # 150 training rows in batches of 64: 64, 64, 22 (an uneven last batch); `limit=2` cuts every epoch short
    train, val = tensor_loaders([X[:150], Y[:150]], [X[150:], Y[150:]], batch_size=64, seed=0)
    extra = {} if limit is None else {"limit_train_batches": limit}
    trainer, cb = make_trainer(max_epochs=3, accelerator="cpu", early_stopping=False, **extra, **QUIET)
    trainer.fit(module, train, val)
    hist = cb.history
    assert len(hist) == 3
    for k in ("loss", "double", "count"):
        np.testing.assert_array_equal(hist[f"mix_{k}"].to_numpy(), hist[f"train_{k}"].to_numpy())
    batches = 3 if limit is None else limit
    sizes = [64, 64, 22][:batches]
    assert hist["mix_count"].iloc[0] == pytest.approx(sum((i + 1) * b for i, b in enumerate(sizes)) / sum(sizes))
    # one `self.log` per key and epoch, instead of one per key and step
    assert sum(c.startswith("mix_") for c in module.log_calls) == 3 * 3
    assert sum(c.startswith("train_") for c in module.log_calls) == 3 * 3 * batches
    assert "mix_loss" in trainer.progress_bar_metrics and "train_loss" not in trainer.progress_bar_metrics


def test_adamw_updates_are_torchs_single_tensor_adamw_bit_for_bit():
    def train(make):
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3)
        )
        groups = [{"params": list(net[:3].parameters())}, {"params": list(net[3].parameters()), "lr": 1e-4}]
        opt = make(groups)
        gen = torch.Generator().manual_seed(1)
        for _ in range(50):
            loss = net(torch.randn(32, 8, generator=gen)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return [p.detach().clone() for p in net.parameters()]

    ours = train(lambda g: adamw(g, lr=1e-2, weight_decay=0.05))
    loop = train(lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.05, foreach=False))
    assert all(torch.equal(a, b) for a, b in zip(ours, loop))
    assert adamw(torch.nn.Linear(2, 2).parameters()).defaults["foreach"] is True


def test_tensor_loaders_seeded_shuffle_dtypes_and_errors():
    X = np.arange(20, dtype=np.float64).reshape(10, 2)
    m = np.ones((10, 2), dtype=bool)

    def order(seed):
        dl, _ = tensor_loaders([X, m], batch_size=4, seed=seed)
        return torch.cat([b[0][:, 0] for b in dl]).tolist()

    assert order(3) == order(3)
    assert sorted(order(3)) == X[:, 0].tolist()
    assert order(3) != order(4)
    dl, val = tensor_loaders([X, m], [X[:3], m[:3]], batch_size=4)
    x, mm = next(iter(dl))
    assert x.dtype == torch.float32 and mm.dtype == torch.bool
    assert [b[0][:, 0].tolist() for b in val] == [[0.0, 2.0, 4.0]]  # validation is never shuffled
    with pytest.raises(ValueError, match="different lengths"):
        tensor_loaders([X, m[:5]])
    with pytest.raises(ValueError, match="no rows"):
        tensor_loaders([X[:0]])
    with pytest.raises(ValueError, match="batch_size"):
        tensor_loaders([X], batch_size=0)


def test_default_strategy(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert count_devices("cpu", "auto") == 1
    assert count_devices("cpu", [0, 1, 2]) == 3
    assert count_devices("gpu", "0,1") == 2
    assert default_strategy("cpu", 1) == "auto"
    assert default_strategy("cpu", 2) == "ddp_spawn"
    assert default_strategy("cpu", 1, num_nodes=2) == "ddp"
    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)
    assert default_strategy("cpu", 2) == "ddp_notebook"


def test_make_trainer_options_and_bad_inputs(tmp_path):
    trainer, cb = make_trainer(max_epochs=2, accelerator="cpu", checkpoint=True, default_root_dir=tmp_path, **QUIET)
    assert isinstance(cb, HistoryCallback)
    kinds = {type(c).__name__ for c in trainer.callbacks}
    assert {"HistoryCallback", "EarlyStopping", "ModelCheckpoint"} <= kinds
    assert trainer.logger is None
    trainer, _ = make_trainer(max_epochs=2, accelerator="cpu", has_val=False, **QUIET)
    assert "EarlyStopping" not in {type(c).__name__ for c in trainer.callbacks}
    with pytest.raises(ValueError, match="max_epochs"):
        make_trainer(max_epochs=0)
    with pytest.raises(ValueError, match="patience"):
        make_trainer(max_epochs=2, patience=0)


def test_atomic_dir(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as d:
        (d / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(FileExistsError, match="overwrite"):
        with atomic_dir(target):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(target, overwrite=True) as d:
            (d / "a.txt").write_text("2")
            raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "1"  # a failed write leaves the old folder
    with atomic_dir(target, overwrite=True) as d:
        (d / "b.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folders left


def test_ddp_spawn_two_cpu_processes_returns_weights_and_history(tmp_path):
    # the module must be importable in the spawned processes: the MLP baseline's module
    module, train, val = tiny_mlp_fit()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    hist = fit_module(
        module, train, val, max_epochs=3, accelerator="cpu", devices=2, strategy="ddp_spawn", early_stopping=False,
        checkpoint=True, default_root_dir=tmp_path, **QUIET,
    )  # fmt: skip
    assert list(hist.index) == [0, 1, 2]
    assert hist[["train_loss", "val_loss"]].notna().all().all()
    assert hist["val_loss"].iloc[-1] < hist["val_loss"].iloc[0]
    after = module.state_dict()
    assert not torch.equal(before["net.0.weight"], after["net.0.weight"])
    # the parent holds exactly the weights the rank-0 process ended with (its last checkpoint)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(torch.equal(last["state_dict"][k], after[k]) for k in after)
    assert "HistoryCallback" in "".join(last["callbacks"])


class _Recorder(L.Callback):
    """The raw weights after every optimiser step (this callback runs after EMAWeightsCallback's update)."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []
        self.per_epoch: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.steps.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    def on_train_epoch_end(self, trainer, pl_module):
        self.per_epoch.append(len(self.steps))


def _ema_by_hand(steps, decay):
    """torch's AveragedModel: the first update copies the weights, later ones move by (1 - decay)."""
    avg, out = None, []
    for w in steps:
        if avg is None:
            avg = {k: v.clone() for k, v in w.items()}
        else:
            avg = {k: decay * avg[k] + (1 - decay) * w[k] for k in w}
        out.append(avg)
    return out


def test_ema_weights_are_the_moving_average_and_replace_the_raw_weights():
    X, Y = _data()
    seed_everything(0)
    module, rec = _Linear(lr=0.1), _Recorder()
    train, _ = tensor_loaders([X, Y], batch_size=40, seed=0)
    fit_module(module, train, None, max_epochs=3, ema_decay=0.8, callbacks=[rec], accelerator="cpu", **QUIET)
    assert len(rec.steps) == 15
    expected = _ema_by_hand(rec.steps, 0.8)[-1]
    got = module.state_dict()
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got[k], rec.steps[-1][k])  # the average, not the last raw weights


def test_ema_validates_and_restores_the_best_averaged_weights():
    X, Y = _data()
    seed_everything(0)
    module, rec = _Linear(lr=0.1), _Recorder()
    train, _ = tensor_loaders([X[:150], Y[:150]], batch_size=50, seed=0)
    val = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(X[150:]), torch.from_numpy(-Y[150:])), 50
    )
    hist = fit_module(
        module, train, val, max_epochs=50, patience=3, restore_best=True, ema_decay=0.5, callbacks=[rec],
        accelerator="cpu", **QUIET,
    )  # fmt: skip
    averages = _ema_by_hand(rec.steps, 0.5)
    # every epoch's validation loss is the loss of the averaged weights at the end of that epoch
    for epoch, n in enumerate(rec.per_epoch):
        lin = torch.nn.Linear(4, 2)
        lin.load_state_dict({k.removeprefix("lin."): v for k, v in averages[n - 1].items()})
        with torch.no_grad():
            loss = float(torch.nn.functional.mse_loss(lin(torch.from_numpy(X[150:])), torch.from_numpy(-Y[150:])))
        assert hist["val_loss"].iloc[epoch] == pytest.approx(loss, rel=1e-5)
    # the module holds the averaged weights of the best epoch, and training continued from the raw weights
    best = int(hist["val_loss"].idxmin())
    for k, v in module.state_dict().items():
        torch.testing.assert_close(v, averages[rec.per_epoch[best] - 1][k], rtol=1e-5, atol=1e-6)
    assert len(hist) == best + 1 + 3


@pytest.mark.parametrize("ema_decay", [None, 0.7])
def test_resuming_from_the_last_checkpoint_gives_the_uninterrupted_run(tmp_path, ema_decay):
    # the seeded shuffle is set to the resumed epoch (SeededSampler.set_epoch), and the average travels too
    X, Y = _data()

    def run(max_epochs, root, ckpt=None):
        seed_everything(0)
        module = _Linear(lr=0.1)
        train, _ = tensor_loaders([X, Y], batch_size=40, seed=0)
        fit_module(
            module, train, None, max_epochs=max_epochs, ema_decay=ema_decay, checkpoint=True, default_root_dir=root,
            ckpt_path=ckpt, accelerator="cpu", **QUIET,
        )  # fmt: skip
        return module.state_dict()

    straight = run(4, tmp_path / "a")
    run(2, tmp_path / "b")
    last = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    states = [v for k, v in last["callbacks"].items() if "EMAWeightsCallback" in k]
    assert len(states) == (ema_decay is not None)
    if ema_decay is not None:  # the average travels in the callback's state; the module's own weights are the raw ones
        assert "average" in states[0]
        assert not all(torch.equal(states[0]["average"][f"module.{k}"], v) for k, v in last["state_dict"].items())
    resumed = run(4, tmp_path / "b", ckpt=tmp_path / "b" / "checkpoints" / "last.ckpt")
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k])


def test_make_trainer_places_the_average_between_best_weights_and_checkpoints(tmp_path):
    trainer, _ = make_trainer(
        max_epochs=2, accelerator="cpu", restore_best=True, ema_decay=0.9, checkpoint=True, default_root_dir=tmp_path
    )
    names = [type(c).__name__ for c in trainer.callbacks]
    assert names.index("BestWeightsCallback") < names.index("EMAWeightsCallback") < names.index("ModelCheckpoint")
    ema = next(c for c in trainer.callbacks if isinstance(c, EMAWeightsCallback))
    assert ema.decay == 0.9 and not ema.copy_at_end  # the best averaged weights are restored instead
    trainer, _ = make_trainer(max_epochs=2, accelerator="cpu", has_val=False, restore_best=True, ema_decay=0.9)
    assert next(c for c in trainer.callbacks if isinstance(c, EMAWeightsCallback)).copy_at_end
    assert "EMAWeightsCallback" not in {type(c).__name__ for c in make_trainer(max_epochs=2)[0].callbacks}


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, 2, "fast", float("nan")])
def test_ema_decay_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="ema_decay"):
        make_trainer(max_epochs=2, ema_decay=bad)
