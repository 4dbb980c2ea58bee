"""The ``histoflow`` command line: ``demo``, ``embed``, ``fit``, ``predict`` and ``evaluate``.

Every data command reads a SpatialData ``.zarr`` folder or an ``.h5ad`` file, runs one function of the Python API
with the same defaults (read from the function signatures with :func:`inspect.signature`, so they cannot drift) and
writes the result in the input's format to a new path, atomically (a temporary sibling renamed into place). An
existing output is replaced only with ``--overwrite``. Bad arguments exit with status 2 and a one-line message naming
the option and the fix; errors raised by the library exit with status 1 and their message.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import shutil
import sys
import time
import types
import typing
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histoflow._constants import Key

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["main", "build_parser", "api_defaults", "write_atomic"]

_SUFFIXES = (".zarr", ".h5ad")
_MODELS = ("molf", "mlp", "ridge")
_DEMO_OUT = "histoflow-demo"
_DEMO_METRICS = ("pcc", "pcc@10", "mse", "gsc", "ssc", "wasserstein_spot", "cosine")
#: exceptions of the library that become a one-line message and exit status 1
_LIBRARY_ERRORS = (KeyError, ValueError, FileNotFoundError, FileExistsError, TypeError, RuntimeError, ArithmeticError)
_LOG = logging.getLogger("histoflow")
# `histoflow demo` trains for at most this many epochs per stage (the API's 300 would take long on a laptop CPU)
DEMO_EPOCHS = 60
# ... on batches of this many spots (the demo's ~800 training spots make 12 optimiser steps per epoch, not 3)
DEMO_FIT_BATCH = 64
# MoLF settings of the demo (a 50-gene panel needs no 128-d latent); `--set` overrides them
DEMO_SETTINGS: dict[str, Any] = {"latent_dim": 32}


# --------------------------------------------------------------------------------------------------------------------
# defaults of the Python API


def _signature_defaults(func: Callable[..., Any]) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(func).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def api_defaults() -> dict[str, dict[str, Any]]:
    """Defaults of the Python functions each command wraps, by function (``"embed_patches"``, ``"fit_molf"``, ...)."""
    from histoflow import pp, tl

    funcs = {
        "embed_patches": pp.embed_patches,
        "normalize": pp.normalize,
        "select_genes": pp.select_genes,
        "split_slides": pp.split_slides,
        "fit_molf": tl.fit_molf,
        "fit_baseline": tl.fit_baseline,
        "predict": tl.predict,
        "select_guidance": tl.select_guidance,
        "evaluate": tl.evaluate,
        "smooth_predictions": tl.smooth_predictions,
    }
    return {name: _signature_defaults(f) for name, f in funcs.items()}


# --------------------------------------------------------------------------------------------------------------------
# argument types


def _number(cast: type, what: str, ok: Any = None) -> Any:
    """An argparse type: ``cast(text)``, refused with ``expected <what>`` unless ``ok(value)``."""

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if ok is not None and not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, "a positive integer", lambda v: v >= 1)
_non_negative_int = _number(int, "a non-negative integer", lambda v: v >= 0)
_positive_float = _number(float, "a positive number", lambda v: 0 < v < float("inf"))
_non_negative_float = _number(float, "a non-negative number", lambda v: 0 <= v < float("inf"))
_fraction = _number(float, "a number")
_unit_weight = _number(float, "a weight between 0 and 1", lambda v: 0 <= v <= 1)


def _devices(text: str) -> int | str | list[int]:
    """``auto``, a number of devices, or comma-separated device indices (``0,1``)."""
    s = text.strip()
    try:
        if s == "auto":
            return s
        if "," in s:
            return [int(x) for x in s.split(",") if x.strip()]
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'auto', a number of devices or comma-separated device indices such as 0,1; got {text!r}"
        ) from None


def _fmt(value: Any) -> str:
    return "none" if value is None else str(value)


# --------------------------------------------------------------------------------------------------------------------
# --set key=value


def _convert(text: str, hint: Any, key: str) -> Any:
    """Convert ``text`` to the annotated type ``hint`` (int, float, bool, str, Literal, X | None, tuples, dict)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is None:
        return _literal_value(text)
    if origin is typing.Literal:
        for choice in args:
            if text == str(choice) or (choice is None and text.lower() == "none"):
                return choice
        raise ValueError(f"{key}={text!r} is not one of {[_fmt(c) for c in args]}")
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.lower() == "none":
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(text, arg, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors) or f"{key}={text!r} has the wrong type")
    if origin in (tuple, list) or hint in (tuple, list) or origin is Sequence:
        item = args[0] if args else Any
        values = [_convert(x.strip(), item, key) for x in text.split(",") if x.strip()]
        return tuple(values) if (origin or hint) is tuple else values
    if origin is dict or hint is dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"{key}={text!r} is not a JSON object such as '{{\"a\": 1}}'") from None
        if not isinstance(value, dict):
            raise ValueError(f"{key}={text!r} is not a JSON object such as '{{\"a\": 1}}'")
        return value
    if hint is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{key}={text!r} is not a boolean (true/false)")
    if hint in (int, float):
        try:
            return hint(text)
        except ValueError:
            raise ValueError(f"{key}={text!r} is not {'an integer' if hint is int else 'a number'}") from None
    if hint is str:
        return text
    if isinstance(hint, type) and hint.__module__ == "pathlib":
        return hint(text)
    return _literal_value(text)


def _literal_value(text: str) -> Any:
    """Best-effort typing of an unannotated value: JSON (numbers, booleans, lists), ``none``, else the string."""
    if text.lower() == "none":
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _hints(obj: Any) -> dict[str, Any]:
    """Resolved annotations of a function or dataclass (names only imported for type checking count as ``Any``)."""
    return typing.get_type_hints(obj, localns={"AnnData": Any, "SpatialData": Any})


def _settable(model: str) -> dict[str, tuple[str, Any]]:
    """``--set`` keys of a model: name → (``"config"`` | ``"train"`` | ``"model"``, annotated type)."""
    reserved = {
        "self", "adata", "table_key", "embedding_key", "layer", "genes", "library_key", "split_key", "seed",
        "max_epochs", "batch_size", "accelerator", "devices", "strategy", "num_nodes", "show_progress_bar",
        "enable_progress_bar", "trainer_kwargs", "extra",
    }  # fmt: skip
    out: dict[str, tuple[str, Any]] = {}
    if model == "molf":
        from histoflow.models import MoLF, MoLFConfig

        for name, hint in _hints(MoLFConfig).items():
            if name not in reserved:
                out[name] = ("config", hint)
        for name, hint in _hints(MoLF.train).items():
            if name not in reserved and name != "return":
                out.setdefault(name, ("train", hint))
        return out
    from histoflow.models import MLPBaseline, RidgeProbe

    cls = MLPBaseline if model == "mlp" else RidgeProbe
    for func in (cls.__init__, cls.train):
        for name, hint in _hints(func).items():
            if name not in reserved and name != "return":
                out.setdefault(name, ("model", hint))
    if model == "mlp":  # fit_baseline sets these from its own arguments
        out.pop("batch_size", None)
    return out


def _parse_settings(
    parser: argparse.ArgumentParser, items: Sequence[str] | None, model: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--set key=value`` items → (model settings, training settings), typed by the model's annotations."""
    config: dict[str, Any] = {}
    train: dict[str, Any] = {}
    if not items:
        return config, train
    known = _settable(model)
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            parser.error(f"argument --set: expected key=value (e.g. --set velocity=dense), got {item!r}")
        if key not in known:
            parser.error(f"argument --set: {key!r} is not a setting of the {model} model; choose from {sorted(known)}")
        where, hint = known[key]
        try:
            value = _convert(text.strip(), hint, key)
        except ValueError as e:
            parser.error(f"argument --set: {e}; fix the value")
        (train if where == "train" else config)[key] = value
    return config, train


# --------------------------------------------------------------------------------------------------------------------
# paths, reading and atomic writing


def _input_path(parser: argparse.ArgumentParser, text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() not in _SUFFIXES:
        parser.error(
            f"argument INPUT: {text!r} is neither a SpatialData .zarr folder nor an .h5ad file; give one of those "
            "(convert other data with histoflow.io)"
        )
    if not path.exists():
        parser.error(f"argument INPUT: {text!r} does not exist; check the path")
    if path.suffix.lower() == ".zarr" and not path.is_dir():
        parser.error(f"argument INPUT: {text!r} is not a folder; a SpatialData .zarr is a folder")
    if path.suffix.lower() == ".h5ad" and not path.is_file():
        parser.error(f"argument INPUT: {text!r} is not a file; an .h5ad is a file")
    return path


def _output_path(parser: argparse.ArgumentParser, inp: Path, text: str | None, command: str, overwrite: bool) -> Path:
    suffix = inp.suffix.lower()
    out = Path(text) if text else inp.with_name(f"{inp.stem}_{command}{suffix}")
    if out.suffix.lower() != suffix:
        parser.error(
            f"argument --output: {str(out)!r} must end in {suffix} like INPUT (the input's format is kept); "
            f"rename it to {out.with_suffix(suffix).name}"
        )
    if not out.parent.is_dir():
        parser.error(f"argument --output: the folder {str(out.parent)!r} does not exist; create it first")
    if out.exists() and not overwrite:
        parser.error(
            f"argument --output: {str(out)!r} exists; pass --overwrite to replace it, or choose another --output"
        )
    return out


def _read(path: Path) -> SpatialData | AnnData:
    _LOG.info("Reading %s", path)
    if path.suffix.lower() == ".zarr":
        import spatialdata as sd

        return sd.read_zarr(path)
    import anndata as ad

    return ad.read_h5ad(path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.stem}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


def write_atomic(data: SpatialData | AnnData, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` (``.zarr``: SpatialData or AnnData zarr; ``.h5ad``) atomically.

    The data are written to a hidden temporary sibling, which is then renamed to ``path``; an existing ``path`` is
    moved aside first and deleted only once the new one is in place. On any error the temporary sibling is removed
    and ``path`` is left as it was.

    Parameters
    ----------
    data
        A SpatialData object or an AnnData table.
    path
        Target path; its suffix chooses the format.
    overwrite
        Replace an existing ``path``; without it an existing ``path`` raises :class:`FileExistsError`.

    Returns
    -------
    The path written.
    """
    from anndata import AnnData

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} exists; pass `overwrite=True` (`--overwrite`) to replace it.")
    tmp = _sibling(path, "tmp")
    try:
        if path.suffix.lower() == ".h5ad":
            if not isinstance(data, AnnData):
                raise TypeError("An .h5ad output needs an AnnData; write a SpatialData to a .zarr folder.")
            data.write_h5ad(tmp)
        elif isinstance(data, AnnData):
            data.write_zarr(tmp)
        else:
            data.write(tmp)
        if path.exists():
            old = _sibling(path, "old")
            path.rename(old)
            tmp.rename(path)
            _remove(old)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            _remove(tmp)
    _LOG.info("Wrote %s", path)
    return path


def _check_new_dir(parser: argparse.ArgumentParser, option: str, text: str, overwrite: bool) -> Path:
    path = Path(text)
    if path.exists() and not overwrite:
        parser.error(f"argument {option}: {text!r} exists; pass --overwrite to replace it, or choose another folder")
    if path.exists() and not path.is_dir():
        parser.error(f"argument {option}: {text!r} is a file, not a folder; choose another path")
    return path


def _model_kind(parser: argparse.ArgumentParser, text: str) -> str:
    """Which model class a folder written by ``histoflow fit`` (``save``) holds: ``molf``, ``mlp`` or ``ridge``."""
    path = Path(text)
    if not path.is_dir():
        parser.error(f"argument --model-dir: {text!r} is not a folder; give a folder written by `histoflow fit`")
    meta_path = path / "model.json"
    if not meta_path.is_file():
        parser.error(
            f"argument --model-dir: {text!r} holds no saved histoflow model (no model.json); train one with "
            "`histoflow fit INPUT --model-dir DIR`"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        parser.error(f"argument --model-dir: {str(meta_path)!r} is not valid JSON; save the model again")
    name = meta.get("class") or meta.get("model")
    kinds = {"MoLF": "molf", "MLPBaseline": "mlp", "RidgeProbe": "ridge"}
    if name not in kinds:
        parser.error(f"argument --model-dir: {text!r} holds an unknown model {name!r}; expected one of {sorted(kinds)}")
    return kinds[name]


def _check_encoder(parser: argparse.ArgumentParser, name: str, checkpoint: str | None) -> None:
    from histoflow.pp._encoders import _ALIASES, ENCODER_SPECS

    key = _ALIASES.get(name.lower(), name.lower())
    if key in ENCODER_SPECS or name.startswith(("hf-hub:", "hf_hub:")):
        pass
    else:
        import timm

        if not timm.is_model(name):
            parser.error(
                f"argument --encoder: unknown encoder {name!r}; use a named encoder "
                f"({', '.join(sorted(ENCODER_SPECS))}) or a timm model name (timm.list_models())"
            )
    if checkpoint is not None and not Path(checkpoint).is_file():
        parser.error(f"argument --checkpoint: {checkpoint!r} is not a file; give the path of the weights file")


# --------------------------------------------------------------------------------------------------------------------
# data commands


def _prepare_for_fit(data: SpatialData | AnnData, args: argparse.Namespace) -> None:
    """Add what fitting needs when it is missing: log1p layer, slide split, gene panel (each logged)."""
    import histoflow as hf
    from histoflow._utils import get_table

    table = get_table(data, args.table_key)
    if Key.log1p not in table.layers:
        _LOG.info("No `layers[%r]`: running histoflow.pp.normalize (log1p of the raw counts).", Key.log1p)
        hf.pp.normalize(data, table_key=args.table_key)
    if Key.split not in table.obs:
        _LOG.info("No `obs[%r]`: running histoflow.pp.split_slides (seed %d).", Key.split, args.seed)
        hf.pp.split_slides(
            data, table_key=args.table_key, val_frac=args.val_frac, test_frac=args.test_frac, seed=args.seed
        )
    if Key.panel not in table.var:
        _LOG.info("No `var[%r]`: selecting the top %d HVGs on the training slides.", Key.panel, args.n_genes)
        train = (table.obs[Key.split].astype(str) == "train").to_numpy()
        hf.pp.select_genes(data, table_key=args.table_key, flavor="hvg", n_top=args.n_genes, mask_obs=train)


def _cmd_embed(args: argparse.Namespace) -> int:
    import histoflow as hf

    parser = args.parser
    inp = _input_path(parser, args.input)
    out = _output_path(parser, inp, args.output, "embed", args.overwrite)
    _check_encoder(parser, args.encoder, args.checkpoint)
    data = _read(inp)
    hf.pp.embed_patches(
        data,
        args.encoder,
        checkpoint=args.checkpoint,
        table_key=args.table_key,
        patch_size_um=args.patch_size_um,
        patch_px=args.patch_px,
        batch_size=args.batch_size,
        device=args.device,
        accelerator=args.accelerator,
        devices=args.devices,
        dihedral=args.dihedral,
        context_size_um=args.context_size_um,
        show_progress_bar=not args.quiet,
        key_added=args.key_added,
    )
    write_atomic(data, out, overwrite=args.overwrite)
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    import histoflow as hf

    parser, d = args.parser, api_defaults()
    inp = _input_path(parser, args.input)
    out = _output_path(parser, inp, args.output, "fit", args.overwrite)
    model_dir = _check_new_dir(parser, "--model-dir", args.model_dir, args.overwrite)
    config, train = _parse_settings(parser, args.set, args.model)
    data = _read(inp)
    from histoflow._utils import get_table

    if args.embedding_key not in get_table(data, args.table_key).obsm:
        raise KeyError(
            f"`obsm[{args.embedding_key!r}]` (patch features) is missing from {str(inp)!r}; run `histoflow embed` "
            "first, or pass --embedding-key with the key of your features."
        )
    _prepare_for_fit(data, args)
    t0 = time.perf_counter()
    if args.model == "molf":
        model = hf.tl.fit_molf(
            data,
            table_key=args.table_key,
            embedding_key=args.embedding_key,
            max_epochs=args.epochs or d["fit_molf"]["max_epochs"],
            batch_size=args.batch_size or d["fit_molf"]["batch_size"],
            accelerator=args.accelerator,
            devices=args.devices,
            seed=args.seed,
            key_added=args.key_added or d["fit_molf"]["key_added"],
            train_kwargs={"show_progress_bar": not args.quiet, **train},
            **config,
        )
    else:
        extra: dict[str, Any] = dict(config)
        if args.model == "mlp":
            extra["enable_progress_bar"] = not args.quiet
            if args.batch_size:
                extra["batch_size"] = args.batch_size
        elif args.epochs or args.batch_size:
            _LOG.warning("--epochs and --batch-size do not apply to the ridge probe; ignored.")
        model = hf.tl.fit_baseline(
            data,
            args.model,
            table_key=args.table_key,
            embedding_key=args.embedding_key,
            key_added=args.key_added,
            seed=args.seed,
            max_epochs=args.epochs or d["fit_baseline"]["max_epochs"],
            accelerator=args.accelerator,
            devices=args.devices,
            **extra,
        )
    _LOG.info("Trained %s in %.1f s.", type(model).__name__, time.perf_counter() - t0)
    model.save(model_dir, overwrite=args.overwrite)
    _LOG.info("Saved the model to %s", model_dir)
    write_atomic(data, out, overwrite=args.overwrite)
    return 0


def _gene_weights_file(parser: argparse.ArgumentParser, text: str) -> pd.Series:
    """The per-gene smoothing weights of ``--smooth-weights``: column ``self_weight`` of a CSV indexed by gene."""
    import pandas as pd

    option = "argument --smooth-weights"
    path = Path(text)
    if not path.is_file():
        parser.error(f"{option}: {text!r} is not a file; give a CSV with a gene column and a self_weight column")
    try:
        table = pd.read_csv(path, index_col=0, dtype=str, keep_default_na=False)  # gene names as written ("NA" too)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        parser.error(f"{option}: {text!r} could not be read as CSV ({e})")
    if "self_weight" not in table.columns:
        parser.error(
            f"{option}: {text!r} has no self_weight column (columns: {list(table.columns)}); write it with "
            "adata.uns['<key>_smoothed']['gene_weights'].to_csv(FILE), or as two columns gene,self_weight"
        )
    weights = pd.to_numeric(table["self_weight"], errors="coerce")
    bad = weights.index[weights.isna()]
    if len(bad):
        parser.error(f"{option}: {text!r} has a self_weight that is not a number for gene {bad[0]!r}; fix the file")
    if weights.index.duplicated().any():
        gene = weights.index[weights.index.duplicated()][0]
        parser.error(f"{option}: {text!r} gives gene {gene!r} twice; keep one weight per gene")
    return weights.astype(float)


def _smoothing(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any] | None:
    """Keyword arguments of ``tl.smooth_predictions`` from the ``--smooth*`` options, or ``None`` for no smoothing."""
    if args.smooth_weights is not None:
        for option, value in (("--smooth", args.smooth), ("--smooth-spread", args.smooth_spread)):
            if value is not None:
                parser.error(
                    f"argument {option}: not allowed with --smooth-weights (the file gives every gene its weight); "
                    "give one or the other"
                )
        return {"self_weight": _gene_weights_file(parser, args.smooth_weights)}
    if args.smooth is None and args.smooth_spread is not None:
        parser.error("argument --smooth-spread: needs --smooth WEIGHT (the weight the spread is centred on)")
    if args.smooth_split is not None and args.smooth_spread is None:
        parser.error("argument --smooth-split: applies only with --smooth-spread (its spots rank the genes)")
    if args.smooth is None:
        return None
    kw: dict[str, Any] = {"self_weight": args.smooth}
    if args.smooth_spread is not None:
        default = api_defaults()["smooth_predictions"]["structure_split"]
        kw.update(spread=args.smooth_spread, structure_split=args.smooth_split or default)
    return kw


def _cmd_predict(args: argparse.Namespace) -> int:
    import histoflow as hf

    parser, d = args.parser, api_defaults()["predict"]
    inp = _input_path(parser, args.input)
    out = _output_path(parser, inp, args.output, "predict", args.overwrite)
    kind = _model_kind(parser, args.model_dir)
    smoothing = _smoothing(parser, args)
    if kind != "molf":
        molf_only = {
            "--steps": args.steps,
            "--guidance": args.guidance,
            "--n-samples": args.n_samples,
            "--temperature": args.temperature,
            "--antithetic": args.antithetic,
            "--device": args.device,
        }
        given = [option for option, value in molf_only.items() if value is not None]
        if given:
            parser.error(f"argument {given[0]}: applies to MoLF models only; {args.model_dir!r} holds a {kind} model")
    data = _read(inp)
    if kind == "molf":
        from histoflow.models import MoLF

        model = MoLF.load(args.model_dir)
        hf.tl.predict(
            model,
            data,
            table_key=args.table_key,
            steps=d["steps"] if args.steps is None else args.steps,
            guidance=args.guidance,
            n_samples=d["n_samples"] if args.n_samples is None else args.n_samples,
            temperature=d["temperature"] if args.temperature is None else args.temperature,
            antithetic=d["antithetic"] if args.antithetic is None else args.antithetic,
            seed=args.seed,
            allow_unknown=args.allow_unknown,
            device=d["device"] if args.device is None else args.device,
            key_added=args.key_added or d["key_added"],
        )
    else:
        from histoflow.models import MLPBaseline, RidgeProbe

        cls = MLPBaseline if kind == "mlp" else RidgeProbe
        hf.tl.predict(cls.load(args.model_dir), data, table_key=args.table_key, key_added=args.key_added or kind)
    if smoothing is not None:  # then each spot averaged with its spatial neighbours, under <key>_smoothed
        key = args.key_added or d["key_added"] or kind
        hf.tl.smooth_predictions(data, pred_key=key, n_rings=args.smooth_rings, table_key=args.table_key, **smoothing)
    write_atomic(data, out, overwrite=args.overwrite)
    return 0


def _summary_view(df: pd.DataFrame, *, everything: bool) -> pd.DataFrame:
    view = df if everything else df[df["gene_set"] == "all"]
    return view.reset_index(drop=True)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import pandas as pd

    import histoflow as hf

    parser = args.parser
    inp = _input_path(parser, args.input)
    out = _output_path(parser, inp, args.output, "evaluate", args.overwrite) if args.output else None
    csv = Path(args.csv) if args.csv else None
    if csv is not None:
        if csv.exists() and not args.overwrite:
            parser.error(f"argument --csv: {args.csv!r} exists; pass --overwrite to replace it, or choose another file")
        if not csv.parent.is_dir():
            parser.error(f"argument --csv: the folder {str(csv.parent)!r} does not exist; create it first")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    data = _read(inp)
    df = hf.tl.evaluate(
        data,
        pred_key=args.pred_key,
        table_key=args.table_key,
        split=args.split,
        split_key=args.split_key,
        metrics=metrics,
        seed=args.seed,
        inplace=out is not None,
    )
    with pd.option_context("display.max_rows", None, "display.width", 160, "display.max_columns", None):
        print(_summary_view(df, everything=args.all).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if not args.all and (df["gene_set"] != "all").any():
        print(f"({len(df)} rows in all; --all prints every gene set, --csv writes them)")
    if csv is not None:
        tmp = _sibling(csv, "tmp")
        try:
            df.to_csv(tmp, index=False)
            tmp.replace(csv)
        finally:
            if tmp.exists():
                tmp.unlink()
        _LOG.info("Wrote %s", csv)
    if out is not None:
        write_atomic(data, out, overwrite=args.overwrite)
    return 0


# --------------------------------------------------------------------------------------------------------------------
# demo


def _markdown_table(df: pd.DataFrame, float_format: str = "{:.3f}") -> str:
    cols = [str(df.index.name or "")] + [str(c) for c in df.columns]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return float_format.format(v) if v == v else "–"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for idx, row in df.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [cell(v) for v in row.tolist()]) + " |")
    return "\n".join(lines)


def _dense(m: Any) -> Any:
    import numpy as np
    import scipy.sparse as sp

    return m.toarray() if sp.issparse(m) else np.asarray(m)


def _demo_figures(
    sdata: SpatialData, model: Any, metrics: pd.DataFrame, test_libs: Sequence[str], out: Path
) -> list[str]:
    """Write the demo's figures with :mod:`histoflow.pl` (from stored keys only); returns their names."""
    import matplotlib.pyplot as plt
    import numpy as np

    import histoflow as hf

    table = sdata.tables[Key.table]
    lib = test_libs[0]
    rows = np.flatnonzero(table.obs[Key.library].astype(str).to_numpy() == lib)
    cols = [table.var_names.get_loc(g) for g in model.registry.genes]
    var = _dense(table.layers[Key.log1p][:, cols])[rows].var(0)
    genes = [model.registry.genes[i] for i in np.argsort(-var)[:3]]  # the most variable panel genes of the slide
    figures = {
        "spatial": lambda: hf.pl.spatial(sdata, genes, "molf", library_id=lib, show=False, return_fig=True),
        "metrics": lambda: hf.pl.metrics(metrics, "pcc", aggregation="pooled", show=False, return_fig=True),
        "routing": lambda: hf.pl.routing(sdata, "molf", groupby=Key.cancer_type, show=False, return_fig=True),
        "history": lambda: hf.pl.history(model, show=False, return_fig=True),
    }
    for name, draw in figures.items():
        fig = draw()
        path = out / f"{name}.png"
        tmp = _sibling(path, "tmp")
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
        plt.close(fig)
        tmp.replace(path)
    return list(figures)


def _demo(args: argparse.Namespace) -> int:
    import numpy as np
    import pandas as pd

    import histoflow as hf

    parser = args.parser
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip() and b.strip() != "none"]
    bad = sorted(set(baselines) - {"mlp", "ridge"})
    if bad:
        parser.error(
            f"argument --baselines: unknown baseline(s) {bad}; choose from mlp, ridge (comma-separated) or none"
        )
    config, train = _parse_settings(parser, args.set, "molf")
    config = {**DEMO_SETTINGS, **config}
    _check_encoder(parser, args.encoder, None)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"argument --out: {args.out!r} is a file; give a folder for the report")
    timings: dict[str, float] = {}

    def step(msg: str) -> float:
        print(f"[histoflow demo] {msg}", flush=True)
        return time.perf_counter()

    def done(name: str, t: float) -> None:
        timings[name] = time.perf_counter() - t

    t0 = t = step(f"histoflow {hf.__version__}: dataset {args.dataset!r}")
    if args.dataset == "synthetic":
        sdata = hf.datasets.synthetic(n_slides=args.n_slides, grid=(args.grid, args.grid), seed=args.seed)
    else:
        path = args.path or os.environ.get("HISTOFLOW_DATA")
        sections = args.sections.split(",") if args.sections else ["C2", "C3", "C4", "C5", "C6"]
        sdata = hf.datasets.her2st(sections=sections, path=path)
    done("load data", t)
    table = sdata.tables[Key.table]
    libs = table.obs[Key.library].cat.categories.tolist()
    types = sorted(table.obs[Key.cancer_type].astype(str).unique())
    print(f"  {table.n_obs} spots × {table.n_vars} genes on {len(libs)} slides {libs}; cancer types {types}")
    print(f"  images: {sorted(sdata.images)}")

    t = step("pp.normalize: log1p of raw counts → layers['log1p'] (counts kept)")
    hf.pp.normalize(sdata)
    done("normalize", t)
    t = step("pp.split_slides: whole slides to train / val / test, stratified by cancer type")
    hf.pp.split_slides(sdata, level="slide", val_frac=args.val_frac, test_frac=args.test_frac, seed=args.seed)
    done("split", t)
    split = table.obs[Key.split].astype(str)
    split_libs = {}
    for name in ("train", "val", "test"):
        split_libs[name] = sorted(table.obs.loc[split == name, Key.library].astype(str).unique())
        print(f"  {name}: {split_libs[name]}")
    t = step(f"pp.select_genes: top-{args.n_genes} HVGs per cancer type on the training slides (seurat_v3, raw counts)")
    train_mask = (split == "train").to_numpy()
    hf.pp.select_genes(sdata, flavor="hvg", n_top=args.n_genes, mask_obs=train_mask)
    done("select genes", t)
    panel = table.var_names[table.var[Key.panel].to_numpy()].tolist()
    print(f"  panel: {len(panel)} genes, e.g. {panel[:8]}")

    t = step(f"pp.embed_patches: encoder {args.encoder!r}, {args.patch_size_um:g} µm patches at {args.patch_px} px")
    hf.pp.embed_patches(
        sdata,
        args.encoder,
        patch_size_um=args.patch_size_um,
        patch_px=args.patch_px,
        batch_size=args.batch_size,
        show_progress_bar=not args.quiet,
    )
    done("embed patches", t)
    emb = Key.embedding(args.encoder)
    feats = table.obsm[emb]
    rate = table.n_obs / timings["embed patches"]
    print(
        f"  obsm[{emb!r}]: {feats.shape[0]} × {feats.shape[1]} features ({rate:.0f} patches/s); "
        f"mean {float(np.mean(feats)):.4f}"
    )

    molf_epochs = args.epochs or DEMO_EPOCHS
    t = step(f"tl.fit_molf: Stage I VAE + Stage II mixture-of-experts flow, at most {molf_epochs} epochs each")
    model = hf.tl.fit_molf(
        sdata,
        embedding_key=emb,
        max_epochs=molf_epochs,
        batch_size=args.fit_batch_size,
        seed=args.seed,
        train_kwargs={"show_progress_bar": not args.quiet, **train},
        **config,
    )
    done("fit MoLF", t)
    epochs = {k: len(v) for k, v in model.history.items()}
    print(f"  trained {model.n_experts} experts; epochs per stage {epochs}")
    t = step("tl.select_guidance: guidance scale by filter-and-rank on the validation slides")
    sweep = hf.tl.select_guidance(model, sdata, seed=args.seed)
    done("select guidance", t)
    print(f"  guidance scale {model.config.guidance:g} (of {sweep['guidance'].tolist()})")
    t = step("tl.predict: one Euler step for every spot at the chosen scale → obsm['molf']")
    hf.tl.predict(model, sdata, seed=args.seed)
    done("predict", t)
    keys = ["molf"]
    for kind in baselines:
        t = step(f"tl.fit_baseline: {kind} on the same features → obsm[{kind!r}]")
        kw: dict[str, Any] = (
            {"enable_progress_bar": not args.quiet, "batch_size": args.fit_batch_size} if kind == "mlp" else {}
        )
        hf.tl.fit_baseline(
            sdata,
            kind,
            embedding_key=emb,
            seed=args.seed,
            max_epochs=args.epochs or DEMO_EPOCHS,
            **kw,
        )
        done(f"fit {kind}", t)
        keys.append(kind)

    t = step("tl.evaluate: every metric on the test slides")
    frames = []
    for key in keys:
        frames.append(hf.tl.evaluate(sdata, pred_key=key, split="test", seed=args.seed).assign(method=key))
    done("evaluate", t)
    metrics = pd.concat(frames, ignore_index=True)
    sel = metrics[(metrics["aggregation"] == "pooled") & (metrics["group"] == "all") & (metrics["gene_set"] == "all")]
    summary = sel.pivot_table(index="method", columns="metric", values="value", sort=False)
    summary = summary[[c for c in _DEMO_METRICS if c in summary.columns]].reindex(keys)
    summary.index.name = "method"
    with pd.option_context("display.width", 160, "display.max_columns", None):
        print(summary.to_string(float_format=lambda v: f"{v:.3f}"))

    out.mkdir(parents=True, exist_ok=True)
    t = step(f"writing the report into {out}/")
    figures = _demo_figures(sdata, model, metrics, split_libs["test"], out)
    done("figures", t)
    total = time.perf_counter() - t0
    csv = out / "metrics.csv"
    tmp = _sibling(csv, "tmp")
    metrics.to_csv(tmp, index=False)
    tmp.replace(csv)
    settings = {
        k: v
        for k, v in vars(args).items()
        if k not in ("func", "parser", "command", "version", "set") and v is not None
    }
    settings.update({f"set {k}": v for k, v in {**config, **train}.items()})
    timing_df = pd.DataFrame({"seconds": list(timings.values())}, index=pd.Index(list(timings), name="step"))
    lines = [
        "# histoflow demo report",
        "",
        f"histoflow {hf.__version__}; dataset `{args.dataset}`: {table.n_obs} spots × {table.n_vars} genes on "
        f"{len(libs)} slides, cancer types {', '.join(types)}. Panel: {len(panel)} genes. Features: `{emb}` "
        f"({feats.shape[1]} per spot). Slides: train {split_libs['train']}, val {split_libs['val']}, "
        f"test {split_libs['test']}. MoLF guidance scale {model.config.guidance:g} (filter-and-rank).",
        "",
        "## Metrics (test slides, pooled over spots, all panel genes)",
        "",
        _markdown_table(summary),
        "",
        "`pcc`: Pearson correlation per gene across spots, mean over genes; `pcc@10`: mean of the 10 best genes; "
        "`gsc`/`ssc`: gene–gene and spatial (Moran's I) structure correlation; `wasserstein_spot`, `cosine`: "
        "MoLF's per-spot distances. Every metric, aggregation, group and gene set: `metrics.csv`.",
        "",
        "## Figures",
        "",
    ]
    captions = {
        "spatial": "measured and MoLF-predicted log1p expression of the most variable panel genes on a test slide "
        "(`histoflow.pl.spatial`)",
        "metrics": "PCC per cancer type and method, test slides pooled (`histoflow.pl.metrics`)",
        "routing": "mean gate weight of each MoLF expert per cancer type (`histoflow.pl.routing`)",
        "history": "training and validation losses of both MoLF stages (`histoflow.pl.history`)",
    }
    for name in figures:
        lines += [f"![{name}]({name}.png)", "", f"`{name}.png`: {captions[name]}.", ""]
    lines += [
        "## Timings",
        "",
        _markdown_table(timing_df, "{:.1f}"),
        "",
        f"Total {total:.1f} s.",
        "",
        "## Settings",
        "",
        *[f"- `{k}`: `{v}`" for k, v in settings.items()],
        "",
    ]
    report = out / "report.md"
    tmp = _sibling(report, "tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(report)
    summary_txt = out / "summary.txt"
    tmp = _sibling(summary_txt, "tmp")
    tmp.write_text(
        f"dataset: {args.dataset}\nspots: {table.n_obs}\nslides: {libs}\npanel: {panel}\n"
        f"features: {emb} {feats.shape}\n"
    )
    tmp.replace(summary_txt)
    print(f"  wrote {report}, {csv} and {len(figures)} figures")
    step(f"done in {total:.1f} s")
    return 0


# --------------------------------------------------------------------------------------------------------------------
# the parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` only where the help does not already say it and the default is a value."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.required or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _add_io(p: argparse.ArgumentParser, *, output_help: str) -> None:
    p.add_argument("input", metavar="INPUT", help="SpatialData .zarr folder or .h5ad file")
    p.add_argument("--output", "-o", metavar="OUT", help=output_help)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--table-key", default=Key.table, help="table of a SpatialData input")
    p.add_argument("--quiet", "-q", action="store_true", help="warnings only, no progress bars")


def _out_help(command: str) -> str:
    return f"where to write the result, in the input's format (default INPUT_{command}.zarr / INPUT_{command}.h5ad)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``histoflow`` command (defaults read from the Python API)."""
    d = api_defaults()
    emb, mol, base, spl, gen = (
        d["embed_patches"],
        d["fit_molf"],
        d["fit_baseline"],
        d["split_slides"],
        d["select_genes"],
    )
    prd, ev = d["predict"], d["evaluate"]
    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(
        prog="histoflow",
        description="Predict spatial gene expression from H&E histology. Each command has its own --help.",
        epilog="Typical run: histoflow embed data.zarr → data_embed.zarr; histoflow fit data_embed.zarr --model-dir "
        "model → data_embed_fit.zarr; histoflow predict new.zarr --model-dir model; histoflow evaluate "
        "data_embed_fit.zarr --pred-key molf --split test.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # demo ------------------------------------------------------------------------------------------------------
    demo = sub.add_parser(
        "demo",
        help="run the whole pipeline on the offline synthetic dataset (or HER2ST) and write a report",
        description="Run the pipeline (normalize, split, select genes, embed, fit MoLF and baselines, choose the "
        "guidance scale, predict, evaluate) and write report.md, metrics.csv and figures into --out.",
        formatter_class=fmt,
    )
    demo.add_argument("--dataset", choices=["synthetic", "her2st"], default="synthetic")
    demo.add_argument("--path", help="local HER2ST folder (default: $HISTOFLOW_DATA, else download)")
    demo.add_argument("--sections", help="comma-separated HER2ST sections (default C2,C3,C4,C5,C6)")
    demo.add_argument("--n-slides", type=int, default=6, help="synthetic slides")
    demo.add_argument("--grid", type=int, default=16, help="synthetic spots per side of each slide")
    demo.add_argument("--n-genes", type=_positive_int, default=gen["n_top"], help="HVGs per cancer type")
    demo.add_argument("--encoder", default=emb["encoder"], help="patch encoder")
    demo.add_argument("--patch-size-um", type=_positive_float, default=emb["patch_size_um"])
    demo.add_argument("--patch-px", type=_positive_int, default=emb["patch_px"])
    demo.add_argument("--batch-size", type=_positive_int, default=emb["batch_size"], help="patches per batch")
    demo.add_argument("--val-frac", type=_fraction, default=spl["val_frac"])
    demo.add_argument("--test-frac", type=_fraction, default=spl["test_frac"])
    demo.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help=f"maximum epochs per MoLF stage and for the MLP (default {DEMO_EPOCHS}, a demo setting that keeps the run "
        f"to minutes on a laptop CPU; `histoflow fit` and the Python API default to {mol['max_epochs']})",
    )
    demo.add_argument(
        "--fit-batch-size",
        type=_positive_int,
        default=DEMO_FIT_BATCH,
        help=f"spots per training batch of MoLF and the MLP (the API's default is {mol['batch_size']}; the demo's "
        "small training set needs smaller batches for enough optimiser steps)",
    )
    demo.add_argument(
        "--baselines", default="ridge,mlp", help="baselines fitted beside MoLF (comma-separated: ridge, mlp; or none)"
    )
    demo.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="MoLF setting (histoflow.models.MoLFConfig), repeatable; the demo sets "
        + ", ".join(f"{k}={v}" for k, v in DEMO_SETTINGS.items()),
    )
    demo.add_argument("--seed", type=int, default=mol["seed"])
    demo.add_argument("--out", default=_DEMO_OUT, help="folder for the report (report.md, metrics.csv, figures)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--verbose", "-v", action="store_true", help="log every step of the library at INFO")
    demo.set_defaults(func=_demo, parser=demo)

    # embed -----------------------------------------------------------------------------------------------------
    p = sub.add_parser(
        "embed",
        help="embed the H&E patch under every spot (histoflow.pp.embed_patches)",
        description="Cut the H&E patch under every spot and write the encoder's features to obsm['X_<encoder>'].",
        formatter_class=fmt,
    )
    _add_io(p, output_help=_out_help("embed"))
    p.add_argument("--encoder", default=emb["encoder"], help="named encoder (see histoflow.pp.list_encoders) or timm")
    p.add_argument("--checkpoint", default=emb["checkpoint"], help="local weights file of the encoder")
    p.add_argument("--patch-size-um", type=_positive_float, default=emb["patch_size_um"], help="patch side in µm")
    p.add_argument("--patch-px", type=_positive_int, default=emb["patch_px"], help="patch side fed to the encoder")
    p.add_argument("--batch-size", type=_positive_int, default=emb["batch_size"], help="patches per forward pass")
    p.add_argument("--device", default=emb["device"], help="single-process torch device (auto, cpu, cuda:0, ...)")
    p.add_argument("--accelerator", default=emb["accelerator"], help="Lightning accelerator, with --devices")
    p.add_argument(
        "--devices", type=_devices, default=emb["devices"], help="several devices or CPU processes (Lightning)"
    )
    p.add_argument(
        "--dihedral",
        action="store_true",
        default=emb["dihedral"],
        help="average the features over the 8 rotations and flips of each patch (8 encoder passes)",
    )
    p.add_argument(
        "--context-size-um",
        type=_positive_float,
        nargs="+",
        default=emb["context_size_um"],
        metavar="UM",
        help="also embed larger patches of these sides (µm) around each spot; features concatenated (multi-scale)",
    )
    p.add_argument("--key-added", default=emb["key_added"], help="obsm key (default X_<encoder>)")
    p.set_defaults(func=_cmd_embed, parser=p)

    # fit -------------------------------------------------------------------------------------------------------
    p = sub.add_parser(
        "fit",
        help="train MoLF or a baseline, save it and write its predictions (histoflow.tl.fit_molf / fit_baseline)",
        description="Train on the train slides (early stopping on val), save the model into --model-dir and write "
        "the predictions for every spot to obsm[KEY]. When missing, layers['log1p'] (pp.normalize), obs['split'] "
        "(pp.split_slides) and the gene panel (pp.select_genes on the train slides) are made first.",
        formatter_class=fmt,
    )
    _add_io(p, output_help=_out_help("fit"))
    p.add_argument("--model-dir", required=True, metavar="DIR", help="folder to save the trained model into")
    p.add_argument("--model", choices=_MODELS, default="molf", help="which model")
    p.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help=f"maximum epochs (default {mol['max_epochs']} per stage for molf, {base['max_epochs']} for mlp)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help=f"spots per batch (default {mol['batch_size']} for molf; the MLP's own default for mlp)",
    )
    p.add_argument("--embedding-key", default=mol["embedding_key"], help="obsm key of the patch features")
    p.add_argument(
        "--key-added", default=None, help=f"key of the predictions (default {mol['key_added']!r}, or the model name)"
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="model setting, repeatable; molf: histoflow.models.MoLFConfig fields (velocity=dense, n_experts=4, ...) "
        "and MoLF.train arguments (lr, patience, vae_epochs, ...); mlp/ridge: their class and train arguments",
    )
    p.add_argument("--seed", type=int, default=mol["seed"], help="seed of everything random")
    p.add_argument("--accelerator", default=mol["accelerator"], help="Lightning accelerator")
    p.add_argument("--devices", type=_devices, default=mol["devices"], help="Lightning devices")
    p.add_argument("--n-genes", type=_positive_int, default=gen["n_top"], help="HVGs per cancer type when no panel")
    p.add_argument("--val-frac", type=_fraction, default=spl["val_frac"], help="val slides when no obs['split']")
    p.add_argument("--test-frac", type=_fraction, default=spl["test_frac"], help="test slides when no obs['split']")
    p.set_defaults(func=_cmd_fit, parser=p)

    # predict ---------------------------------------------------------------------------------------------------
    p = sub.add_parser(
        "predict",
        help="predict expression with a saved model (histoflow.tl.predict)",
        description="Load the model in --model-dir and write predictions for every spot (expression is not "
        "needed; missing patch features are embedded first with the model's encoder when the input has the H&E image).",
        formatter_class=fmt,
    )
    _add_io(p, output_help=_out_help("predict"))
    p.add_argument("--model-dir", required=True, metavar="DIR", help="folder written by `histoflow fit`")
    p.add_argument("--steps", type=_positive_int, default=None, help=f"Euler steps, MoLF (default {prd['steps']})")
    p.add_argument("--guidance", type=float, default=prd["guidance"], help="guidance scale, MoLF (default: model's)")
    p.add_argument(
        "--n-samples", type=_positive_int, default=None, help=f"draws per spot, MoLF (default {prd['n_samples']})"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help=f"scale of the prior noise, MoLF: 0 gives the point estimate (default {prd['temperature']})",
    )
    p.add_argument(
        "--antithetic",
        action="store_true",
        default=None,
        help="draw the prior noise in antithetic pairs (z0, -z0), MoLF: a closer mean for the same --n-samples",
    )
    p.add_argument("--seed", type=int, default=prd["seed"], help="seed of the prior noise")
    p.add_argument("--allow-unknown", action="store_true", help="predict unseen cancer types with the null token")
    p.add_argument(
        "--device", default=None, help=f"torch device, MoLF: auto, cpu, cuda, cuda:1, ... (default {prd['device']})"
    )
    p.add_argument(
        "--key-added", default=None, help="key of the predictions (default: the model's name, molf, mlp or ridge)"
    )
    p.add_argument(
        "--smooth",
        type=_unit_weight,
        default=None,
        metavar="WEIGHT",
        help="also write the predictions averaged with the spots' spatial neighbours under <key>_smoothed "
        "(histoflow.tl.smooth_predictions): WEIGHT for the spot, 1 - WEIGHT for its neighbours' mean (e.g. 0.5)",
    )
    p.add_argument(
        "--smooth-rings",
        type=_positive_int,
        default=d["smooth_predictions"]["n_rings"],
        help="with --smooth or --smooth-weights: rings of neighbours (1: the grid's neighbours, 2: also theirs)",
    )
    p.add_argument(
        "--smooth-spread",
        type=_non_negative_float,
        default=None,
        metavar="SPREAD",
        help="with --smooth WEIGHT: one weight per gene, WEIGHT - SPREAD x (rank - 1/2) clipped to [0, 1], the genes "
        "ranked by the spatial autocorrelation (Moran's I) of their measured expression on the --smooth-split spots: "
        "patterned genes are averaged more (e.g. --smooth 0.7 --smooth-spread 1); stored under "
        "uns['<key>_smoothed']['gene_weights']",
    )
    p.add_argument(
        "--smooth-split",
        default=None,
        metavar="SPLIT",
        help="with --smooth-spread: the obs['split'] value of the spots whose measured expression ranks the genes "
        f"(default {d['smooth_predictions']['structure_split']})",
    )
    p.add_argument(
        "--smooth-weights",
        default=None,
        metavar="CSV",
        help="smooth with one weight per gene from a file (a gene column and a self_weight column, as "
        "uns['<key>_smoothed']['gene_weights'].to_csv(CSV) writes them): a slide without measured expression "
        "smoothed as a former gene-wise run; instead of --smooth",
    )
    p.set_defaults(func=_cmd_predict, parser=p)

    # evaluate --------------------------------------------------------------------------------------------------
    p = sub.add_parser(
        "evaluate",
        help="score stored predictions against measured expression (histoflow.tl.evaluate)",
        description="Print the tidy metrics table (rows of gene set 'all'; --all for every gene set) and "
        "optionally write it as CSV.",
        formatter_class=fmt,
    )
    _add_io(p, output_help="also write the data with uns['<KEY>_metrics'] (default: nothing written)")
    p.add_argument("--pred-key", required=True, metavar="KEY", help="obsm key of the predictions")
    p.add_argument("--split", default=ev["split"], help="score only spots of this split, e.g. test (default: all)")
    p.add_argument("--split-key", default=ev["split_key"], help="obs column with the split")
    p.add_argument("--metrics", default=None, help="comma-separated metric families (default: all)")
    p.add_argument("--seed", type=int, default=ev["seed"], help="seed of the domain clustering")
    p.add_argument("--csv", metavar="FILE", help="write the whole tidy table as CSV")
    p.add_argument("--all", action="store_true", help="print the rows of every gene set")
    p.set_defaults(func=_cmd_evaluate, parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``histoflow`` command.

    Parameters
    ----------
    argv
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    The exit status: 0 on success, 1 when the library raised an error (message on stderr), 2 without a command.
    Argument errors exit with status 2 through :class:`SystemExit`, as argparse does.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from histoflow import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":
        level = logging.INFO if args.verbose else logging.WARNING
    else:
        level = logging.WARNING if args.quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    old_level = _LOG.level
    _LOG.addHandler(handler)
    _LOG.setLevel(level)
    try:
        return int(args.func(args))
    except _LIBRARY_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"histoflow {args.command}: error: {msg}", file=sys.stderr)
        return 1
    finally:
        _LOG.removeHandler(handler)
        _LOG.setLevel(old_level)
