"""Client optimizers with an explicit, exportable curvature state (Theta).

``SOAP`` (Theta: Shampoo statistics), ``Sophia`` (diagonal Hessian EMA with GNB
refreshes), ``Muon`` (momentum of hidden matrices; AdamW for the rest),
``AdamW`` (second moment) and ``SGD`` (empty Theta), all built by
:func:`create_optimizer`. This package knows nothing about federation.
"""

from ._soap_kernels import eigenbasis
from ._soap_state import preconditioner_layout, stat_names
from ._theta_forms import next_global_curvature, sent_form
from .adamw import AdamW
from .base import CurvatureOptimizer, check_curvature_keys, named_params
from .factory import OPTIMIZERS, create_optimizer, curvature_retention, no_weight_decay_names
from .muon import Muon, is_muon_matrix, muon_matrix_names
from .sgd import SGD
from .soap import SOAP
from .sophia import GNBLoss, Sophia, gnb_loss, hessian_refresh_due, sophia_refresh

__all__ = [
    "OPTIMIZERS",
    "SGD",
    "SOAP",
    "AdamW",
    "CurvatureOptimizer",
    "GNBLoss",
    "Muon",
    "Sophia",
    "check_curvature_keys",
    "create_optimizer",
    "curvature_retention",
    "eigenbasis",
    "gnb_loss",
    "hessian_refresh_due",
    "is_muon_matrix",
    "muon_matrix_names",
    "named_params",
    "next_global_curvature",
    "sent_form",
    "no_weight_decay_names",
    "preconditioner_layout",
    "sophia_refresh",
    "stat_names",
]
