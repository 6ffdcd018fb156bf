"""Weights made once from a checkpoint (q4_1 blocks in the kernels' layout, FBGEMM's float16 layout of the
prefill weights), kept in a file under the textgen cache and mapped into memory at the next start instead of
made again: a start then reads no float32 weight of the layers it serves from the cache, and the mapped
pages come in as a step first touches them.

A file is named for everything its entries depend on (`cache_path`): the checkpoint's files (path, size,
modification time) and what the entries are and how they were made (a version string naming the layout
and, where it matters, the CPU's block width and torch's version). An entry is used only with the dtype and
shape expected of it; a file that cannot be read (truncated, garbled) is ignored, its entries made again
and the file written anew.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine.execution.paths import cache_dir

log = logging.getLogger(__name__)


def cache_path(checkpoint: Path, folder: str, version: str) -> Path:
    """The cache file under `<textgen cache>/folder` for the checkpoint in the directory `checkpoint`,
    named for its files' paths, sizes and modification times and for `version`: a changed checkpoint or
    layout gets a new file instead of stale entries."""
    identity = [version, str(checkpoint.resolve())]
    for file in sorted(checkpoint.iterdir()):
        if file.is_file():
            stat = file.stat()
            identity.append(f"{file.name} {stat.st_size} {stat.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:16]
    return cache_dir() / folder / f"{checkpoint.name}-{digest}.safetensors"


def parameter_names(model: torch.nn.Module) -> dict[int, str]:
    """A model's parameter names by their tensors' data pointers (a tied head answers to its embedding's)."""
    return {param.data_ptr(): name for name, param in model.named_parameters()}


def weight_key(names: dict[int, str], parts: list[torch.Tensor], suffix: str) -> str | None:
    """A cache entry's name for the layer made of `parts` (weights stacked into one matrix), None when one
    of them is not a named parameter (nothing to key it by: it is made, not cached)."""
    found = [names.get(part.data_ptr()) for part in parts]
    return None if None in found else "+".join(map(str, found)) + f".{suffix}"


class WeightCache:
    """The entries of one cache file (none for `path` None): `get` returns a stored entry or makes it, and
    `save` writes the file when something was made."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stored = _read(path)
        self._made: dict[str, torch.Tensor] = {}
        self.num_stored = 0

    def get(
        self, key: str | None, dtype: torch.dtype, shape: tuple[int, ...], make: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """The entry `key` if the file holds it with this dtype and shape, else `make()` (kept for `save`)."""
        stored = self._stored.get(key) if key is not None else None
        if stored is not None and stored.dtype == dtype and tuple(stored.shape) == shape:
            self.num_stored += 1
            return stored
        made = make()
        assert made.dtype == dtype and tuple(made.shape) == shape, f"{key}: made {made.dtype} {made.shape}"
        if key is not None and self.path is not None:
            self._made[key] = made
        return made

    def save(self) -> None:
        """Write the file with every entry it held and every one made here, if any was made (atomically:
        a concurrent reader maps the old file or the new one, never half of one)."""
        if self.path is None:
            return
        log.info("%s: %d weights from the cache, %d made", self.path, self.num_stored, len(self._made))
        if not self._made:
            return
        staging = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save_file({**self._stored, **self._made}, staging)
            staging.rename(self.path)
        except OSError as exc:  # a read-only or full cache: this start serves, the next makes them again
            with contextlib.suppress(OSError):
                staging.unlink(missing_ok=True)
            log.warning("could not cache weights in %s (%s): the next start makes them again", self.path, exc)
            return
        self._stored, self._made = {**self._stored, **self._made}, {}
        log.info("weights cached in %s", self.path)


def _read(path: Path | None) -> dict[str, torch.Tensor]:
    """The file's entries, mapped (not read: pages come in when used); none if it is missing or unreadable."""
    if path is None or not path.exists():
        return {}
    try:
        with safe_open(path, framework="pt") as file:
            names = file.keys()  # a safetensors file object is not iterable
            return {name: file.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as exc:
        log.warning("ignoring the unreadable weight cache %s (%s): its weights are made again", path, exc)
        return {}
