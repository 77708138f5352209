"""`PartitionArguments`: how a run splits one training set into clients.

A dataclass mixed into :class:`~fedpac_hf.config.arguments.FedPACArguments`
(used when the trainer gets one ``train_dataset``), so the settings read the
same from YAML, the command line and a Flower run config. The partitioners
themselves are in :mod:`fedpac_hf.partition`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from fedpac_hf.config.checks import PARTITIONER_FIELDS, PARTITIONERS

__all__ = ["PartitionArguments"]


@dataclass
class PartitionArguments:
    """The partitioner and its knobs; ``seed`` is ``TrainingArguments``'s."""

    num_clients: int = field(
        default=10, metadata={"help": "Number of clients to split train_dataset into."}
    )
    partitioner: str = field(
        default="dirichlet",
        metadata={"help": f"How to split train_dataset into clients: one of {PARTITIONERS}."},
    )
    dirichlet_alpha: float = field(
        default=0.1,
        metadata={
            "help": "Dirichlet concentration (label skew: 0.05 extreme, 1 ~ IID); also the "
            "quantity-skew concentration."
        },
    )
    dirichlet_scheme: str = field(
        default="client",
        metadata={
            "help": "'client': per-client class proportions, equal client sizes (the "
            "FedPAC paper); 'class': per-class proportions over clients (Hsu et al.)."
        },
    )
    classes_per_client: int = field(
        default=2, metadata={"help": "Classes per client for the pathological partitioner."}
    )
    partition_label_column: str = field(
        default="label", metadata={"help": "Label column used by label-skew partitioners."}
    )
    partition_id_column: str | None = field(
        default=None,
        metadata={"help": "Column with a natural client id (e.g. speaker) for natural_id."},
    )
    min_examples_per_client: int = field(
        default=1, metadata={"help": "Smallest client a partitioner may produce."}
    )

    def build_partitioner(self) -> Any:
        """The :class:`~fedpac_hf.partition.Partitioner` these arguments describe."""
        from fedpac_hf.partition import get_partitioner

        return get_partitioner(self.partitioner, **self.partitioner_kwargs())

    @staticmethod
    def partition_setting_names() -> dict[str, str]:
        """Partitioner argument -> the field of these arguments that sets it."""
        return {**PARTITIONER_FIELDS, "partitioner": "partitioner", "seed": "seed"}

    def assign_clients(self, dataset: Any, partitioner: Any = None) -> list[Any]:
        """Split ``dataset`` into client index arrays with ``partitioner`` or the configured one.

        A missing column is reported under the name of the field to change
        (``partition_label_column`` / ``partition_id_column``).
        """
        if partitioner is None:
            partitioner = self.build_partitioner()
        try:
            return partitioner.assign(dataset)
        except ValueError as err:
            pattern = r"\b(" + "|".join(PARTITIONER_FIELDS) + r")="
            message = re.sub(pattern, lambda m: f"{PARTITIONER_FIELDS[m.group(1)]}=", str(err))
            raise ValueError(message) from None

    def partitioner_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of the configured partitioner."""
        name = self.partitioner.replace("-", "_")
        if name == "natural_id":
            if not self.partition_id_column:
                raise ValueError(
                    "partitioner='natural_id' needs partition_id_column (e.g. 'speaker')"
                )
            return {"column": self.partition_id_column}
        kwargs: dict[str, Any] = {"num_clients": self.num_clients, "seed": self.seed}
        if name == "dirichlet":
            kwargs.update(
                alpha=self.dirichlet_alpha,
                label_column=self.partition_label_column,
                scheme=self.dirichlet_scheme,
                min_examples_per_client=self.min_examples_per_client,
            )
        elif name == "pathological":
            kwargs.update(
                classes_per_client=self.classes_per_client,
                label_column=self.partition_label_column,
            )
        elif name == "quantity_skew":
            kwargs.update(
                alpha=self.dirichlet_alpha, min_examples_per_client=self.min_examples_per_client
            )
        return kwargs
