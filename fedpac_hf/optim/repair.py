"""Make a noised curvature state usable again (post-processing, no privacy cost).

Gaussian noise added to the sum of the clients' Theta (differential privacy,
:mod:`fedpac_hf.federated.privacy`) can leave second moments negative and
Kronecker statistics indefinite, which the optimizers cannot import (a
negative second moment under a square root, an indefinite ``L`` whose
eigenbasis means nothing). :func:`repair_curvature` projects every entry back
onto the set its optimizer keeps it in, by its name:

- ``*.exp_avg_sq`` (AdamW), ``*.hessian`` (Sophia), ``*.rotated_diagonal``
  (SOAP's basis form) and a SOAP statistic sent as its diagonal: clamped at 0;
- a SOAP statistic ``*.L``, ``*.R``, ``*.GG<i>`` sent in full: symmetrized and
  projected onto the positive semi-definite cone (negative eigenvalues set to
  0, the nearest PSD matrix in the Frobenius norm);
- everything else (Muon's ``*.momentum``, sketches ``L Omega``): unchanged,
  these are not constrained.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

__all__ = ["NONNEGATIVE_ENTRIES", "repair_curvature"]

#: Theta entries (last name component) that are elementwise non-negative.
NONNEGATIVE_ENTRIES = ("exp_avg_sq", "hessian", "rotated_diagonal")

_STATISTIC = re.compile(r"^(L|R|GG\d+)$")


def _nearest_psd(matrix: torch.Tensor) -> torch.Tensor:
    """The positive semi-definite matrix nearest to ``matrix`` (Frobenius norm)."""
    work = matrix.to(torch.float64)
    work = (work + work.T) / 2
    values, vectors = torch.linalg.eigh(work)
    return ((vectors * values.clamp_min(0.0)) @ vectors.T).to(matrix.dtype)


def repair_curvature(theta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Theta with every entry projected onto the values its optimizer allows.

    Parameters
    ----------
    theta:
        A curvature state as clients send it up (names as the optimizers'
        ``export_curvature`` gives them).

    Returns
    -------
    dict
        The same keys; constrained entries projected (see the module
        docstring), the others as they were. Repairing a valid Theta changes
        nothing but rounding.
    """
    repaired: dict[str, torch.Tensor] = {}
    for key, value in theta.items():
        last = key.rsplit(".", 1)[-1]
        if last in NONNEGATIVE_ENTRIES or (_STATISTIC.match(last) and value.ndim == 1):
            repaired[key] = value.clamp_min(0.0)
        elif _STATISTIC.match(last) and value.ndim == 2 and value.shape[0] == value.shape[1]:
            repaired[key] = _nearest_psd(value)
        else:
            repaired[key] = value
    return repaired
