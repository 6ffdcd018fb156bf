"""A check over code that a CUDA graph captures: it fails on every operation that a replay cannot repeat.

A graph records device work only; a replay runs it again on the same memory, with no Python. So inside
the captured region an operation must not:
- read a device value on the host (`.item()`, `int(t)`, `bool(t)`: `aten._local_scalar_dense`,
  `aten.item`): a sync,
  which capture refuses on CUDA, and the value would be frozen into the graph;
- make an output whose shape depends on the data (`nonzero`, boolean-mask indexing, `unique`, ...): a
  sync for its size;
- make a tensor from host data (`torch.tensor(list)`, `torch.as_tensor`, `from_numpy`: `aten.lift_fresh`)
  or copy between the host and the device: a replay copies from a host buffer long gone, or stale.

`forbid_host_work()` is a `TorchDispatchMode` that raises `CaptureSafetyError` on any of these. It sees the
same operations on the CPU as on CUDA, so the CPU tests run it over the very code a graph captures
(`DecodeGraphs.check_capture_safety`), and CUDA runs it before capturing.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Under inference mode torch dispatches `item` and `is_nonzero` themselves, not `_local_scalar_dense`.
_HOST_READS = {
    aten._local_scalar_dense.default,
    aten.item.default,
    aten.is_nonzero.default,
    aten.equal.default,
}
_DATA_DEPENDENT_SHAPES = {
    aten.nonzero.default, aten.masked_select.default, aten._unique.default, aten._unique2.default,
    aten.unique_dim.default, aten.unique_consecutive.default, aten.repeat_interleave.Tensor,
}  # fmt: skip
_FROM_HOST = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
_COPIES = {aten._to_copy.default, aten.copy_.default}
_BOOLEAN_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default}


class CaptureSafetyError(RuntimeError):
    """An operation that a CUDA graph's replay cannot repeat, inside the region a graph captures."""


class forbid_host_work(TorchDispatchMode):  # noqa: N801  (used as a context manager, like torch's own modes)
    """Within `with forbid_host_work():`, raise `CaptureSafetyError` on host reads, syncs and host data."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = _why_unsafe(func, args, kwargs)
        if reason:
            raise CaptureSafetyError(f"{func}: {reason}, inside a region that a CUDA graph captures")
        return func(*args, **kwargs)


def _why_unsafe(func, args: tuple, kwargs: dict) -> str | None:
    if func in _HOST_READS:
        return "reads a device value on the host (a sync)"
    if func in _DATA_DEPENDENT_SHAPES:
        return "an output shape that depends on the data (a sync)"
    # A 0-d tensor is a Python number wrapped for an op (`x[i] = 1.0`): a kernel argument, not a copy.
    if func in _FROM_HOST and args[0].dim() > 0:
        return "a tensor made from host data"
    if func in _COPIES and _crosses_devices(func, args, kwargs):
        return "a copy between the host and the device"
    if func in _BOOLEAN_INDEXING and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
    ):
        return "boolean-mask indexing (an output shape that depends on the data)"
    return None


def _crosses_devices(func, args: tuple, kwargs: dict) -> bool:
    source = args[0].device
    if func == aten.copy_.default:
        return args[1].device.type != source.type
    target = kwargs.get("device")
    return target is not None and torch.device(target).type != source.type
