"""Expert parallelism over the DP group (``--enable-expert-parallel``, TP = 1).

Each of the N DP ranks keeps experts ``[r*E/N, (r+1)*E/N)`` of every MoE layer; attention, the
router, dense layers and shared experts stay whole on every rank. In each MoE layer the ranks
exchange tokens with fixed-shape collectives: every rank's tokens (padded to the step's largest
token count, agreed with one all-reduce) with their routing are all-gathered, each rank applies
its own experts to the tokens routed to them, and a reduce-scatter returns every rank its tokens'
combined expert output. Shapes depend only on the padded size, so a decode step with EP keeps
fixed dispatch buffers per bucket (what a CUDA graph needs) and no rank ever waits on a message
whose size it cannot know.

All DP ranks must enter every MoE layer together: ``EPCoordinator.sync`` runs once per engine
loop iteration on every rank (an all-reduce of "I have work"); when any rank has work, the idle
ones run ``idle_step`` — the MoE collectives with zero tokens — so the collectives never hang.
"""

from __future__ import annotations

import datetime
import os
from types import MethodType

import torch
import torch.distributed as dist
from torch import nn


def _expert_range(num_experts: int, rank: int, size: int) -> tuple[int, int]:
    if num_experts % size:
        raise ValueError(f"{num_experts} experts do not split over EP{size}")
    per = num_experts // size
    return rank * per, (rank + 1) * per


def _slice_experts(experts: nn.Module, lo: int, hi: int) -> None:
    for name in ("w13", "w2"):
        if isinstance(getattr(experts, name, None), nn.Parameter):
            setattr(experts, name, nn.Parameter(getattr(experts, name).data[lo:hi].contiguous(), requires_grad=False))
    for name in ("w13_q", "w13_s", "w2_q", "w2_s"):
        if hasattr(experts, name):
            setattr(experts, name, getattr(experts, name)[lo:hi].contiguous())
    if hasattr(experts, "num_experts"):
        experts.num_experts = hi - lo


def _ep_forward(self, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    T, H = x2.shape
    group, size = self.ep_group, self.ep_size
    tmax = torch.tensor([T], dtype=torch.int64)
    dist.all_reduce(tmax, op=dist.ReduceOp.MAX, group=group)
    tmax = int(tmax.item())
    if tmax == 0:
        return x
    if T:
        weights, idx = self.route(x2)
    else:
        weights = x2.new_zeros((0, self.top_k))
        idx = torch.zeros((0, self.top_k), dtype=torch.int64, device=x.device)
    xp = x2.new_zeros((tmax, H))
    xp[:T] = x2
    ip = torch.full((tmax, self.top_k), -1, dtype=torch.int64, device=x.device)
    ip[:T] = idx
    wp = torch.zeros((tmax, self.top_k), dtype=torch.float32, device=x.device)
    wp[:T] = weights.float()
    xs = [torch.empty_like(xp) for _ in range(size)]
    ids = [torch.empty_like(ip) for _ in range(size)]
    ws = [torch.empty_like(wp) for _ in range(size)]
    dist.all_gather(xs, xp, group=group)
    dist.all_gather(ids, ip, group=group)
    dist.all_gather(ws, wp, group=group)
    xs, ids, ws = torch.cat(xs), torch.cat(ids), torch.cat(ws)
    out = torch.zeros((size * tmax, H), dtype=torch.float32, device=x.device)
    for e in range(self.ep_lo, self.ep_hi):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        y = self.experts.forward_expert(e - self.ep_lo, xs[tok]).float()
        out.index_add_(0, tok, y * ws[tok, slot, None])
    mine = torch.empty((tmax, H), dtype=torch.float32, device=x.device)
    dist.reduce_scatter(mine, list(out.chunk(size)), group=group)
    out = mine[:T]
    if self.shared_experts is not None and T:
        out = out + self.shared_experts(x2).float()
    return out.to(x.dtype).reshape(shape)


def shard_experts_(model: nn.Module, rank: int, size: int, group) -> list[nn.Module]:
    """Keep this rank's experts in every MoE layer and switch those layers to EP dispatch."""
    moes = []
    for layer in model.model.layers:
        mlp = layer.mlp
        if not hasattr(mlp, "experts"):
            continue
        lo, hi = _expert_range(mlp.num_experts, rank, size)
        _slice_experts(mlp.experts, lo, hi)
        mlp.ep_lo, mlp.ep_hi, mlp.ep_size, mlp.ep_group = lo, hi, size, group
        mlp.forward = MethodType(_ep_forward, mlp)
        moes.append(mlp)
    model.ep_moes = moes
    return moes


class EPCoordinator:
    """Keeps the DP ranks of one EP group stepping together."""

    def __init__(self, model: nn.Module, rank: int, size: int, master: str):
        if not dist.is_initialized():
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://{master}",
                rank=rank,
                world_size=size,
                timeout=datetime.timedelta(seconds=float(os.environ.get("PDBUS_TP_TIMEOUT_S", "600"))),
            )
        self.group = dist.group.WORLD
        self.rank, self.size = rank, size
        self.moes = shard_experts_(model, rank, size, self.group)
        self.hidden = model.cfg.hidden_size
        self.dtype = model.dtype

    def sync(self, has_work: bool) -> bool:
        flag = torch.tensor([1 if has_work else 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    @torch.inference_mode()
    def idle_step(self) -> None:
        """Join every MoE layer's collectives with zero tokens."""
        empty = torch.zeros((0, self.hidden), dtype=self.dtype)
        for moe in self.moes:
            moe(empty)
