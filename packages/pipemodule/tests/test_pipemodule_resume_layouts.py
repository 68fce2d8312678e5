"""A full-state checkpoint written with virtual stages resumes on a plain layout, and back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812

from pipemodule import PipeDataParallelTopology, PipelineModule, PipelineTrainer
from pipemodule.examples import gpt_layers
from pipetopo.testing import spawn_ranks

VOCAB, HIDDEN, DEPTH, BATCH, SEQ, STEPS = 16, 8, 4, 8, 4, 4


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def _run(pipe: int, per_rank: int, root: str, load: bool, steps: list[int]) -> dict[str, Any]:
    torch.manual_seed(0 if not load else 5)
    module = PipelineModule(
        gpt_layers(VOCAB, HIDDEN, DEPTH),
        topology=PipeDataParallelTopology(num_pp=pipe, num_dp=dist.get_world_size() // pipe),
        loss_fn=_loss,
        device="cpu",
        stages_per_rank=per_rank,
        stage_placement="v" if per_rank == 2 and pipe == 2 else "loop",
    )
    schedule = "1f1b" if per_rank == 1 else "ZBVZeroBubble"
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.05)
    trainer = PipelineTrainer(
        module, optimizer, n_microbatches=4, schedule=schedule, max_grad_norm=0.5
    )
    if load:
        trainer.load_checkpoint(root)
    replicas, replica = module.grid.axis_size("data"), module.grid.axis_rank("data")
    tokens = torch.randint(
        0, VOCAB, (STEPS, BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3)
    )
    share = BATCH // replicas
    losses = []
    for step in steps:
        mine = tokens[step, replica * share : (replica + 1) * share]
        losses.append(trainer.train_step(mine[:, :-1], mine[:, 1:]))
    trainer.save_checkpoint(root)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {"losses": losses, "state": state, "replica": replica}


def _merged(results: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {k: v for r in results if r["replica"] == 0 for k, v in r["state"].items()}


def test_virtual_stages_resume_on_a_plain_layout_and_back(tmp_path: Path) -> None:
    reference = spawn_ranks(_run, 4, 4, 1, str(tmp_path / "ref"), False, [0, 1, 2, 3])
    root = str(tmp_path / "run")
    spawn_ranks(_run, 2, 2, 2, root, False, [0, 1])  # 2 ranks x 2 stages, 'v', ZBV
    plain = spawn_ranks(_run, 4, 4, 1, root, True, [2])  # pipe 4, 1F1B
    virtual = spawn_ranks(_run, 4, 2, 2, root, True, [3])  # pipe 2 x data 2, 2 stages, 'v'
    torch.testing.assert_close(plain[0]["losses"], reference[0]["losses"][2:3])
    torch.testing.assert_close(virtual[0]["losses"], reference[0]["losses"][3:])
    expected, resumed = _merged(reference), _merged(virtual)
    assert resumed.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6, msg=name)
