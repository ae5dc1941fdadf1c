"""Evaluation: the reference speculative decoder, acceptance metrics, plots, the vLLM runner."""

from speculators_core.evaluate.reference import (
    DecodeStats,
    GenerationResult,
    ReferenceDecoder,
    accept_greedy,
    accept_sampled,
)

__all__ = ["DecodeStats", "GenerationResult", "ReferenceDecoder", "accept_greedy", "accept_sampled"]
