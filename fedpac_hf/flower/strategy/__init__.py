"""Flower message-API strategies: a small base that maps clients to nodes, and FedPAC."""

from .base import PartitionStrategy
from .fedpac import FedPACStrategy

__all__ = ["FedPACStrategy", "PartitionStrategy"]
