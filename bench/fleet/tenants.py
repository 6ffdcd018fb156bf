"""A multi-tenant chat workload: a few long system prompts, many users each, Poisson arrivals.

Each request is one tenant's system prompt (the same words every time, so its KV blocks can be reused)
followed by a user's own question; tenants are drawn uniformly. `kv_blocks` sizes a replica's KV cache
from the workload: room for every tenant's prefix, or for only a replica's share of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bench.workload import poisson_arrivals, prompt_text

# Chat-template tokens around the two messages and the words that tokenize to more than one token: the
# prompt is somewhat longer than its word count, and a KV budget must not come out short.
PROMPT_SLACK = 1.25


@dataclass(slots=True, frozen=True)
class TenantWorkloadConfig:
    """`num_tenants` system prompts of `system_len` words, `num_requests` questions of `question_len` words,
    each answered with exactly `output_len` tokens, arriving at `request_rate` per second (Poisson)."""

    num_tenants: int = 16
    system_len: int = 500
    question_len: int = 24
    output_len: int = 32
    num_requests: int = 96
    request_rate: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        assert self.num_tenants > 0 and self.num_requests > 0, "tenants and requests must be positive"
        assert min(self.system_len, self.question_len, self.output_len) > 0, "lengths must be positive"
        assert self.request_rate > 0, "request_rate must be positive (math.inf = all at once)"


@dataclass(slots=True, frozen=True)
class ChatSpec:
    """One request: when it is sent, whose system prompt it carries, its question, its output length."""

    index: int
    arrival_s: float
    tenant: int
    messages: tuple[dict[str, str], ...]
    output_len: int


def system_prompts(config: TenantWorkloadConfig) -> list[str]:
    """Each tenant's system prompt: its name, then `system_len` seeded words."""
    rng = np.random.default_rng(config.seed)
    return [
        f"You are tenant {t}'s assistant. " + prompt_text(rng, config.system_len)
        for t in range(config.num_tenants)
    ]


def tenant_workload(config: TenantWorkloadConfig) -> list[ChatSpec]:
    """The requests of `config`; the same config always gives the same requests."""
    systems = system_prompts(config)
    arrival_rng, tenant_rng, text_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(3)
    )
    arrivals = poisson_arrivals(arrival_rng, config.num_requests, config.request_rate)
    tenants = tenant_rng.integers(0, config.num_tenants, size=config.num_requests)
    return [
        ChatSpec(
            i,
            arrivals[i],
            int(tenant),
            (
                {"role": "system", "content": systems[tenant]},
                {"role": "user", "content": f"User {i} asks: " + prompt_text(text_rng, config.question_len)},
            ),
            config.output_len,
        )
        for i, tenant in enumerate(tenants)
    ]


def kv_blocks(config: TenantWorkloadConfig, block_size: int, cached_tenants: int, in_flight: int) -> int:
    """KV blocks for a replica that keeps `cached_tenants` system prompts cached while `in_flight` requests
    run (each holding its whole prompt and output)."""
    prefix = math.ceil(config.system_len * PROMPT_SLACK / block_size)
    request = math.ceil(
        ((config.system_len + config.question_len) * PROMPT_SLACK + config.output_len) / block_size
    )
    return cached_tenants * prefix + in_flight * request


def kv_budgets(
    config: TenantWorkloadConfig, block_size: int, num_replicas: int, in_flight: int
) -> dict[str, int]:
    """`room`: every tenant's prefix fits on each replica; `tight`: only a replica's share of the tenants
    does, so that together the replicas hold them all (the case a fleet exists for)."""
    return {
        "room": kv_blocks(config, block_size, config.num_tenants, in_flight),
        "tight": kv_blocks(config, block_size, math.ceil(config.num_tenants / num_replicas), in_flight),
    }
