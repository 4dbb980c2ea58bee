"""Top-k gated mixture of experts with load balancing (torch only), and the experts MoLF uses."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
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
    r"""Sparse top-k mixture of experts.

    ``y = Σ_i g_i(x) E_i(x)``; each expert runs only on the inputs routed to it. With router logits
    ``l = W r + b`` (``r`` the router input: ``x``, or ``gate_input`` when given), plus Gaussian noise of std
    ``gate_noise`` in training, router probabilities ``p = softmax(l)`` and ``S`` the indices of the ``top_k``
    largest logits, the gates are

    - ``renormalize=True`` (the default for ``top_k > 1``; Shazeer et al. 2017, GShard): ``g_i = p_i / Σ_{j∈S} p_j``
      for ``i ∈ S`` (the softmax over the kept logits), 0 otherwise;
    - ``renormalize=False`` (the default for ``top_k = 1``; Switch Transformer, Fedus et al. 2022):
      ``g_i = p_i`` for ``i ∈ S``, 0 otherwise.

    With top-1 the renormalised gate is always exactly 1, so the router would get no gradient from the task loss
    (only from the load-balancing loss); scaling the chosen expert by its full softmax probability gives it one.

    Losses in ``info``: ``aux``, the Switch-Transformer load-balancing loss ``E · Σ_i f_i P_i`` (``f_i`` = fraction of
    routing slots given to expert i, ``P_i`` = mean router probability of i; 1 under perfectly uniform routing), and
    ``z_loss``, the router z-loss of ST-MoE (Zoph et al. 2022), ``mean(logsumexp(l)²)``, which keeps the logits small
    (add it to the objective with a small weight, e.g. 1e-3, if the logits drift).

    ``forward(x, weights=...)`` bypasses the learned router with given routing weights (hard routing, e.g. one
    expert per cancer type); with ``gate_dim=0`` the module has no learned router and always needs them.

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
        Size of a separate router input (e.g. the condition only, or image features and metadata); ``0``: no learned
        router (routing weights are passed to :meth:`forward`).
    renormalize
        Renormalise the kept gates to sum to 1 (see above); default ``top_k > 1``.
    """

    def __init__(
        self,
        in_dim: int,
        make_expert: Callable[[], nn.Module],
        n_experts: int = 6,
        top_k: int = 2,
        gate_noise: float = 1e-2,
        gate_dim: int | None = None,
        renormalize: bool | None = None,
    ):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"`top_k` must be between 1 and `n_experts`={n_experts}, got {top_k}.")
        if gate_noise < 0:
            raise ValueError(f"`gate_noise` must be non-negative, got {gate_noise}.")
        self.n_experts, self.top_k, self.gate_noise = n_experts, top_k, gate_noise
        self.renormalize = top_k > 1 if renormalize is None else bool(renormalize)
        self.gate = nn.Linear(in_dim if gate_dim is None else gate_dim, n_experts) if gate_dim != 0 else None
        self.experts = nn.ModuleList(make_expert() for _ in range(n_experts))

    @torch.no_grad()
    def init_router(self, gate_inputs: torch.Tensor, *, sharpness: float = 3.0, seed: int = 0) -> torch.Tensor:
        r"""Initialise the router to send every input to the expert of its nearest k-means centroid.

        k-means with ``n_experts`` clusters on a sample of router inputs ``r`` (the rows of ``gate_inputs``) gives
        centroids :math:`\mu_i`; the router becomes
        :math:`l_i(r) = s\,(\mu_i \cdot r - \lVert \mu_i \rVert^2 / 2) / \bar d^2`, whose arg max is the nearest
        centroid (a Voronoi partition of the router-input space), with :math:`s` = ``sharpness`` and
        :math:`\bar d^2` the mean squared distance of the inputs to their nearest centroid. Each expert then starts
        with its own contiguous, similarly populated region of inputs to specialise on, where a random router splits
        the inputs arbitrarily and may give some experts none; training can move the boundaries from there. Useful when
        the router sees a fixed, low-dimensional input (e.g. ``router="condition"`` on given conditions).

        Returns the centroids ``(n_experts, gate_dim)``.
        """
        from sklearn.cluster import KMeans

        if self.gate is None:
            raise ValueError(
                "This mixture of experts has no learned router (`gate_dim=0`); there is nothing to initialise."
            )
        x = torch.as_tensor(gate_inputs, dtype=torch.float32).detach().cpu()
        if x.ndim != 2 or x.shape[1] != self.gate.in_features:
            raise ValueError(
                f"`gate_inputs` must have shape (n, {self.gate.in_features}) (router inputs), got {tuple(x.shape)}."
            )
        if x.shape[0] < self.n_experts or not torch.isfinite(x).all():
            raise ValueError(
                f"`gate_inputs` needs at least {self.n_experts} finite rows (one per expert), got {x.shape[0]} rows."
            )
        if not (isinstance(sharpness, (int, float)) and sharpness > 0):
            raise ValueError(f"`sharpness` must be a positive number, got {sharpness!r}.")
        km = KMeans(self.n_experts, n_init=4, random_state=seed).fit(x.numpy().astype(np.float64))
        mu = torch.as_tensor(km.cluster_centers_, dtype=torch.float32)
        spread = float(km.inertia_) / x.shape[0]
        scale = sharpness / max(spread, float(torch.finfo(torch.float32).eps))
        self.gate.weight.copy_((scale * mu).to(self.gate.weight))
        self.gate.bias.copy_((-scale * (mu**2).sum(1) / 2).to(self.gate.bias))
        return mu

    def route(self, gate_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gates (mixing weights ``g``), router probabilities, top-k indices ``(B, k)`` and logits, ``(B, E)`` each."""
        if self.gate is None:
            raise ValueError("This mixture of experts has no learned router (`gate_dim=0`): pass `weights`.")
        logits = self.gate(gate_input)
        if self.training and self.gate_noise > 0:
            logits = logits + torch.randn_like(logits) * self.gate_noise
        probs = torch.softmax(logits, dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter(1, top_i, top_p)
        return gates, probs, top_i, logits

    def forward(
        self, x: torch.Tensor, gate_input: torch.Tensor | None = None, *, weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mixed output and routing info.

        ``info``: ``weights`` (B, E), the routing shares (the gates renormalised to sum to 1 per row: the chosen
        expert gets 1 under top-1), ``gates`` (B, E), the mixing weights actually applied, ``probs`` (B, E), ``aux``
        (load-balancing loss), ``z_loss`` and ``load`` (fraction of routing slots per expert). With ``weights``
        given (B, E) (non-negative, rows summing to 1), they are used as gates and the losses are 0.
        """
        if weights is not None:
            if weights.shape != (x.shape[0], self.n_experts):
                raise ValueError(
                    f"`weights` must have shape {(x.shape[0], self.n_experts)} (inputs × experts), "
                    f"got {tuple(weights.shape)}."
                )
            gates = probs = weights.to(x.dtype)
            zero = x.new_zeros(())
            aux, z_loss = zero, zero
            active = gates > 0
            counts = active.to(x.dtype).sum(0)
            frac = counts / counts.sum().clamp_min(1)
        else:
            gates, probs, top_i, logits = self.route(x if gate_input is None else gate_input)
            counts = torch.zeros(self.n_experts, device=x.device, dtype=x.dtype).index_add(
                0, top_i.reshape(-1), torch.ones(top_i.numel(), device=x.device, dtype=x.dtype)
            )
            frac = counts / top_i.numel()
            aux = self.n_experts * torch.sum(frac * probs.mean(dim=0))
            z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        if weights is None and not torch.is_grad_enabled():
            out = self._grouped(x, gates, top_i)
        else:
            out = self._per_expert(x, gates)
        shares = gates / gates.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(gates.dtype).tiny)
        info = {"weights": shares, "gates": gates, "probs": probs, "aux": aux, "z_loss": z_loss, "load": frac}
        return out, info

    def _per_expert(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """``Σ_i g_i E_i(x)``, each expert on the rows whose gate for it is positive (any number of experts per row)."""
        out = None
        idle: list[nn.Module] = []
        for e, expert in enumerate(self.experts):
            sel = torch.nonzero(gates[:, e] > 0, as_tuple=True)[0]
            if sel.numel() == 0:
                idle.append(expert)
                continue
            y = expert(x.index_select(0, sel)) * gates.index_select(0, sel)[:, e : e + 1]
            if out is None:
                out = x.new_zeros((x.shape[0], y.shape[1]))
            # rows in `sel` are unique: a gather + put (no accumulation) is exact and fast, also in deterministic mode
            out = out.index_put((sel,), out.index_select(0, sel) + y)
        if idle and self.training and torch.is_grad_enabled():
            # an expert that got no input still joins the graph, with zero gradient: DDP needs every parameter used
            out = out + 0.0 * sum(p.sum() for expert in idle for p in expert.parameters())
        return out

    def _grouped(self, x: torch.Tensor, gates: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        """The same sum for top-k routing (``top_k`` experts per row), grouped: inference without gradients.

        The ``B × k`` routing slots are sorted by expert once, the inputs gathered once, each expert runs on its
        contiguous block, and the weighted outputs go back to their slots and are summed over each row's ``k`` slots
        (a gather and a fixed-order sum: deterministic, and with ``top_k ≤ 2`` bit for bit the sum of
        :meth:`_per_expert`, since adding two numbers does not depend on their order).
        """
        b, k = top_i.shape
        flat = top_i.reshape(-1)  # slot j of row r is r * k + j
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        xs = x.index_select(0, torch.div(order, k, rounding_mode="floor"))
        ys = [expert(part) for expert, part, c in zip(self.experts, xs.split(counts), counts) if c > 0]
        y = torch.cat(ys) * gates.gather(1, top_i).reshape(-1).index_select(0, order)[:, None]
        return y.index_select(0, torch.argsort(order)).view(b, k, -1).sum(dim=1)


class DenseBlock(nn.Module):
    """The dense ablation: one network with the same interface as :class:`MixtureOfExperts`."""

    def __init__(self, make_expert: Callable[[], nn.Module]):
        super().__init__()
        self.net = make_expert()
        self.n_experts = 1

    def forward(
        self, x: torch.Tensor, gate_input: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ones, zero = x.new_ones((x.shape[0], 1)), x.new_zeros(())
        info = {"weights": ones, "gates": ones, "probs": ones, "aux": zero, "z_loss": zero, "load": x.new_ones(1)}
        return self.net(x), info
