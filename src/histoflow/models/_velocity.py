"""Stage II of MoLF: the condition encoder and the velocity field (torch only)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from histoflow.models._moe import DenseBlock, MixtureOfExperts, MLPExpert, TokenTransformerExpert

__all__ = ["ConditionEncoder", "VelocityField", "timestep_embedding", "sinusoidal_2d"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding ``(B, dim)`` of times ``t`` in [0, 1] (scaled by 1000, as in diffusion models)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float().reshape(-1, 1) * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))


def sinusoidal_2d(xy_um: torch.Tensor, dim: int, min_wavelength_um: float = 10.0, max_wavelength_um: float = 10_000.0):
    """2-D sinusoidal encoding of physical offsets ``(..., 2)`` in micrometres.

    Half the channels encode x, half y; wavelengths are spaced geometrically between ``min_wavelength_um`` and
    ``max_wavelength_um``.
    """
    quarter = dim // 4
    wl = torch.exp(
        torch.linspace(math.log(min_wavelength_um), math.log(max_wavelength_um), quarter, device=xy_um.device)
    )
    ang = 2 * math.pi * xy_um[..., None] / wl  # (..., 2, quarter)
    emb = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1).flatten(-2)  # (..., 4 * quarter)
    return nn.functional.pad(emb, (0, dim - emb.shape[-1]))


class ConditionEncoder(nn.Module):
    """Patch features (+ spatial context) + metadata → one condition vector per spot.

    - Image: the spot's patch features are projected to ``cond_dim``.
    - Spatial context (``spatial_context="window"``): the spot and its neighbours within a window (given as
      feature tokens and their offsets from the spot in µm) get a 2-D sinusoidal encoding of the offset and go
      through ``context_layers`` Transformer layers; the spot's own output token is the context-aware condition.
      Offsets are physical, so slides scanned at different resolutions mean the same thing.
    - Metadata (cancer type, ...): each field value owns ``tokens_per_value`` learned tokens; together with
      ``n_memory`` shared learned tokens they are the keys/values of a cross-attention whose query is the image
      condition, so how metadata shifts the condition depends on the image (with one key only, attention would
      reduce to a constant bias). Code ``-1`` selects the field's learned null token (unknown value).
    - Classifier-free guidance: rows flagged in ``drop`` get the learned null condition.
    """

    def __init__(
        self,
        feat_dim: int,
        cond_dim: int = 256,
        *,
        spatial_context: Literal["window"] | None = "window",
        context_layers: int = 1,
        n_heads: int = 4,
        metadata_sizes: Sequence[int] = (),
        tokens_per_value: int = 4,
        n_memory: int = 4,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.cond_dim, self.spatial_context = cond_dim, spatial_context
        self.proj = nn.Sequential(
            nn.LayerNorm(feat_dim), nn.Linear(feat_dim, cond_dim), nn.GELU(), nn.Linear(cond_dim, cond_dim)
        )
        if spatial_context == "window":
            layer = nn.TransformerEncoderLayer(
                cond_dim, n_heads, 2 * cond_dim, dropout, activation="gelu", batch_first=True, norm_first=True
            )
            self.context = nn.TransformerEncoder(layer, context_layers, enable_nested_tensor=False)
            self.context_norm = nn.LayerNorm(cond_dim)
        elif spatial_context is not None:
            raise ValueError(f"`spatial_context` must be 'window' or None, got {spatial_context!r}.")
        self.metadata_sizes = list(metadata_sizes)
        self.tokens_per_value = tokens_per_value
        if self.metadata_sizes:
            # one extra row per field: the null (unknown) token
            self.meta = nn.ModuleList(nn.Embedding(n + 1, tokens_per_value * cond_dim) for n in self.metadata_sizes)
            self.memory = nn.Parameter(torch.randn(n_memory, cond_dim) * 0.02)
            self.cross = nn.MultiheadAttention(cond_dim, n_heads, dropout=dropout, batch_first=True)
            self.cross_norm = nn.LayerNorm(cond_dim)
        self.null = nn.Parameter(torch.zeros(cond_dim))

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """Per-token projection of patch features (shared by the spot and its neighbours)."""
        return self.proj(feats)

    def forward(
        self,
        feats: torch.Tensor,
        offsets_um: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        meta: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Condition ``(B, cond_dim)`` and the metadata attention weights ``(B, n_keys)`` (None without metadata).

        ``feats`` is ``(B, D)`` (the spot alone) or ``(B, 1 + K, D)`` (the spot first, then K neighbours) with
        ``offsets_um`` ``(B, 1 + K, 2)`` and ``valid`` ``(B, 1 + K)`` marking real (not padded) neighbours.
        """
        return self.forward_projected(self.project(feats), offsets_um, valid, meta, drop)

    def forward_projected(
        self,
        h: torch.Tensor,
        offsets_um: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        meta: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`forward` on tokens already passed through :meth:`project` (lets inference project each spot once)."""
        if self.spatial_context == "window" and h.ndim == 3:
            h = h + sinusoidal_2d(offsets_um, self.cond_dim)
            pad = None if valid is None else ~valid
            c = self.context_norm(self.context(h, src_key_padding_mask=pad)[:, 0])
        else:
            c = h[:, 0] if h.ndim == 3 else h
        attn = None
        if self.metadata_sizes:
            b = c.shape[0]
            tokens = [self.memory.expand(b, -1, -1)]
            for j, (emb, n) in enumerate(zip(self.meta, self.metadata_sizes)):
                code = meta[:, j] if meta is not None else torch.full((b,), -1, device=c.device)
                code = torch.where(code < 0, torch.full_like(code, n), code)
                tokens.append(emb(code).view(b, self.tokens_per_value, self.cond_dim))
            kv = torch.cat(tokens, dim=1)
            out, attn = self.cross(c[:, None], kv, kv, need_weights=True)
            c = self.cross_norm(c + out[:, 0])
            attn = attn[:, 0]
        if drop is not None:
            c = torch.where(drop[:, None], self.null.expand_as(c), c)
        return c, attn


class VelocityField(nn.Module):
    """The velocity ``v(z_t, t, c)``.

    The LayerNorm of ``[z_t, time embedding, c]`` feeds a top-k mixture of experts (or a dense network of the same
    depth and total width, ``velocity="dense"``).

    Experts are MLPs (``expert="mlp"``, default) or small Transformers over the three input parts
    (``expert="transformer"``). The dense ablation uses one expert whose width (and, for Transformers, head count)
    is ``n_experts`` times an expert's. The router sees the whole input, as in MoLF's ``G(z_t, t, c)``
    (``router="input"``), or only the condition (``router="condition"``: each spot's experts depend on its image and
    metadata, not on the time or the noise; on the eight-Gaussians task this routes by mode far better).
    """

    def __init__(
        self,
        latent_dim: int,
        cond_dim: int,
        *,
        time_dim: int = 64,
        velocity: Literal["moe", "dense"] = "moe",
        n_experts: int = 6,
        top_k: int = 2,
        expert: Literal["mlp", "transformer"] = "mlp",
        expert_width: int = 256,
        expert_heads: int = 4,
        gate_noise: float = 1e-2,
        router: Literal["input", "condition"] = "input",
    ):
        super().__init__()
        if router not in ("input", "condition"):
            raise ValueError(f"`router` must be 'input' or 'condition', got {router!r}.")
        self.time_dim, self.router = time_dim, router
        in_dim = latent_dim + time_dim + cond_dim
        self.norm = nn.LayerNorm(in_dim)
        segments = [latent_dim, time_dim, cond_dim]

        def factory(scale: int):
            def make() -> nn.Module:
                if expert == "mlp":
                    return MLPExpert(in_dim, expert_width * scale, latent_dim)
                if expert == "transformer":
                    return TokenTransformerExpert(
                        segments, expert_width * scale, latent_dim, n_heads=expert_heads * scale
                    )
                raise ValueError(f"`expert` must be 'mlp' or 'transformer', got {expert!r}.")

            return make

        if velocity == "moe":
            self.block: nn.Module = MixtureOfExperts(
                in_dim,
                factory(1),
                n_experts=n_experts,
                top_k=top_k,
                gate_noise=gate_noise,
                gate_dim=cond_dim if router == "condition" else None,
            )
        elif velocity == "dense":
            self.block = DenseBlock(factory(n_experts))
        else:
            raise ValueError(f"`velocity` must be 'moe' or 'dense', got {velocity!r}.")

    def forward(
        self, z: torch.Tensor, t: torch.Tensor, c: torch.Tensor, gate_input: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Velocity ``(B, latent_dim)`` and routing info."""
        t = t.reshape(-1).expand(z.shape[0]) if t.numel() == 1 else t.reshape(-1)
        x = self.norm(torch.cat([z, timestep_embedding(t, self.time_dim), c], dim=-1))
        if gate_input is None and self.router == "condition":
            gate_input = c
        return self.block(x, gate_input)
