"""A request inside the router: its phase, what it holds on the instances, how it can end.

:class:`Flow` is the state the PD walk (``actors/router/pd.py``) keeps for one request; every
exit of the walk is an :class:`Exit`, and ``_Ended`` carries a non-finishing exit with the HTTP
answer it maps to. ``next_event`` is the one bounded wait on a flow's queue.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

from actors.frontend.server import BackendUnavailable, RequestRejected, RequestTimedOut


class Phase(enum.Enum):
    RESERVE = "reserve"
    PREFILL = "prefill"
    DECODE = "decode"
    DONE = "done"


class Exit(enum.Enum):
    """How a request left the router (``PDBackend.exits`` counts them)."""

    FINISHED = "finished"
    CLIENT_GONE = "client_gone"
    PREFILL_REFUSED = "prefill_refused"
    DECODE_FAILED = "decode_failed"  # the decode refused the request for good
    RETRIES_EXHAUSTED = "retries_exhausted"
    INSTANCE_LOST = "instance_lost"  # the mixed instance running the request died
    NO_CAPACITY = "no_capacity"
    TIMEOUT = "timeout"


@dataclass
class InstanceLost:
    identity: bytes
    reason: str


@dataclass
class ReserveAnswer:
    """A decode's answer to the flow's pending ``Reserve``: block ids, or None (Busy)."""

    identity: bytes
    block_ids: list[int] | None
    reason: str
    cached_blocks: int = 0  # leading blocks of the lease whose KV the decode has cached


@dataclass
class InstanceLoad:
    """What the router dispatched to an instance since it last reported."""

    pending_prefill_tokens: int = 0
    prefills: int = 0  # requests those tokens belong to
    active: int = 0
    reserved_blocks: int = 0

    def idle(self) -> bool:
        return not (self.pending_prefill_tokens or self.prefills or self.active or self.reserved_blocks)


@dataclass
class Flow:
    """One request inside the router, and what it holds on the instances."""

    req_id: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    phase: Phase = Phase.RESERVE
    reserving: bytes | None = None  # asked for a lease (Reserve sent), its answer not taken yet
    decode: bytes | None = None  # holds a lease for the request (runs it once ``decoding``)
    block_ids: list[int] | None = None  # the lease's blocks on ``decode``
    cached_blocks: int = 0  # of them, leading ones the decode's prefix cache holds (not written)
    lease_blocks: int = 0  # blocks charged to the decode's estimate until Decode or release
    decoding: bool = False  # Decode sent: the decode runs the sequence (abort, not release)
    prefill: bytes | None = None  # computing the prompt; may write into the lease once ``dest_sent``
    prefill_tokens: int = 0  # charged to the prefill's pending estimate
    prefill_over: bool = False  # its answer (or its loss) arrived: it writes no more, even if unread
    dest_sent: bool = False  # the prefill has the lease's block ids
    # prefill -> answers still due for dispatches the flow gave up (Abort sent): each dispatch
    # gets exactly one Prefilled or Failed, and these must not be read as the current one's
    stale: dict[bytes, int] = field(default_factory=dict)
    exit: Exit | None = None


@dataclass
class Orphan:
    """A lease whose request ended while its prefill may still write into it."""

    prefill: bytes
    decode: bytes
    stale: int = 0  # answers of given-up dispatches to skip before the one that ends the writing
    since: float = field(default_factory=time.monotonic)


class Ended(Exception):
    """A request's end other than finishing, with the HTTP answer it maps to."""

    def __init__(self, how: Exit, message: str, retry_after: int = 5):
        super().__init__(message)
        self.how, self.message, self.retry_after = how, message, retry_after

    def as_http(self) -> Exception:
        if self.how in (Exit.PREFILL_REFUSED, Exit.DECODE_FAILED):
            return RequestRejected(self.message)
        if self.how is Exit.TIMEOUT:
            return RequestTimedOut(self.message)
        return BackendUnavailable(self.message, retry_after=self.retry_after)


async def next_event(queue: asyncio.Queue, timeout: float):
    """The queue's next item, waiting at most ``timeout`` seconds (``TimeoutError`` after). An item
    already there is taken at once (no timer, no task: the per-token path). ``asyncio.timeout``
    cancels only its own scope, so — unlike ``asyncio.wait_for`` before Python 3.12 — a
    cancellation that races with an item arriving is never swallowed: a client that goes away is
    always seen."""
    if not queue.empty():
        return queue.get_nowait()
    async with asyncio.timeout(timeout):
        return await queue.get()
