"""A small GPT-like layer list, used by the demo, the benchmarks and the tests.

``gpt_layers(vocab_size, hidden, depth)`` is the shape every pipeline user meets first: a token
embedding tied to the output projection (the same weight at both ends of the pipeline), a stack
of identical blocks, and a final norm.
"""

from __future__ import annotations

import torch

from pipespec import Layer, LayerSpec, TiedLayerSpec

__all__ = ["FeedForwardBlock", "gpt_layers", "tied_unembed"]


class FeedForwardBlock(torch.nn.Module):
    """A residual MLP block: ``x + W2 relu(W1 x)`` with a 4x wide hidden layer."""

    def __init__(self, hidden: int, expansion: int = 4) -> None:
        super().__init__()
        self.up = torch.nn.Linear(hidden, expansion * hidden)
        self.down = torch.nn.Linear(expansion * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.down(torch.relu(self.up(x)))
        return out


def tied_unembed(embedding: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Logits from hidden states through the embedding's own weight (the LM head)."""
    weight = embedding.weight
    assert isinstance(weight, torch.Tensor)
    return hidden_states @ weight.t()


def gpt_layers(vocab_size: int = 256, hidden: int = 64, depth: int = 4) -> list[Layer]:
    """Tied embedding, ``depth`` blocks, LayerNorm, tied LM head: ``depth + 3`` layers."""
    return [
        TiedLayerSpec("embed", torch.nn.Embedding, vocab_size, hidden),
        *[LayerSpec(FeedForwardBlock, hidden) for _ in range(depth)],
        LayerSpec(torch.nn.LayerNorm, hidden),
        TiedLayerSpec("embed", torch.nn.Embedding, vocab_size, hidden, forward_fn=tied_unembed),
    ]
