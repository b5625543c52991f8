"""What a model is built for: its tensor- and expert-parallel groups (size 1 = no parallelism).

The model's constructor takes a :class:`ParallelContext` and hands its groups to the layers
(native/model/layers.py): each layer then allocates only its shard and records which checkpoint
rows / columns / experts it holds, and row-parallel layers own their all-reduce. Nothing is
sharded or patched after construction.

:class:`StepRows` carries the one value that changes per step under expert parallelism: the rows
per rank that every EP rank pads its MoE dispatch to, agreed by ``EPCoordinator.plan`` before the
step and read by the MoE layers inside it (one object shared by the coordinator and the layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Group:
    """One parallel group as a layer sees it: this rank, the group size, the data collectives
    (a native.parallel.comm.Comm; None when ``size`` is 1)."""

    rank: int = 0
    size: int = 1
    comm: object = None

    def __post_init__(self):
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is not in a group of {self.size}")
        if self.size > 1 and self.comm is None:
            raise ValueError(f"a group of {self.size} ranks needs its collectives (comm)")


@dataclass
class StepRows:
    """EP: this step's rows per rank in every MoE layer (0: no rank has work)."""

    tokens: int = 0


@dataclass(frozen=True)
class ParallelContext:
    tp: Group = field(default_factory=Group)
    ep: Group = field(default_factory=Group)
    # set when experts are sharded over an EP group (ep.size > 1, or an EP group of one rank that
    # still runs the dispatch); None: the MoE layers route locally
    ep_rows: StepRows | None = None

    def __post_init__(self):
        if self.tp.size > 1 and self.ep_rows is not None:
            raise ValueError(f"expert parallelism runs with TP 1, not TP{self.tp.size}")

    @classmethod
    def tensor_parallel(cls, rank: int, size: int, comm) -> ParallelContext:
        return cls(tp=Group(rank, size, comm if size > 1 else None))


NO_PARALLEL = ParallelContext()
