"""PipelineModule: one pipeline stage, built from a list of layer specs (DeepSpeed's facade)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipemodule._layout import PipelineLayout, TrainingStep, layout_of
from pipemodule._stage.activation_checkpoint import CheckpointFn, activation_checkpoint
from pipemodule._stage.agreement import agree_on_construction
from pipemodule._stage.build import ForwardFunc, LayerBuilder
from pipemodule._stage.checkpoint import layer_file, stage_files
from pipemodule._stage.collective import require_every_rank, run_on_every_rank
from pipemodule._stage.construction import check_process_group, prepare_construction
from pipemodule._stage.deepspeed_names import DeepSpeedModuleNames
from pipemodule._stage.forward import contiguous_outputs, run_layers
from pipemodule._stage.layer_checkpoint import load_layer_checkpoint, save_layer_checkpoint
from pipemodule._stage.options import check_checkpoint_interval, require_initialised
from pipemodule._stage.profile import measure_on_first_rank
from pipemodule._stage.seeding import SeedFn, Seeding
from pipemodule._stage.stage_module import StageModule
from pipemodule._stage.tie_links import (
    TieLink,
    is_tied_copy,
    link_ties,
    tied_weights_and_groups,
)
from pipepartition import PartitionMethod, PartitionPlan
from pipespec import Layer
from pipetopo import PipelineParallelGrid, ProcessTopology

__all__ = ["PipelineModule"]

logger = logging.getLogger(__name__)


class PipelineModule(DeepSpeedModuleNames, torch.nn.Module):
    """The local stage of a pipeline-parallel model, built from a list of layers.

    Every rank of the job constructs a ``PipelineModule`` from the same list; each keeps and
    builds only the layers of its own pipeline stage. The same arguments as DeepSpeed's
    ``deepspeed.pipe.PipelineModule``, in the same order, plus keyword-only extras.

    Construction is collective over ``process_group`` (default: the whole world): every rank
    must call it with the same layers and arguments, in the same order relative to other
    collective calls. Inconsistent arguments are detected and raise on every rank, rather than
    hang as they would elsewhere. The decisions are one value, :attr:`layout` (see
    :func:`pipemodule.plan_pipeline`), computed before any communication.

    Args:
        layers: ``LayerSpec``, ``TiedLayerSpec``, built ``nn.Module`` and plain callables, in the
            order the forward pass runs them (an ``nn.Sequential`` works).
        num_stages: the number of ranks along the pipeline (DeepSpeed's meaning; the stages,
            with one per rank); must divide the world size (the rest is data parallelism).
            Give this or ``topology``.
        topology: a ``pipetopo.ProcessTopology`` with a ``pipe`` axis (e.g.
            ``PipeModelDataParallelTopology``) for more than pipe x data parallelism.
        loss_fn: ``loss_fn(outputs, labels)``, used on the last stage by training schedules.
        seed_layers: seed before building each layer with ``seed_fn(base_seed + index)`` and
            before each layer's forward, as DeepSpeed does. By default (``False``) every layer is
            built from a seed derived from the user's torch seed and its global index, so initial
            weights do not depend on the number of stages.
        seed_fn: the seeding function for ``seed_layers``; default seeds ``random``, numpy
            and torch.
        base_seed: the first seed for ``seed_layers``.
        partition_method: ``'parameters'`` (balance trainable parameters), ``'uniform'``
            (balance layer counts), ``'type:REGEX'`` (balance layers whose class name matches),
            ``'profile'`` (balance measured forward+backward time; needs ``profile_input``) or
            a ``pipepartition`` method object (``Boundaries``, ``Weights``, ...).
        activation_checkpoint_interval: checkpoint chunks of this many layers in ``forward``
            (0 disables).
        activation_checkpoint_func: ``fn(function, *args)``; default: torch's non-reentrant
            checkpoint.
        checkpointable_layers: class names; when given, only chunks made entirely of these
            layers are checkpointed (default: chunks holding any parameters).
        dynamic_shape: kept for DeepSpeed compatibility (torch's pipelining infers shapes at
            run time).
        device: where the local layers are built (default: the current CUDA device when CUDA is
            available, else the CPU). Layers are built there directly, never on the CPU first.
        process_group: the group the pipeline lives in (default: the whole world).
        stage_speeds: relative speed of each stage, for heterogeneous hardware: balanced
            methods minimise the slowest stage's ``cost / speed``.
        stage_memory_limits: bytes per stage that the partition never exceeds (``ValueError``,
            on every rank before any group exists, if no partition fits). Without
            ``training_step`` they cap parameter bytes only (no gradients, optimizer state or
            activations); with it, each stage's training peak.
        training_step: a :class:`pipemodule.TrainingStep` (one micro-batch's input to the
            first layer, the schedule, ``n_microbatches``, the optimizer's states per
            parameter): ``stage_memory_limits`` then cap each stage's peak for that step as
            :func:`pipemodule.plan_memory` counts it (this module's activation checkpointing
            included), and the partition is the fastest that fits; the error names the stage,
            the bytes it lacks and what would fit.
        profile_input: sample input of the first layer, for ``partition_method='profile'``.
        stages_per_rank: stages each rank holds; the list is cut into ``num_stages *
            stages_per_rank`` stages (for the interleaved and zero-bubble schedules).
        stage_placement: ``'loop'`` (rank r holds r, r + P, ...) or ``'v'`` (two per rank: r
            and 2P - 1 - r, so the first and last stage share a rank).

    Raises:
        TypeError: an argument of the wrong type, before any collective communication.
        ValueError: a bad argument value, before any collective communication.
        RuntimeError: torch.distributed is not initialised, or ranks disagree about the model.
    """

    def __init__(
        self,
        layers: Iterable[Layer],
        num_stages: int | None = None,
        topology: ProcessTopology | None = None,
        loss_fn: Callable[..., Any] | None = None,
        seed_layers: bool = False,
        seed_fn: SeedFn | None = None,
        base_seed: int = 1234,
        partition_method: str | PartitionMethod = "parameters",
        activation_checkpoint_interval: int = 0,
        activation_checkpoint_func: CheckpointFn = activation_checkpoint,
        checkpointable_layers: Sequence[str] | None = None,
        dynamic_shape: bool = False,
        *,
        device: torch.device | str | int | None = None,
        process_group: dist.ProcessGroup | None = None,
        stage_speeds: Sequence[float] | None = None,
        stage_memory_limits: Sequence[float] | None = None,
        profile_input: Any = None,
        stages_per_rank: int = 1,
        stage_placement: str = "loop",
        training_step: TrainingStep | None = None,
    ) -> None:
        super().__init__()
        # 1-2. Check every argument and compute the layout, locally; 3. agree, before any group
        # exists (ranks that disagree would create different groups). A rank whose local step
        # raised still joins the agreement, which delivers its error to every rank.
        require_initialised()
        world_size = check_process_group(process_group)
        prepared, init_seed = agree_on_construction(
            lambda: prepare_construction(
                layers,
                num_stages,
                topology,
                world_size,
                loss_fn=loss_fn,
                seed_layers=seed_layers,
                seed_fn=seed_fn,
                base_seed=base_seed,
                partition_method=partition_method,
                activation_checkpoint_interval=activation_checkpoint_interval,
                activation_checkpoint_func=activation_checkpoint_func,
                checkpointable_layers=checkpointable_layers,
                device=device,
                stage_speeds=stage_speeds,
                stage_memory_limits=stage_memory_limits,
                profile_input=profile_input,
                stages_per_rank=stages_per_rank,
                stage_placement=stage_placement,
                refuse=PipelineModule,
                training_step=training_step,
            ),
            torch.initial_seed(),
            process_group,
        )
        options, arguments, resolved_device = prepared.options, prepared.arguments, prepared.device
        seeding = Seeding(seed_layers, seed_fn, base_seed, init_seed, resolved_device)
        layout = prepared.layout
        if layout is None:
            costs = measure_on_first_rank(
                arguments.layers, profile_input, seeding, process_group, arguments.tie_layers
            )
            layout = layout_of(arguments, profile=costs)

        # 4. The grid: the process groups of the topology.
        self._grid = PipelineParallelGrid(topology=layout.topology, process_group=process_group)
        self._layout = layout
        self._options = options
        self._seeding = seeding
        pipe_rank = self._grid.stage_id
        stage_ids = layout.stages_of(pipe_rank)
        if self._grid.topology_rank == 0 and logger.isEnabledFor(logging.INFO):
            logger.info("pipeline partition (%s):\n%s", layout.plan.method, layout.table())

        # 5. Build the local layers, directly on the device; a rank's stages share tied modules.
        builder = LayerBuilder(
            layout.layers, {key: tie.first_layer for key, tie in layout.ties.items()}, seeding
        )
        tied: dict[str, torch.nn.Module] = {}
        try:
            built = run_on_every_rank(
                f"building stage(s) {list(stage_ids)}",
                lambda: [builder.build_stage(layout.layers_of(stage), tied) for stage in stage_ids],
                self._grid.process_group,
            )
        except BaseException:
            self._grid.close()  # raised on every rank, so every rank gives its groups back
            raise

        # DeepSpeed's public attributes, kept for compatibility; the working state is above.
        self.num_stages = layout.placement.pipe_ranks
        self.loss_fn = loss_fn
        self.seed_layers = seed_layers
        self.seed_fn = seed_fn
        self.base_seed = base_seed
        self.partition_method = partition_method
        self.activation_checkpoint_interval = activation_checkpoint_interval
        self.activation_checkpoint_func = activation_checkpoint_func
        self.checkpointable_layers = (
            None if options.checkpointable_layers is None else list(options.checkpointable_layers)
        )
        self.dynamic_shape = dynamic_shape
        self.device = resolved_device
        self.global_rank = dist.get_rank()
        self.world_size = dist.get_world_size(process_group)
        self.stage_id = pipe_rank
        self.plan: PartitionPlan = layout.plan
        self.parts: list[int] = list(layout.plan.boundaries)
        self.micro_offset = 0
        self.curr_layer = -1
        self.forward_funcs: list[ForwardFunc] = [f for stage in built for f in stage.forward_funcs]
        self.fwd_map: dict[str, int] = {}
        self.tied_modules = torch.nn.ModuleDict(tied)
        self.tied_weight_attrs = {key: layout.ties[key].attrs for key in tied}
        local_layers = [index for stage in stage_ids for index in layout.layers_of(stage)]
        for stage in built:
            for index, module in stage.modules.items():
                self.fwd_map[str(index)] = local_layers.index(index)
                self.add_module(str(index), module)
        # Not submodules (a tuple is not registered): the same modules under the same names.
        self.stages: tuple[torch.nn.Module, ...] = (
            (self,)
            if len(stage_ids) == 1
            else tuple(
                StageModule(self, stage, layout.layers_of(stage), stage_built)
                for stage, stage_built in zip(stage_ids, built, strict=True)
            )
        )
        self._stage_ids = stage_ids
        self._built = built
        self._first_layer = layout.layers_of(stage_ids[0]).start

        # 6. Link the tied copies and start them equal.
        self.tied_comms: dict[str, TieLink] = link_ties(layout, self._grid, tied)
        self._synchronize_tied_weights()

    def close(self) -> None:
        """Give back this module's process groups (grid and ties); the layers stay usable.

        Groups are shared by pipelines over the same ranks; one no live module uses is destroyed
        (its connections, threads, file descriptors). Call it on every rank, as construction;
        communicating afterwards raises. ``with PipelineModule(...) as model:`` closes on exit.
        """
        self.tied_comms = {}
        self._grid.close()

    def __enter__(self) -> PipelineModule:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _synchronize_tied_weights(self) -> None:
        for link in self.tied_comms.values():
            link.broadcast_from_owner()

    # ------------------------------------------------------------------ layout and grid

    @property
    def layout(self) -> PipelineLayout:
        """The pipeline's layout: every stage's layers, the ties, the topology."""
        return self._layout

    @property
    def grid(self) -> PipelineParallelGrid:
        """The communication grid (DeepSpeed calls it :meth:`mpu`)."""
        return self._grid

    @property
    def stage_ids(self) -> tuple[int, ...]:
        """The stages this rank holds, in order: ``(stage_id,)`` with one stage per rank."""
        return self._stage_ids

    @property
    def holds_first_stage(self) -> bool:
        """Whether this rank holds stage 0, which takes the inputs."""
        return 0 in self._stage_ids

    @property
    def holds_last_stage(self) -> bool:
        """Whether this rank holds the last stage, which computes the loss."""
        return self._layout.num_stages - 1 in self._stage_ids

    @property
    def local_layer_indices(self) -> Sequence[int]:
        """Global indices of the layers this rank runs (a ``range`` with one stage per rank)."""
        if len(self._stage_ids) == 1:
            return self._layout.layers_of(self._stage_ids[0])
        return tuple(i for stage in self._stage_ids for i in self._layout.layers_of(stage))

    # ------------------------------------------------------------------ ties

    def allreduce_tied_weight_gradients(self) -> None:
        """Sum the gradients of each tied tensor over the stages that hold a copy.

        Call after backward and before the optimizer step, so every copy takes the same step.
        Collective over each tie group.
        """
        for link in self.tied_comms.values():
            link.sum_gradients()

    def get_tied_weights_and_groups(self) -> list[tuple[torch.Tensor, dist.ProcessGroup]]:
        """``(tensor, group)`` for each tied tensor this stage holds, as DeepSpeed returns."""
        return tied_weights_and_groups(self.tied_comms.values(), self._grid)

    def is_tied_copy(self, parameter: torch.Tensor) -> bool:
        """Whether ``parameter`` is a tied tensor whose owner is another stage.

        Summing a quantity over all stages (a parameter count, a gradient norm) counts each tied
        tensor once by skipping these copies.
        """
        return is_tied_copy(self.tied_comms.values(), parameter, self.global_rank)

    # ------------------------------------------------------------------ forward

    def set_checkpoint_interval(self, interval: int) -> None:
        """Checkpoint activations in chunks of ``interval`` layers (0 disables)."""
        self.activation_checkpoint_interval = check_checkpoint_interval("interval", interval)

    def forward(self, *inputs: Any) -> Any:
        """Run the local layers in order.

        One argument is passed to the first layer as is (a 1-tuple is unwrapped); several
        arguments, as a schedule passes a previous stage's tuple output, are passed as a tuple.
        """
        if len(self._stage_ids) > 1:
            raise RuntimeError(
                f"this rank holds stages {list(self._stage_ids)}; run one of them: "
                f"model.stages[i](...) (a schedule does so through pipeline_stages(model))"
            )
        self.micro_offset += 1
        return contiguous_outputs(run_layers(self, self.forward_funcs, self._first_layer, inputs))

    # ------------------------------------------------------------------ checkpoints

    def ckpt_layer_path(self, ckpt_dir: str | Path, local_layer_idx: int) -> str:
        """The file of local layer ``local_layer_idx`` in ``ckpt_dir`` (DeepSpeed's naming)."""
        index = self.local_layer_indices[local_layer_idx]
        return str(layer_file(ckpt_dir, index, self.layer_file_suffix()))

    def layer_file_suffix(self) -> str:
        """This rank's part of a layer file's name: ``model_YY`` with a model axis, else ``''``."""
        return self._layout.topology.get_rank_repr(self._grid.topology_rank)

    def layer_modules(self, *, owned_only: bool) -> list[tuple[int, torch.nn.Module]]:
        """``(global layer index, module)`` of each layer file this rank writes or reads.

        Every layer module, and each tie key under its first layer; with ``owned_only``, only
        the ties whose owner stage is on this rank (each tie is written once).
        """
        files: dict[int, torch.nn.Module] = {}
        for stage, built in zip(self._stage_ids, self._built, strict=True):
            files.update(
                stage_files(
                    self._layout, stage, built.modules, built.tied_modules, owned_only=owned_only
                )
            )
        return sorted(files.items(), key=lambda entry: entry[0])

    def save_state_dict(self, save_dir: str | Path, exclude_frozen_params: bool = False) -> None:
        """Write one file per layer with parameters, and one per tie key, into ``save_dir``.

        Files are named ``layer_XX[-model_YY]-model_states.pt`` by global layer index, so the
        checkpoint loads with any number of stages. A tied module is written once, under the
        index of its key's first occurrence, whether or not it has a ``forward_fn``. Only the
        first data-parallel replica writes. Every file is written atomically.

        Collective over the pipeline's process group: returns on every rank once every file is
        written, or raises on every rank if any rank failed.
        """
        require_every_rank("save_state_dict()", self._grid.process_group)
        save_layer_checkpoint(self, Path(save_dir), exclude_frozen_params=exclude_frozen_params)

    def load_state_dir(self, load_dir: str | Path, strict: bool = True) -> None:
        """Load the files :meth:`save_state_dict` wrote, whatever stage count wrote them.

        Collective over the pipeline's process group. A missing or mismatched file raises on
        every rank, naming the layer and the path.
        """
        require_every_rank("load_state_dir()", self._grid.process_group)
        load_layer_checkpoint(self, Path(load_dir), strict=strict)
        self._synchronize_tied_weights()
