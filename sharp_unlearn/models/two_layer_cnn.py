"""The theory network (Cao et al. 2022; Chen et al. 2023): a two-layer CNN with a fixed second layer.

For an input of ``P`` patches ``x^(p)`` of dimension ``d`` and ``m`` filters per class::

    F_j(W, x) = (1/m) * sum_r sum_p sigma(<w_{j,r}, x^(p)>)

The second layer is fixed (not trained): in the binary theory the prediction is
``sign(F_1 - F_0)``, i.e. weight ``+1`` on class 1's filters and ``-1`` on class
0's. Implemented as one logit per class, each the mean over its own filters, so
cross-entropy on the two logits is the logistic loss on ``F_1 - F_0``.

Because every filter sees each patch through an inner product, training can be
read off directly: ``<w_{j,r}, mu>`` (signal learning) and ``<w_{j,r}, xi_i>``
(noise memorization), for the ``mu`` and ``xi_i`` that ``signal_noise`` records
in ``bundle.meta``.

Options: ``width`` (filters per class, m=10), ``activation`` (``relu``,
``relu_q``: ``max(0,z)^q``, ``smoothed_relu``: ``z^q/(q kappa^(q-1))`` on
``[0, kappa]`` then linear, ``linear``), ``q`` (3), ``kappa`` (0.1), ``init_std``
(sigma_0 of the Gaussian initialisation, 0.01).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from sharp_unlearn.errors import ConfigError
from sharp_unlearn.models.base import MODELS, FeatureModel

ACTIVATIONS = ("relu", "relu_q", "smoothed_relu", "linear")


class PatchActivation(nn.Module):
    def __init__(self, kind: str, q: float, kappa: float):
        super().__init__()
        self.kind, self.q, self.kappa = kind, q, kappa

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "relu":
            return torch.relu(z)
        if self.kind == "relu_q":
            return torch.relu(z) ** self.q
        if self.kind == "smoothed_relu":
            # polynomial near 0 (the smooth part the theory needs), linear beyond kappa;
            # value and slope agree at kappa: kappa/q and 1
            z = torch.relu(z)
            poly = z ** self.q / (self.q * self.kappa ** (self.q - 1))
            return torch.where(z <= self.kappa, poly, z - (1.0 - 1.0 / self.q) * self.kappa)
        return z

    def extra_repr(self) -> str:
        return f"kind={self.kind}, q={self.q}, kappa={self.kappa}"


class FixedClassMean(nn.Module):
    """The fixed second layer: logit j = mean of class j's ``m`` filter activations."""

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.num_classes, self.width = num_classes, width

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.view(features.shape[0], self.num_classes, self.width).mean(-1)


@MODELS.register("two_layer_cnn")
class TwoLayerCNN(FeatureModel):
    def __init__(self, num_classes: int, input_shape: tuple[int, ...], width: int = 10,
                 activation: str = "relu", q: float = 3.0, kappa: float = 0.1, init_std: float = 0.01):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"model.options.activation={activation!r} is not valid; "
                              f"expected one of: {', '.join(ACTIVATIONS)}")
        if int(width) < 1:
            raise ConfigError(f"model.options.width={width!r} is out of range; expected >= 1")
        if not (q >= 1 and kappa > 0 and init_std > 0):
            raise ConfigError(f"two_layer_cnn needs q >= 1, kappa > 0, init_std > 0; got q={q}, "
                              f"kappa={kappa}, init_std={init_std}")
        # [P, d] patches; anything else (e.g. an image) is read as one patch of all its values
        if len(input_shape) == 2:
            self.patches, self.dim = int(input_shape[0]), int(input_shape[1])
        else:
            self.patches, self.dim = 1, int(math.prod(input_shape))
        self.num_classes, self.width = int(num_classes), int(width)
        self.weight = nn.Parameter(torch.randn(self.num_classes, self.width, self.dim) * init_std)
        self.activation = PatchActivation(activation, float(q), float(kappa))
        self.head = FixedClassMean(self.num_classes, self.width)
        self.feature_dim = self.num_classes * self.width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-filter activations summed over patches: ``[batch, classes * m]``
        (class-major: entry ``j*m + r`` is filter ``w_{j,r}``)."""
        x = x.reshape(x.shape[0], self.patches, self.dim)
        pre = torch.einsum("bpd,jrd->bjrp", x, self.weight)
        return self.activation(pre).sum(-1).flatten(1)

    # ---------------------------------------------------------------- theory measurements
    @torch.no_grad()
    def signal_coefficients(self, mu: torch.Tensor) -> torch.Tensor:
        """``<w_{j,r}, mu>`` as ``[classes, m]``."""
        return torch.einsum("jrd,d->jr", self.weight, mu.to(self.weight))

    @torch.no_grad()
    def noise_coefficients(self, noise: torch.Tensor) -> torch.Tensor:
        """``<w_{j,r}, xi>`` for noise ``[..., d]`` (e.g. ``[n, d]`` or ``[n, P-1, d]``):
        ``[classes, m, ...]``."""
        return torch.einsum("jrd,...d->jr...", self.weight, noise.to(self.weight))

    @torch.no_grad()
    def signal_learning(self, mu: torch.Tensor) -> torch.Tensor:
        """Per class ``max_r <w_{j,r}, s_j mu>``: ``[classes]``.

        ``s_j`` is the sign class j's signal carries: in the binary model class 1
        sees ``+mu`` and class 0 sees ``-mu``, so both entries grow as the signal is
        learned. With more than two classes the raw ``max_r <w_{j,r}, mu>`` is returned.
        """
        coeff = self.signal_coefficients(mu)
        if self.num_classes == 2:
            coeff = coeff * torch.tensor([-1.0, 1.0], device=coeff.device)[:, None]
        return coeff.max(dim=1).values

    @torch.no_grad()
    def noise_memorization(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per example ``max_r max_p <w_{y_i,r}, xi_i^(p)>``: ``[n]``.

        The own-class filters are the ones whose positive alignment with ``xi_i``
        lets the network fit example i (even a mislabeled one) without the signal.
        ``noise`` is ``[n, d]`` or ``[n, P-1, d]``; ``labels`` ``[n]`` (classes).
        """
        coeff = self.noise_coefficients(noise)  # [C, m, n] or [C, m, n, k]
        if coeff.dim() == 3:
            coeff = coeff.unsqueeze(-1)
        labels = labels.to(coeff.device).long()
        own = coeff[labels, :, torch.arange(len(labels), device=coeff.device)]  # [n, m, k]
        return own.flatten(1).max(dim=1).values

    @torch.no_grad()
    def coefficient_summary(self, mu: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Scalars for logging: ``signal`` (mean over classes of the signal learning),
        ``noise`` (mean noise memorization), ``noise_max``."""
        memo = self.noise_memorization(noise, labels)
        return {"signal": float(self.signal_learning(mu).mean()), "noise": float(memo.mean()),
                "noise_max": float(memo.max()) if len(memo) else float("nan")}
