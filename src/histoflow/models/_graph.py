"""Spatial graph encoder: the spots of a window as a graph, used as the *condition* of the flow (torch only).

FLAG's point ("graph as condition, not as target") is that spot–spot structure should be absorbed by an encoder of the
tissue graph while the generative model only handles the gene dimension. Here the graph of a spot is its window: the
spot itself (node 0) and up to ``K`` neighbours within the context radius (built by ``MoLF._arrays``). The window is
small (``1 + K`` nodes, 9 by default), so every pair of nodes is connected (a complete graph, self-loops included);
no kNN sparsification is needed.

Edge features are really used (unlike the released FLAG configuration, which zeroes them):

- **physical distance** ``d_ij = ‖off_j − off_i‖`` in µm, from the offsets of the nodes to the centre spot, expanded
  on Gaussian radial basis functions spread evenly over ``[0, max_distance_um]``. Only distances enter (no absolute
  positions, no directions): the encoder is invariant to rotations and reflections of the tissue, and the pairwise
  distances of a window fix its geometry up to such a motion;
- **visual similarity** ``s_ij = cos(h_i, h_j)``, the cosine similarity of the nodes' *projected* patch features (the
  tokens the encoder receives), expanded on Gaussian radial basis functions over ``[−1, 1]``. Using the projections
  instead of the raw features keeps one interface for training and for inference, where each spot is projected once
  and neighbour tokens are gathered from the projections.

Both expansions go through a small MLP to an edge embedding ``e_ij``. Each layer (pre-norm) is a multi-head attention
in which the edge embedding adds a per-head bias to the attention logits, gates each message per head
(``σ(W_g e_ij)``) and adds an edge-dependent term to the values (``v_j + W_v e_ij``); padded nodes are masked as keys
and zeroed on input, so what a padded slot holds never reaches a real node. The output is the centre node's token
after the last layer (layer-normalised).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from histoflow._validate import check_dropout

__all__ = ["GraphContextEncoder", "gaussian_rbf"]


def gaussian_rbf(x: torch.Tensor, centres: torch.Tensor, width: float) -> torch.Tensor:
    """Gaussian radial basis expansion ``exp(−((x − μ_k) / width)²)`` of ``x`` ``(...)`` → ``(..., len(centres))``."""
    return torch.exp(-(((x[..., None] - centres) / width) ** 2))


class _GraphLayer(nn.Module):
    """One pre-norm graph-transformer layer with edge bias, edge gating and edge-conditioned values."""

    def __init__(self, dim: int, n_heads: int, edge_dim: int, ff_mult: int, dropout: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.edge_bias = nn.Linear(edge_dim, n_heads)
        self.edge_gate = nn.Linear(edge_dim, n_heads)
        self.edge_value = nn.Linear(edge_dim, dim)
        self.attn_drop = nn.Dropout(dropout)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_mult * dim, dim)
        )

    def bias(self, e: torch.Tensor) -> torch.Tensor:
        """Additive attention bias ``(B, H, N, N)`` from edge embeddings ``(B, N, N, E)``."""
        return self.edge_bias(e).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, e: torch.Tensor, valid: torch.Tensor, centre_only: bool = False) -> torch.Tensor:
        """Updated tokens ``(B, N, dim)``; with ``centre_only`` only node 0 is updated and returned, ``(B, 1, dim)``."""
        b, n, d = x.shape
        h, hd = self.n_heads, self.head_dim
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, h, hd).permute(2, 0, 3, 1, 4)  # each (B, H, N, hd)
        if centre_only:  # the last layer: only the centre's output is read
            q, e, x = q[:, :, :1], e[:, :1], x[:, :1]
        m = q.shape[2]
        logits = q @ k.transpose(-1, -2) / math.sqrt(hd) + self.bias(e)  # (B, H, m, N)
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
        w = self.attn_drop(torch.softmax(logits, dim=-1)) * torch.sigmoid(self.edge_gate(e)).permute(0, 3, 1, 2)
        # Σ_j w_ij (v_j + W_v e_ij + b_v), with W_v applied after aggregating the (narrow) edge embeddings, so no
        # (B, H, m, N, head_dim) tensor is formed
        agg = torch.einsum("bhij,bije->bhie", w, e)  # (B, H, m, E)
        wv = self.edge_value.weight.view(h, hd, -1)
        bv = self.edge_value.bias.view(1, h, 1, hd)
        msg = w @ v + torch.einsum("bhie,hde->bhid", agg, wv) + w.sum(-1, keepdim=True) * bv  # (B, H, m, hd)
        x = x + self.drop(self.out(msg.transpose(1, 2).reshape(b, m, d)))
        return x + self.drop(self.ff(self.norm2(x)))


class GraphContextEncoder(nn.Module):
    """Graph transformer over a spot's window → the spot's context vector.

    Parameters
    ----------
    dim
        Token width (the condition width of :class:`~histoflow.models.ConditionEncoder`).
    n_heads
        Attention heads (``dim`` must be divisible by it).
    n_layers
        Graph-transformer layers.
    edge_dim
        Width of the edge embedding.
    n_distance_rbf
        Radial basis functions for the physical distance.
    max_distance_um
        Distance covered by the distance basis (µm); twice the context radius covers every pair of a window.
    n_similarity_rbf
        Radial basis functions for the cosine similarity.
    ff_mult
        Width of the feed-forward block relative to ``dim``.
    dropout
        Dropout on attention weights, residual branches and the feed-forward block.
    """

    def __init__(
        self,
        dim: int,
        *,
        n_heads: int = 4,
        n_layers: int = 2,
        edge_dim: int = 32,
        n_distance_rbf: int = 16,
        max_distance_um: float = 500.0,
        n_similarity_rbf: int = 8,
        ff_mult: int = 2,
        dropout: float = 0.1,
    ):
        super().__init__()
        for name, value in (
            ("dim", dim),
            ("n_heads", n_heads),
            ("n_layers", n_layers),
            ("edge_dim", edge_dim),
            ("ff_mult", ff_mult),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name, value in (("n_distance_rbf", n_distance_rbf), ("n_similarity_rbf", n_similarity_rbf)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"`{name}` must be an integer of at least 2, got {value!r}.")
        if dim % n_heads:
            raise ValueError(f"`dim` ({dim}) must be divisible by `n_heads` ({n_heads}); change one of them.")
        if not (math.isfinite(max_distance_um) and max_distance_um > 0):
            raise ValueError(f"`max_distance_um` must be a positive number of micrometres, got {max_distance_um!r}.")
        check_dropout(dropout)
        self.dim, self.n_layers = dim, n_layers
        self.register_buffer("dist_centres", torch.linspace(0.0, float(max_distance_um), n_distance_rbf))
        self.register_buffer("sim_centres", torch.linspace(-1.0, 1.0, n_similarity_rbf))
        self.dist_width = float(max_distance_um) / (n_distance_rbf - 1)
        self.sim_width = 2.0 / (n_similarity_rbf - 1)
        self.edge_mlp = nn.Sequential(
            nn.Linear(n_distance_rbf + n_similarity_rbf, edge_dim), nn.GELU(), nn.Linear(edge_dim, edge_dim)
        )
        self.layers = nn.ModuleList(_GraphLayer(dim, n_heads, edge_dim, ff_mult, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)

    def _inputs(
        self, h: torch.Tensor, offsets_um: torch.Tensor, valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if h.ndim != 3 or h.shape[-1] != self.dim:
            raise ValueError(f"Node tokens must be (batch, nodes, {self.dim}); got shape {tuple(h.shape)}.")
        if offsets_um is None or tuple(offsets_um.shape) != (*h.shape[:2], 2):
            got = None if offsets_um is None else tuple(offsets_um.shape)
            raise ValueError(
                f"`offsets_um` must be (batch, nodes, 2) = {(*h.shape[:2], 2)} (µm from the centre spot); got {got}."
            )
        if valid is None:
            valid = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        elif tuple(valid.shape) != tuple(h.shape[:2]):
            raise ValueError(f"`valid` must be (batch, nodes) = {tuple(h.shape[:2])}; got {tuple(valid.shape)}.")
        valid = valid.bool()
        if not bool(valid[:, 0].all()):
            raise ValueError("`valid[:, 0]` must be True: node 0 is the centre spot, whose context is computed.")
        # padded slots are zeroed, so whatever they hold (even NaN) cannot leak through 0 × value
        h = h.masked_fill(~valid[..., None], 0.0)
        offsets_um = offsets_um.masked_fill(~valid[..., None], 0.0)
        return h, offsets_um, valid

    def edge_geometry(
        self, h: torch.Tensor, offsets_um: torch.Tensor, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairwise physical distance (µm) and cosine similarity of the node tokens, each ``(B, N, N)``."""
        h, offsets_um, valid = self._inputs(h, offsets_um, valid)
        return self._geometry(h, offsets_um)

    @staticmethod
    def _geometry(h: torch.Tensor, off: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        delta = off[:, None, :, :] - off[:, :, None, :]  # [b, i, j] = off_j − off_i
        dist = (delta**2).sum(-1).clamp_min(1e-12).sqrt()
        hn = nn.functional.normalize(h, dim=-1, eps=1e-6)
        return dist, hn @ hn.transpose(-1, -2)

    def _edges(self, h: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
        dist, sim = self._geometry(h, off)
        feats = torch.cat(
            [
                gaussian_rbf(dist, self.dist_centres, self.dist_width),
                gaussian_rbf(sim, self.sim_centres, self.sim_width),
            ],
            dim=-1,
        )
        return self.edge_mlp(feats)  # (B, N, N, edge_dim)

    def edge_bias(self, h: torch.Tensor, offsets_um: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Additive attention bias of every layer, ``(n_layers, B, n_heads, N, N)`` (before key masking)."""
        h, offsets_um, valid = self._inputs(h, offsets_um, valid)
        e = self._edges(h, offsets_um)
        return torch.stack([layer.bias(e) for layer in self.layers])

    def forward(self, h: torch.Tensor, offsets_um: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Context vector ``(B, dim)`` of node 0 (the centre spot).

        ``h`` ``(B, N, dim)``: node tokens, the centre first; ``offsets_um`` ``(B, N, 2)``: offsets from the centre in
        µm; ``valid`` ``(B, N)``: real (True) or padded (False) nodes (default all real).
        """
        h, offsets_um, valid = self._inputs(h, offsets_um, valid)
        e = self._edges(h, offsets_um)
        x = h
        for i, layer in enumerate(self.layers):
            x = layer(x, e, valid, centre_only=i == self.n_layers - 1)
        return self.norm(x[:, 0])
