"""Expert parallelism over the DP group (``--enable-expert-parallel``, TP = 1).

Each of the N DP ranks keeps experts ``[r*E/N, (r+1)*E/N)`` of every MoE layer; attention, the
router, dense layers and shared experts stay whole on every rank. In each MoE layer the ranks
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

from types import MethodType

import torch
import torch.distributed as dist
from torch import nn

from native.parallel.comm import GroupBroken, first_line, init_groups


class EPGroupError(GroupBroken):
    """The EP group is broken (a rank died or left): this rank cannot step any more."""


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
    experts.shard_experts = (lo, hi)  # the checkpoint experts this shard holds


def padded_rows(x: torch.Tensor, tokens: int) -> torch.Tensor:
    """``x [T, H]`` padded with zero rows to the step's agreed ``tokens``."""
    T = x.shape[0]
    if T > tokens:
        raise RuntimeError(f"EP step of {T} tokens exceeds the agreed {tokens} (plan() was not called?)")
    return x if T == tokens else torch.cat([x, x.new_zeros((tokens - T, x.shape[1]))])


def _ep_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The torch path of an EP MoE block (the kernel path is gpu_ops.moe_ep)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    T, H = x2.shape
    ep, k = self.ep, self.top_k
    if ep.tokens == 0:
        return x
    # routing is computed where the token lives (as without EP) and travels with it: one buffer
    # [tokens, H | k ids | k weights] in fp32 (bf16 values and expert ids are exact in fp32)
    buf = x2.new_zeros((ep.tokens, H + 2 * k), dtype=torch.float32)
    buf[:, H : H + k] = -1
    if T:
        weights, idx = self.route(x2)
        buf[:T, :H] = x2.float()
        buf[:T, H : H + k] = idx.float()
        buf[:T, H + k :] = weights.float()
    gathered = ep.comm.all_gather(buf)
    xs = gathered[:, :H].to(x.dtype)
    ids = gathered[:, H : H + k].long()
    ws = gathered[:, H + k :]
    out = torch.zeros((gathered.shape[0], H), dtype=torch.float32, device=x.device)
    for e in range(self.ep_lo, self.ep_hi):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        y = self.experts.forward_expert(e - self.ep_lo, xs[tok]).float()
        out.index_add_(0, tok, y * ws[tok, slot, None])
    out = ep.comm.reduce_scatter(out)[:T]
    if self.shared_experts is not None and T:
        out = out + self.shared_experts(x2).float()
    return out.to(x.dtype).reshape(shape)


def shard_experts_(model: nn.Module, rank: int, size: int, ep=None) -> list[nn.Module]:
    """Keep this rank's experts in every MoE layer and switch those layers to EP dispatch
    (through ``ep``, the EPCoordinator). Works on a meta-device model (before loading)."""
    moes = []
    for layer in model.model.layers:
        mlp = layer.mlp
        if not hasattr(mlp, "experts"):
            continue
        lo, hi = _expert_range(mlp.num_experts, rank, size)
        _slice_experts(mlp.experts, lo, hi)
        mlp.ep_lo, mlp.ep_hi, mlp.ep = lo, hi, ep
        mlp.forward = MethodType(_ep_forward, mlp)
        moes.append(mlp)
    model.ep_moes = moes
    return moes


class EPCoordinator:
    """Keeps the DP ranks of one EP group stepping together (see the module docstring)."""

    def __init__(self, rank: int, size: int, master: str, device: torch.device):
        self.comm, self.control = init_groups(rank, size, f"tcp://{master}", device, "EP")
        self.rank, self.size = rank, size
        self.device = device
        self.tokens = 0  # this step's rows per rank in every MoE layer
        self.moes: list[nn.Module] = []
        self.model = None
        self.kv_cache = None  # set by the rank server: decides the kernel or torch path
        self.graphs = None  # the rank's DecodeGraphs, when captured

    def prepare(self, model: nn.Module) -> None:
        """Shard ``model``'s experts for this rank (meta or loaded); pass as load_model's prepare."""
        self.moes = shard_experts_(model, self.rank, self.size, self)
        self.model = model
        model.ep = self

    def barrier(self) -> None:
        dist.barrier(group=self.control)

    @property
    def expert_range(self) -> tuple[int, int]:
        return (self.moes[0].ep_lo, self.moes[0].ep_hi - 1) if self.moes else (0, 0)

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
        if self.kv_cache is not None and self.model.kernel_path(self.kv_cache):
            from native.model import gpu_ops

            for moe in self.moes:
                gpu_ops.moe_ep(moe, empty)
        else:
            for moe in self.moes:
                moe(empty)
