"""pipestack demo: train a character-level GPT as a pipeline, checkpoint it, reload it re-split.

    python tools/demo.py                      # launches torchrun: 4 CPU ranks (gloo)
    python tools/demo.py --device cuda        # one rank per GPU (NCCL)
    torchrun --nproc-per-node 4 tools/demo.py # or launch it yourself (multi-node works too)

The model is a small GPT (token embedding tied to the LM head, learned positions, causal
self-attention blocks) written as a list of layer specs. The script partitions it over the
pipeline stages, trains it with a 1F1B schedule on text it generates itself, saves a per-layer
checkpoint, rebuilds the model with a different number of stages, loads the checkpoint and
checks that the held-out loss is unchanged. It ends with a summary of its checks and exits
non-zero if one failed.

    python tools/demo.py --checkpoint-every 20 --fail-at-step 30   # survive a killed rank

With --checkpoint-every N it saves the full training state every N steps and, at start, resumes
from the latest one. With --fail-at-step K the last rank kills itself (SIGKILL) in the middle of
step K, in the first attempt only; torchrun (--max-restarts) restarts every worker, training
resumes from the last checkpoint, and the demo reports the faults, the steps lost, the time to
recover and the final loss, which equals that of the same command without --fail-at-step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812
from torch.distributed.pipelining import ScheduleGPipe

from pipemodule import (
    LayerSpec,
    PipelineModule,
    PipelineTrainer,
    TiedLayerSpec,
    count_parameters,
    latest_checkpoint,
    pipeline_stage,
)
from pipemodule.examples import tied_unembed
from pipespec import Layer
from pipetopo.testing import run_torchrun

# -- the data: sentences from a small grammar, so the demo needs no download -------------------

_SUBJECTS = ["the cat", "a dog", "the old sailor", "my neighbour", "the small robot", "a fox"]
_VERBS = ["sees", "follows", "paints", "likes", "finds", "carries"]
_OBJECTS = ["the moon", "a red kite", "the river", "an apple", "the lighthouse", "a map"]
_ENDINGS = [".", " at noon.", " by the sea.", " again.", " in the rain."]


def generate_text(num_sentences: int, seed: int = 0) -> str:
    """Deterministic English-like text: the same on every rank and every run."""
    rng = random.Random(seed)
    sentences = [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)}"
        for _ in range(num_sentences)
    ]
    return " ".join(sentences)


@dataclass(frozen=True)
class CharData:
    """Text encoded as character ids, split into a training and a held-out part."""

    alphabet: str
    train: torch.Tensor
    heldout: torch.Tensor

    @classmethod
    def from_text(cls, text: str) -> CharData:
        alphabet = "".join(sorted(set(text)))
        ids = torch.tensor([alphabet.index(c) for c in text], dtype=torch.long)
        cut = int(0.9 * len(ids))
        return cls(alphabet, ids[:cut], ids[cut:])

    def batch(
        self, split: torch.Tensor, size: int, seq_len: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` windows of ``seq_len`` characters and their next characters."""
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(split) - seq_len - 1, (size,), generator=generator)
        windows = torch.stack([split[s : s + seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]


# -- the model, as layer specs --------------------------------------------------------------------


class TokenEmbedding(torch.nn.Embedding):
    """An embedding initialised small, as GPT-2 does, since it also serves as the LM head."""

    def reset_parameters(self) -> None:
        torch.nn.init.normal_(self.weight, std=0.02)


class AddPositions(torch.nn.Module):
    """Adds a learned embedding of each position to the token embeddings."""

    def __init__(self, seq_len: int, hidden: int) -> None:
        super().__init__()
        self.positions = torch.nn.Parameter(torch.randn(seq_len, hidden) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.positions[: x.shape[1]]


class CausalBlock(torch.nn.Module):
    """A pre-norm transformer block: causal self-attention, then an MLP, both residual."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm = torch.nn.LayerNorm(hidden)
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.proj = torch.nn.Linear(hidden, hidden)
        self.mlp_norm = torch.nn.LayerNorm(hidden)
        self.up = torch.nn.Linear(hidden, 4 * hidden)
        self.down = torch.nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(hidden, dim=-1)
        q, k, v = (t.view(batch, seq, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, seq, hidden))
        out: torch.Tensor = x + self.down(F.gelu(self.up(self.mlp_norm(x))))
        return out


def char_gpt_layers(vocab: int, seq_len: int, hidden: int, depth: int, heads: int) -> list[Layer]:
    """The model as DeepSpeed users write it: the embedding and the LM head share one weight."""
    return [
        TiedLayerSpec("embed", TokenEmbedding, vocab, hidden),
        LayerSpec(AddPositions, seq_len, hidden),
        *[LayerSpec(CausalBlock, hidden, heads) for _ in range(depth)],
        LayerSpec(torch.nn.LayerNorm, hidden),
        TiedLayerSpec("embed", TokenEmbedding, vocab, hidden, forward_fn=tied_unembed),
    ]


def next_char_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# -- the job that runs on every rank --------------------------------------------------------------


class Report:
    """Prints on rank 0 only and collects the outcome of each check."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.checks: list[tuple[str, bool, str]] = []

    def say(self, text: str = "") -> None:
        if self.rank == 0:
            print(text, flush=True)

    def check(self, name: str, passed: bool, detail: str) -> None:
        self.checks.append((name, passed, detail))

    def summary(self) -> bool:
        self.say("\nsummary")
        for name, passed, detail in self.checks:
            self.say(f"  [{'PASS' if passed else 'FAIL'}] {name}: {detail}")
        return all(passed for _, passed, _ in self.checks)


def _progress(step: int, total: int, width: int = 24) -> str:
    done = round(width * step / total)
    return "[" + "#" * done + "." * (width - done) + "]"


def _shared_directory(requested: str | None) -> str:
    """A checkpoint directory every rank agrees on (rank 0 picks it when none is given)."""
    choice = [requested]
    if requested is None and dist.get_rank() == 0:
        choice = [tempfile.mkdtemp(prefix="pipestack-demo-")]
    dist.broadcast_object_list(choice, src=0)
    assert choice[0] is not None
    return choice[0]


def _replica_share(
    batch: tuple[torch.Tensor, torch.Tensor], module: PipelineModule, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """This data-parallel replica's equal share of a global batch."""
    grid = module.mpu()
    share = batch[0].shape[0] // grid.get_data_parallel_world_size()
    mine = slice(grid.get_data_parallel_id() * share, (grid.get_data_parallel_id() + 1) * share)
    return batch[0][mine].to(device), batch[1][mine].to(device)


def _tied_copies_identical(module: PipelineModule) -> bool:
    """Whether every tied tensor equals its copy on the lowest stage holding it (collective)."""
    identical = torch.ones((), device=module.device)
    for weight, group in module.get_tied_weights_and_groups():
        reference = weight.detach().clone()
        dist.broadcast(reference, src=min(dist.get_process_group_ranks(group)), group=group)
        if not torch.equal(reference, weight.detach()):
            identical.zero_()
    dist.all_reduce(identical, op=dist.ReduceOp.MIN)
    return bool(identical.item())


def _generate(
    module: PipelineModule, data: CharData, prompt: str, length: int, seq_len: int
) -> str:
    """Greedy continuation of ``prompt``: one pass through the pipeline per character.

    Collective over the pipe group: the last stage picks the next character and broadcasts it
    to the other stages, which feed the growing text back in. Each data-parallel replica
    generates the same text.
    """
    grid = module.mpu()
    schedule = ScheduleGPipe(pipeline_stage(module), n_microbatches=1)
    ids = [data.alphabet.index(c) for c in prompt]
    pad = data.alphabet.index(" ")
    last_stage = grid.stage_to_global(module.num_stages - 1)
    for _ in range(length):
        window = torch.tensor([([pad] * seq_len + ids)[-seq_len:]], device=module.device)
        with torch.no_grad():
            logits = schedule.eval(window) if grid.is_first_stage else schedule.eval()
        next_id = torch.zeros((), dtype=torch.long, device=module.device)
        if grid.is_last_stage:
            next_id.fill_(int(logits[0, -1].argmax()))
        dist.broadcast(next_id, src=last_stage, group=grid.get_pipe_parallel_group())
        ids.append(int(next_id))
    return "".join(data.alphabet[i] for i in ids)


# -- surviving a killed rank: checkpoints, resume, fault injection --------------------------------

_KEEP_CHECKPOINTS = 2
# Makes torchrun give each round of workers a fresh store, so restarts work.
_UNSHARED_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def _attempt() -> int:
    """Which start of the workers this is: 0, then 1 after torchrun's first restart, and so on."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _fault_record(root: Path, attempt: int) -> Path:
    """Where the rank that kills itself in ``attempt`` notes when and where it did."""
    run = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return root / f"fault-{run}-attempt_{attempt}.json"


def _read_fault(root: Path, attempt: int) -> dict[str, Any] | None:
    path = _fault_record(root, attempt)
    return json.loads(path.read_text()) if path.exists() else None


def _fault_words(fault: dict[str, Any]) -> str:
    """ "rank 3 was killed", or "stopped" for --fault stop."""
    done = "stopped" if fault["signal"] == "SIGSTOP" else "killed"
    return f"rank {int(fault['rank'])} was {done}"


class FaultInjector:
    """Kills this rank with SIGKILL in the middle of training step ``step`` (or stops it with
    SIGSTOP: a rank that hangs, whose connections stay open).

    The kill comes in the first forward of the rank's stage in that step: on the last stage,
    once the first micro-batch's activations have arrived, while the other stages wait for its
    gradients. Before dying the rank writes the step and the time to a record under ``root``,
    from which the restarted job measures what the fault cost.
    """

    def __init__(self, module: PipelineModule, step: int, root: Path, kind: str) -> None:
        self.step = step
        self.signal = signal.SIGSTOP if kind == "stop" else signal.SIGKILL
        self.record = _fault_record(root, _attempt())
        self.armed = False
        module.stages[0].register_forward_pre_hook(self._pre_forward)

    def before_step(self, step: int) -> None:
        self.armed = step == self.step

    def _pre_forward(self, *_: object) -> None:
        if not self.armed:
            return
        rank = dist.get_rank()
        staging = self.record.with_suffix(".tmp")
        name = self.signal.name
        record = {"rank": rank, "step": self.step, "signal": name, "time": time.time()}
        staging.write_text(json.dumps(record))
        staging.replace(self.record)
        what = "kills" if self.signal == signal.SIGKILL else "stops"
        print(
            f"demo: fault injection: rank {rank} {what} itself ({name}) in step {self.step}",
            file=sys.stderr,
            flush=True,
        )
        os.kill(os.getpid(), self.signal)


@dataclass
class Recovery:
    """What the demo measures about the fault it survived (rank 0 prints it)."""

    fault: dict[str, Any]
    resumed_step: int
    started: float  # this attempt's run_job began (time.time())
    loaded: float = math.nan  # the checkpoint was loaded
    first_step: float = math.nan  # the first step after resuming was done

    def lines(self) -> list[str]:
        step = int(self.fault["step"])
        redone = step - 1 - self.resumed_step
        origin = f"step_{self.resumed_step:08d}" if self.resumed_step else "the start"
        kill = self.fault["time"]
        finished = f"{redone} finished step{'s' if redone != 1 else ''}"
        if redone:
            finished += f" ({self.resumed_step + 1}..{step - 1})"
        return [
            "\nrecovery",
            f"  faults injected  1: {_fault_words(self.fault).replace(' was', '')} "
            f"({self.fault['signal']}) in the middle of step {step}",
            f"  recovered        {_attempt()}: torchrun restarted the workers, which resumed from "
            f"{origin}",
            f"  steps lost       {finished} and the interrupted step {step}, done again",
            f"  time to recover  {self.first_step - kill:.1f} s from the kill to the end of step "
            f"{self.resumed_step + 1}: {self.started - kill:.1f} s restarting the workers, "
            f"{self.loaded - self.started:.1f} s building and loading, "
            f"{self.first_step - self.loaded:.1f} s the step",
        ]


def _resume_root(args: argparse.Namespace) -> Path | None:
    """Where --checkpoint-every saves the training state and a start resumes from."""
    if not args.checkpoint_every:
        return None
    if args.resume_dir is not None:
        return Path(args.resume_dir)
    if args.checkpoint_dir is not None:
        return Path(args.checkpoint_dir) / "training"
    return None


def _train_step(
    trainer: PipelineTrainer, batch: tuple[torch.Tensor, torch.Tensor], step: int, root: Path | None
) -> float:
    """One training step; a step that fails (a peer died) says how long it took to fail."""
    began = time.time()
    try:
        return trainer.train_step(*batch)
    except Exception as error:
        failed = time.time()
        fault = _read_fault(root, _attempt()) if root is not None else None
        since = ""
        if fault is not None:
            since = f", {failed - fault['time']:.2f} s after {_fault_words(fault)}"
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(
            f"demo: rank {dist.get_rank()}: step {step} failed after {failed - began:.2f} s"
            f"{since}: {type(error).__name__}: {message}",
            file=sys.stderr,
            flush=True,
        )
        raise


def _say_when_exiting_after_a_fault(args: argparse.Namespace) -> None:
    """On a rank that fails after a peer was killed: how long after the kill it exits."""
    root = _resume_root(args)
    fault = _read_fault(root, _attempt()) if root is not None else None
    if fault is not None:
        print(
            f"demo: rank {int(os.environ.get('RANK', '-1'))} exits "
            f"{time.time() - fault['time']:.2f} s after {_fault_words(fault)}",
            file=sys.stderr,
            flush=True,
        )


def _warn_about_a_shared_store() -> None:
    # torchrun lends its own TCPStore to the workers; restarted workers then read the keys the
    # killed ones wrote and connect to dead ports (pytorch/pytorch#135712).
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if shared and restarts > 0 and dist.get_rank() == 0 and _attempt() == 0:
        print(
            f"demo: warning: torchrun --max-restarts {restarts} with its store shared with the "
            f"workers: restarted workers fail to connect; set {_UNSHARED_STORE}=1 for torchrun",
            file=sys.stderr,
            flush=True,
        )


def run_job(args: argparse.Namespace) -> int:
    """The work of one rank; returns the process exit code."""
    use_cuda = args.device == "cuda"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # A bound on every wait for a peer: a rank that died without closing its connections
    # costs the others at most this long (see the README's "Surviving a killed rank").
    timeout = datetime.timedelta(seconds=args.pg_timeout)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    _warn_about_a_shared_store()
    try:
        try:
            return _train_save_reload(args, Report(), time.time())
        finally:
            dist.destroy_process_group()
    except Exception:
        _say_when_exiting_after_a_fault(args)
        raise


def _reload_stages(args: argparse.Namespace) -> int:
    """--reload-stages, by default a stage count different from --stages."""
    return int(args.reload_stages or (2 if args.stages != 2 else 1))


def _train_save_reload(args: argparse.Namespace, report: Report, job_started: float) -> int:
    world = dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else None
    reload_stages = _reload_stages(args)
    for name, stages in (("--stages", args.stages), ("--reload-stages", reload_stages)):
        if world % stages != 0:
            report.say(f"error: {name} {stages} does not divide the {world} ranks")
            return 2
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if args.checkpoint_dir is None and local_world != world:
        # Ranks on other nodes cannot read files in this node's temporary directory.
        report.say("error: several nodes need --checkpoint-dir on storage that every node can read")
        return 2
    root = _resume_root(args)
    if args.checkpoint_every and root is None:
        # Under a torchrun of your own, restarted workers must find the checkpoints again.
        report.say("error: --checkpoint-every needs --checkpoint-dir (or --resume-dir)")
        return 2
    attempt = _attempt()

    data = CharData.from_text(generate_text(args.sentences))
    layers = char_gpt_layers(len(data.alphabet), args.seq_len, args.hidden, args.depth, 4)
    if attempt == 0:
        report.say(
            f"pipestack demo: a character GPT of {count_parameters(layers):,} parameters "
            f"({len(layers)} layers, vocabulary of {len(data.alphabet)} characters) on {world} "
            f"ranks, {args.device}"
        )
    else:
        report.say(f"\nrestart {attempt}: torchrun started the {world} workers again")

    torch.manual_seed(args.seed)
    model = PipelineModule(layers, num_stages=args.stages, loss_fn=next_char_loss, device=device)
    grid = model.mpu()
    if attempt == 0:
        report.say(
            f"\npartition over {model.num_stages} stages x {grid.get_data_parallel_world_size()} "
            f"data-parallel replicas (method 'parameters'):\n{model.plan.table()}"
        )
    trainer = PipelineTrainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=args.lr),
        n_microbatches=args.microbatches,
        schedule="1f1b",
        max_grad_norm=1.0,
    )
    heldout = data.batch(data.heldout, args.batch_size, args.seq_len, seed=-1 % 2**31)
    start, loss, first_eval = 0, math.nan, math.nan
    resumed_from = latest_checkpoint(root) if root is not None else None
    if resumed_from is not None:
        # The data position is the step: batch n is drawn from seed n, so the batches after
        # the resume are those the uninterrupted run took.
        extra = trainer.load_checkpoint(resumed_from)
        start, loss, first_eval = int(extra["step"]), extra["loss"], extra["first_eval"]
    else:
        first_eval = trainer.evaluate(*_replica_share(heldout, model, model.device))
    fault = _read_fault(root, attempt - 1) if root is not None and attempt > 0 else None
    recovery = Recovery(fault, start, job_started, time.time()) if fault is not None else None
    if attempt == 0:
        report.say(f"\ntraining {args.steps} steps, 1F1B, {args.microbatches} micro-batches")
    if resumed_from is None:
        report.say(f"  step {0:>4}/{args.steps}  held-out loss {first_eval:.3f}")
    else:
        report.say(f"  step {start:>4}/{args.steps}  resumed from {resumed_from}")
    injector = None
    if args.fail_at_step and attempt == 0 and dist.get_rank() == world - 1:
        assert root is not None  # --fail-at-step requires --checkpoint-every
        injector = FaultInjector(model, args.fail_at_step, root, args.fault)
    started = time.perf_counter()
    for step in range(start + 1, args.steps + 1):
        batch = data.batch(data.train, args.batch_size, args.seq_len, seed=step)
        if injector is not None:
            injector.before_step(step)
        loss = _train_step(trainer, _replica_share(batch, model, model.device), step, root)
        if recovery is not None and step == start + 1:
            recovery.first_step = time.time()
        if not math.isfinite(loss):
            report.check("training", False, f"the loss became {loss} at step {step}")
            return 0 if report.summary() else 1
        if step % args.log_every == 0 or step == args.steps:
            elapsed = time.perf_counter() - started
            report.say(
                f"  step {step:>4}/{args.steps}  loss {loss:.3f}  {_progress(step, args.steps)}"
                f"  {elapsed:.1f} s"
            )
        if root is not None and step % args.checkpoint_every == 0:
            saved = trainer.save_checkpoint(
                root, keep_last=_KEEP_CHECKPOINTS, step=step, loss=loss, first_eval=first_eval
            )
            report.say(f"  step {step:>4}/{args.steps}  saved {saved}")
    if root is not None:
        if recovery is not None:
            for line in recovery.lines():
                report.say(line)
        report.say(f"  final loss       {loss!r} (step {args.steps})")
    if args.fail_at_step:
        report.check(
            "training survived the killed rank",
            recovery is not None,
            f"{attempt} restart(s), resumed from step {start}"
            if recovery is not None
            else "no fault was injected and recovered from",
        )
    trained_eval = trainer.evaluate(*_replica_share(heldout, model, model.device))
    report.say(f"  held-out loss {first_eval:.3f} -> {trained_eval:.3f}")
    report.check(
        "the loss falls",
        trained_eval < 0.75 * first_eval,
        f"held-out loss {first_eval:.3f} -> {trained_eval:.3f}",
    )
    identical = _tied_copies_identical(model)
    report.check(
        "tied embedding and LM head stay identical",
        identical,
        f"first and last stage {'agree' if identical else 'differ'} after {args.steps} steps",
    )

    directory = _shared_directory(args.checkpoint_dir)
    try:
        return _save_and_reload(args, report, data, layers, heldout, trained_eval, model, directory)
    finally:
        dist.barrier()
        if args.checkpoint_dir is None and dist.get_rank() == 0:
            shutil.rmtree(directory, ignore_errors=True)


def _save_and_reload(
    args: argparse.Namespace,
    report: Report,
    data: CharData,
    layers: list[Layer],
    heldout: tuple[torch.Tensor, torch.Tensor],
    trained_eval: float,
    model: PipelineModule,
    directory: str,
) -> int:
    device = model.device
    reload_stages = _reload_stages(args)
    model.save_state_dict(directory)
    dist.barrier()
    files = sorted(Path(directory).glob("*.pt"))
    kept = "" if args.checkpoint_dir else " (temporary: pass --checkpoint-dir DIR to keep it)"
    report.say(f"\nsaved {len(files)} layer files to {directory}{kept}")

    torch.manual_seed(args.seed + 1)  # a different init, so only the checkpoint can match
    reloaded = PipelineModule(
        layers, num_stages=reload_stages, loss_fn=next_char_loss, device=device
    )
    reloaded.load_state_dir(directory)
    report.say(
        f"reloaded with {reload_stages} stages x "
        f"{reloaded.mpu().get_data_parallel_world_size()} data-parallel replicas:\n"
        f"{reloaded.plan.table()}"
    )
    evaluator = PipelineTrainer(
        reloaded,
        torch.optim.SGD(reloaded.parameters(), lr=0.0),
        n_microbatches=args.microbatches,
        schedule="gpipe",
    )
    reloaded_eval = evaluator.evaluate(*_replica_share(heldout, reloaded, reloaded.device))
    sample = _generate(reloaded, data, args.prompt, args.sample_length, args.seq_len)
    report.say(f"\ngreedy sample from the reloaded model: {sample!r}")
    report.check(
        f"the checkpoint reloads with {reload_stages} stages",
        abs(reloaded_eval - trained_eval) <= 1e-4 * max(1.0, trained_eval),
        f"held-out loss {trained_eval:.6f} ({args.stages} stages) vs {reloaded_eval:.6f} "
        f"({reload_stages} stages)",
    )
    return 0 if report.summary() else 1


# -- the command line -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=4, help="ranks to launch (default 4)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--stages", type=int, default=4, help="pipeline stages for training")
    parser.add_argument(
        "--reload-stages", type=int, default=0, help="stages to reload with (default: 2, or 1)"
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--sentences", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default="the old ", help="start of the generated sample")
    parser.add_argument("--sample-length", type=int, default=60, help="characters to generate")
    parser.add_argument("--checkpoint-dir", default=None, help="default: a new temporary dir")
    parser.add_argument(
        "--timeout", type=float, default=1200, help="seconds before the launcher stops torchrun"
    )
    recovery = parser.add_argument_group("surviving a killed rank")
    recovery.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="save the training state every N steps and resume from the latest at start "
        "(into --resume-dir, else CHECKPOINT_DIR/training, else a temporary dir)",
    )
    recovery.add_argument(
        "--fail-at-step",
        type=int,
        default=0,
        metavar="K",
        help="the last rank kills itself (SIGKILL) in the middle of step K, in the first "
        "attempt only; needs --checkpoint-every",
    )
    recovery.add_argument(
        "--fault",
        choices=["kill", "stop"],
        default="kill",
        help="kill: SIGKILL (default); stop: SIGSTOP, a rank that hangs with its connections open",
    )
    recovery.add_argument(
        "--max-restarts",
        type=int,
        default=None,
        metavar="N",
        help="torchrun's --max-restarts (default: 1 with --fail-at-step, else 0)",
    )
    recovery.add_argument(
        "--resume-dir", default=None, help="where --checkpoint-every saves and resumes from"
    )
    recovery.add_argument(
        "--pg-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="init_process_group's timeout: the longest wait for a peer (default 120 s)",
    )
    args = parser.parse_args(argv)
    if args.checkpoint_every < 0 or args.fail_at_step < 0:
        parser.error("--checkpoint-every and --fail-at-step take a step count >= 0")
    if args.fail_at_step and not args.checkpoint_every:
        parser.error("--fail-at-step needs --checkpoint-every, to resume from a checkpoint")
    if args.fail_at_step > args.steps:
        parser.error(f"--fail-at-step {args.fail_at_step} is past --steps {args.steps}")
    if args.max_restarts is not None and args.max_restarts < 0:
        parser.error("--max-restarts takes a count >= 0")
    if not args.pg_timeout > 0:
        parser.error("--pg-timeout takes a number of seconds > 0")
    return args


def launch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run this script under torchrun on ``--nproc`` local ranks."""
    nproc = args.nproc
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("demo: error: --device cuda needs CUDA GPUs; none are visible", file=sys.stderr)
            return 2
        nproc = min(nproc, torch.cuda.device_count())
    restarts = args.max_restarts
    if restarts is None:
        restarts = 1 if args.fail_at_step else 0
    torchrun_args = ["--max-restarts", str(restarts)] if restarts else []
    env = {_UNSHARED_STORE: "1"} if restarts else None
    try:
        with _resume_directory(args) as resume_args:
            # Not captured: the ranks print the demo's progress straight to this terminal.
            result = run_torchrun(
                __file__,
                nproc,
                [*argv, *resume_args],
                timeout=args.timeout,
                capture=False,
                env=env,
                extra_torchrun_args=torchrun_args,
            )
    except KeyboardInterrupt:  # the launcher has stopped the job
        return 130
    if result.timed_out:
        print(f"demo: error: torchrun did not finish within {args.timeout} s", file=sys.stderr)
        return 1
    return result.returncode


@contextmanager
def _resume_directory(args: argparse.Namespace) -> Iterator[list[str]]:
    """--resume-dir for the workers: a temporary one, removed afterwards, when none is given."""
    if not args.checkpoint_every or args.resume_dir or args.checkpoint_dir:
        yield []
        return
    directory = tempfile.mkdtemp(prefix="pipestack-demo-training-")
    try:
        yield ["--resume-dir", directory]
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(arguments)
    if "LOCAL_RANK" not in os.environ:
        return launch(args, arguments)
    return run_job(args)


if __name__ == "__main__":
    sys.exit(main())
