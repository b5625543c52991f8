"""Typed, validated configuration for every process, from flags and TOML topologies.

Flags keep FastDeploy's names. A TOML file (``--config conf/x.toml``) supplies defaults per
section (``[serve]``, ``[prefill]``, ``[decode]``, ``[router]``); flags given on the command
line win. Inconsistent settings raise ``ConfigError`` with one line; the CLI prints it and
exits non-zero. ``ConfigError`` is the one class for every configuration error (flags, TOML,
a model's config.json, a bus key file); this module imports nothing heavy at module level so
that ``native/`` can raise it too.
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from dataclasses import dataclass, field, fields

from pdbus import envs
from pdbus.messages import SEED_RANGE, Role, TransferProtocol

KNOWN_PROTOCOLS = tuple(p.value for p in TransferProtocol)
ROLES = (Role.MIXED, Role.PREFILL, Role.DECODE)  # --splitwise-role
QUANTIZATIONS = ("bf16", "wint8", "wint4")
DTYPE_CHOICES = ("auto", "bfloat16", "float32")  # --dtype; the torch table is native/kv_cache.DTYPES
# --tool-call-parser / --reasoning-parser (actors/frontend/tool_parsers.py, reasoning.py); FastDeploy
# spells them ernie-x1, vLLM-style flags ernie_x1: both are taken
TOOL_CALL_PARSERS = ("ernie_x1",)
REASONING_PARSERS = ("ernie_x1",)
ROUTER_POLICIES = ("cache_aware", "power_of_two", "round_robin")  # actors/router/cache_index.RouterPolicy


class ConfigError(ValueError):
    """A setting is missing, malformed or inconsistent; the message is one line naming it."""


def parse_host_port(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what} must be HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _check_port(flag: str, host: str, port: int, free: bool = True) -> None:
    """A port number in range and, with ``free``, bindable on ``host`` now."""
    if not 0 <= port < 65536:
        raise ConfigError(f"{flag} {port} is not a port number")
    if not free or not port:
        return
    from pdbus.sockets import port_in_use

    try:
        busy = port_in_use(host, port)
    except (OSError, OverflowError) as exc:
        raise ConfigError(f"{flag} {port}: cannot bind on {host}: {getattr(exc, 'strerror', None) or exc}") from None
    if busy:
        raise ConfigError(f"{flag} {port} on {host} is already in use")


def _check_seed(seed: int | None) -> None:
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ConfigError(f"--seed {seed} is out of range [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")


def _check_parsers(cfg) -> None:
    """The OpenAI frontend's output parsers, names normalized (``ernie-x1`` is ``ernie_x1``)."""
    for flag, name, known in (
        ("--tool-call-parser", "tool_call_parser", TOOL_CALL_PARSERS),
        ("--reasoning-parser", "reasoning_parser", REASONING_PARSERS),
    ):
        value = getattr(cfg, name)
        if value is None:
            continue
        value = value.strip().lower().replace("-", "_")
        if value not in known:
            raise ConfigError(f"{flag} must be one of {', '.join(known)}, got {getattr(cfg, name)!r}")
        setattr(cfg, name, value)
    if cfg.enable_auto_tool_choice and cfg.tool_call_parser is None:
        raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser (e.g. ernie_x1)")


def frontend_flags(cfg) -> list[str]:
    """The flags of the OpenAI frontend's parsers, for the router a mixed ``pdbus serve`` starts."""
    out = []
    for flag, value in (("--tool-call-parser", cfg.tool_call_parser), ("--reasoning-parser", cfg.reasoning_parser)):
        if value is not None:
            out += [flag, value]
    return out + (["--enable-auto-tool-choice"] if cfg.enable_auto_tool_choice else [])


def parse_ports(value: str | None, what: str) -> list[int]:
    if not value:
        return []
    out = []
    for part in str(value).split(","):
        part = part.strip()
        if not part.isdigit() or not 0 < int(part) < 65536:
            raise ConfigError(f"{what}: {part!r} is not a port number")
        out.append(int(part))
    return out


def default_model_dir() -> str:
    """The built-in model (``native/default_model``), or ``PDBUS_DEFAULT_MODEL`` when set."""
    from pathlib import Path

    override = envs.PDBUS_DEFAULT_MODEL
    return override or str(Path(__file__).resolve().parent.parent / "native" / "default_model")


@dataclass
class ServeConfig:
    model: str = ""
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8188
    splitwise_role: str = "mixed"
    router: str | None = None
    cache_transfer_protocol: list[str] = field(default_factory=lambda: ["ipc", "tcp"])
    transfer_host: str | None = None
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    data_parallel_rank: int = 0
    enable_expert_parallel: bool = False
    quantization: str = "bf16"
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int = 2048
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    num_gpu_blocks_override: int | None = None
    block_size: int = 64
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_gb: float = 1.0
    enforce_eager: bool = False
    # steps with prompt chunks of up to this many tokens replay CUDA graphs (native.graphs.
    # PrefillGraphs; capped at --max-num-batched-tokens; 0: such steps run eagerly)
    prefill_cuda_graph_max_tokens: int = 2048
    # decode steps launched before the last one's tokens are read back (on a GPU, with a runner
    # that takes its tokens on the device: actors.engine.overlap); this turns it off
    no_async_scheduling: bool = False
    # automatic prefix caching (vLLM's flag): full KV blocks kept by their contents and reused by
    # later requests that share the prefix; --no-enable-prefix-caching turns it off
    enable_prefix_caching: bool = True
    skip_tokenizer_init: bool = False
    heartbeat_interval: float = 1.0
    api_key: str | None = None
    bus_key_file: str | None = None
    max_body_mb: float = 8.0
    # default seed of requests that give none (mixed role without --router: passed to the router it
    # starts; otherwise the router prepares requests: pdbus router --seed)
    seed: int | None = None
    # the OpenAI frontend's output parsers (as --seed: the router's, passed to the one a mixed
    # instance without --router starts); tool calls parsed with tool_choice auto, the reasoning split
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False  # vLLM's spelling: auto is on with --tool-call-parser anyway
    reasoning_parser: str | None = None

    def validate(self, check_port: bool = True) -> ServeConfig:
        if not self.model:
            self.model = default_model_dir()
        if not os.path.isdir(self.model):
            raise ConfigError(f"--model: {self.model!r} is not a directory")
        if self.splitwise_role not in ROLES:
            raise ConfigError(f"--splitwise-role must be one of {', '.join(ROLES)}, got {self.splitwise_role!r}")
        if self.splitwise_role in ("prefill", "decode") and not self.router:
            raise ConfigError(f"--splitwise-role {self.splitwise_role} needs --router HOST:PORT")
        if self.router:
            parse_host_port(self.router, "--router")
        unknown = [p for p in self.cache_transfer_protocol if p not in KNOWN_PROTOCOLS]
        if unknown or not self.cache_transfer_protocol:
            raise ConfigError(
                f"--cache-transfer-protocol: unknown {', '.join(unknown) or '(empty)'} (known: {', '.join(KNOWN_PROTOCOLS)})"
            )
        if self.enable_expert_parallel and self.tensor_parallel_size > 1:
            raise ConfigError("--enable-expert-parallel needs --tensor-parallel-size 1 (experts are sharded over DP ranks)")
        if self.tensor_parallel_size < 1 or self.data_parallel_size < 1:
            raise ConfigError("--tensor-parallel-size and --data-parallel-size must be >= 1")
        if not 0 <= self.data_parallel_rank < self.data_parallel_size:
            raise ConfigError(f"--data-parallel-rank {self.data_parallel_rank} not in [0, {self.data_parallel_size})")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--block-size must be a power of two, got {self.block_size}")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        if self.prefill_cuda_graph_max_tokens < 0:
            raise ConfigError("--prefill-cuda-graph-max-tokens must be >= 0 (0: prompt chunks run eagerly)")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override <= 0:
            raise ConfigError("--num-gpu-blocks-override must be positive")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("--gpu-memory-utilization must be in (0, 1]")
        if not self.heartbeat_interval > 0:
            raise ConfigError(f"--heartbeat-interval must be positive, got {self.heartbeat_interval}")
        _check_seed(self.seed)
        if self.seed is not None and (self.splitwise_role != Role.MIXED or self.router):
            # without --router, a mixed instance's --seed goes to the router it starts
            what = f"a {self.splitwise_role} instance" + (" with --router" if self.router else "")
            raise ConfigError(
                f"--seed is the default seed of requests, applied where they are prepared: for {what} "
                "that is the router (pdbus router --seed N)"
            )
        _check_parsers(self)
        if frontend_flags(self) and (self.splitwise_role != Role.MIXED or self.router):
            what = f"a {self.splitwise_role} instance" + (" with --router" if self.router else "")
            raise ConfigError(
                "--tool-call-parser, --enable-auto-tool-choice and --reasoning-parser belong to the OpenAI "
                f"frontend, which for {what} is the router (pdbus router --tool-call-parser ernie_x1 ...)"
            )
        _check_port("--port", self.host, self.port, free=check_port)
        return self


@dataclass
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 8109
    bus_port: int = 0
    splitwise: bool = True
    heartbeat_interval: float = 1.0
    api_key: str | None = None
    bus_key_file: str | None = None
    reserve_timeout_s: float = 30.0
    request_timeout_s: float = 600.0
    max_body_mb: float = 8.0
    max_retries: int = 2
    # default seed of requests that give none (prefill and decode then draw the same)
    seed: int | None = None
    tool_call_parser: str | None = None  # ernie_x1: <tool_call> blocks into message.tool_calls (tool_choice auto)
    enable_auto_tool_choice: bool = False  # vLLM's flag, taken; needs --tool-call-parser
    reasoning_parser: str | None = None  # ernie_x1: <think>...</think> into message.reasoning_content
    # how an instance is picked (actors/router/cache_index.py): cache_aware, power_of_two,
    # round_robin; cache_aware leaves the longest prefix match for the least loaded instance when
    # its load (requests) exceeds that one's by more than both thresholds (SGLang's names)
    router_policy: str = "cache_aware"
    balance_abs_threshold: float = 16.0
    balance_rel_threshold: float = 1.5

    def validate(self, check_port: bool = True) -> RouterConfig:
        _check_seed(self.seed)
        _check_parsers(self)
        if self.router_policy not in ROUTER_POLICIES:
            raise ConfigError(f"--router-policy must be one of {', '.join(ROUTER_POLICIES)}, got {self.router_policy!r}")
        if not self.balance_abs_threshold >= 0 or not self.balance_rel_threshold >= 1:
            raise ConfigError(
                f"--balance-abs-threshold must be >= 0 and --balance-rel-threshold >= 1, got "
                f"{self.balance_abs_threshold:g} and {self.balance_rel_threshold:g}"
            )
        if self.bus_port and self.bus_port == self.port:
            raise ConfigError("--bus-port must differ from --port")
        if not self.heartbeat_interval > 0:
            raise ConfigError(f"--heartbeat-interval must be positive, got {self.heartbeat_interval}")
        for flag, port in (("--port", self.port), ("--bus-port", self.bus_port)):
            _check_port(flag, self.host, port, free=check_port)
        return self


# --------------------------------------------------------------------------- argparse glue


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """Every ServeConfig field as a flag with default None (so TOML and defaults fill in)."""
    p.add_argument("--config", help="TOML topology; flags override it")
    helps = {
        "model": "model directory (safetensors, -PT or -Paddle layout); default: the built-in model",
        "splitwise_role": "mixed (default: prefill and decode in one engine) | prefill | decode",
        "router": "router HOST:PORT (its HTTP port); required for prefill/decode; a mixed instance without it starts its own router on --port",
        "cache_transfer_protocol": "comma list in order of preference: ipc,tcp,rdma",
        "quantization": "bf16 | wint8 | wint4 (experts int4, other linears int8)",
        "kv_cache_memory_gb": "KV cache size on the CPU (GiB) when --num-gpu-blocks-override is unset",
        "no_async_scheduling": "read each decode step's tokens back before launching the next (on by default on a GPU)",
        "prefill_cuda_graph_max_tokens": "steps with prompt chunks of up to this many tokens replay CUDA graphs (0: eager)",
        "enable_prefix_caching": "reuse the KV of full blocks a request shares with earlier ones (on by default)",
    }
    for f in fields(ServeConfig):
        flag = _flag(f.name)
        if f.type in ("bool",) or f.type is bool:
            # on by default: --X and --no-X (vLLM's spelling); off by default: --X alone
            action = argparse.BooleanOptionalAction if f.default is True else "store_true"
            p.add_argument(flag, action=action, default=None, help=helps.get(f.name))
            continue
        p.add_argument(flag, default=None, help=helps.get(f.name))
    # FastDeploy's launch scripts pass these; pdbus has no such channel (each says why, once)
    for name in FASTDEPLOY_ONLY:
        p.add_argument(_flag(name), default=None, help=argparse.SUPPRESS)


def _coerce(cls, name: str, value):
    default = next(f for f in fields(cls) if f.name == name)
    typ = str(default.type)
    if value is None:
        return None
    try:
        if name == "cache_transfer_protocol":
            if isinstance(value, list):
                return [str(v).strip() for v in value]
            return [v.strip() for v in str(value).split(",") if v.strip()]
        if typ.startswith("bool"):
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        if typ.startswith("int"):
            return int(value)
        if typ.startswith("float"):
            return float(value)
        return str(value)
    except ValueError:
        raise ConfigError(f"{_flag(name)}: {value!r} is not a valid {typ.split(' ')[0]}") from None


# keys of a topology's role sections that are not `pdbus serve` flags: read by the launcher
LAUNCH_KEYS = ("gpus", "ports")


def _section_keys() -> dict[str, set[str]]:
    serve = {f.name for f in fields(ServeConfig)}
    return {"router": {f.name for f in fields(RouterConfig)}, "serve": serve, "prefill": serve | set(LAUNCH_KEYS), "decode": serve | set(LAUNCH_KEYS)}


def load_toml(path: str) -> dict:
    """A topology file, every section and key checked: a misspelt one is refused, not ignored."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"--config: {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path}: {exc}") from None
    known = _section_keys()
    for section, values in data.items():
        if section not in known or not isinstance(values, dict):
            raise ConfigError(f"--config {path}: unknown {'section' if isinstance(values, dict) else 'key'} {section!r} (known sections: {', '.join(f'[{s}]' for s in known)})")
        for key in values:
            if key.replace("-", "_") not in known[section]:
                raise ConfigError(f"--config {path}: unknown key {key!r} in [{section}]")
    return data


def build(cls, args: argparse.Namespace, sections: list[str]):
    """Defaults < TOML sections (in order) < flags."""
    values: dict = {}
    conf_path = getattr(args, "config", None)
    if conf_path:
        data = load_toml(conf_path)
        for section in sections:
            for key, value in (data.get(section) or {}).items():
                key = key.replace("-", "_")
                if any(f.name == key for f in fields(cls)):
                    values[key] = _coerce(cls, key, value)
    for f in fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = _coerce(cls, f.name, v)
    return cls(**values)


# FastDeploy flags for channels pdbus does not have, with where that traffic goes instead. They
# are accepted so that FastDeploy's launch scripts run unchanged, and each one given says in one
# line that it has no effect.
FASTDEPLOY_ONLY = {
    "pd_comm_port": "prefill/decode control messages travel over the router's bus",
    "rdma_comm_ports": "Mooncake picks its own RPC ports (MC_MIN_RPC_PORT / MC_MAX_RPC_PORT)",
    "engine_worker_queue_port": "the engine runs inside the rank server's process",
    "cache_queue_port": "KV transfers run inside the rank server's process",
    "metrics_port": "metrics are served on --port at /metrics",
}


def fastdeploy_only_notes(args: argparse.Namespace) -> list[str]:
    """One line for each FastDeploy-only flag that was given: what pdbus does instead."""
    return [
        f"{_flag(name)} {value} is FastDeploy's and has no effect here: {why}"
        for name, why in FASTDEPLOY_ONLY.items()
        if (value := getattr(args, name, None)) is not None
    ]


def serve_config_from_args(args: argparse.Namespace, check_port: bool = True) -> ServeConfig:
    role = args.splitwise_role
    sections = ["serve"] + ([role] if role else [])
    cfg = build(ServeConfig, args, sections)
    cfg = cfg.validate(check_port=check_port)
    for line in fastdeploy_only_notes(args):
        print(f"pdbus serve: {line}", file=sys.stderr)
    return cfg


def add_router_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML topology ([router] section); flags override it")
    for f in fields(RouterConfig):
        flag = _flag(f.name)
        if f.type is bool or f.type == "bool":
            p.add_argument(flag, action="store_true", default=None)
        else:
            p.add_argument(flag, default=None)


def router_config_from_args(args: argparse.Namespace, check_port: bool = True) -> RouterConfig:
    return build(RouterConfig, args, ["router"]).validate(check_port=check_port)
