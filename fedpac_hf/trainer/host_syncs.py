"""Count the operations that make the host wait for a device (host syncs).

A training step on an accelerator runs ahead of the device only as long as the
host never needs a value the device has not computed yet. Every such read
(``tensor.item()``, ``float(tensor)``, ``bool(tensor)``, ``int(tensor)``, a
copy to the CPU, a boolean mask's ``nonzero``) stalls the pipeline. They all
reach the dispatcher as a handful of ATen operations, so a
``TorchDispatchMode`` sees them whatever code issues them, on any device:

- ``aten._local_scalar_dense``: ``item``, ``float``, ``int``, ``bool``;
- ``aten.nonzero``, ``aten.masked_select``, boolean-mask ``aten.index`` /
  ``aten.index_put_``: the result's size depends on the data;
- ``aten.equal``: returns a Python ``bool``;
- ``aten._to_copy`` / ``aten.copy_`` from a device to the CPU (not
  ``non_blocking``).

:class:`HostSyncCounter` records each with the place in the calling code that
issued it. On a CPU-only machine nothing really waits, but the same reads are
seen (with ``device_type=None``), so a test can check how many syncs a loop
would cost on an accelerator. Two blind spots on the CPU: ``tensor.tolist()``
and copies to the CPU do not dispatch for CPU tensors; and some reads are of
tensors that stay on the host even on an accelerator (``torch.optim.AdamW``
keeps its step count on the CPU), which :attr:`SyncEvent.torch_location` helps
to tell apart. On CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` is the
ground truth; ``benchmarks/gpu_check.py`` reports both.

Example::

    with HostSyncCounter() as syncs:
        client_update(...)
    print(len(syncs.events), syncs.summary())
"""

from __future__ import annotations

import collections
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncCounter", "SyncEvent"]

_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_THIS_FILE = str(Path(__file__).resolve())

_SCALAR_READS = {"aten._local_scalar_dense.default", "aten.equal.default"}
_DATA_DEPENDENT = {
    "aten.nonzero.default",
    "aten.masked_select.default",
}
_MASK_INDEXING = {
    "aten.index.Tensor",
    "aten.index_put.default",
    "aten.index_put_.default",
}
_COPIES = {"aten._to_copy.default", "aten.copy_.default"}
# torch frames that only carry the dispatch to this mode, never the reason for a read
_MACHINERY = ("_python_dispatch.py", "/_dynamo/", "/_compile.py", "/utils/_contextlib.py")


@dataclass(frozen=True)
class SyncEvent:
    """One operation that waits for the device.

    Attributes
    ----------
    op:
        The ATen operation, e.g. ``"aten._local_scalar_dense.default"``.
    device:
        The device of the tensor read, e.g. ``"cuda:0"``.
    location:
        ``file:line`` of the innermost calling frame outside torch (the code
        that asked for the value, directly or through a torch function).
    torch_location:
        ``file:line`` of the innermost torch frame below ``location`` (e.g.
        inside ``torch.optim`` or ``torch.amp``), or ``""`` when the calling
        code read the value itself.
    """

    op: str
    device: str
    location: str
    torch_location: str


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _sync_device(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The device whose values ``func(*args, **kwargs)`` reads on the host, or ``None``."""
    name = str(func)
    if name in _SCALAR_READS or name in _DATA_DEPENDENT:
        return str(args[0].device) if args and isinstance(args[0], torch.Tensor) else None
    if name in _MASK_INDEXING and len(args) > 1:
        masks = [t for t in _tensors(args[1]) if t.dtype in (torch.bool, torch.uint8)]
        return str(masks[0].device) if masks else None
    if name in _COPIES and not kwargs.get("non_blocking", False):
        if name == "aten._to_copy.default":
            source, target = args[0], kwargs.get("device")
        else:
            source, target = args[1], args[0].device
        if (
            target is not None
            and torch.device(target).type == "cpu"
            and isinstance(source, torch.Tensor)
            and source.device.type != "cpu"
        ):
            return str(source.device)
    return None


def _caller() -> tuple[str, str]:
    """(innermost frame outside torch, innermost torch frame below it), as ``file:line``."""
    frame = sys._getframe(2)
    torch_location = ""
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename == _THIS_FILE or any(part in filename for part in _MACHINERY):
            frame = frame.f_back
            continue
        where = f"{filename}:{frame.f_lineno}"
        if not filename.startswith(_TORCH_DIR):
            return where, torch_location
        torch_location = torch_location or where
        frame = frame.f_back
    return "?", torch_location


class HostSyncCounter(TorchDispatchMode):
    """A context manager that records every host sync issued inside it.

    Parameters
    ----------
    device_type:
        Record only reads of tensors on this kind of device (``"cuda"``: the
        syncs a GPU run really pays); ``None`` records reads on every device,
        the CPU included, which is how a CPU-only test sees what a loop would
        cost on an accelerator.

    Attributes
    ----------
    events:
        One :class:`SyncEvent` per sync, in order.
    """

    def __init__(self, device_type: str | None = None) -> None:
        super().__init__()
        self.device_type = device_type
        self.events: list[SyncEvent] = []

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        device = _sync_device(func, args, kwargs)
        if device is not None and (
            self.device_type is None or torch.device(device).type == self.device_type
        ):
            location, torch_location = _caller()
            self.events.append(SyncEvent(str(func), device, location, torch_location))
        return func(*args, **kwargs)

    def count(self, *, location_contains: str | None = None, in_torch: bool | None = None) -> int:
        """Number of recorded syncs, optionally only those whose ``location``
        contains a string, or only those issued inside (``True``) or outside
        (``False``) a torch function."""
        return sum(
            1
            for e in self.events
            if (location_contains is None or location_contains in e.location)
            and (in_torch is None or bool(e.torch_location) == in_torch)
        )

    def summary(self) -> dict[str, int]:
        """Syncs by place: ``"location [via torch_location]" -> count``, most frequent first."""
        counts = collections.Counter(
            e.location + (f" via {e.torch_location}" if e.torch_location else "")
            for e in self.events
        )
        return dict(counts.most_common())
