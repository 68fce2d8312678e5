"""PipelineModule: one pipeline stage, built from a list of layer specs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipemodule._activation_checkpoint import CheckpointFn, activation_checkpoint
from pipemodule._agreement import ConstructionFingerprint, agree_on_construction, layer_signature
from pipemodule._checkpoint_files import atomic_save, layer_file, load_layer_file
from pipemodule._collective import run_on_every_rank
from pipemodule._config import validate_config
from pipemodule._planning import plan_stages, with_parameter_counts
from pipemodule._profile import measure_layer_costs
from pipemodule._seeding import SeedFn, default_seed_fn, layer_init_seed
from pipemodule._ties import TieComm, TiedKey
from pipepartition import PartitionMethod, PartitionPlan
from pipespec import Layer, LayerSpec, TiedLayerSpec
from pipetopo import PipelineParallelGrid, ProcessTopology, default_if_none, none_if_default

__all__ = ["PipelineModule", "TiedForward"]

logger = logging.getLogger(__name__)


class TiedForward:
    """A tied module used through a ``forward_fn``: calling it runs ``forward_fn(module, x)``."""

    def __init__(self, forward_fn: Callable[[torch.nn.Module, Any], Any], module: torch.nn.Module):
        self.forward_fn = forward_fn
        self.module = module

    def __call__(self, inputs: Any) -> Any:
        return self.forward_fn(self.module, inputs)

    def __repr__(self) -> str:
        name = getattr(self.forward_fn, "__name__", repr(self.forward_fn))
        return f"TiedForward({name}, {type(self.module).__name__})"


ForwardFunc = Callable[[Any], Any]


class PipelineModule(torch.nn.Module):
    """The local stage of a pipeline-parallel model, built from a list of layers.

    Every rank of the job constructs a ``PipelineModule`` from the same list; each keeps and
    builds only the layers of its own pipeline stage. The same arguments as DeepSpeed's
    ``deepspeed.pipe.PipelineModule``, in the same order, plus keyword-only extras.

    Construction is collective over ``process_group`` (default: the whole world): every rank
    must call it with the same layers and arguments, in the same order relative to other
    collective calls. Inconsistent arguments are detected and raise on every rank, rather than
    hang as they would elsewhere.

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
        ValueError: bad arguments, before any collective communication.
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
        config = validate_config(
            layers=layers,
            num_stages=num_stages,
            topology=topology,
            loss_fn=loss_fn,
            seed_layers=seed_layers,
            seed_fn=seed_fn,
            base_seed=base_seed,
            partition_method=partition_method,
            activation_checkpoint_interval=activation_checkpoint_interval,
            activation_checkpoint_func=activation_checkpoint_func,
            checkpointable_layers=checkpointable_layers,
            device=device,
            process_group=process_group,
            stage_speeds=stage_speeds,
            stage_memory_limits=stage_memory_limits,
            profile_input=profile_input,
        )
        self._config = config
        self._layer_specs: list[Layer] = list(config.layers)
        self._num_layers = len(self._layer_specs)
        self._topo = config.topology
        self.num_stages = config.num_stages
        self.loss_fn = loss_fn
        self.seed_layers = seed_layers
        self.seed_fn = seed_fn
        self.base_seed = base_seed
        self.partition_method = partition_method
        self.activation_checkpoint_interval = activation_checkpoint_interval
        self.activation_checkpoint_func = activation_checkpoint_func
        self.checkpointable_layers = (
            None if checkpointable_layers is None else list(checkpointable_layers)
        )
        self.dynamic_shape = dynamic_shape
        self.device = config.device
        self.micro_offset = 0
        self.curr_layer = -1

        # Plans that need no measurement are computed before the first collective, so a
        # partition error (e.g. an empty stage) raises on every rank without communication.
        plan = None if config.needs_profile else plan_stages(config)

        self._grid = PipelineParallelGrid(topology=self._topo, process_group=process_group)
        self.global_rank = dist.get_rank()
        self.world_size = dist.get_world_size(process_group)
        self.stage_id = self._grid.get_stage_id()
        group = self._grid.process_group

        fingerprint = ConstructionFingerprint(
            layers=tuple(layer_signature(layer) for layer in self._layer_specs),
            topology=repr(self._topo),
            partition=repr(config.method) if plan is None else repr(plan.boundaries),
        )
        self._init_seed = agree_on_construction(fingerprint, torch.initial_seed(), group)

        if plan is None:
            costs = run_on_every_rank("profiling the layers", self._profile_on_rank_zero, group)
            plan = plan_stages(config, profile=costs)
        self.plan: PartitionPlan = plan
        self.parts: list[int] = list(plan.boundaries)
        self._local_start = self.parts[self.stage_id]
        self._local_stop = self.parts[self.stage_id + 1]
        if self.global_rank == self._grid.to_global_rank(0) and logger.isEnabledFor(logging.INFO):
            # Only the logging rank describes the layers (on meta) for a parameters column
            # when the method itself did not need their counts.
            shown = with_parameter_counts(plan, self._layer_specs)
            logger.info("pipeline partition (%s):\n%s", plan.method, shown.table())

        self.forward_funcs: list[ForwardFunc] = []
        self.fwd_map: dict[str, int] = {}
        self.tied_modules = torch.nn.ModuleDict()
        self.tied_weight_attrs: dict[str, tuple[str, ...]] = {}
        run_on_every_rank(f"building stage {self.stage_id}", self._build, group)
        self.tied_comms: dict[str, TieComm] = self._index_tied_modules()
        self._synchronize_tied_weights()

    # ------------------------------------------------------------------ construction

    def _build(self) -> None:
        for index in range(self._local_start, self._local_stop):
            layer = self._layer_specs[index]
            if isinstance(layer, TiedLayerSpec):
                self._add_tied(index, layer)
            elif isinstance(layer, LayerSpec):
                with self._layer_seed(index):
                    self._register_layer(index, layer.build(device=self.device))
            elif isinstance(layer, torch.nn.Module):
                self._register_layer(index, layer.to(self.device))
            else:
                self.forward_funcs.append(layer)

    def _add_tied(self, index: int, layer: TiedLayerSpec) -> None:
        if layer.key not in self.tied_modules:
            # By default a tied module is built from the seed of its key's first occurrence,
            # whichever stage builds it, so every copy starts identical even before the owner's
            # values are broadcast. seed_layers seeds by the occurrence being built, as DeepSpeed.
            seed_index = index if self.seed_layers else self._tied_keys()[layer.key].first_layer
            with self._layer_seed(seed_index):
                self.tied_modules[layer.key] = layer.build(device=self.device)
            self.tied_weight_attrs[layer.key] = layer.tied_weight_attr
        module = self.tied_modules[layer.key]
        if layer.forward_fn is None:
            self.forward_funcs.append(module)
        else:
            self.forward_funcs.append(TiedForward(layer.forward_fn, module))

    def _register_layer(self, index: int, module: torch.nn.Module) -> None:
        self.forward_funcs.append(module)
        self.fwd_map[str(index)] = len(self.forward_funcs) - 1
        self.add_module(str(index), module)

    def _layer_seed(self, index: int) -> _LayerSeed:
        return _LayerSeed(self, index)

    def _tied_keys(self) -> dict[str, TiedKey]:
        return self._config.tied_keys

    def _profile_on_rank_zero(self) -> list[float] | None:
        costs: list[float] | None = None
        owner = self._grid.to_global_rank(0)
        if self.global_rank == owner:
            costs = measure_layer_costs(
                self._layer_specs,
                self._config.profile_input,
                device=self.device,
                build=self._build_for_profile,
            )
        shared: list[object] = [costs]
        dist.broadcast_object_list(shared, src=owner, group=self._grid.process_group)
        received = shared[0]
        assert isinstance(received, list)
        return [float(cost) for cost in received]

    def _build_for_profile(self, index: int) -> ForwardFunc:
        layer = self._layer_specs[index]
        if isinstance(layer, TiedLayerSpec):
            module = layer.build(device=self.device)
            if layer.forward_fn is None:
                return module
            return TiedForward(layer.forward_fn, module)
        if isinstance(layer, LayerSpec):
            return layer.build(device=self.device)
        if isinstance(layer, torch.nn.Module):
            return layer
        return layer

    def _index_tied_modules(self) -> dict[str, TieComm]:
        """Create one group per (key, non-pipe coordinate) over the stages holding the key.

        Collective: every rank creates every group, keys in sorted order and coordinates in
        row-major order, so all ranks agree on the order of group creation.
        """
        comms: dict[str, TieComm] = {}
        pipe_lines = self._topo.get_axis_comm_lists("pipe")
        for key, tied in sorted(self._tied_keys().items()):
            stages = sorted({self.stage_owner(index) for index in tied.layer_indices})
            if len(stages) < 2:
                continue
            for line in pipe_lines:
                topo_ranks = [line[stage] for stage in stages]
                group = self._grid.group_for(topo_ranks)
                global_ranks = tuple(self._grid.to_global_rank(rank) for rank in topo_ranks)
                if self.global_rank in global_ranks and group is not None:
                    comms[key] = TieComm(
                        key=key,
                        ranks=global_ranks,
                        group=none_if_default(group),
                        attrs=self.tied_weight_attrs[key],
                        module=self.tied_modules[key],
                    )
        return comms

    def _synchronize_tied_weights(self) -> None:
        for comm in self.tied_comms.values():
            comm.broadcast_from_owner()

    # ------------------------------------------------------------------ DeepSpeed accessors

    def partitions(self) -> list[int]:
        """Stage boundaries: stage ``s`` holds layers ``parts[s]`` to ``parts[s + 1] - 1``."""
        return self.parts

    def stage_owner(self, layer_idx: int) -> int:
        """The stage that holds global layer ``layer_idx``."""
        if not 0 <= layer_idx < self._num_layers:
            raise ValueError(
                f"layer_idx={layer_idx} is out of range: the pipeline has {self._num_layers} "
                f"layers (0 to {self._num_layers - 1})"
            )
        return self.plan.stage_of(layer_idx)

    def topology(self) -> ProcessTopology:
        """The process topology (pipe x data x ...) of this pipeline."""
        return self._topo

    def mpu(self) -> PipelineParallelGrid:
        """The communication grid, with DeepSpeed's model-parallel-unit accessors."""
        return self._grid

    def num_pipeline_stages(self) -> int:
        return self.num_stages

    @property
    def local_layer_indices(self) -> range:
        """Global indices of the layers this stage runs."""
        return range(self._local_start, self._local_stop)

    def allreduce_tied_weight_gradients(self) -> None:
        """Sum the gradients of each tied tensor over the stages that hold a copy.

        Call after backward and before the optimizer step, so every copy takes the same step.
        Collective over each tie group.
        """
        for comm in self.tied_comms.values():
            comm.sum_gradients()

    def get_tied_weights_and_groups(self) -> list[tuple[torch.Tensor, dist.ProcessGroup]]:
        """``(tensor, group)`` for each tied tensor this stage holds, as DeepSpeed returns."""
        return [
            (tensor, default_if_none(comm.group))
            for comm in self.tied_comms.values()
            for tensor in comm.tensors()
        ]

    def is_tied_copy(self, parameter: torch.Tensor) -> bool:
        """Whether ``parameter`` is a tied tensor whose owner is another stage.

        Summing a quantity over all stages (a parameter count, a gradient norm) counts each tied
        tensor once by skipping these copies.
        """
        for comm in self.tied_comms.values():
            if comm.ranks[0] != self.global_rank and any(
                parameter is tensor for tensor in comm.tensors()
            ):
                return True
        return False

    # ------------------------------------------------------------------ forward

    def set_checkpoint_interval(self, interval: int) -> None:
        """Checkpoint activations in chunks of ``interval`` layers (0 disables)."""
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
            raise ValueError(
                f"interval={interval!r}: the activation checkpoint interval must be an int >= 0 "
                f"(0 disables checkpointing)"
            )
        self.activation_checkpoint_interval = interval

    def forward(self, *inputs: Any) -> Any:
        """Run the local layers in order.

        One argument is passed to the first layer as is (a 1-tuple is unwrapped); several
        arguments, as a schedule passes a previous stage's tuple output, are passed as a tuple.
        """
        self.micro_offset += 1
        micro_offset = self.micro_offset
        x: Any = inputs[0] if len(inputs) == 1 else tuple(inputs)
        if isinstance(x, tuple) and len(x) == 1:
            x = x[0]
        interval = self.activation_checkpoint_interval
        if interval == 0:
            return self._run_range(0, len(self.forward_funcs), micro_offset)(x)
        for start in range(0, len(self.forward_funcs), interval):
            stop = min(start + interval, len(self.forward_funcs))
            run = self._run_range(start, stop, micro_offset)
            if self._is_checkpointable(self.forward_funcs[start:stop]):
                args = x if isinstance(x, tuple) else (x,)
                x = self.activation_checkpoint_func(_unpacking(run), *args)
            else:
                x = run(x)
        return x

    def _run_range(self, start: int, stop: int, micro_offset: int) -> Callable[[Any], Any]:
        def run(x: Any) -> Any:
            for local_index in range(start, stop):
                # The global index, also inside checkpointed chunks: DeepSpeed uses the index
                # within the chunk there, so every chunk reuses the same seeds.
                self.curr_layer = self._local_start + local_index
                if self.seed_layers:
                    (self.seed_fn or default_seed_fn)(
                        self.base_seed * micro_offset + self.curr_layer
                    )
                x = self.forward_funcs[local_index](x)
            return x

        return run

    def _is_checkpointable(self, funcs: Sequence[ForwardFunc]) -> bool:
        modules = [f.module if isinstance(f, TiedForward) else f for f in funcs]
        if self.checkpointable_layers is not None:
            return all(type(m).__name__ in self.checkpointable_layers for m in modules)
        return any(
            isinstance(m, torch.nn.Module) and next(m.parameters(), None) is not None
            for m in modules
        )

    # ------------------------------------------------------------------ checkpoints

    def ckpt_layer_path(self, ckpt_dir: str | Path, local_layer_idx: int) -> str:
        """The file of local layer ``local_layer_idx`` in ``ckpt_dir`` (DeepSpeed's naming)."""
        return str(self._layer_file(ckpt_dir, self._local_start + local_layer_idx))

    def _layer_file(self, directory: str | Path, layer_index: int) -> Path:
        return layer_file(directory, layer_index, self._topo.get_rank_repr(self._topo_rank()))

    def _topo_rank(self) -> int:
        return self._grid.topology_rank

    def _files_to_save(self) -> list[tuple[int, torch.nn.Module]]:
        """``(global layer index, module)`` this rank writes: its layers, and its owned ties."""
        owned: list[tuple[int, torch.nn.Module]] = [
            (int(name), self.get_submodule(name)) for name in self.fwd_map
        ]
        for key, tied in sorted(self._tied_keys().items()):
            if key in self.tied_modules and self.stage_owner(tied.first_layer) == self.stage_id:
                owned.append((tied.first_layer, self.tied_modules[key]))
        return sorted(owned, key=lambda entry: entry[0])

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
            if self._grid.get_data_parallel_id() != 0:
                return
            for index, module in self._files_to_save():
                state = module.state_dict()
                if exclude_frozen_params:
                    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
                    state = {k: v for k, v in state.items() if k not in frozen}
                atomic_save(state, self._layer_file(directory, index))

        run_on_every_rank(f"saving the checkpoint to {directory}", write, self._grid.process_group)

    def load_state_dir(self, load_dir: str | Path, strict: bool = True) -> None:
        """Load the files :meth:`save_state_dict` wrote, whatever stage count wrote them.

        Collective over the pipeline's process group. A missing or mismatched file raises on
        every rank, naming the layer and the path.
        """
        directory = Path(load_dir)

        def read() -> None:
            for index, module in self._files_to_load():
                path = self._layer_file(directory, index)
                state = load_layer_file(path, index, self.device)
                try:
                    module.load_state_dict(state, strict=strict)
                except RuntimeError as error:
                    raise RuntimeError(
                        f"the checkpoint of layer {index} at {path} does not fit "
                        f"{type(module).__name__}: {error}"
                    ) from error

        run_on_every_rank(
            f"loading the checkpoint from {directory}", read, self._grid.process_group
        )
        self._synchronize_tied_weights()

    def _files_to_load(self) -> list[tuple[int, torch.nn.Module]]:
        entries: list[tuple[int, torch.nn.Module]] = [
            (int(name), self.get_submodule(name)) for name in self.fwd_map
        ]
        for key in self.tied_modules:
            entries.append((self._tied_keys()[key].first_layer, self.tied_modules[key]))
        return sorted(entries, key=lambda entry: entry[0])


class _LayerSeed:
    """Seeds the RNGs before building one layer, as ``seed_layers`` asks."""

    def __init__(self, module: PipelineModule, index: int) -> None:
        self._module = module
        self._index = index
        self._fork: Any = None

    def __enter__(self) -> None:
        module = self._module
        if module.seed_layers:
            # As DeepSpeed: the seed stays set after construction.
            (module.seed_fn or default_seed_fn)(module.base_seed + self._index)
            return
        devices = [module.device] if module.device.type == "cuda" else []
        self._fork = torch.random.fork_rng(devices=devices)
        self._fork.__enter__()
        torch.manual_seed(layer_init_seed(module._init_seed, self._index))

    def __exit__(self, *exc_info: object) -> None:
        if self._fork is not None:
            self._fork.__exit__(*exc_info)
            self._fork = None


def _unpacking(run: Callable[[Any], Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        return run(args[0] if len(args) == 1 else args)

    return call
