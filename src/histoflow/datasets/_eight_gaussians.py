"""The conditional eight-Gaussian toy task of MoLF (appendix A.3)."""

from __future__ import annotations

import numbers

import numpy as np

from histoflow._utils import as_rng
from histoflow._validate import check_positive

__all__ = ["eight_gaussians"]


def eight_gaussians(
    n: int = 1000,
    seed: int | np.random.Generator | None = 0,
    *,
    radius: float = 3.0,
    sigma2: float = 0.01,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Sample the conditional eight-Gaussian dataset of MoLF (appendix A.3).

    An angle :math:`\theta \sim \mathcal{U}(0, 2\pi)` gives the condition
    :math:`c = (\cos\theta, \sin\theta)` and the mode :math:`k = \lfloor 4\theta/\pi \rfloor \in \{0, \dots, 7\}`;
    the target is :math:`z \sim \mathcal{N}(\mu_k, \sigma^2 I)` with
    :math:`\mu_k = R\,(\cos(k\pi/4), \sin(k\pi/4))`. A model must learn a map from a continuous condition to a
    multi-modal target, which is what a mixture of experts separates well.

    Parameters
    ----------
    n
        Number of samples.
    seed
        Seed or :class:`numpy.random.Generator`; the same seed gives the same arrays.
    radius
        Radius :math:`R` of the ring of mode means.
    sigma2
        Variance :math:`\sigma^2` of each mode (0 puts every sample on its mode mean).

    Returns
    -------
    ``(condition, z, mode)``: the conditions ``(n, 2)`` on the unit circle (float32), the targets ``(n, 2)``
    (float32) and the mode index of each sample ``(n,)`` (int64, in ``0..7``).

    Examples
    --------
    >>> import histoflow as hf
    >>> c, z, k = hf.datasets.eight_gaussians(500, seed=1)
    >>> c.shape, z.shape, int(k.max()) <= 7
    ((500, 2), (500, 2), True)
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"`n` must be a positive integer (number of samples), got {n!r}.")
    check_positive(radius, "radius")
    check_positive(sigma2, "sigma2", allow_zero=True)
    rng = as_rng(seed)
    theta = rng.uniform(0.0, 2.0 * np.pi, size=int(n))
    condition = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    mode = np.clip(np.floor(4.0 * theta / np.pi).astype(np.int64), 0, 7)
    angle = mode * (np.pi / 4.0)
    means = float(radius) * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    z = means + np.sqrt(float(sigma2)) * rng.standard_normal((int(n), 2))
    return condition.astype(np.float32), z.astype(np.float32), mode
