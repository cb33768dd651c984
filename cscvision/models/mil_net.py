"""The MIL network over a bag of tile features: gated attention (Ilse et al. 2018), with
CLAM-SB's instance classifiers (Lu et al. 2021) when asked, or mean pooling.

``mean`` is the same network with every tile weighted ``1/N``: the slide's regression
output is then the mean of per-tile predictions ``W h_i``, the form of a fraction label
(the share of tissue that is stemness-rich). Trained by gradient descent it does not beat
ridge regression on mean-pooled features (pooled CV Pearson 0.849-0.868 against 0.907 on
the synthetic 200-slide cohort). ``instance_linear`` (:class:`InstanceLinearMIL`) is the
linear per-tile head with mean pooling fitted in closed form (``training.mil_linear``):
the default for regression-only (fraction) labels.

The training system that holds it is :class:`cscvision.training.mil.MILSystem`; the
per-tile split that inference runs is :mod:`cscvision.models.mil`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

TRAINED = ("gated_attention", "clam_sb", "mean")  # by gradient descent (training.mil.MILSystem)
NETWORKS = (*TRAINED, "instance_linear")
# ``auto``: instance_linear when every target is a regression (a fraction of the section),
# gated attention when a class target is trained (training.mil.resolve_architecture)
ARCHITECTURES = ("auto", *NETWORKS)
CLAM_K = 8  # CLAM's k_sample: tiles pseudo-labelled at each end of the attention ranking


class GatedAttentionMIL(nn.Module):
    def __init__(
        self,
        in_dim: int,
        *,
        n_regression: int,
        n_classes: Sequence[int] = (),
        n_covariates: int = 0,
        hidden: int = 128,
        attention: int = 64,
        dropout: float = 0.1,
        instance_heads: bool = False,
        mean_pool: bool = False,
    ):
        super().__init__()
        self.mean_pool = mean_pool
        self.embed = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout)
        )
        self.attn_v = nn.Linear(hidden, attention)
        self.attn_u = nn.Linear(hidden, attention)
        self.attn_w = nn.Linear(attention, 1)
        width = hidden + n_covariates
        self.regression = nn.Linear(width, n_regression) if n_regression else None
        self.classifiers = nn.ModuleList(nn.Linear(width, k) for k in n_classes)
        # CLAM-SB: one in-the-class/not instance classifier per class of each target
        self.instance = nn.ModuleList(
            nn.ModuleList(nn.Linear(hidden, 2) for _ in range(k if instance_heads else 0))
            for k in n_classes
        )
        self.n_covariates = n_covariates

    def attend(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tile embeddings ``h`` [N, H] and attention weights ``a`` [N] (sum 1)."""
        h = self.embed(x)
        return h, torch.softmax(self.tile_scores(h).squeeze(-1), dim=0)

    def tile_scores(self, h: torch.Tensor) -> torch.Tensor:
        """Unnormalised attention scores ``[N, 1]`` of tile embeddings (zeros, so equal
        weights, under mean pooling)."""
        if self.mean_pool:
            return h.new_zeros((h.shape[0], 1))
        return self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h)))

    def forward(
        self, x: torch.Tensor, covariates: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, list[torch.Tensor], torch.Tensor]:
        return self.pool(*self.attend(x), covariates)

    def pool(
        self, h: torch.Tensor, a: torch.Tensor, covariates: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, list[torch.Tensor], torch.Tensor]:
        """The slide's outputs from tile embeddings ``h`` and attention ``a``."""
        z = (a[:, None] * h).sum(0)
        if covariates is not None and covariates.numel():
            z = torch.cat([z, covariates])
        reg = self.regression(z) if self.regression is not None else None
        return reg, [head(z) for head in self.classifiers], a

    def instance_loss(self, h: torch.Tensor, a: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """CLAM's clustering loss over the top/bottom ``CLAM_K`` attended tiles (0 without
        instance heads or known class labels)."""
        loss, terms = h.new_zeros(()), 0
        k = min(CLAM_K, len(a) // 2)
        if k < 1:
            return loss
        order = torch.argsort(a, descending=True)
        top, bottom = h[order[:k]], h[order[-k:]]
        ones, zeros = torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)
        for heads, label in zip(self.instance, labels, strict=False):
            if not len(heads) or label < 0:
                continue
            for c, head in enumerate(heads):
                if c == int(label):  # in-class: attended tiles are the class, the least not
                    x, y = torch.cat([top, bottom]), torch.cat([ones, zeros])
                else:  # out-of-class: the attended tiles are not this class
                    x, y = top, zeros
                loss = loss + nn.functional.cross_entropy(head(x), y.to(h.device))
                terms += 1
        return loss / max(terms, 1)

    def contributions(self, x: torch.Tensor) -> torch.Tensor:
        """Per-tile share of each regression output ``a_i (W h_i)`` [N, R] (sums, with the
        bias and any covariate term, to the slide's standardised prediction)."""
        h, a = self.attend(x)
        width = h.shape[1]
        return a[:, None] * (h @ self.regression.weight[:, :width].T)


class InstanceLinearMIL(GatedAttentionMIL):
    """A linear per-tile head on the raw tile features, every tile weighted ``1/N``: the
    slide's prediction is the mean of the tiles' predictions ``w · x_i + b``, which equals
    a linear model on the mean-pooled features (fitted in closed form by
    :func:`cscvision.training.mil_linear.fit_instance_linear`). Regression targets only;
    the attention, pooling and contribution methods are :class:`GatedAttentionMIL`'s with
    ``embed`` the identity and uniform attention."""

    def __init__(self, in_dim: int, *, n_regression: int, n_covariates: int = 0):
        nn.Module.__init__(self)
        self.mean_pool = True
        self.embed = nn.Identity()
        self.regression = nn.Linear(in_dim + n_covariates, n_regression)
        self.classifiers = nn.ModuleList()
        self.instance = nn.ModuleList()
        self.n_covariates = n_covariates
