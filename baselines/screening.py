"""Exact greedy selection at the speed of half-precision matrix-vector products.

Herding and k-center greedy each need one product `X @ v` over the whole pool per pick, and on a CPU
that product is bound by memory bandwidth: a float16 copy of X is read 2-4x faster than float32.
Each pick therefore screens with the float16 copy, whose error is bounded (below), and re-scores in
float64 only the rows the bound cannot rule out (float64, because k-center's 2 - 2 cos loses the
small distances to cancellation in float32). The picks are those of the literal algorithm computed
in float64; tests compare against it.

Bound, for unit rows x and a unit query v: rounding both to float16 moves the dot product by at most
2 (u + 2^-25 sqrt(D)) with u = 2^-11 (relative rounding, plus the subnormal floor), and float32
accumulation adds at most D 2^-24. EPS_MARGIN doubles this, and ARITHMETIC_SLACK covers the float32
arithmetic of the screen itself. On first use the bound is checked
against the float32 product on a sample; if a kernel ever exceeds it, screening is switched off.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)

EPS_MARGIN = 2.0
ARITHMETIC_SLACK = 1e-5  # absolute, on screened scores of magnitude <= a few units
FULL_PASS_FRACTION = 0.25  # above this share of candidates a full product is cheaper than a gather
CHUNK_ROWS = 16384  # rows per float64 block of a full product, to bound the temporary memory


def screening_error_bound(dim: int) -> float:
    u = 2.0 ** -11
    return EPS_MARGIN * (2 * (u + 2.0 ** -25 * math.sqrt(dim)) + dim * 2.0 ** -24)


class ScreenedProducts:
    """Distances between the (near-unit) rows of `features` and query vectors, screened in float16."""

    def __init__(self, features: torch.Tensor) -> None:
        self.features = features.float()
        self.sqnorms = torch.cat([(block.double() ** 2).sum(1) for block in self.features.split(CHUNK_ROWS)])
        self.half_sqnorms32 = (self.sqnorms / 2).float()  # for the float32 screen
        self.eps = screening_error_bound(features.shape[1])
        self.half = self.features.half()
        if not self._bound_holds():
            log.warning("float16 products exceed the screening bound on this device; screening is off")
            self.half = None

    def _bound_holds(self, sample: int = 4096) -> bool:
        rows = self.features[:sample]
        query = torch.nn.functional.normalize(rows.mean(0) + 1e-3, dim=0)
        error = (self.half[:sample] @ query.half()).float() - rows @ query
        return bool(error.abs().max() <= self.eps / EPS_MARGIN)

    def approx(self, query: torch.Tensor) -> torch.Tensor | None:
        """float16 products of every row with `query`, within eps |query| of the exact ones (None: off)."""
        if self.half is None:
            return None
        norm = query.norm().clamp_min(1e-30)
        return (self.half @ (query / norm).half()).float() * float(norm)

    def exact(self, rows: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor:
        """float64 products with the given rows (all rows when None)."""
        query = query.double()
        if rows is None or len(rows) > FULL_PASS_FRACTION * len(self.features):
            full = torch.cat([block.double() @ query for block in self.features.split(CHUNK_ROWS)])
            return full if rows is None else full[rows]
        return self.features[rows].double() @ query

    def nearest(self, query: torch.Tensor, excluded: torch.Tensor) -> int:
        """The row closest to `query` among rows not `excluded`; the lowest row wins exact ties.

        argmin |x - q|^2 = argmax x.q - |x|^2 / 2, screened with the float16 products.
        """
        approx = self.approx(query)
        if approx is None:
            score = (self.exact(None, query) - self.sqnorms / 2).masked_fill(excluded, -math.inf)
            return int(torch.argmax(score))
        score = (approx - self.half_sqnorms32).masked_fill_(excluded, -math.inf)
        slack = 2 * (self.eps * float(query.norm()) + ARITHMETIC_SLACK * (1 + float(query.norm())))
        candidates = torch.nonzero(score >= score.max() - slack).squeeze(1)
        exact = self.exact(candidates, query) - self.sqnorms[candidates] / 2
        return int(candidates[torch.argmax(exact)])

    def shrink_min_sqdist(self, min_sqdist: torch.Tensor, centre: torch.Tensor) -> None:
        """float64 min_sqdist <- min(min_sqdist, |x - centre|^2) in place, |x - c|^2 = |x|^2 + |c|^2 - 2 x.c."""
        centre_sqnorm = float((centre.double() ** 2).sum())
        approx = self.approx(centre)
        if approx is None:
            torch.minimum(min_sqdist, self.sqnorms + centre_sqnorm - 2 * self.exact(None, centre), out=min_sqdist)
            return
        # a row can only move closer if a lower bound on its new distance beats its current one
        upper_dot = approx.add_((self.eps + ARITHMETIC_SLACK) * centre_sqnorm ** 0.5 + ARITHMETIC_SLACK)  # >= x.c
        lower = upper_dot.sub_(self.half_sqnorms32).mul_(-2).add_(centre_sqnorm)  # <= |x|^2 + |c|^2 - 2 x.c
        candidates = torch.nonzero(lower < min_sqdist).squeeze(1)
        if len(candidates):
            new = self.sqnorms[candidates] + centre_sqnorm - 2 * self.exact(candidates, centre)
            min_sqdist[candidates] = torch.minimum(min_sqdist[candidates], new)
