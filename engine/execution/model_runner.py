"""Runs one engine step (prefill or decode) through a loaded causal LM with paged attention.

Any decoder-only model that transformers implements with its attention interface works: the runner
packs every sequence of a step into one row of tokens with explicit position ids, and the model's
attention is `engine.execution.attention.paged_attention`, which reads and writes the paged KV cache. Loading
(device, dtype, checkpoint, weight format, KV-cache size) is `engine.execution.loader`'s.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch

from engine.core.kv_cache import check_block_size
from engine.core.step import PositionLogprobs, Step, StepOutput, StepRow
from engine.core.structured import GRAMMAR_STEP_BUDGET_MS
from engine.execution import loader
from engine.execution.attention import PrefillSegment, StepContext, resolve_decode_backend
from engine.execution.decode_graphs import DecodeBatch, DecodeGraphs, decode_buckets
from engine.execution.models import build_forward
from engine.execution.models.llama import LlamaModel
from engine.execution.sampler import prompt_logprobs
from engine.execution.step_sampler import IDLE_MASK_WAIT_S, StepSampler

# A prefill step's tokens go through the model in forward passes of at most this many tokens on the
# CPU, so that each pass's activations stay in the caches (README, "CPU dtype, weights and attention").
CPU_PREFILL_CHUNK_TOKENS = 512

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _PackedStep:
    """A step's sequences packed into one row of tokens, ready for the model."""

    token_ids: list[int]
    positions: list[int]
    slots: list[int]  # where each token's key and value go
    logit_rows: list[int]  # the rows whose logits the step returns
    segments: list[PrefillSegment]  # prefill only


class ModelRunner:
    """Owns the loaded model, the tokenizer and the KV cache; runs prefill and decode steps."""

    def __init__(
        self,
        model: str | loader.LoadedModel | None,
        device: str = "auto",
        dtype: str = "auto",
        num_kv_blocks: int = 0,
        block_size: int = 16,
        attention_backend: str = "auto",
        weight_format: str = "auto",
        prefill_chunk_tokens: int = -1,
        model_impl: str = "auto",
        grammar_step_budget_ms: float = GRAMMAR_STEP_BUDGET_MS,
    ) -> None:
        preloaded = isinstance(model, loader.LoadedModel)  # keeps its own device, dtype and weights
        resolved_device = model.device if preloaded else loader.resolve_device(device)
        resolved_dtype = model.dtype if preloaded else loader.resolve_dtype(dtype, resolved_device)
        # Before loading, so that a block size or backend that cannot run here fails fast.
        check_block_size(block_size)
        self.attention_backend, self._decode_attention = resolve_decode_backend(
            attention_backend, resolved_device, resolved_dtype
        )
        loaded = (
            model
            if preloaded
            else loader.load(model, resolved_device, resolved_dtype, weight_format, model_impl)
        )
        self.model, self.tokenizer, self.name = loaded.model, loaded.tokenizer, loaded.name
        self.device, self.dtype, self.weight_format = loaded.device, loaded.dtype, loaded.weight_format
        self.max_context_len, self.vocab_size = loaded.max_context_len, loaded.vocab_size
        self.model_impl, self._model_forward = build_forward(
            loaded.model, model_impl, loaded.weight_format, loaded.gguf_path, loaded.checkpoint
        )
        self.kv_cache = loader.allocate_kv_cache(loaded, num_kv_blocks, block_size)
        self.block_size = block_size
        if prefill_chunk_tokens < 0:
            prefill_chunk_tokens = CPU_PREFILL_CHUNK_TOKENS if self.device.type == "cpu" else 0
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self._decode_graphs: DecodeGraphs | None = None
        self.sampler = StepSampler(self.vocab_size, self.device, grammar_step_budget_ms)

    def close(self) -> None:
        """Stop the grammar worker threads (the engine's loop has stopped)."""
        self.sampler.close()

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps replay CUDA graphs."""
        return self._decode_graphs is not None and self._decode_graphs.captured

    @property
    def decode_graphs(self) -> DecodeGraphs | None:
        """The static decode buffers (and graphs), once `pad_decode_batches` or a capture made them."""
        return self._decode_graphs

    @torch.inference_mode()
    def capture_decode_graphs(self, max_batch_size: int, max_context_len: int) -> bool:
        """On CUDA, capture a CUDA graph of the decode step per batch-size bucket; whether it did.

        Only the lean model code is captured, and only with a decode backend that reads just the blocks
        a sequence holds (triton): the torch backend gathers every row's table, as wide as the longest
        context the graph may meet.
        """
        if self.device.type != "cuda":
            return False
        if self.model_impl != "lean" or self.attention_backend != "triton":
            log.info("decode runs eagerly: CUDA graphs need the lean model code and the triton backend")
            return False
        self.pad_decode_batches(max_batch_size, max_context_len, capture=True)
        return True

    @torch.inference_mode()
    def pad_decode_batches(self, max_batch_size: int, max_context_len: int, capture: bool = False) -> None:
        """Run decode steps of up to `max_batch_size` rows padded to batch-size buckets on static buffers,
        replayed from CUDA graphs with `capture` (else eagerly, as on the CPU). Lean model code only."""
        assert isinstance(self._model_forward, LlamaModel), "padded decode runs the lean model code"
        self._model_forward.complete_rope(max_context_len)
        self._decode_graphs = DecodeGraphs(
            self._model_forward, self.kv_cache, self._decode_attention, decode_buckets(max_batch_size),
            max_context_len, capture,
        )  # fmt: skip

    @property
    def allocator(self):
        return self.kv_cache.allocator

    @torch.inference_mode()
    def execute(self, step: Step) -> StepOutput:
        """Run `step` and sample the next token of every row that asks for one (`StepSampler`)."""
        sampler = self.sampler
        sampler.forget(step.finished_seq_ids, step.preempted_seq_ids)
        if not step.rows:  # every running sequence waits for its grammar's mask
            return sampler.settle(StepOutput([], []), wait_s=IDLE_MASK_WAIT_S)
        rows = step.sampled_rows
        masks = sampler.start_masks(rows)  # grammar work runs beside the forward pass
        started = time.perf_counter()
        logits = self.run(step.rows, step.is_prefill)
        forward_s = time.perf_counter() - started
        scored: dict[int, list[PositionLogprobs]] = {}
        if step.is_prefill and any(row.scores_prompt for row in step.rows):  # never a decode row
            logits, scored = _score_prompts(step, logits)
        return sampler.pick(rows, logits, masks, forward_s, StepOutput([], [], prompt_logprobs=scored))

    @torch.inference_mode()
    def run(self, inputs: list[StepRow], is_prefill: bool) -> torch.Tensor:
        """Run one step; return logits [rows, vocab] for the inputs that need them, in order.

        A prefill step larger than `prefill_chunk_tokens` runs as several forward passes over whole
        sequences, so a sequence computes what it would in one pass; only a sequence longer than the
        budget is cut, into pieces that continue from the cache as chunked prefill does.
        """
        budget = self.prefill_chunk_tokens
        if not is_prefill or budget <= 0 or sum(len(item.token_ids) for item in inputs) <= budget:
            return self._forward(inputs, is_prefill)
        outputs = [self._forward(part, True) for part in split_prefill(inputs, budget)]
        return torch.cat(outputs, dim=0)

    def _forward(self, inputs: list[StepRow], is_prefill: bool) -> torch.Tensor:
        """One forward pass over `inputs` packed into one row; logits of the rows that need them."""
        graphs = self._decode_graphs
        if not is_prefill and graphs is not None and len(inputs) <= graphs.max_batch_size:
            return graphs.run(self._decode_batch(inputs))
        device = self.device
        packed = self._pack(inputs, is_prefill)
        slot_mapping = torch.tensor(packed.slots, device=device)
        ctx = StepContext(self.kv_cache, slot_mapping, is_prefill, segments=packed.segments)
        if not is_prefill:
            ctx.block_tables, ctx.context_lens = self._decode_tables(inputs)
            ctx.decode_attention = self._decode_attention
        return self._model_forward(
            torch.tensor(packed.token_ids, device=device),
            torch.tensor(packed.positions, device=device),
            ctx,
            torch.tensor(packed.logit_rows, dtype=torch.long, device=device),
        )

    def _pack(self, inputs: list[StepRow], is_prefill: bool) -> _PackedStep:
        """Token ids, positions and cache slots of every input, one after the other."""
        bs = self.block_size
        packed = _PackedStep([], [], [], [], [])
        for item in inputs:
            n = len(item.token_ids)
            start = len(packed.token_ids)
            num_context = item.start_pos + n
            table = item.block_table
            packed.token_ids.extend(item.token_ids)
            packed.positions.extend(range(item.start_pos, num_context))
            packed.slots.extend(table[p // bs] * bs + p % bs for p in range(item.start_pos, num_context))
            if is_prefill:
                context_slots = None  # a sequence's first chunk: its keys are its new tokens
                if item.start_pos:
                    context = [table[p // bs] * bs + p % bs for p in range(num_context)]
                    context_slots = torch.tensor(context, device=self.device)
                packed.segments.append(PrefillSegment(start, start + n, num_context, context_slots))
            if item.scores_prompt:
                packed.logit_rows.extend(range(start, start + n))
            elif item.sample:
                packed.logit_rows.append(start + n - 1)
        return packed

    def _decode_batch(self, inputs: list[StepRow]) -> DecodeBatch:
        bs = self.block_size
        return DecodeBatch(
            token_ids=[item.token_ids[0] for item in inputs],
            positions=[item.start_pos for item in inputs],
            slots=[item.block_table[item.start_pos // bs] * bs + item.start_pos % bs for item in inputs],
            block_tables=[item.block_table for item in inputs],
            logit_rows=[i for i, item in enumerate(inputs) if item.sample],
        )

    def _decode_tables(self, inputs: list[StepRow]) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables padded to the longest, and the context lengths (the new token included)."""
        bs = self.block_size
        context_lens = [item.start_pos + 1 for item in inputs]
        width = -(-max(context_lens) // bs)
        tables = torch.zeros(len(inputs), width, dtype=torch.long)
        for i, item in enumerate(inputs):
            used = item.block_table[:width]
            tables[i, : len(used)] = torch.tensor(used)
        return tables.to(self.device), torch.tensor(context_lens, device=self.device)


def split_prefill(inputs: list[StepRow], budget: int) -> list[list[StepRow]]:
    """Group prefill inputs, in order, into passes of at most `budget` tokens.

    Whole sequences are packed while they fit; a sequence longer than `budget` gets passes of its
    own, cut into pieces whose later parts start where the earlier left off (only its last piece asks
    for logits).
    """
    parts: list[list[StepRow]] = []
    current: list[StepRow] = []
    used = 0
    for item in inputs:
        n = len(item.token_ids)
        if n > budget:
            if current:
                parts.append(current)
                current, used = [], 0
            for offset in range(0, n, budget):
                piece = item.token_ids[offset : offset + budget]
                last = offset + budget >= n
                start = item.start_pos + offset
                parts.append([replace(item, token_ids=piece, start_pos=start, sample=item.sample and last)])
            continue
        if used + n > budget:
            parts.append(current)
            current, used = [], 0
        current.append(item)
        used += n
    if current:
        parts.append(current)
    return parts


def _score_prompts(
    step: Step, logits: torch.Tensor
) -> tuple[torch.Tensor, dict[int, list[PositionLogprobs]]]:
    """Split the logits of a step with prompt-scoring rows (a row of logits per token of theirs) into the
    sampling rows' logits and each scoring row's prompt positions.

    Position p's logits score prompt token p + 1; a chunk's last position scores the first token of the
    next chunk (known: the whole prompt is in `history`), and the prompt's last position only samples.
    """
    sample_rows: list[int] = []
    scored: dict[int, list[PositionLogprobs]] = {}
    offset = 0
    for row in step.rows:
        if not row.scores_prompt:
            if row.sample:
                sample_rows.append(offset)
                offset += 1
            continue
        n, start = row.num_tokens, row.start_pos
        num_scored = min(n, row.num_prompt_tokens - 1 - start)
        if num_scored > 0:
            targets = row.history[start + 1 : start + 1 + num_scored]
            values = prompt_logprobs(logits[offset : offset + num_scored], targets, row.sampling.top_logprobs)
            scored[row.seq_id] = [
                PositionLogprobs(token_id, logprob, top)
                for token_id, (logprob, top) in zip(targets, values, strict=True)
            ]
        if row.sample:
            sample_rows.append(offset + n - 1)
        offset += n
    assert offset == logits.shape[0]
    return logits[torch.tensor(sample_rows, dtype=torch.long, device=logits.device)], scored
