"""Process groups and the collectives the model runs in them (TP and EP alike).

Every parallel group gets two torch.distributed groups:

* ``control`` — gloo, always: host values (the leader's step commands, the EP step plan). A
  host-side all-reduce on gloo costs no CUDA synchronisation.
* ``data`` — what the model's tensors travel on: NCCL when every rank has a GPU of its own
  (collectives run on the GPU and can be captured in a CUDA graph), gloo otherwise (the CPU,
  or several ranks sharing one GPU, which NCCL refuses: CUDA tensors are then staged through
  host memory, correct but slow, and decode runs without graphs).

:class:`Comm` wraps the data group with the three collectives the model needs, with the same
result on either backend: ``all_reduce`` (sum), ``all_gather`` (concatenated along dim 0) and
``reduce_scatter`` (sum, then this rank's slice of dim 0); a collective that fails because a peer
is gone raises :class:`GroupBroken`, one line. On gloo that is immediate (the peer's connection
closes); NCCL collectives are asynchronous, so a survivor stalls at its next synchronisation until
the NCCL watchdog (``PDBUS_TP_TIMEOUT_S``, 600 s) aborts it — the gloo control collectives (the
leader's step broadcast, the EP plan) usually notice first. Reductions of bf16 on gloo are done in
fp32 (gloo has no bf16 sum); on NCCL they stay bf16 so that a step's traffic is what it says.
"""

from __future__ import annotations

import datetime
import functools
import logging

import torch
import torch.distributed as dist

from pdbus import envs

log = logging.getLogger("pdbus.parallel")


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=envs.PDBUS_TP_TIMEOUT_S)


class GroupBroken(RuntimeError):
    """A collective failed because a peer rank died or left: the group cannot be used again."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _guarded(fn):
    """Turn a failed collective (gloo: a peer closed its connection, or timed out) into GroupBroken."""

    @functools.wraps(fn)
    def wrapper(self, *args):
        try:
            return fn(self, *args)
        except torch.OutOfMemoryError:
            raise  # a local failure, not the group's (the engine still treats it as fatal mid-step)
        except (RuntimeError, OSError) as exc:
            raise GroupBroken(f"{fn.__name__} failed (rank {self.rank} of {self.size}): {first_line(exc)}") from None

    return wrapper


def _device_uuid(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    return str(torch.cuda.get_device_properties(device).uuid)


class Comm:
    """The data-path collectives of one group (see the module docstring)."""

    def __init__(self, group, backend: str, sharing: int = 1):
        self.group = group
        self.backend = backend
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.sharing = sharing  # ranks of this group on this rank's GPU (gloo only: NCCL needs 1)

    @property
    def capturable(self) -> bool:
        """Whether the collectives can be captured in a CUDA graph."""
        return self.backend == "nccl"

    def _staged(self, t: torch.Tensor, reduce: bool) -> torch.Tensor:
        host = t.detach().to("cpu")
        if reduce and host.dtype in (torch.bfloat16, torch.float16):
            host = host.float()
        return host

    @_guarded
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks; in place on NCCL, returns the result either way."""
        if self.backend == "nccl":
            dist.all_reduce(t, group=self.group)
            return t
        host = self._staged(t, reduce=True)
        dist.all_reduce(host, group=self.group)
        return host.to(device=t.device, dtype=t.dtype)

    @_guarded
    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """``[N, ...]`` on each rank -> ``[size * N, ...]``, rank-major."""
        t = t.contiguous()
        if self.backend == "nccl":
            out = t.new_empty((self.size * t.shape[0], *t.shape[1:]))
            dist.all_gather_into_tensor(out, t, group=self.group)
            return out
        host = self._staged(t, reduce=False)
        parts = [torch.empty_like(host) for _ in range(self.size)]
        dist.all_gather(parts, host, group=self.group)
        return torch.cat(parts).to(t.device)

    @_guarded
    def reduce_scatter(self, t: torch.Tensor) -> torch.Tensor:
        """``[size * N, ...]`` on each rank -> the sum's rows ``[rank*N, (rank+1)*N)``."""
        if t.shape[0] % self.size:
            raise ValueError(f"reduce_scatter of {t.shape[0]} rows over {self.size} ranks")
        n = t.shape[0] // self.size
        t = t.contiguous()
        if self.backend == "nccl":
            out = t.new_empty((n, *t.shape[1:]))
            dist.reduce_scatter_tensor(out, t, group=self.group)
            return out
        host = self._staged(t, reduce=True)
        out = host.new_empty((n, *host.shape[1:]))
        dist.reduce_scatter(out, list(host.chunk(self.size)), group=self.group)
        return out.to(device=t.device, dtype=t.dtype)


def shutdown(clean: bool) -> None:
    """Leave the process groups at exit; after a broken group only the process exit cleans up
    (destroying a communicator whose peer is gone can block)."""
    if clean and dist.is_initialized():
        dist.destroy_process_group()


def init_groups(rank: int, size: int, init_method: str, device: torch.device, what: str) -> tuple[Comm, object]:
    """Join a group of ``size`` processes (``init_method`` e.g. ``tcp://host:port``): returns the
    data :class:`Comm` and the gloo control group. ``what`` names the group in the log."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=size, timeout=_timeout())
    elif (dist.get_rank(), dist.get_world_size()) != (rank, size):
        raise RuntimeError(f"this process is already rank {dist.get_rank()} of {dist.get_world_size()}, not {rank} of {size}")
    control = dist.group.WORLD
    uuids: list[str] = [""] * size
    dist.all_gather_object(uuids, _device_uuid(device), group=control)
    if device.type == "cuda" and len(set(uuids)) == size:
        data = dist.new_group(backend="nccl", timeout=_timeout())
        return Comm(data, "nccl"), control
    if device.type == "cuda" and rank == 0:
        log.warning(
            "%s%d: %d ranks share %d GPU(s), and NCCL needs a GPU per rank: collectives go through gloo "
            "(host-staged, slow) and decode runs without CUDA graphs",
            what, size, size, len(set(uuids)),
        )
    mine = uuids[rank]
    return Comm(control, "gloo", sharing=uuids.count(mine) if mine else 1), control
