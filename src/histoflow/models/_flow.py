"""Conditional flow matching in a latent space: training loss and guided Euler sampling (torch only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from histoflow.models._vae import masked_mse
from histoflow.models._velocity import ConditionEncoder, VelocityField

__all__ = ["LatentFlow", "PREDICTIONS", "draw_path"]

#: What the network outputs: the velocity ``z1 − z0`` (the paper's) or the endpoint ``ẑ1``
#: (then the velocity is ``(ẑ1 − z_t) / (1 − t)``).
PREDICTIONS = ("velocity", "endpoint")
# smallest 1 − t an endpoint is divided by (t < 1 in every Euler step; only a training draw can come closer)
_MIN_REMAINING = 1e-3


def draw_path(
    condition: nn.Module,
    batch: dict[str, torch.Tensor],
    x1: torch.Tensor,
    p_uncond: float,
    p_meta_drop: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One flow-matching training draw, shared by MoLF's latent flow and FLAG's gene-token flow.

    Drops whole conditions with probability ``p_uncond`` (classifier-free guidance) and single metadata fields with
    ``p_meta_drop`` (code -1, the null token), encodes the condition, draws the prior noise ``x0 ~ N(0, I)`` and
    ``t ~ U(0, 1)``, and returns ``(c, meta, drop, x0, t, xt)`` with ``xt = (1 − t) x0 + t x1`` on the linear path.
    ``generator`` fixes every draw (a validation loss that does not jitter).
    """
    b, dev = x1.shape[0], x1.device
    drop = torch.rand(b, device=dev, generator=generator) < p_uncond
    meta = batch.get("meta")
    if meta is not None and p_meta_drop > 0:
        hit = torch.rand(meta.shape, device=dev, generator=generator) < p_meta_drop
        meta = torch.where(hit, torch.full_like(meta, -1), meta)
    c, _ = condition(batch["feats"], batch.get("offsets"), batch.get("valid"), meta, drop)
    x0 = torch.randn(x1.shape, device=dev, generator=generator)
    t = torch.rand(b, 1, device=dev, generator=generator)
    return c, meta, drop, x0, t, (1 - t) * x0 + t * x1


def one_start(z: torch.Tensor) -> bool:
    """Whether every row of ``z`` ``(B, ...)`` is the same point (e.g. draws from the prior mean), for ``B > 1``.

    The null branch of classifier-free guidance sees the same null condition for every row, so from one point it
    gives one output: samplers then evaluate it on one row and broadcast it.
    """
    return z.shape[0] > 1 and bool((z == z[:1]).all())


class LatentFlow(nn.Module):
    """Condition encoder + velocity field, with the MoLF objective and sampler.

    Training (:meth:`loss`): linear path ``z_t = (1 − t) z0 + t z1`` with ``z0 ~ N(0, I)`` (the same prior as in
    sampling), ``t ~ U(0, 1)``, target ``z1 − z0``; gene consistency: decode ``ẑ1 = z_t + (1 − t) v`` with the frozen
    decoder, masked MSE against log1p truth; load balancing from the experts; the condition is replaced by the learned
    null condition with probability ``p_uncond`` (classifier-free guidance), and each metadata field by its null token
    with probability ``p_meta_drop`` (so unknown values can be predicted).

    Sampling (:meth:`sample`): Euler from t = 0 to 1 in ``steps`` velocity evaluations; with guidance ``w ≠ 1`` each
    evaluation is ``v_u + w (v_c − v_u)`` (conditional and null branches batched into one forward pass).

    Metadata routers (``router="image+metadata"`` or ``"cancer_type"`` in :class:`VelocityField`) also get the
    metadata codes. In training they see the same codes as the condition encoder (after metadata dropout), and rows
    whose condition is dropped for guidance get code ``-1`` in every field; in sampling the null branch routes by
    code ``-1`` too. So the unconditional velocity ``v_u`` is unconditional in its routing as well: the
    ``"cancer_type"`` router mixes all experts uniformly there, the ``"image+metadata"`` router sees the null
    condition and the null metadata embeddings.

    ``prediction="endpoint"`` makes the network output the endpoint ``ẑ1`` instead of the velocity; the velocity is then
    ``(ẑ1 − z_t) / (1 − t)`` (the same path, sampler and guidance), and the flow term is the endpoint error
    ``‖ẑ1 − z1‖²`` (the velocity error weighted by ``(1 − t)²``; both have the same minimiser,
    ``E[z1 | z_t, c]``). With one Euler step a velocity network must output ``E[z1 | c] − z0``, cancelling its own
    input noise exactly; an endpoint network outputs ``E[z1 | c]`` directly, so single draws depend less on the
    noise.
    """

    def __init__(self, condition: ConditionEncoder, velocity: VelocityField, prediction: str = "velocity"):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"`prediction` must be one of {list(PREDICTIONS)}, got {prediction!r}.")
        self.condition = condition
        self.velocity = velocity
        self.prediction = prediction

    def velocity_and_endpoint(
        self, z: torch.Tensor, t: torch.Tensor, c: torch.Tensor, meta: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Velocity ``v``, endpoint estimate ``ẑ1 = z_t + (1 − t) v`` and routing info at ``(z_t, t)``.

        ``t`` is one time ``(1,)`` for every row or one per row ``(B, 1)``.
        """
        out, info = self.velocity(z, t, c) if meta is None else self.velocity(z, t, c, meta=meta)
        remaining = 1 - t.reshape(-1, 1)  # (1, 1) or (B, 1)
        if self.prediction == "endpoint":
            return (out - z) / remaining.clamp_min(_MIN_REMAINING), out, info
        return out, z + remaining * out, info

    def loss(
        self,
        batch: dict[str, torch.Tensor],
        decoder: Callable[[torch.Tensor], torch.Tensor],
        *,
        p_uncond: float = 0.1,
        p_meta_drop: float = 0.1,
        lambda_flow: float = 1.0,
        lambda_gene: float = 1.0,
        lambda_aux: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """All loss terms for one batch (keys ``loss``, ``flow``, ``gene``, ``aux``, ``load``).

        ``generator`` fixes the noise, times and dropout draws (used for a validation loss that does not jitter).
        """
        z1 = batch["z1"]
        c, meta, drop, z0, t, zt = draw_path(self.condition, batch, z1, p_uncond, p_meta_drop, generator)
        route_meta = None
        if meta is not None and getattr(self.velocity, "uses_metadata", False):
            route_meta = torch.where(drop[:, None], torch.full_like(meta, -1), meta)  # the null branch is unconditional
        v, z1_hat, info = self.velocity_and_endpoint(zt, t, c, route_meta)
        if self.prediction == "endpoint":
            flow = torch.mean((z1_hat - z1) ** 2)
        else:
            flow = torch.mean((v - (z1 - z0)) ** 2)
        gene = masked_mse(decoder(z1_hat), batch["x"], batch.get("mask")) if lambda_gene > 0 else flow * 0
        total = lambda_flow * flow + lambda_gene * gene + lambda_aux * info["aux"]
        return {"loss": total, "flow": flow, "gene": gene, "aux": info["aux"], "load": info["load"]}

    @torch.no_grad()
    def sample(
        self,
        c: torch.Tensor,
        z0: torch.Tensor,
        *,
        meta: torch.Tensor | None = None,
        steps: int = 1,
        guidance: float = 1.0,
        record: bool = False,
    ) -> dict[str, Any]:
        """Integrate from noise ``z0`` ``(B, L)`` under conditions ``c`` ``(B, C)``.

        ``meta`` ``(B, F)``: metadata codes for a metadata router (``-1`` = unknown; the null branch of guidance
        always routes by ``-1``); ignored by the other routers.

        Returns ``z1`` ``(B, L)``, ``routing`` (gate weights of the conditional branch at t = 0, ``(B, E)``) and,
        with ``record``, ``trajectory`` ``(steps + 1, B, L)``.
        """
        if steps < 1:
            raise ValueError(f"`steps` must be at least 1, got {steps}.")
        guided = guidance != 1.0
        mm = None
        if meta is not None and getattr(self.velocity, "uses_metadata", False):
            mm = meta
        z = z0
        traj = [z0] if record else None
        routing = None
        dt = 1.0 / steps
        for s in range(steps):
            t = torch.full((1,), s * dt, device=z.device)
            if guided:
                v_c, v_u, info = self._guided_branches(z, t, c, mm)
                v = v_u + guidance * (v_c - v_u)
            else:
                v, _, info = self.velocity_and_endpoint(z, t, c, mm)
            if routing is None:
                routing = info["weights"]
            z = z + dt * v
            if record:
                traj.append(z)
        out: dict[str, Any] = {"z1": z, "routing": routing}
        if record:
            out["trajectory"] = torch.stack(traj)
        return out

    def _guided_branches(
        self, z: torch.Tensor, t: torch.Tensor, c: torch.Tensor, meta: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Conditional and null-branch velocities at ``(z, t)``, and the conditional branch's routing info.

        The null branch sees the learned null condition (and the unknown metadata code) for every row, so it depends
        on ``z`` alone: when every row is at the same point (:func:`one_start`) it is evaluated once and broadcast
        instead of once per spot. Otherwise both branches run in one batched pass.
        """
        b = z.shape[0]
        null_meta = None if meta is None else torch.full_like(meta, -1)
        if one_start(z):
            v_c, _, info = self.velocity_and_endpoint(z, t, c, meta)
            nm = None if null_meta is None else null_meta[:1]
            v_u, _, _ = self.velocity_and_endpoint(z[:1], t, self.condition.null.expand(1, -1), nm)
            return v_c, v_u.expand_as(v_c), info
        cc = torch.cat([c, self.condition.null.expand_as(c)])
        mm = None if meta is None else torch.cat([meta, null_meta])
        v, _, info = self.velocity_and_endpoint(torch.cat([z, z]), t, cc, mm)
        v_c, v_u = v.chunk(2)
        return v_c, v_u, {**info, "weights": info["weights"][:b]}
