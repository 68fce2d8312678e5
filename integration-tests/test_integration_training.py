"""The README's main job, tools/demo.py, under torchrun: training, checkpoint, reload re-split."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DEMO = Path(__file__).resolve().parents[1] / "tools" / "demo.py"
SMALL = ["--sentences", "400", "--hidden", "32", "--depth", "2", "--batch-size", "16"]


def _demo(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(DEMO), *SMALL, *args, "--timeout", str(timeout - 20)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def test_demo_trains_saves_and_reloads_with_another_stage_count(tmp_path: Path) -> None:
    result = _demo("--steps", "60", "--log-every", "30", "--checkpoint-dir", str(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "partition over 4 stages" in output
    assert "reloaded with 2 stages x 2 data-parallel replicas" in output
    assert output.count("[PASS]") == 3, output
    assert "[FAIL]" not in output
    # One file per layer, the tied embedding once: 2 blocks + 4 other layers - 1 tied copy.
    assert len(list(tmp_path.glob("layer_*-model_states.pt"))) == 5


def test_demo_exits_non_zero_when_a_check_fails() -> None:
    # One step cannot bring the loss down to 75 % of its start: that check must fail the run.
    result = _demo("--steps", "1", "--stages", "2", "--reload-stages", "4")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "[FAIL] the loss falls" in output
    assert "[PASS] the checkpoint reloads with 4 stages" in output


@pytest.mark.parametrize("flag", ["--stages", "--reload-stages"])
def test_demo_refuses_a_stage_count_that_does_not_divide_the_ranks(flag: str) -> None:
    result = _demo(flag, "3", "--steps", "1", timeout=120)
    assert result.returncode != 0
    assert f"{flag} 3 does not divide the 4 ranks" in result.stdout + result.stderr


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs for NCCL")
def test_demo_on_gpus_with_nccl(tmp_path: Path) -> None:
    gpus = min(torch.cuda.device_count(), 4)
    result = _demo(
        "--device", "cuda", "--nproc", str(gpus), "--stages", str(gpus), "--steps", "60",
        "--log-every", "30", "--checkpoint-dir", str(tmp_path),
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("[PASS]") == 3, output
