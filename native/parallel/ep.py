"""Expert parallelism over the DP group (``--enable-expert-parallel``, TP = 1).

Each of the N DP ranks keeps experts ``[r*E/N, (r+1)*E/N)`` of every MoE layer; attention, the
router, dense layers and shared experts stay whole on every rank. The model is built that way:
``load_model(..., parallel=coordinator.context())``, and its MoE layers (native/model/ernie.py
``MoE``) do the dispatch themselves. In each MoE layer the ranks
exchange tokens through buffers of a fixed size per rank: every rank pads its tokens to the
step's agreed size ``tokens`` and all-gathers them (``[N * tokens, H]``), each rank applies its own
experts to the tokens routed to them, and a reduce-scatter returns every rank the combined expert
output of its own rows. No size is exchanged inside the layer and nothing is read back to the
host, so an EP decode step is captured in a CUDA graph like any other (DeepEP's low-latency mode
has the same property; its buffers are per expert, these per rank, since with top-k routing over
few ranks nearly every token reaches every rank anyway).

The step size is agreed once per engine iteration, before the step: :meth:`EPCoordinator.plan`
all-reduces (on the gloo control group, host values only) this rank's token count and whether its
step is decode-only. All ranks then pad to the same size — the smallest captured graph bucket
that fits when every rank is decoding (each replays that bucket's graph), the largest count
otherwise (eager). A rank with no work runs :meth:`EPCoordinator.idle_step` (the bucket's graph
with only padding rows, or the MoE collectives with zero tokens), so the collectives never hang.
The plan is also the group's liveness check: when a rank dies, the others' next plan fails
(:class:`EPGroupError`), and each stops its instance with one line, since no rank can serve
without the dead one's experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from native.parallel.comm import GroupBroken, first_line, init_groups
from native.parallel.context import Group, ParallelContext, StepRows


class EPGroupError(GroupBroken):
    """The EP group is broken (a rank died or left): this rank cannot step any more."""


class EPCoordinator:
    """Keeps the DP ranks of one EP group stepping together (see the module docstring)."""

    def __init__(self, rank: int, size: int, master: str, device: torch.device):
        self.comm, self.control = init_groups(rank, size, f"tcp://{master}", device, "EP")
        self.rank, self.size = rank, size
        self.device = device
        self.rows = StepRows()  # shared with the model's MoE layers: this step's rows per rank
        self.model = None  # set by attach(): the model built from context()
        self.kv_cache = None  # set by the rank server: decides the kernel or torch path
        self.graphs = None  # the rank's DecodeGraphs, when captured

    def context(self) -> ParallelContext:
        """What to build this rank's model for (``load_model(..., parallel=...)``)."""
        return ParallelContext(ep=Group(self.rank, self.size, self.comm), ep_rows=self.rows)

    def attach(self, model) -> None:
        """The model built from :meth:`context`, whose MoE layers :meth:`idle_step` runs."""
        if model.parallel.ep_rows is not self.rows:
            raise ValueError("attach() takes the model built from this coordinator's context()")
        self.model = model

    @property
    def tokens(self) -> int:
        """This step's rows per rank in every MoE layer (agreed by :meth:`plan`)."""
        return self.rows.tokens

    @tokens.setter
    def tokens(self, value: int) -> None:
        self.rows.tokens = value

    def barrier(self) -> None:
        dist.barrier(group=self.control)

    @property
    def expert_range(self) -> tuple[int, int]:
        """(first, last) expert of each MoE layer held here."""
        moes = self.model.moe_layers() if self.model is not None else []
        if not moes:
            return (0, 0)
        lo, hi = moes[0].experts.expert_range
        return lo, hi - 1

    def plan(self, num_tokens: int, decode_only: bool) -> int:
        """Agree on this step's rows per rank (0: no rank has work, nobody steps)."""
        t = torch.tensor([num_tokens, 0 if decode_only else 1], dtype=torch.int64)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        except (RuntimeError, OSError) as exc:  # gloo: a peer closed its connection, or timed out
            raise EPGroupError(f"EP{self.size} group broken at rank {self.rank}: {first_line(exc)}") from None
        tokens, mixed = (int(v) for v in t.tolist())
        buckets = self.graphs.buckets if self.graphs is not None and self.graphs.enabled else []
        if tokens and not mixed and buckets and tokens <= buckets[-1]:
            tokens = min(b for b in buckets if b >= tokens)
        self.tokens = tokens
        return tokens

    @torch.inference_mode()
    def idle_step(self) -> None:
        """Join this step's MoE collectives with no tokens of our own."""
        if self.graphs is not None and self.graphs.run_idle(self.tokens):
            return
        hidden = self.model.cfg.hidden_size
        empty = torch.zeros((0, hidden), dtype=self.model.dtype, device=self.device)
        self.model.select_ops(self.kv_cache)  # the same table as this rank's steps: same collectives
        for moe in self.model.moe_layers():
            moe(empty)
