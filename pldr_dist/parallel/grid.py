"""The TP x PP x DP x CP process grid: one place that builds and hands out the groups.

Rank layout is DeepSpeed's PipeModelDataParallelTopology (axes pipe, data, model), so
tensor-parallel ranks are adjacent, as in Megatron-LM, and a DeepSpeed PipelineModule
built from `grid.topology` sees the same layout. Context-parallel ranks hold the same weights
as data-parallel ones and their gradients are averaged the same way (context_parallel.py), so
the topology's data axis spans dp x cp ("replicas"): index d is data-parallel rank d // cp and
context-parallel rank d % cp. The object also answers the `mpu` queries deepspeed.initialize
asks with that dp x cp group, so ZeRO shards and gradient averaging span it.
"""
from __future__ import annotations

import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from ..errors import PLDRError


class LayoutError(PLDRError, ValueError):
    """An impossible parallel layout for this job (raised before any group is built)."""


def check_layout(world_size: int, tp: int, pp: int, num_heads: int | None = None,
                 vocab_size: int | None = None, num_layers: int | None = None, cp: int = 1) -> int:
    """Validate a layout and return the data-parallel size."""
    for name, value in (("parallel.tp", tp), ("parallel.pp", pp), ("parallel.cp", cp)):
        if not isinstance(value, int) or value < 1:
            raise LayoutError(f"{name}={value!r} must be a positive integer")
    if world_size % (tp * pp * cp):
        names, sizes = ("tp", "pp", "cp") if cp > 1 else ("tp", "pp"), (tp, pp, cp) if cp > 1 else (tp, pp)
        raise LayoutError(f"world size {world_size} is not divisible by {'*'.join('parallel.' + n for n in names)}="
                          f"{'*'.join(map(str, sizes))}={tp * pp * cp} (launch a multiple of {tp * pp * cp} processes)")
    if num_heads is not None and num_heads % tp:
        divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise LayoutError(f"parallel.tp={tp} does not divide model.num_heads={num_heads} "
                          f"(choose one of {', '.join(map(str, divisors))})")
    if vocab_size is not None and vocab_size % tp:
        raise LayoutError(f"parallel.tp={tp} does not divide model.vocab_size={vocab_size} "
                          f"(pad the vocabulary to a multiple of {tp})")
    if num_layers is not None and pp > num_layers:
        raise LayoutError(f"parallel.pp={pp} is more pipeline stages than model.num_layers={num_layers}")
    return world_size // (tp * pp * cp)


class ProcessGrid:
    def __init__(self, tp: int = 1, pp: int = 1, cp: int = 1):
        if not dist.is_initialized():
            raise RuntimeError("ProcessGrid needs torch.distributed to be initialised first")
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.dp = check_layout(self.world_size, tp, pp, cp=cp)
        self.tp, self.pp, self.cp = tp, pp, cp
        self.replicas = self.dp * cp          # ranks holding the same weights
        self.topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=self.replicas)
        coord = self.topology.get_coord(self.rank)
        self.tp_rank, self.pp_rank, self.replica_rank = coord.model, coord.pipe, coord.data
        self.dp_rank, self.cp_rank = divmod(coord.data, cp)
        # Every rank creates every group in the same order (a torch.distributed requirement).
        self.tp_group, self.tp_ranks = self._groups("model")
        self.replica_group, self.replica_ranks = self._groups("data")
        self.pp_group, self.pp_ranks = self._groups("pipe")
        if cp == 1:
            self.dp_group, self.dp_ranks = self.replica_group, self.replica_ranks
            self.cp_group, self.cp_ranks = None, [self.rank]
        else:
            self.dp_group, self.dp_ranks = self._new_groups(self._data_lists(lambda c: [j * cp + c for j in range(self.dp)], cp))
            self.cp_group, self.cp_ranks = self._new_groups(self._data_lists(lambda j: [j * cp + c for c in range(cp)], self.dp))
        # DeepSpeed's "model parallel" group is everything that is not data parallel (TP x PP).
        mp_lists = [sorted(self.topology.get_axis_list("data", d)) for d in range(self.replicas)]
        self.mp_group, self.mp_ranks = self._new_groups(mp_lists)

    def _data_lists(self, members, count: int) -> list:
        """Rank lists over subsets of the data axis, one per (pipe, model) position and per
        `count` index: members(i) -> the data-axis indices of list i."""
        return [[self.topology.get_rank(pipe=p, data=d, model=m) for d in members(i)]
                for p in range(self.pp) for m in range(self.tp) for i in range(count)]

    def _groups(self, axis: str):
        return self._new_groups(self.topology.get_axis_comm_lists(axis) or [[r] for r in range(self.world_size)])

    def _new_groups(self, lists):
        mine = None
        for ranks in lists:
            group = dist.new_group(ranks=ranks)
            if self.rank in ranks:
                mine = (group, list(ranks))
        return mine

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        cp = f" cp={self.cp}" if self.cp > 1 else ""
        cp_rank = f" cp_rank={self.cp_rank}" if self.cp > 1 else ""
        return (f"tp={self.tp} pp={self.pp} dp={self.dp}{cp} (rank {self.rank}: tp_rank={self.tp_rank} "
                f"pp_rank={self.pp_rank} dp_rank={self.dp_rank}{cp_rank})")

    # -- the mpu interface deepspeed.initialize uses: "data parallel" = dp x cp ---------
    def get_data_parallel_group(self):
        return self.replica_group

    def get_data_parallel_rank(self):
        return self.replica_rank

    def get_data_parallel_world_size(self):
        return self.replicas

    def get_model_parallel_group(self):
        return self.mp_group

    def get_model_parallel_rank(self):
        return self.mp_ranks.index(self.rank)

    def get_model_parallel_world_size(self):
        return len(self.mp_ranks)

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    def get_tensor_model_parallel_rank(self):
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self):
        return self.tp

    get_slice_parallel_group = get_tensor_model_parallel_group
    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size

    def get_pipe_parallel_group(self):
        return self.pp_group

    def get_pipe_parallel_rank(self):
        return self.pp_rank

    def get_pipe_parallel_world_size(self):
        return self.pp
