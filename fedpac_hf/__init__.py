"""fedpac_hf: federated second-order fine-tuning for Hugging Face Transformers.

FedPAC (preconditioner alignment and correction) lets SOAP, Sophia and Muon
clients train on non-IID data without the preconditioner drift that makes
naive federated second-order training stall or diverge.

The main entry points are imported lazily so that ``import fedpac_hf`` stays
cheap: :class:`FedPACTrainer`, :class:`FedPACArguments`,
:class:`FedPACCallback`, and :func:`simulate` for plain PyTorch loops.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names resolve to, for type checkers and IDEs
    from fedpac_hf.config.arguments import FedPACArguments
    from fedpac_hf.federated import get_algorithm, list_algorithms, simulate
    from fedpac_hf.optim import create_optimizer
    from fedpac_hf.partition import get_partitioner
    from fedpac_hf.trainer.callbacks import FedPACCallback
    from fedpac_hf.trainer.fedpac_trainer import FedPACTrainer

__version__ = "0.1.0"

_LAZY = {
    "FedPACTrainer": "fedpac_hf.trainer.fedpac_trainer",
    "FedPACCallback": "fedpac_hf.trainer.callbacks",
    "FedPACArguments": "fedpac_hf.config.arguments",
    "simulate": "fedpac_hf.federated",
    "get_algorithm": "fedpac_hf.federated",
    "list_algorithms": "fedpac_hf.federated",
    "create_optimizer": "fedpac_hf.optim",
    "get_partitioner": "fedpac_hf.partition",
}

__all__ = [  # written out (not *_LAZY) so that linters see the names above as exported
    "__version__",
    "FedPACTrainer",
    "FedPACCallback",
    "FedPACArguments",
    "simulate",
    "get_algorithm",
    "list_algorithms",
    "create_optimizer",
    "get_partitioner",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedpac_hf' has no attribute {name!r}")
