"""Decode steps padded to batch-size buckets and, on CUDA, replayed from one CUDA graph per bucket.

An eager decode step of a model on a GPU is bound by launching its kernels from Python, not by the GPU:
a graph captured once per batch size replays every kernel of the step in one launch. A graph runs on
fixed tensors, so a step's inputs are copied into static buffers and its batch is padded up to the
nearest bucket. Padding rows run token 0 at position 0 against a block of their own (reserved from the
pool), so they write and read nothing of a real row's, and every operation of a decode step works row
by row: a real row's result does not depend on the padding, except for how a BLAS rounds a GEMM of another
row count (tests/test_decode_graphs.py, on the CPU, where the same buffers and padding run eagerly).

Before capturing, every bucket's step runs once under `capture_safety.forbid_host_work`, which fails on
what a replay cannot repeat (a host read, a tensor made from host data); the CPU tests run the same check
(tests/test_capture_safety.py).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.core.kv_cache import KVCache
from engine.execution.attention import DecodeAttention, StepContext
from engine.execution.capture_safety import forbid_host_work

# Small batches get a bucket each (a step of 3 runs as 4, not 8); larger ones every 8, as a step's cost
# grows slowly with its batch while each bucket costs a capture and its graph's memory.
_SMALL_BUCKETS = (1, 2, 4, 8)
_BUCKET_STEP = 8

ModelForward = Callable[[torch.Tensor, torch.Tensor, StepContext, torch.Tensor], torch.Tensor]


def decode_buckets(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes a decode step is padded to: 1, 2, 4, 8, then every 8, the last `max_batch_size`."""
    assert max_batch_size > 0
    buckets = [b for b in _SMALL_BUCKETS if b < max_batch_size]
    buckets += range(_SMALL_BUCKETS[-1] + _BUCKET_STEP, max_batch_size, _BUCKET_STEP)
    return (*buckets, max_batch_size)


@dataclass(slots=True)
class DecodeBatch:
    """A decode step's inputs on the host: one new token per row, `logit_rows` the rows to return."""

    token_ids: list[int]
    positions: list[int]
    slots: list[int]
    block_tables: list[list[int]]
    logit_rows: list[int]

    @property
    def size(self) -> int:
        return len(self.token_ids)


class DecodeGraphs:
    """Static decode buffers for batches up to `max(buckets)` and, with `capture`, a CUDA graph per bucket.

    Without `capture` (the CPU, tests) a step runs eagerly on the same buffers and padding, which is what
    a graph replays.
    """

    def __init__(
        self,
        forward: ModelForward,
        kv_cache: KVCache,
        decode_attention: DecodeAttention,
        buckets: tuple[int, ...],
        max_context_len: int,
        capture: bool,
    ) -> None:
        self.buckets = tuple(sorted(buckets))
        self.max_batch_size = self.buckets[-1]
        self._forward = forward
        self._kv_cache = kv_cache
        self._decode_attention = decode_attention
        block_size = kv_cache.block_size
        self._padding_block = kv_cache.allocator.reserve()
        self._max_blocks = -(-max_context_len // block_size)
        device = kv_cache.data.device
        size = self.max_batch_size
        self._token_ids = torch.zeros(size, dtype=torch.long, device=device)
        self._positions = torch.zeros(size, dtype=torch.long, device=device)
        self._slots = torch.zeros(size, dtype=torch.long, device=device)
        self._block_tables = torch.zeros(size, self._max_blocks, dtype=torch.long, device=device)
        self._context_lens = torch.zeros(size, dtype=torch.long, device=device)
        self._all_rows = torch.arange(size, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._load(DecodeBatch([], [], [], [], []), size)  # every row padding
        if capture:
            self._capture()

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def run(self, batch: DecodeBatch) -> torch.Tensor:
        """Logits [len(batch.logit_rows), vocab] of `batch` (at most `max_batch_size` rows)."""
        bucket = self.buckets[bisect.bisect_left(self.buckets, batch.size)]
        self._load(batch, bucket)
        if bucket in self._graphs:
            graph, logits = self._graphs[bucket]
            graph.replay()
        else:
            logits = self._run_bucket(bucket)
        rows = torch.tensor(batch.logit_rows, dtype=torch.long, device=logits.device)
        return logits.index_select(0, rows)  # a copy: the next replay overwrites the graph's output

    @torch.inference_mode()
    def check_capture_safety(self) -> None:
        """Run every bucket's step once under `forbid_host_work`: raises `CaptureSafetyError` where the step
        does what a graph's replay cannot repeat. The buffers hold padding: it writes only its own block."""
        for bucket in self.buckets:
            with forbid_host_work():
                self._run_bucket(bucket)

    def _load(self, batch: DecodeBatch, bucket: int) -> None:
        """Copy `batch` into rows [0, size) of the buffers and padding into rows [size, bucket)."""
        padding = bucket - batch.size
        bs = self._kv_cache.block_size
        # Only the columns this step's tables use: a kernel reads a row's first ceil(context / block size)
        # entries, so what lies further right (left from earlier steps) is never read.
        width = min(max((len(table) for table in batch.block_tables), default=1), self._max_blocks)
        tables = torch.full((bucket, width), self._padding_block, dtype=torch.long)
        for row, table in enumerate(batch.block_tables):
            tables[row, : len(table)] = torch.tensor(table[:width])
        columns = torch.tensor([
            batch.token_ids + [0] * padding,
            batch.positions + [0] * padding,
            batch.slots + [self._padding_block * bs] * padding,
            [p + 1 for p in batch.positions] + [1] * padding,
        ])  # fmt: skip
        for buffer, values in zip(
            (self._token_ids, self._positions, self._slots, self._context_lens), columns, strict=True
        ):
            buffer[:bucket].copy_(values)
        self._block_tables[:bucket, :width].copy_(tables)

    def _run_bucket(self, bucket: int) -> torch.Tensor:
        """The model's forward on the first `bucket` rows of the buffers: logits of every row."""
        ctx = StepContext(
            self._kv_cache,
            self._slots[:bucket],
            is_prefill=False,
            block_tables=self._block_tables[:bucket],
            context_lens=self._context_lens[:bucket],
            decode_attention=self._decode_attention,
        )
        return self._forward(self._token_ids[:bucket], self._positions[:bucket], ctx, self._all_rows[:bucket])

    def _capture(self) -> None:
        """One graph per bucket, largest first, all in one memory pool (their steps never overlap)."""
        self.check_capture_safety()
        pool = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.buckets):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: Triton compiles, libraries pick their kernels
                for _ in range(2):
                    self._run_bucket(bucket)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._run_bucket(bucket)
            self._graphs[bucket] = (graph, logits)
        torch.cuda.synchronize()
