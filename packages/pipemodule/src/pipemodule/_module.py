"""PipelineModule: one pipeline stage, built from a list of layer specs (DeepSpeed's facade)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipemodule._layout import PipelineLayout, check_pipeline_arguments, layout_of
from pipemodule._stage.activation_checkpoint import CheckpointFn, activation_checkpoint
from pipemodule._stage.agreement import agree_on_construction
from pipemodule._stage.build import ForwardFunc, LayerBuilder
from pipemodule._stage.checkpoint import (
    layer_file,
    load_layer_files,
    save_layer_files,
    stage_files,
)
from pipemodule._stage.collective import run_on_every_rank
from pipemodule._stage.device import resolve_device
from pipemodule._stage.forward import run_layers
from pipemodule._stage.options import StageOptions, check_checkpoint_interval, require_initialised
from pipemodule._stage.profile import measure_on_first_rank
from pipemodule._stage.seeding import SeedFn, Seeding
from pipemodule._stage.tie_links import TieLink, link_ties
from pipepartition import PartitionMethod, PartitionPlan
from pipespec import Layer
from pipetopo import PipelineParallelGrid, ProcessTopology

__all__ = ["PipelineModule"]

logger = logging.getLogger(__name__)


class PipelineModule(torch.nn.Module):
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
        num_stages: the number of pipeline stages; must divide the world size (the rest is data
            parallelism). Give this or ``topology``.
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
        stage_memory_limits: maximum parameter bytes per stage; the partition never exceeds
            them (``ValueError`` if no partition fits).
        profile_input: sample input of the first layer, for ``partition_method='profile'``.

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
    ) -> None:
        super().__init__()
        # 1. Check every argument locally: an error found after a collective would be a hang.
        require_initialised()
        options = StageOptions(
            loss_fn=loss_fn,
            seed_layers=seed_layers,
            seed_fn=seed_fn,
            base_seed=base_seed,
            activation_checkpoint_interval=activation_checkpoint_interval,
            activation_checkpoint_func=activation_checkpoint_func,
            checkpointable_layers=StageOptions.layer_classes(checkpointable_layers),
        )
        arguments = check_pipeline_arguments(
            layers,
            num_stages,
            topology=topology,
            world_size=dist.get_world_size(process_group),
            partition_method=partition_method,
            stage_speeds=stage_speeds,
            stage_memory_limits=stage_memory_limits,
        )
        _refuse_nested_pipelines(arguments.layers)
        if arguments.needs_profile and profile_input is None:
            raise ValueError(
                "partition_method='profile' measures each layer on a sample input: pass "
                "profile_input=<a sample batch for the first layer>"
            )
        resolved_device = resolve_device(device)

        # 2. The layout, unless it balances times that must be measured first.
        layout = None if arguments.needs_profile else layout_of(arguments)

        # 3. Agree, before any group exists: ranks that disagree create different groups.
        fingerprint = arguments.fingerprint() if layout is None else layout.fingerprint()
        init_seed = agree_on_construction(fingerprint, torch.initial_seed(), process_group)
        seeding = Seeding(seed_layers, seed_fn, base_seed, init_seed, resolved_device)
        if layout is None:
            costs = measure_on_first_rank(arguments.layers, profile_input, seeding, process_group)
            layout = layout_of(arguments, profile=costs)

        # 4. The grid: the process groups of the topology.
        self._grid = PipelineParallelGrid(topology=layout.topology, process_group=process_group)
        self._layout = layout
        self._options = options
        self._seeding = seeding
        stage = self._grid.stage_id
        if self._grid.topology_rank == 0 and logger.isEnabledFor(logging.INFO):
            logger.info("pipeline partition (%s):\n%s", layout.plan.method, layout.table())

        # 5. Build the local layers, directly on the device.
        builder = LayerBuilder(
            layout.layers, {key: tie.first_layer for key, tie in layout.ties.items()}, seeding
        )
        built = run_on_every_rank(
            f"building stage {stage}",
            lambda: builder.build_stage(layout.layers_of(stage)),
            self._grid.process_group,
        )

        # DeepSpeed's public attributes, kept for compatibility; the working state is above.
        self.num_stages = layout.num_stages
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
        self.stage_id = stage
        self.plan: PartitionPlan = layout.plan
        self.parts: list[int] = list(layout.plan.boundaries)
        self.micro_offset = 0
        self.curr_layer = -1
        self.forward_funcs: list[ForwardFunc] = built.forward_funcs
        self.fwd_map: dict[str, int] = {}
        self.tied_modules = torch.nn.ModuleDict(built.tied_modules)
        self.tied_weight_attrs = {key: layout.ties[key].attrs for key in built.tied_modules}
        for index, module in built.modules.items():
            self.fwd_map[str(index)] = self._local_index(index)
            self.add_module(str(index), module)

        # 6. Link the tied copies and start them equal.
        self.tied_comms: dict[str, TieLink] = link_ties(layout, self._grid, built.tied_modules)
        self._synchronize_tied_weights()

    def _local_index(self, layer_index: int) -> int:
        return layer_index - self._layout.layers_of(self.stage_id).start

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
    def local_layer_indices(self) -> range:
        """Global indices of the layers this stage runs."""
        return self._layout.layers_of(self.stage_id)

    # ------------------------------------------------------------------ DeepSpeed accessors

    def partitions(self) -> list[int]:
        """Stage boundaries: stage ``s`` holds layers ``parts[s]`` to ``parts[s + 1] - 1``."""
        return self.parts

    def stage_owner(self, layer_idx: int) -> int:
        """The stage that holds global layer ``layer_idx``."""
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
            raise TypeError(f"layer_idx={layer_idx!r} is not an int; pass a global layer index")
        num_layers = self._layout.num_layers
        if not 0 <= layer_idx < num_layers:
            raise ValueError(
                f"layer_idx={layer_idx} is out of range: the pipeline has {num_layers} "
                f"layers (0 to {num_layers - 1})"
            )
        return self._layout.stage_of(layer_idx)

    def topology(self) -> ProcessTopology:
        """The process topology (pipe x data x ...) of this pipeline."""
        return self._layout.topology

    @property
    def _topo(self) -> ProcessTopology:
        return self._layout.topology

    def mpu(self) -> PipelineParallelGrid:
        """The communication grid, with DeepSpeed's model-parallel-unit accessors."""
        return self._grid

    def num_pipeline_stages(self) -> int:
        return self.num_stages

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
        pairs = []
        for link in self.tied_comms.values():
            # Created at construction, so this is a cache look-up on this rank alone.
            group = self._grid.group_for(link.topology_ranks)
            if group is None:
                raise RuntimeError(f"rank {self.global_rank} lost the group of tie {link.key!r}")
            pairs += [(tensor, group) for tensor in link.tensors()]
        return pairs

    def is_tied_copy(self, parameter: torch.Tensor) -> bool:
        """Whether ``parameter`` is a tied tensor whose owner is another stage.

        Summing a quantity over all stages (a parameter count, a gradient norm) counts each tied
        tensor once by skipping these copies.
        """
        return any(
            link.owner != self.global_rank and any(parameter is t for t in link.tensors())
            for link in self.tied_comms.values()
        )

    # ------------------------------------------------------------------ forward

    def set_checkpoint_interval(self, interval: int) -> None:
        """Checkpoint activations in chunks of ``interval`` layers (0 disables)."""
        self.activation_checkpoint_interval = check_checkpoint_interval("interval", interval)

    def forward(self, *inputs: Any) -> Any:
        """Run the local layers in order.

        One argument is passed to the first layer as is (a 1-tuple is unwrapped); several
        arguments, as a schedule passes a previous stage's tuple output, are passed as a tuple.
        """
        self.micro_offset += 1
        return run_layers(self, inputs, self.micro_offset)

    # ------------------------------------------------------------------ checkpoints

    def ckpt_layer_path(self, ckpt_dir: str | Path, local_layer_idx: int) -> str:
        """The file of local layer ``local_layer_idx`` in ``ckpt_dir`` (DeepSpeed's naming)."""
        index = self.local_layer_indices.start + local_layer_idx
        return str(layer_file(ckpt_dir, index, self._rank_repr()))

    def _rank_repr(self) -> str:
        return self._layout.topology.get_rank_repr(self._grid.topology_rank)

    def _files(self, *, owned_only: bool) -> list[tuple[int, torch.nn.Module]]:
        modules = {int(name): self.get_submodule(name) for name in self.fwd_map}
        tied = {key: self.tied_modules[key] for key in self.tied_modules}
        return stage_files(self._layout, self.stage_id, modules, tied, owned_only=owned_only)

    def save_state_dict(self, save_dir: str | Path, exclude_frozen_params: bool = False) -> None:
        """Write one file per layer with parameters, and one per tie key, into ``save_dir``.

        Files are named ``layer_XX[-model_YY]-model_states.pt`` by global layer index, so the
        checkpoint loads with any number of stages. A tied module is written once, under the
        index of its key's first occurrence, whether or not it has a ``forward_fn``. Only the
        first data-parallel replica writes. Every file is written atomically.

        Collective over the pipeline's process group: returns on every rank once every file is
        written, or raises on every rank if any rank failed.
        """
        directory = Path(save_dir)

        def write() -> None:
            if self._grid.axis_rank("data") == 0:
                save_layer_files(
                    self._files(owned_only=True),
                    directory,
                    self._rank_repr(),
                    exclude_frozen_params=exclude_frozen_params,
                )

        run_on_every_rank(f"saving the checkpoint to {directory}", write, self._grid.process_group)

    def load_state_dir(self, load_dir: str | Path, strict: bool = True) -> None:
        """Load the files :meth:`save_state_dict` wrote, whatever stage count wrote them.

        Collective over the pipeline's process group. A missing or mismatched file raises on
        every rank, naming the layer and the path.
        """
        directory = Path(load_dir)
        run_on_every_rank(
            f"loading the checkpoint from {directory}",
            lambda: load_layer_files(
                self._files(owned_only=False),
                directory,
                self._rank_repr(),
                map_location=self.device,
                strict=strict,
            ),
            self._grid.process_group,
        )
        self._synchronize_tied_weights()


def _refuse_nested_pipelines(layers: Sequence[Layer]) -> None:
    for index, layer in enumerate(layers):
        if isinstance(layer, PipelineModule):
            raise ValueError(
                f"layer {index} is a PipelineModule; nested pipelines are not supported: pass its "
                f"layer list instead"
            )
