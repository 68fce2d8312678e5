"""The bytes autograd saves for each layer alone, per micro-batch: additive per-layer sizes.

A partition search needs one number per layer that adds up over a stage. Each layer here
runs on meta under the counting hooks of ``activations.py`` with a fresh input, as if it began
a stage (a received input: a new leaf that requires grad when the sending side's output did),
and its saves are counted. Summed over a stage this is never less than what
``stage_activations`` counts for the same stage: the only difference is a tensor that two
neighbouring layers both save (an output the next layer saves as its input), counted once
within a stage and here once per layer. So a partition whose per-layer sums fit really fits,
up to that double count, which errs on the safe side.

With activation checkpointing a stage keeps only the inputs of its chunks, and which layers
begin a chunk depends on where the stage begins: that is not additive. Each checkpointable
layer is then counted as a chunk of its own (what it keeps is its input), and the caller
checks the partition with the exact per-stage count (``memory_limits.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.utils.checkpoint

from pipemodule._layout.activations import (
    SavedTensorCounter,
    chunk_runner,
    is_checkpointed_chunk,
)
from pipemodule._layout.shapes import (
    describe_values,
    meta_layer,
    meta_like,
    meta_tensors_only,
)

if TYPE_CHECKING:
    from pipemodule._layout.layout import PipelineLayout

__all__ = ["layer_saved_bytes"]


def layer_saved_bytes(
    layout: PipelineLayout,
    sample: Any,
    *,
    activation_checkpoint_interval: int = 0,
    checkpointable_layers: Sequence[str] | None = None,
) -> tuple[int, ...]:
    """Per layer of ``layout``, the bytes it saves for backward per micro-batch, run alone.

    ``sample`` is one micro-batch's input to the first layer (meta or real; values are never
    read). Only ``layout.layers`` is used, not its partition.

    Raises:
        RuntimeError: a layer fails on the meta device.
    """
    checkpointing = activation_checkpoint_interval > 0
    x: Any = meta_like(sample, requires_grad=False)
    tied: dict[str, torch.nn.Module] = {}
    found: list[int] = []
    with meta_tensors_only():
        for index in range(layout.num_layers):
            layer = meta_layer(layout, index, tied)
            counter = SavedTensorCounter(layer.state)
            with counter.hooks():
                try:
                    if checkpointing and is_checkpointed_chunk([layer], checkpointable_layers):
                        args = x if isinstance(x, tuple) else (x,)
                        out = torch.utils.checkpoint.checkpoint(
                            chunk_runner([layer]), *args, use_reentrant=False
                        )
                    else:
                        out = layer.call(x)
                except Exception as error:
                    raise RuntimeError(
                        f"layer {index} failed on the meta device for input "
                        f"{describe_values(x)}: {error}; a forward must run on any device "
                        f"(create tensors with device=x.device)"
                    ) from error
            found.append(counter.total_live_bytes)  # counted while `out` keeps its graph
            x = meta_like(out)  # as a receive makes them: fresh leaves
            del out
    return tuple(found)
