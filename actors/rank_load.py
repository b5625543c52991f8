"""Start-up of a rank server: device, model (TP and EP shards included), KV cache, decode CUDA
graphs, runner, tokenizer and transfer engines. :func:`load_rank` returns them as one
:class:`LoadedRank`, which ``actors.rank.RankServer`` holds and closes when it stops."""

from __future__ import annotations

import contextlib
import os
import time

from actors.rank_setup import (
    FaultSlowRunner,
    FaultTransfer,
    as_set,
    generation_eos_ids,
    pick_device,
)
from native.kv_cache import kv_blocks_for_budget
from native.runner import Runner
from native.transfer.base import host_id
from pdbus import envs
from pdbus.config import ServeConfig
from pdbus.log import get_logger

log = get_logger("rank")


def load_rank(cfg: ServeConfig) -> LoadedRank:
    """Load everything a rank serves with; in prefill / decode role its transfer engines too."""
    rank = LoadedRank(cfg)
    rank.load()
    if cfg.splitwise_role != "mixed":
        rank._make_transfers()
    return rank


class LoadedRank:
    """One rank's loaded state: the device, the model and its config, the KV cache, the runner
    the engine drives (wrapped for TP, EP and fault injection), the tokenizer and eos ids, the
    TP group or EP coordinator, and the KV transfer engines with the endpoints this rank
    publishes."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.device = None
        self.model = None
        self.model_cfg = None
        self.model_name = ""
        self.kv_dtype = None
        self.kv_cache = None
        self.runner: Runner | None = None
        self.tokenizer = None  # None with --skip-tokenizer-init
        self.eos_ids: set[int] = set()
        self.tp_group = None  # TPGroup: the spawned TP ranks 1..N-1 (TP > 1)
        self.tp_control = None
        self.tp_split = None
        self.tp_runner = None
        self.ep = None  # EPCoordinator (--enable-expert-parallel, DP > 1)
        self.transfers: dict = {}  # protocol -> TransferEngine
        self.endpoints: dict[str, dict] = {}  # protocol -> what the Hello publishes

    @property
    def lockstep(self) -> bool:
        """Other ranks run each step's collectives with this one (TP or EP)."""
        return self.tp_group is not None or self.ep is not None

    def prefix_cache_key(self) -> str:
        """What makes this rank's KV besides the tokens, the root of its prefix-cache hashes
        (actors.engine.block_manager): the model and its config, weight quantization, KV dtype,
        the head slice this rank holds and the block size."""
        kv = self.kv_cache.layout()
        return (
            f"{self.model_name}|{self.model_cfg.config_hash()}|{self.cfg.quantization}|{kv.dtype}"
            f"|heads {kv.head_start}+{kv.num_kv_heads}/{kv.total_kv_heads}|block {kv.block_size}"
        )

    # ----------------------------------------------------------------- startup
    def load(self) -> None:
        from native.kv_cache import KVCache
        from native.model.config import ErnieConfig
        from native.model.loader import load_model, resolve_dtype
        from native.runner import ModelRunner

        cfg = self.cfg
        self.device = pick_device(cfg)
        if cfg.splitwise_role != "mixed":
            self._offered_protocols()  # before the weights load: a protocol that cannot be built stops us now
        t0 = time.monotonic()
        self.model_cfg = ErnieConfig.from_model_dir(cfg.model)
        self.model_name = cfg.served_model_name or os.path.basename(os.path.normpath(cfg.model))
        dtype = resolve_dtype(cfg.dtype, self.model_cfg)
        self.kv_dtype = dtype
        tp = cfg.tensor_parallel_size
        shared = self.device.type == "cpu" and cfg.splitwise_role == "decode" and "ipc" in cfg.cache_transfer_protocol
        self.tp_group = None
        self.ep = None
        if cfg.enable_expert_parallel and cfg.data_parallel_size > 1:
            from native.parallel.ep import EPCoordinator

            master = envs.PDBUS_EP_MASTER
            if not master:
                raise RuntimeError("--enable-expert-parallel with DP > 1 needs the DP ranks started together by `pdbus multi-serve`")
            self.ep = EPCoordinator(cfg.data_parallel_rank, cfg.data_parallel_size, master, self.device)
        if tp > 1:
            self._load_tp(shared)
            num_blocks = self.kv_cache.num_blocks
        else:
            self.model, self.model_cfg = load_model(
                cfg.model,
                dtype=cfg.dtype,
                quantization=cfg.quantization,
                device=self.device,
                parallel=self.ep.context() if self.ep is not None else None,  # EP: read only our experts
            )
            if self.ep is not None:
                self.ep.attach(self.model)
                log.info("EP%d: rank %d holds experts %d..%d of each MoE layer", self.ep.size, self.ep.rank, *self.ep.expert_range)
            reserve = 0
            if self.device.type == "cuda" and not cfg.num_gpu_blocks_override:
                from native.runner import profile_activation_peak

                reserve = profile_activation_peak(self.model, cfg, self.device, graph_tokens=self._prefill_graph_tokens())
            sharing = self.ep.comm.sharing if self.ep is not None else 1
            if self.ep is not None:
                self.ep.barrier()  # EP ranks sharing a GPU measure it with all their weights in
            num_blocks = kv_blocks_for_budget(
                cfg, self.model_cfg, self.model_cfg.num_key_value_heads, dtype, self.device, reserve_bytes=reserve, sharing=sharing
            )
            if self.ep is not None:
                self.ep.barrier()  # ... and before any of them allocates its cache
            self.kv_cache = KVCache(
                self.model_cfg.num_hidden_layers,
                num_blocks,
                self.model_cfg.num_key_value_heads,
                cfg.block_size,
                self.model_cfg.head_dim,
                dtype,
                device=self.device,
                shared=shared,
            )
        graphs = prefill_graphs = None
        pool = None
        if self._prefill_graph_tokens():
            import torch

            from native.graphs import PrefillGraphs

            pool = torch.cuda.graph_pool_handle()  # one pool for every graph: they replay one at a time
            prefill_graphs = PrefillGraphs(
                self.model, self.kv_cache, max_rows=cfg.max_num_seqs, max_model_len=cfg.max_model_len,
                max_tokens=self._prefill_graph_tokens(), pool=pool,
            )  # fmt: skip
            prefill_graphs = prefill_graphs if prefill_graphs.enabled else None
        if self._decode_graphs():
            from native.graphs import DecodeGraphs

            graphs = DecodeGraphs(
                self.model, self.kv_cache, max_batch=cfg.max_num_seqs, max_model_len=cfg.max_model_len, pool=pool
            )
        if self.ep is not None:
            self.ep.kv_cache, self.ep.graphs = self.kv_cache, graphs
        if self.device.type == "cpu" and self.model is not None:
            # picks the CPU table now, so native/cpu's kernels build (once per machine, ~1 min)
            # while the rank loads rather than inside its first request
            self.model.select_ops(self.kv_cache)
        self.runner = ModelRunner(self.model, self.kv_cache, self.device, graphs=graphs, prefill_graphs=prefill_graphs)
        if self.device.type == "cuda" and self.ep is None and tp == 1:  # a group steps in lockstep: not alone
            from native.runner import warm_up_prefill

            t_warm = time.monotonic()
            steps = warm_up_prefill(self.runner, min(cfg.max_num_batched_tokens, cfg.max_model_len))
            log.info("warmed up %d prompt-chunk shapes in %.1fs", steps, time.monotonic() - t_warm)
        if self.ep is not None:
            from native.parallel.ep_runner import EPRunner

            self.runner = EPRunner(self.runner, self.ep)
        if self.tp_group is not None:
            from native.parallel.group import TPRunner

            self.runner = self.tp_runner = TPRunner(self.runner, self.tp_control)
        if envs.PDBUS_FAULT_STEP_DELAY_S > 0:
            self.runner = FaultSlowRunner(self.runner, envs.PDBUS_FAULT_STEP_DELAY_S)
        if not cfg.skip_tokenizer_init:
            from actors.frontend.tokenizer import Tokenizer

            self.tokenizer = Tokenizer(cfg.model)
        self.eos_ids = set(self.tokenizer.eos_token_ids) if self.tokenizer else as_set(self.model_cfg.eos_token_id)
        self.eos_ids |= generation_eos_ids(cfg.model)  # e.g. <|end_of_sentence|> when no tokenizer is loaded
        log.info(
            "loaded %s (%s, %s, %s) in %.1fs; KV cache %d blocks x %d tokens (%.1f MiB)%s",
            self.model_name,
            self.model_cfg.model_type,
            cfg.quantization,
            str(dtype).replace("torch.", ""),
            time.monotonic() - t0,
            num_blocks,
            cfg.block_size,
            self.kv_cache.nbytes / 2**20,
            " in shared memory" if shared else "",
        )
        if tp > 1:
            log.info("TP%d: this process is rank 0 of %d; KV heads %s here", tp, tp, list(self.tp_split.kv_heads))

    def _prefill_graph_tokens(self) -> int:
        """The largest prompt-chunk graph's tokens (0: none): ranks that compute prompts on a GPU,
        alone (a TP or EP group's ranks step in lockstep, eagerly)."""
        cfg = self.cfg
        if self.device.type != "cuda" or cfg.enforce_eager or cfg.splitwise_role == "decode":
            return 0
        if self.ep is not None or cfg.tensor_parallel_size > 1:
            return 0
        return min(cfg.prefill_cuda_graph_max_tokens, cfg.max_num_batched_tokens)

    def _decode_graphs(self) -> bool:
        cfg = self.cfg
        return self.device.type == "cuda" and not cfg.enforce_eager and cfg.splitwise_role != "prefill"

    def _load_tp(self, shared: bool) -> None:
        """TP > 1: spawn ranks 1..N-1, join the group, load and shard rank 0 here."""
        from native.parallel.group import CacheSizing, TPGroup, WorkerSpec, init_group
        from native.parallel.worker import build_shard
        from pdbus.procs import free_port

        cfg = self.cfg
        spec = WorkerSpec(
            model=cfg.model,
            dtype=cfg.dtype,
            quantization=cfg.quantization,
            device=self.device.type,
            rank=0,
            size=cfg.tensor_parallel_size,
            master_port=free_port(),
            report_endpoint="",
            sizing=CacheSizing.of(cfg),
            role=cfg.splitwise_role,
            protocols=list(cfg.cache_transfer_protocol) if cfg.splitwise_role != "mixed" else [],
            transfer_host=cfg.transfer_host or cfg.host,
            shared_kv=shared,
            decode_graphs=self._decode_graphs(),
        )
        self.tp_group = TPGroup(spec)
        self.tp_group.spawn()
        world, self.tp_control = init_group(0, spec.size, spec.master_port, self.device)
        self.model, self.model_cfg, self.tp_split, self.kv_cache = build_shard(spec, self.device, world, self.tp_control)
        self.tp_group.wait_ready()

    def _offered_protocols(self) -> None:
        """What this instance offers: the listed protocols that apply to its cache on this host
        (tcp needs a CPU cache, ipc on a GPU needs cupy, rdma a NIC and Mooncake); each one left out
        says why in one line, and only when none applies does the instance stop, saying why for each."""
        from native.transfer.base import unavailable

        kept, why = [], []
        for proto in self.cfg.cache_transfer_protocol:
            reason = unavailable(proto, self.device.type)
            if reason is None:
                kept.append(proto)
            else:
                why.append(f"{proto}: {reason}")
                log.warning("--cache-transfer-protocol %s is left out: %s", proto, reason)
        if not kept:
            raise RuntimeError(f"no --cache-transfer-protocol applies on this host ({'; '.join(why)})")
        self.cfg.cache_transfer_protocol = kept

    def _make_transfers(self) -> None:
        from native.transfer.base import create_transfer_engine
        from native.transfer.tp_routing import TPTransfer
        from pdbus.messages import SenderEndpoint, TPEndpoint

        host = self.cfg.transfer_host or self.cfg.host
        for proto in self.cfg.cache_transfer_protocol:
            try:
                self.transfers[proto] = engine = create_transfer_engine(proto, self.kv_cache, host)
                if self.cfg.splitwise_role == "prefill":  # KV heads routed onto the decode's TP ranks
                    workers = None
                    if self.tp_group is not None:
                        from native.parallel.group import WorkerTransfers

                        workers = WorkerTransfers(self.tp_group, self.tp_control)
                    self.transfers[proto] = TPTransfer(engine, workers)
                if envs.PDBUS_FAULT_TRANSFER and self.cfg.splitwise_role == "prefill":
                    self.transfers[proto] = FaultTransfer(self.transfers[proto], envs.PDBUS_FAULT_TRANSFER)
                # decode publishes where to write (every TP rank's slice); prefill only its host
                if self.cfg.splitwise_role != "decode":
                    self.endpoints[proto] = SenderEndpoint(host, host_id())
                elif self.tp_group is None:
                    self.endpoints[proto] = engine.endpoint()
                else:
                    workers_eps = [self.tp_group.endpoints[r][proto] for r in range(1, self.cfg.tensor_parallel_size)]
                    self.endpoints[proto] = TPEndpoint(host, host_id(), [engine.endpoint(), *workers_eps])
            except Exception as exc:
                raise RuntimeError(f"--cache-transfer-protocol {proto}: {exc}") from exc

    # ----------------------------------------------------------------- shutdown
    def close(self, clean: bool) -> None:
        """Stop the TP ranks, close the transfer engines, the cache and the process groups;
        ``clean`` is False when the engine stopped because its group broke."""
        from native.parallel.comm import GroupBroken

        if self.tp_group is not None:
            if self.tp_group.dead is None and clean:
                with contextlib.suppress(GroupBroken):  # a worker died just now: close() reaps it
                    self.tp_runner.stop()
            self.tp_group.close()
        for eng in self.transfers.values():
            with contextlib.suppress(Exception):
                eng.close()
        self.kv_cache.close()
        if self.lockstep:
            from native.parallel.comm import shutdown

            shutdown(clean=clean and (self.tp_group is None or self.tp_group.dead is None))
