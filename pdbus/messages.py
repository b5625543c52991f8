"""Every message that crosses the bus, defined once.

Each message is a msgspec ``Struct`` tagged with a short name; ``Message`` is the tagged union
that the decoder validates against.  New fields are appended last with a default so that an
older peer can still decode a newer message of the same protocol version.  Bulk payloads
(tokenizer files, tensors) travel as extra zero-copy frames, never inside the header.

Nothing here knows about models: sampling parameters and KV layouts are plain data.
"""

from __future__ import annotations

import enum
from typing import ClassVar

import msgspec

PROTOCOL_VERSION = 1


class Role(enum.StrEnum):
    """What a peer is on the bus (``Hello.role``). A ``StrEnum``: it travels as its value, so the
    wire is unchanged, and a member equals its string (``Role.DECODE == "decode"``)."""

    PREFILL = "prefill"
    DECODE = "decode"
    MIXED = "mixed"
    CLIENT = "client"


class FinishReason(enum.StrEnum):
    """Why a sequence ended (``TokenOut`` / ``TextOut.finish_reason``); travels as its value."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


class _Msg(msgspec.Struct, tag_field="t", forbid_unknown_fields=False, omit_defaults=True):
    pass


# --------------------------------------------------------------------------- plain data


SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # a seed (request or --seed) is any int64 or uint64


class StructuredOutput(msgspec.Struct, frozen=True, omit_defaults=True):
    """A grammar the output must follow (guided decoding), filled by the frontend from
    ``response_format``, ``tool_choice`` or vLLM's ``guided_*`` fields; the engine enforces it."""

    kind: str  # "json_object" | "json_schema" | "regex" | "ebnf" | "choice"
    spec: str = ""  # json_schema: the schema as JSON; regex: the pattern; ebnf: the grammar; choice: a JSON list


class SamplingParams(msgspec.Struct, omit_defaults=True):
    """Per-request sampling settings (OpenAI + vLLM extras). Validated by the frontend."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: sampled token's logprob plus top-k
    structured: StructuredOutput | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5 or self.top_k == 1


class KVLayout(msgspec.Struct, frozen=True):
    """What a peer must know to write into this instance's KV blocks.

    Per layer K and V are ``[num_blocks, num_kv_heads, block_size, head_dim]``; this instance
    holds heads ``[head_start, head_start + num_kv_heads)`` of ``total_kv_heads``.
    """

    num_layers: int
    num_blocks: int
    num_kv_heads: int
    block_size: int
    head_dim: int
    dtype: str
    total_kv_heads: int = 0
    head_start: int = 0


# --------------------------------------------------------------------------- KV transfer endpoints


class TransferProtocol(enum.StrEnum):
    """The ``--cache-transfer-protocol`` names, defined here once."""

    IPC = "ipc"  # one host: CUDA IPC between GPUs, POSIX shared memory between CPU caches
    TCP = "tcp"  # pdbus's own socket transport (native/transfer/tcp.py)
    RDMA = "rdma"  # Mooncake's TransferEngine


class _Endpoint(msgspec.Struct, tag_field="kind", frozen=True):
    """What a peer needs to reach this instance's KV cache. ``host_id`` names the machine (its
    boot id, or PDBUS_HOST_ID): ``ipc`` pairs need the same one."""

    host: str
    host_id: str


class ShmEndpoint(_Endpoint, tag="shm"):
    """``ipc`` into a CPU cache held in POSIX shared memory."""

    protocol: ClassVar[TransferProtocol] = TransferProtocol.IPC
    shm_name: str
    nbytes: int
    layout: KVLayout


class CudaIpcEndpoint(_Endpoint, tag="cuda_ipc"):
    """``ipc`` into a GPU cache: the allocation's IPC handle and the cache's offset inside it."""

    protocol: ClassVar[TransferProtocol] = TransferProtocol.IPC
    device: int
    device_uuid: str
    handle: bytes
    offset: int
    nbytes: int
    layout: KVLayout


class TcpEndpoint(_Endpoint, tag="tcp"):
    """``tcp``: the receiver's listening port on ``host``."""

    protocol: ClassVar[TransferProtocol] = TransferProtocol.TCP
    port: int
    layout: KVLayout


class RdmaEndpoint(_Endpoint, tag="rdma"):
    """``rdma``: a Mooncake session (``host:rpc_port``) and the registered buffer's address;
    ``transport`` is Mooncake's own (``rdma``, or ``tcp`` where no NIC exists)."""

    protocol: ClassVar[TransferProtocol] = TransferProtocol.RDMA
    session: str
    base: int
    nbytes: int
    layout: KVLayout
    transport: str = "rdma"


RankEndpoint = ShmEndpoint | CudaIpcEndpoint | TcpEndpoint | RdmaEndpoint


class TPEndpoint(_Endpoint, tag="tp"):
    """A TP decode: one endpoint per TP rank, each with its KV head slice in its layout."""

    ranks: list[RankEndpoint]

    def __post_init__(self):
        if not self.ranks:
            raise ValueError("a TP endpoint needs at least one rank")
        if len({type(r) for r in self.ranks}) > 1:
            raise ValueError("a TP endpoint's ranks must all be of one kind")

    @property
    def protocol(self) -> TransferProtocol:
        return self.ranks[0].protocol


class SenderEndpoint(_Endpoint, tag="sender"):
    """A prefill's entry: it receives nothing, it tells only the host it sends from."""


Endpoint = RankEndpoint | TPEndpoint | SenderEndpoint


class Load(msgspec.Struct, omit_defaults=True):
    free_blocks: int = 0
    total_blocks: int = 0
    running: int = 0
    waiting: int = 0
    pending_prefill_tokens: int = 0
    reserved_blocks: int = 0
    # the prefix cache's running totals (tokens looked up / found), for the router's /metrics
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_blocks_reused: int = 0


class TokenLogprob(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float


class TokenOut(msgspec.Struct, array_like=True, omit_defaults=True):
    """New tokens of one sequence in one engine step."""

    req_id: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[TokenLogprob]] | None = None
    error: str | None = None


# --------------------------------------------------------------------------- registration


class Hello(_Msg, tag="hello"):
    """Instance -> router, first message after connect (and again after a router restart)."""

    protocol: int
    instance_id: str
    role: Role
    host: str
    http_port: int
    model: str
    config_hash: str
    kv: KVLayout | None = None
    transfer: dict[TransferProtocol, Endpoint] = {}
    max_num_seqs: int = 0
    max_model_len: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    tp_size: int = 1
    load: Load = msgspec.field(default_factory=Load)
    has_tokenizer: bool = False  # tokenizer files follow as extra frames: name, bytes, name, bytes...
    pid: int = 0
    vocab_size: int = 0  # the model's; the router checks prompt token ids against it (0: unknown)


class Welcome(_Msg, tag="welcome"):
    protocol: int
    router_id: str
    heartbeat_interval: float


class Refused(_Msg, tag="refused"):
    reason: str


class Heartbeat(_Msg, tag="hb"):
    load: Load = msgspec.field(default_factory=Load)


class Unknown(_Msg, tag="unknown"):
    """Router -> instance: 'I do not know you' (router restarted): send Hello again."""


class Bye(_Msg, tag="bye"):
    reason: str = ""


# --------------------------------------------------------------------------- PD request flow


class Reserve(_Msg, tag="reserve"):
    """Router -> decode: hold blocks for ``num_tokens`` tokens of a coming request, and keep its
    prompt, outputs so far (a re-prefill after a lost decode) and sampling with the lease: the
    ``Decode`` that claims it carries only token one. Sent together with the ``Prefill``."""

    req_id: str
    num_tokens: int
    lease_s: float = 30.0
    prompt_token_ids: list[int] = []
    output_token_ids: list[int] = []
    sampling: SamplingParams | None = None


class Reserved(_Msg, tag="reserved"):
    """Decode -> router: the lease's blocks. The first ``cached_blocks`` of them are blocks of
    the decode's prefix cache that already hold the prompt's KV (shared, read-only): the prefill
    writes only the rest."""

    req_id: str
    block_ids: list[int]
    cached_blocks: int = 0


class Busy(_Msg, tag="busy"):
    req_id: str
    reason: str = ""


class Destination(msgspec.Struct, omit_defaults=True):
    """Where a prefill writes a request's KV. ``block_ids`` None: the decode has not answered
    yet; they follow in ``DestReady``, needed only when the prompt's last chunk computes."""

    instance_id: str
    protocol: TransferProtocol
    endpoint: Endpoint
    block_ids: list[int] | None = None
    kv: KVLayout | None = None
    cached_blocks: int = 0  # leading blocks of ``block_ids`` the decode holds already: not written


class Prefill(_Msg, tag="prefill"):
    """Router -> prefill: compute the prompt's KV, write it into ``dest``, sample token one.

    Without ``dest`` (router -> mixed instance) the same engine prefills and decodes: the answer
    is ``Tokens`` (the first token, then every later step's), as from a decode."""

    req_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    dest: Destination | None = None
    num_output_tokens: int = 0  # > 0 when re-prefilling prompt + generated tokens


class DestReady(_Msg, tag="dest_ready"):
    """Router -> prefill: the decode leased ``block_ids`` for the request (its ``Reserved``
    forwarded). ``dest``, when set, replaces the ``Prefill``'s destination (the decode it named
    was busy or lost and another one took the request). The first ``cached_blocks`` blocks
    already hold the prompt's KV on the decode (its ``Reserved``): the prefill skips them."""

    req_id: str
    block_ids: list[int]
    dest: Destination | None = None
    cached_blocks: int = 0


class Prefilled(_Msg, tag="prefilled"):
    req_id: str
    first: TokenOut
    transfer_bytes: int = 0  # what the prefill sent (blocks the decode had cached are not sent)
    transfer_s: float = 0.0


class Decode(_Msg, tag="decode"):
    """Router -> decode: the KV is in the reserved blocks; continue from token one (the prompt
    and sampling came with ``Reserve``)."""

    req_id: str
    first_token_id: int


class Release(_Msg, tag="release"):
    """Router -> decode: drop a reservation that will not be used."""

    req_id: str


class Abort(_Msg, tag="abort"):
    req_id: str
    reason: str = ""


class Tokens(_Msg, tag="tokens"):
    """Engine -> router: all sequences' new tokens of one step."""

    items: list[TokenOut]


class Failed(_Msg, tag="failed"):
    """Any instance -> router: this request failed here."""

    req_id: str
    error: str
    retryable: bool = False


# --------------------------------------------------------------------------- bus clients


class Generate(_Msg, tag="generate"):
    """Bus client -> router: a completion request without HTTP."""

    req_id: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict] | None = None
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)


class TextOut(_Msg, tag="text"):
    """Router -> bus client: a streamed chunk."""

    req_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    error: str | None = None
    prompt_tokens: int = 0


Message = (
    Hello
    | Welcome
    | Refused
    | Heartbeat
    | Unknown
    | Bye
    | Reserve
    | Reserved
    | Busy
    | Prefill
    | DestReady
    | Prefilled
    | Decode
    | Release
    | Abort
    | Tokens
    | Failed
    | Generate
    | TextOut
)

ALL_MESSAGE_TYPES: tuple[type, ...] = Message.__args__  # type: ignore[attr-defined]
