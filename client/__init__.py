"""Python client for textgen.v1: `TextGenClient`, `AsyncTextGenClient`, typed results, and a CLI."""

from client.aio import AsyncTextGenClient
from client.channel import replica_options, tls_credentials
from client.params import GenerateParams
from client.results import (
    Completion,
    FinishReason,
    GenerationResult,
    ModelInfo,
    StreamChunk,
    Timing,
    Token,
    TokenizeResult,
    TopLogprob,
    Usage,
)
from client.retry import RetryPolicy
from client.sync import TextGenClient

__all__ = [
    "AsyncTextGenClient",
    "Completion",
    "FinishReason",
    "GenerateParams",
    "GenerationResult",
    "ModelInfo",
    "RetryPolicy",
    "StreamChunk",
    "TextGenClient",
    "Timing",
    "Token",
    "TokenizeResult",
    "TopLogprob",
    "Usage",
    "replica_options",
    "tls_credentials",
]
