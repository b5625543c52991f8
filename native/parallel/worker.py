"""A TP worker process (rank 1..N-1): load and shard the model, hold its KV head slice, follow
the leader's broadcast commands until told to stop (or the group breaks)."""

from __future__ import annotations

import sys
import threading

import msgspec
import torch
import zmq

from native.parallel.group import (
    AbortCmd,
    EndpointsReport,
    StepCmd,
    StopCmd,
    TransferCmd,
    TransferReport,
    WorkerSpec,
    init_group,
    recv_cmd,
)
from native.transfer.base import TransferError, TransferHandle, WriteOp
from native.transfer.tp_routing import all_of, rank_peer, route_heads
from pdbus.log import get_logger, setup_logging


def build_shard(spec: WorkerSpec, device: torch.device, comm, control):
    """Model shard + KV cache slice for ``spec.rank`` (shared by leader and workers).

    The cache is sized after the shard is loaded, on every rank (on a GPU: what the weights and
    the profiled activation peak leave under --gpu-memory-utilization; the profile's collectives
    run on all ranks together), and all ranks take the smallest count."""
    import torch.distributed as dist

    from native.kv_cache import KVCache, kv_blocks_for_budget
    from native.model.loader import load_model
    from native.parallel.context import ParallelContext
    from native.runner import profile_activation_peak

    model, cfg = load_model(  # built holding only this rank's shard, and only that is read
        spec.model,
        dtype=spec.dtype,
        quantization=spec.quantization,
        device=device,
        parallel=ParallelContext.tensor_parallel(spec.rank, spec.size, comm),
    )
    split = model.head_split
    heads = split.kv_heads
    sizing = spec.sizing
    reserve = 0
    if device.type == "cuda" and not sizing.num_gpu_blocks_override:
        reserve = profile_activation_peak(model, sizing, device)
    dist.barrier(group=control)  # every rank's weights are in memory before anyone measures
    blocks = kv_blocks_for_budget(sizing, cfg, len(heads), model.dtype, device, reserve_bytes=reserve, sharing=comm.sharing)
    blocks = torch.tensor([blocks])
    dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=control)
    cache = KVCache(
        cfg.num_hidden_layers,
        int(blocks),
        len(heads),
        sizing.block_size,
        cfg.head_dim,
        model.dtype,
        device=device,
        shared=spec.shared_kv,
        total_kv_heads=cfg.num_key_value_heads,
        head_start=heads.start,
    )
    return model, cfg, split, cache


def main(argv: list[str]) -> int:
    setup_logging()
    spec = msgspec.json.decode(argv[0].encode(), type=WorkerSpec)
    log = get_logger(f"tp.worker{spec.rank}")
    torch.set_num_threads(1)
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(spec.rank % max(1, torch.cuda.device_count()))
        device = torch.device("cuda", torch.cuda.current_device())
    world, control = init_group(spec.rank, spec.size, spec.master_port, device)
    from native.runner import ModelRunner
    from native.transfer.base import create_transfer_engine

    model, cfg, split, cache = build_shard(spec, device, world, control)
    transfers = {p: create_transfer_engine(p, cache, spec.transfer_host) for p in spec.protocols}
    layout = cache.layout()
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(spec.report_endpoint)
    lock = threading.Lock()

    def report(msg: EndpointsReport | TransferReport) -> None:
        with lock:  # from this thread and from the transfer engines' completing threads
            push.send(msgspec.msgpack.encode(msg))

    endpoints = {p: e.endpoint() for p, e in transfers.items()} if spec.role == "decode" else {}
    report(EndpointsReport(spec.rank, endpoints))  # loaded: the leader goes on to its graphs
    graphs = None
    if spec.decode_graphs:  # captured with the leader's, after this report: their collectives pair up
        from native.graphs import DecodeGraphs

        graphs = DecodeGraphs(model, cache, max_batch=spec.sizing.max_num_seqs, max_model_len=spec.sizing.max_model_len)
    runner = ModelRunner(model, cache, device, graphs=graphs)
    log.info("TP rank %d/%d ready: %d query heads, KV heads %s", spec.rank, spec.size, len(split.q_heads), list(split.kv_heads))

    def finish(handle: TransferHandle) -> None:  # on the thread that completed the last part
        report(TransferReport(spec.rank, handle.req_id, handle.error, handle.nbytes, handle.seconds))

    while True:
        cmd = recv_cmd(control)
        if isinstance(cmd, StopCmd):
            break
        if isinstance(cmd, StepCmd):
            with torch.inference_mode():
                logits = runner.execute(cmd.token_chunks, cmd.start_positions, cmd.block_tables, cmd.sample_rows)
            del logits
        elif isinstance(cmd, TransferCmd):
            engine = transfers[cmd.protocol]
            handles = []
            try:
                for w in route_heads(layout, cmd.endpoint, split.owns_kv):
                    peer = rank_peer(cmd.peer, w.rank)
                    engine.open_peer(peer, w.endpoint)
                    # every layer at once: a backend that copies a layer at a time gets them one by one
                    ranged = WriteOp(0, cmd.src_blocks, cmd.dst_blocks, w.src_heads, w.dst_heads, cfg.num_hidden_layers)
                    engine.write(cmd.req_id, peer, ranged)
                    handles.append(engine.commit(cmd.req_id, peer))
            except TransferError as exc:
                report(TransferReport(spec.rank, cmd.req_id, str(exc)))
                continue
            all_of(cmd.req_id, handles).add_done_callback(finish)
        elif isinstance(cmd, AbortCmd):
            for engine in transfers.values():
                engine.abort(cmd.req_id)
    for engine in transfers.values():
        engine.close()
    cache.close()
    push.close()
    ctx.term()
    from native.parallel.comm import shutdown

    shutdown(clean=True)  # told to stop by the leader: the group is whole
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
