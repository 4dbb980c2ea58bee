"""Stage II of MoLF: the condition encoder and the velocity field (torch only)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from histoflow.models._dropout import use_fast_dropout
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
    if emb.shape[-1] == dim:  # padding by nothing would still copy
        return emb
    return nn.functional.pad(emb, (0, dim - emb.shape[-1]))


def null_coded(code: torch.Tensor, n: int) -> torch.Tensor:
    """Metadata codes as embedding rows: ``-1`` (unknown) becomes ``n``, the row of the field's learned null token."""
    return torch.where(code < 0, torch.full_like(code, n), code).long()


def centre_attention(
    mha: nn.MultiheadAttention, h: torch.Tensor, pad: torch.Tensor | None, *, training: bool
) -> torch.Tensor:
    """``mha`` with the first token of ``h`` ``(B, T, D)`` as the only query over all ``T`` tokens: ``(B, D)``.

    The same function as ``mha(h[:, :1], h, h, key_padding_mask=pad)`` (batch first, packed in-projection, no extra
    key/value bias), without projecting a key and a value for every token. With ``q_h`` the centre's query in head
    ``h`` and ``W_k,h``, ``W_v,h`` that head's key and value weights, the score of token ``j`` is
    ``x_j · (W_k,hᵀ q_h)`` plus a term constant over ``j`` (``q_h · b_k,h``, which the softmax cancels), and the
    head's output is ``W_v,h (Σ_j a_hj x_j) + b_v,h Σ_j a_hj``: two small products per head instead of two per token.
    Attention weights get ``mha.dropout`` when ``training``. ``pad`` ``(B, T)`` is True for padded tokens (never the
    first one).
    """
    b, _, d = h.shape
    heads = mha.num_heads
    dh = d // heads
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, _, b_v = mha.in_proj_bias.chunk(3)  # the key bias adds the same to every score: the softmax cancels it
    q = nn.functional.linear(h[:, 0], w_q, b_q).view(b, heads, dh) * dh**-0.5
    q = torch.einsum("bhe,hed->bhd", q, w_k.view(heads, dh, d))  # the query carried back to token space
    scores = torch.bmm(q, h.transpose(1, 2))  # (B, heads, T)
    if pad is not None:
        scores = scores.masked_fill(pad[:, None, :], float("-inf"))
    weights = nn.functional.dropout(torch.softmax(scores, dim=-1), mha.dropout, training=training)
    out = torch.einsum("bhd,hed->bhe", torch.bmm(weights, h), w_v.view(heads, dh, d))
    out = out + b_v.view(heads, dh) * weights.sum(-1, keepdim=True)
    return mha.out_proj(out.reshape(b, d))


class ConditionEncoder(nn.Module):
    """Patch features (+ spatial context) + metadata → one condition vector per spot.

    - Image: the spot's patch features are projected to ``cond_dim``.
    - Spatial context (``spatial_context="window"``): the spot and its neighbours within a window (given as
      feature tokens and their offsets from the spot in µm) get a 2-D sinusoidal encoding of the offset and go
      through ``context_layers`` Transformer layers; the spot's own output token is the context-aware condition.
      Offsets are physical, so slides scanned at different resolutions mean the same thing.
    - Spatial context (``spatial_context="graph"``): the same window as a complete graph through ``graph_layers``
      layers of :class:`~histoflow.models.GraphContextEncoder`, whose attention uses edge features (pairwise
      physical distance in µm, expanded over ``[0, 2 × context_radius_um]``, and cosine similarity of the projected
      patch features); the spot's node output is the context-aware condition ("graph as condition", FLAG).
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
        spatial_context: Literal["window", "graph"] | None = "window",
        context_layers: int = 1,
        graph_layers: int = 2,
        context_radius_um: float = 250.0,
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
            self.context = use_fast_dropout(nn.TransformerEncoder(layer, context_layers, enable_nested_tensor=False))
            self.context_norm = nn.LayerNorm(cond_dim)
        elif spatial_context == "graph":
            from histoflow.models._graph import GraphContextEncoder

            if isinstance(graph_layers, bool) or not isinstance(graph_layers, int) or graph_layers < 1:
                raise ValueError(f"`graph_layers` must be a positive integer, got {graph_layers!r}.")
            if not (isinstance(context_radius_um, (int, float)) and 0 < context_radius_um < float("inf")):
                raise ValueError(f"`context_radius_um` must be a positive number of µm, got {context_radius_um!r}.")
            # every pair of a window lies within twice the context radius
            self.context = use_fast_dropout(
                GraphContextEncoder(
                    cond_dim,
                    n_heads=n_heads,
                    n_layers=graph_layers,
                    max_distance_um=2 * context_radius_um,
                    dropout=dropout,
                )
            )
        elif spatial_context is not None:
            raise ValueError(f"`spatial_context` must be 'window', 'graph' or None, got {spatial_context!r}.")
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

    def _window_centre(self, h: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        """Output of the window Transformer at the centre token ``(B, D)``, computing only what that token needs.

        Every layer but the last runs on all tokens; the last one (pre-norm) attends from the centre token only
        (:func:`centre_attention`) and applies its feed-forward block to that token only: the same function as the
        full layer's first output token, at a fraction of the cost.
        """
        layers = self.context.layers
        for layer in layers[:-1]:
            h = layer(h, src_key_padding_mask=pad)
        last = layers[-1]
        hn = last.norm1(h)
        x = h[:, 0] + last.dropout1(centre_attention(last.self_attn, hn, pad, training=self.training))
        ff = last.linear2(last.dropout(last.activation(last.linear1(last.norm2(x)))))
        return x + last.dropout2(ff)

    def metadata_tokens(self, meta: torch.Tensor | None, b: int) -> torch.Tensor:
        """Unprojected metadata keys/values of ``b`` spots: ``(b, n_memory + fields × tokens_per_value, cond_dim)``."""
        tokens = [self.memory.expand(b, -1, -1)]
        for j, emb in enumerate(self.meta):
            tokens.append(emb(self._field_rows(meta, j, b)).view(b, self.tokens_per_value, self.cond_dim))
        return torch.cat(tokens, dim=1)

    def _field_rows(self, meta: torch.Tensor | None, j: int, b: int) -> torch.Tensor:
        """Embedding rows of metadata field ``j`` for ``b`` spots: the codes, with the null row for -1 or no codes."""
        if meta is None:
            return torch.full((b,), self.metadata_sizes[j], dtype=torch.long, device=self.memory.device)
        return null_coded(meta[:, j], self.metadata_sizes[j])

    def _metadata_attention(self, c: torch.Tensor, meta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention of ``c`` over the metadata tokens: output ``(B, cond_dim)``, weights ``(B, n_keys)``.

        The same function as ``self.cross`` (``nn.MultiheadAttention``) over :meth:`metadata_tokens`, but the keys and
        values are projected once per memory token and per metadata value present (then gathered by code) instead of
        once per spot: a spot's tokens depend only on its metadata codes. Weights are averaged over
        heads (before attention dropout).
        """
        mha, d = self.cross, self.cond_dim
        heads = mha.num_heads
        dh, b = d // heads, c.shape[0]
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
        q = nn.functional.linear(c, w_q, b_q).view(b, heads, dh) * dh**-0.5
        # memory tokens: shared by every spot, no gather
        k_mem = nn.functional.linear(self.memory, w_k, b_k).view(-1, heads, dh)
        v_mem = nn.functional.linear(self.memory, w_v, b_v).view(-1, heads, dh)
        scores = [torch.einsum("bhd,thd->bht", q, k_mem)]
        values = []
        for j, emb in enumerate(self.meta):
            # only the values present: a field with many values costs no more than the batch's
            present, code = torch.unique(self._field_rows(meta, j, b), return_inverse=True)
            rows = emb(present).view(len(present), self.tokens_per_value, d)
            k = nn.functional.linear(rows, w_k, b_k).view(len(present), -1, heads, dh)[code]
            values.append(nn.functional.linear(rows, w_v, b_v).view(len(present), -1, heads, dh)[code])
            scores.append(torch.einsum("bhd,bthd->bht", q, k))
        weights = torch.softmax(torch.cat(scores, dim=-1), dim=-1)
        attn = weights.mean(dim=1)
        weights = nn.functional.dropout(weights, mha.dropout, training=self.training)
        n_mem = k_mem.shape[0]
        out = torch.einsum("bht,thd->bhd", weights[..., :n_mem], v_mem)
        for j, v in enumerate(values):
            sl = slice(n_mem + j * self.tokens_per_value, n_mem + (j + 1) * self.tokens_per_value)
            out = out + torch.einsum("bht,bthd->bhd", weights[..., sl], v)
        out = out.reshape(b, d)
        return mha.out_proj(out), attn

    def forward_projected(
        self,
        h: torch.Tensor,
        offsets_um: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        meta: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward`` on tokens already passed through ``project`` (lets inference project each spot once)."""
        if self.spatial_context == "window" and h.ndim == 3:
            h = h + sinusoidal_2d(offsets_um, self.cond_dim)
            pad = None if valid is None else ~valid
            c = self.context_norm(self._window_centre(h, pad))
        elif self.spatial_context == "graph" and h.ndim == 3:
            c = self.context(h, offsets_um, valid)
        else:
            c = h[:, 0] if h.ndim == 3 else h
        attn = None
        if self.metadata_sizes:
            out, attn = self._metadata_attention(c, meta)
            c = self.cross_norm(c + out)
        if drop is not None:
            c = torch.where(drop[:, None], self.null.expand_as(c), c)
        return c, attn


ROUTERS = ("input", "condition", "image+metadata", "cancer_type")


class VelocityField(nn.Module):
    """The velocity ``v(z_t, t, c)``.

    The LayerNorm of ``[z_t, time embedding, c]`` feeds a top-k mixture of experts (or a dense network of the same
    depth and total width, ``velocity="dense"``); see :class:`~histoflow.models.MixtureOfExperts` for the exact
    gating formula (top-1: the chosen expert is scaled by its full softmax probability, Switch-Transformer style, so
    the router learns from the flow loss; top-k > 1: softmax over the kept logits).

    Experts are MLPs (``expert="mlp"``, default) or small Transformers over the three input parts
    (``expert="transformer"``). The dense ablation uses one expert whose width (and, for Transformers, head count)
    is ``n_experts`` times an expert's.

    Routers (``router``):

    - ``"input"``: a linear router on the whole expert input, MoLF's ``G(z_t, t, c)``;
    - ``"condition"``: a linear router on ``c`` only: each spot's experts depend on its image (and metadata, through
      the condition), not on the time or the noise;
    - ``"image+metadata"`` (HistoMoE): a linear router on ``[c, e_1(m_1), ..., e_F(m_F)]``, the condition (patch
      features and spatial context, after the condition encoder's metadata cross-attention) next to a learned
      embedding of each metadata code (organ, cancer type, technology, ...; ``metadata_sizes``); code ``-1``
      (unknown / dropped value) has its own learned null embedding;
    - ``"cancer_type"``: one expert per cancer type and hard routing: a spot with cancer-type code ``k`` (field
      ``cancer_type_field`` of the metadata codes) goes to expert ``k`` with weight 1. Unknown type (code ``-1``,
      also used for the unconditional branch of classifier-free guidance) falls back to the uniform mixture of all
      experts (weight ``1 / E`` each), which training also fits, since metadata dropout sends some spots there.
      ``n_experts`` is the number of cancer types.

    Parameters
    ----------
    latent_dim
        Size of ``z``.
    cond_dim
        Size of the condition ``c``.
    time_dim
        Size of the sinusoidal time embedding.
    velocity
        ``"moe"`` or the ``"dense"`` ablation (the router does not apply).
    n_experts
        Number of experts (default 6; for ``router="cancer_type"``: the number of cancer types, and a different value
        is an error).
    top_k
        Experts per input (learned routers).
    expert
        ``"mlp"`` or ``"transformer"``.
    expert_width
        Hidden width of one expert.
    expert_heads
        Attention heads of a Transformer expert.
    gate_noise
        Std of the router-logit noise in training.
    router
        ``"input"``, ``"condition"``, ``"image+metadata"`` or ``"cancer_type"`` (see above).
    metadata_sizes
        Number of categories of each metadata field (the columns of the ``meta`` codes), for the metadata routers.
    cancer_type_field
        Which metadata field is the cancer type (``router="cancer_type"``).
    metadata_embed_dim
        Size of each metadata embedding seen by the ``"image+metadata"`` router.
    """

    def __init__(
        self,
        latent_dim: int,
        cond_dim: int,
        *,
        time_dim: int = 64,
        velocity: Literal["moe", "dense"] = "moe",
        n_experts: int | None = None,
        top_k: int = 2,
        expert: Literal["mlp", "transformer"] = "mlp",
        expert_width: int = 256,
        expert_heads: int = 4,
        gate_noise: float = 1e-2,
        router: Literal["input", "condition", "image+metadata", "cancer_type"] = "input",
        metadata_sizes: Sequence[int] = (),
        cancer_type_field: int = 0,
        metadata_embed_dim: int = 16,
    ):
        super().__init__()
        if router not in ROUTERS:
            raise ValueError(f"`router` must be one of {list(ROUTERS)}, got {router!r}.")
        if velocity not in ("moe", "dense"):
            raise ValueError(f"`velocity` must be 'moe' or 'dense', got {velocity!r}.")
        self.metadata_sizes = [int(n) for n in metadata_sizes]
        if router in ("image+metadata", "cancer_type"):
            if velocity != "moe":
                raise ValueError(f"`router={router!r}` needs `velocity='moe'` (the dense ablation has no router).")
            if not self.metadata_sizes:
                raise ValueError(
                    f"`router={router!r}` routes on sample metadata, but there is none (`metadata_sizes` is empty); "
                    "give the metadata columns (e.g. `metadata_keys=['cancer_type']`) or use `router='input'`."
                )
        if router == "cancer_type":
            if not 0 <= cancer_type_field < len(self.metadata_sizes):
                raise ValueError(
                    f"`cancer_type_field` must index one of the {len(self.metadata_sizes)} metadata fields, "
                    f"got {cancer_type_field}."
                )
            n_types = self.metadata_sizes[cancer_type_field]
            if n_experts is not None and n_experts != n_types:
                raise ValueError(
                    f"`router='cancer_type'` uses one expert per cancer type ({n_types}), but `n_experts={n_experts}`; "
                    "leave `n_experts` unset."
                )
            n_experts, top_k = n_types, 1
        n_experts = 6 if n_experts is None else int(n_experts)
        self.time_dim, self.router, self.cancer_type_field = time_dim, router, cancer_type_field
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

        if velocity == "dense":
            self.block: nn.Module = DenseBlock(factory(n_experts))
            return
        gate_dim = {"input": None, "condition": cond_dim, "cancer_type": 0}.get(router)
        if router == "image+metadata":
            # one extra row per field: the null (unknown) embedding for code -1
            self.meta_embed = nn.ModuleList(nn.Embedding(n + 1, metadata_embed_dim) for n in self.metadata_sizes)
            gate_dim = cond_dim + metadata_embed_dim * len(self.metadata_sizes)
        self.block = MixtureOfExperts(
            in_dim,
            factory(1),
            n_experts=n_experts,
            top_k=top_k,
            gate_noise=gate_noise,
            gate_dim=gate_dim,
        )

    @property
    def uses_metadata(self) -> bool:
        """Whether the router needs the metadata codes (``meta``) in ``forward``."""
        return self.router in ("image+metadata", "cancer_type") and isinstance(self.block, MixtureOfExperts)

    def _meta_codes(self, meta: torch.Tensor | None, b: int) -> torch.Tensor:
        if meta is None:
            raise ValueError(
                f"`router={self.router!r}` routes on metadata: pass the metadata codes `meta` (B, "
                f"{len(self.metadata_sizes)}), with -1 for unknown values."
            )
        if meta.ndim != 2 or meta.shape != (b, len(self.metadata_sizes)):
            raise ValueError(
                f"`meta` must have shape {(b, len(self.metadata_sizes))} (inputs × metadata fields), "
                f"got {tuple(meta.shape)}."
            )
        return meta.long()

    def routing_weights(self, meta: torch.Tensor) -> torch.Tensor:
        """Hard routing weights ``(B, E)`` of ``router="cancer_type"``: one-hot on the type's expert, uniform for -1."""
        code = meta[:, self.cancer_type_field]
        n = self.block.n_experts
        if (code >= n).any() or (code < -1).any():
            bad = sorted({int(v) for v in code[(code >= n) | (code < -1)].tolist()})
            raise ValueError(f"Cancer-type codes must be in -1..{n - 1} (-1 = unknown), got {bad[:5]}.")
        known = code >= 0
        onehot = nn.functional.one_hot(code.clamp_min(0), n).float()
        return torch.where(known[:, None], onehot, torch.full_like(onehot, 1.0 / n))

    def forward(
        self,
        z: torch.Tensor,
        t: torch.Tensor,
        c: torch.Tensor,
        gate_input: torch.Tensor | None = None,
        *,
        meta: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Velocity ``(B, latent_dim)`` and routing info.

        ``meta`` ``(B, n_fields)`` holds the metadata codes (``-1`` = unknown); only the metadata routers use it.
        ``gate_input`` overrides the router input of a learned router.
        """
        t = t.reshape(-1).expand(z.shape[0]) if t.numel() == 1 else t.reshape(-1)
        x = self.norm(torch.cat([z, timestep_embedding(t, self.time_dim), c], dim=-1))
        if not isinstance(self.block, MixtureOfExperts):
            return self.block(x, gate_input)
        if self.router == "cancer_type":
            return self.block(x, weights=self.routing_weights(self._meta_codes(meta, z.shape[0])))
        if gate_input is None and self.router == "condition":
            gate_input = c
        elif gate_input is None and self.router == "image+metadata":
            codes = self._meta_codes(meta, z.shape[0])
            embs = [
                emb(null_coded(codes[:, j], n)) for j, (emb, n) in enumerate(zip(self.meta_embed, self.metadata_sizes))
            ]
            gate_input = torch.cat([c, *embs], dim=-1)
        return self.block(x, gate_input)
