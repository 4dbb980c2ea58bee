"""Top-k gated mixture of experts with load balancing (torch only), and the experts MoLF uses."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["MLPExpert", "TokenTransformerExpert", "MixtureOfExperts", "DenseBlock"]


class MLPExpert(nn.Module):
    """``in → width → width → out`` with GELU."""

    def __init__(self, in_dim: int, width: int, out_dim: int, depth: int = 2):
        super().__init__()
        dims = [in_dim] + [width] * depth
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.GELU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TokenTransformerExpert(nn.Module):
    """A small Transformer over the input's parts (e.g. ``z_t``, the time embedding, the condition).

    The input vector is cut into ``segments``; each segment is projected to ``width`` and becomes a token (plus a
    learned token type), ``n_layers`` pre-norm Transformer layers with ``n_heads`` heads mix the tokens, and the
    mean token is mapped to ``out_dim``. Unlike a Transformer on a length-1 sequence, attention here is real.
    """

    def __init__(self, segments: Sequence[int], width: int, out_dim: int, n_heads: int = 1, n_layers: int = 1):
        super().__init__()
        self.segments = list(segments)
        self.proj = nn.ModuleList(nn.Linear(s, width) for s in self.segments)
        self.token_type = nn.Parameter(torch.randn(len(self.segments), width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, n_heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.segments, dim=-1)
        tok = torch.stack([p(part) for p, part in zip(self.proj, parts)], dim=1) + self.token_type
        return self.out(self.blocks(tok).mean(dim=1))


class MixtureOfExperts(nn.Module):
    """Sparse top-k mixture of experts.

    ``y = Σ_i g_i(x) E_i(x)`` where the gate keeps the ``top_k`` largest logits of a linear router (Gaussian noise of
    std ``gate_noise`` added during training) and renormalises them with a softmax; each expert runs only on the
    inputs routed to it. The load-balancing loss is the Switch-Transformer form ``E · Σ_i f_i P_i`` (f_i = fraction of
    routing slots given to expert i, P_i = mean router probability of i), which is 1 under perfectly uniform routing.

    Parameters
    ----------
    in_dim
        Input size of the experts (and of the router when no ``gate_dim`` is given).
    make_expert
        Factory returning one expert module.
    n_experts
        Number of experts.
    top_k
        Experts active per input.
    gate_noise
        Std of the router-logit noise in training.
    gate_dim
        Size of a separate router input (e.g. image features and metadata for metadata-aware routing).
    """

    def __init__(
        self,
        in_dim: int,
        make_expert: Callable[[], nn.Module],
        n_experts: int = 6,
        top_k: int = 2,
        gate_noise: float = 1e-2,
        gate_dim: int | None = None,
    ):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"`top_k` must be between 1 and `n_experts`={n_experts}, got {top_k}.")
        self.n_experts, self.top_k, self.gate_noise = n_experts, top_k, gate_noise
        self.gate = nn.Linear(gate_dim or in_dim, n_experts)
        self.experts = nn.ModuleList(make_expert() for _ in range(n_experts))

    def route(self, gate_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sparse gate weights ``(B, E)``, router probabilities ``(B, E)`` and the top-k indices ``(B, k)``."""
        logits = self.gate(gate_input)
        if self.training and self.gate_noise > 0:
            logits = logits + torch.randn_like(logits) * self.gate_noise
        top_v, top_i = logits.topk(self.top_k, dim=-1)
        weights = torch.zeros_like(logits).scatter(1, top_i, torch.softmax(top_v, dim=-1))
        return weights, torch.softmax(logits, dim=-1), top_i

    def forward(
        self, x: torch.Tensor, gate_input: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mixed output and routing info: ``weights`` (B, E), ``probs`` (B, E), ``aux`` (load-balancing loss)."""
        weights, probs, top_i = self.route(x if gate_input is None else gate_input)
        out = None
        for e, expert in enumerate(self.experts):
            sel = torch.nonzero(weights[:, e] > 0, as_tuple=True)[0]
            if sel.numel() == 0:
                continue
            y = expert(x.index_select(0, sel)) * weights.index_select(0, sel)[:, e : e + 1]
            if out is None:
                out = x.new_zeros((x.shape[0], y.shape[1]))
            # rows in `sel` are unique: a gather + put (no accumulation) is exact and fast, also in deterministic mode
            out = out.index_put((sel,), out.index_select(0, sel) + y)
        counts = torch.zeros(self.n_experts, device=x.device, dtype=x.dtype).index_add(
            0, top_i.reshape(-1), torch.ones(top_i.numel(), device=x.device, dtype=x.dtype)
        )
        frac = counts / top_i.numel()
        aux = self.n_experts * torch.sum(frac * probs.mean(dim=0))
        return out, {"weights": weights, "probs": probs, "aux": aux, "load": frac}


class DenseBlock(nn.Module):
    """The dense ablation: one network with the same interface as :class:`MixtureOfExperts`."""

    def __init__(self, make_expert: Callable[[], nn.Module]):
        super().__init__()
        self.net = make_expert()
        self.n_experts = 1

    def forward(
        self, x: torch.Tensor, gate_input: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ones = x.new_ones((x.shape[0], 1))
        return self.net(x), {"weights": ones, "probs": ones, "aux": x.new_zeros(()), "load": x.new_ones(1)}
