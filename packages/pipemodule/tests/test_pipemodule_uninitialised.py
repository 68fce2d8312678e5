"""Without torch.distributed, construction says what to do instead of failing obscurely."""

import pytest
import torch
import torch.distributed as dist

from pipemodule import LayerSpec, PipelineModule


def test_requires_init_process_group() -> None:
    if dist.is_initialized():
        pytest.skip("another test in this process left a process group initialised")
    with pytest.raises(RuntimeError, match="init_process_group"):
        PipelineModule([LayerSpec(torch.nn.Linear, 2, 2)], num_stages=1, device="cpu")
