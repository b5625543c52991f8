"""Tensor parallelism on the CPU (gloo): sharded logits equal TP1; PD between different TP sizes
equals mixed; a dead TP worker takes its instance down cleanly."""

from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.multiprocessing as mp
from test_pd import COMMON, complete, prompts, start_pd, wait_all_blocks_free
from waits import wait_instances

from pdbus.procs import free_port, http_json, wait_until
from pdbus.testing import exit_rank_process

CFGS = ["moe_shared", "dense_hd"]


def _tp_logits(rank: int, size: int, port: int, model_dir: str, quant: str, out: str) -> None:

    from native.attn_meta import AttnMeta
    from native.kv_cache import KVCache
    from native.model.loader import load_model
    from native.parallel.comm import init_groups
    from native.parallel.context import ParallelContext

    torch.set_num_threads(1)
    comm, _ = init_groups(rank, size, f"tcp://127.0.0.1:{port}", torch.device("cpu"), "TP")
    parallel = ParallelContext.tensor_parallel(rank, size, comm)  # built holding its shard only
    model, cfg = load_model(model_dir, dtype="float32", quantization=quant, parallel=parallel)
    split = model.head_split
    bs = 4
    cache = KVCache(cfg.num_hidden_layers, 32, len(split.kv_heads), bs, cfg.head_dim, torch.float32)
    ids = [3, 9, 27, 81, 50, 60, 70, 11, 12, 13]
    tables = [[0, 1, 2], [3, 4]]
    # step 1: two prompts (7 and 3 tokens); step 2: one decode token each
    meta = AttnMeta.build([7, 3], [7, 3], tables, bs)
    h = model(torch.tensor(ids), torch.tensor(list(range(7)) + list(range(3))), cache, meta)
    first = model.compute_logits(h)
    meta = AttnMeta.build([1, 1], [8, 4], tables, bs)
    h = model(torch.tensor([5, 6]), torch.tensor([7, 3]), cache, meta)
    second = model.compute_logits(h)
    if rank == 0:
        torch.save({"first": first, "second": second}, out)
    exit_rank_process()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from conftest_model import build_hf, save_hf

    out = {}
    for name in CFGS:
        d = tmp_path_factory.mktemp(name)
        save_hf(build_hf(name), str(d))
        out[name] = str(d)
    return out


@pytest.mark.parametrize("name", CFGS)
@pytest.mark.parametrize("size,quant", [(2, "bf16"), (4, "bf16"), (2, "wint4")])
def test_tp_logits_equal_tp1(model_dirs, tmp_path, name, size, quant):
    d = model_dirs[name]
    ref, got = tmp_path / "ref.pt", tmp_path / "tp.pt"
    mp.spawn(_tp_logits, args=(1, free_port(), d, quant, str(ref)), nprocs=1, join=True)
    mp.spawn(_tp_logits, args=(size, free_port(), d, quant, str(got)), nprocs=size, join=True)
    a, b = torch.load(ref), torch.load(got)
    for key in ("first", "second"):
        err = (a[key] - b[key]).abs().max() / a[key].abs().max()
        assert err < 1e-4, f"{name} TP{size} {quant} {key}: relative error {err:.2e}"


@pytest.fixture(scope="module")
def mixed_ref(tiny_model_dir, tmp_path_factory):
    from pdbus.procs import Cluster

    with Cluster(tmp_path_factory.mktemp("mixed")) as c:
        s = c.serve(tiny_model_dir, "mixed", None, *COMMON, "--dtype", "float32")
        c.wait_health(s.url)
        ps = prompts(8)
        return ps, [complete(s.url, p) for p in ps]


@pytest.mark.slow
@pytest.mark.parametrize(
    "prefill_tp,decode_tp,decode_dp,protocol",
    [(2, 1, 1, "ipc"), (1, 2, 1, "tcp"), (2, 2, 1, "ipc"), (2, 1, 2, "tcp")],
)
def test_pd_across_tp_sizes(cluster, tiny_model_dir, mixed_ref, prefill_tp, decode_tp, decode_dp, protocol):
    ps, ref = mixed_ref
    router = cluster.router()
    args = [*COMMON, "--dtype", "float32", "--cache-transfer-protocol", protocol]
    cluster.serve(tiny_model_dir, "prefill", router, *args, "--tensor-parallel-size", str(prefill_tp))
    for rank in range(decode_dp):
        cluster.serve(
            tiny_model_dir, "decode", router, *args, "--tensor-parallel-size", str(decode_tp),
            "--data-parallel-size", str(decode_dp), "--data-parallel-rank", str(rank),
        )
    cluster.wait_health(router.url)
    wait_instances(router.url, lambda alive: len(alive) >= 1 + decode_dp, 60, f"{1 + decode_dp} instances registered")
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda p: complete(router.url, p), ps))
    assert got == ref
    wait_all_blocks_free(cluster)


@pytest.mark.slow
def test_dead_tp_worker_takes_instance_down(cluster, tiny_model_dir):
    router = start_pd(cluster, tiny_model_dir, "tcp", serve_extra=("--tensor-parallel-size", "2"))
    decode = next(p for p in cluster.procs if p.name == "decode")
    import subprocess

    out = subprocess.run(["pgrep", "-f", "native.parallel.worker"], capture_output=True, text=True).stdout.split()
    children = [int(pid) for pid in out if _parent(int(pid)) == decode.popen.pid]
    assert children, "the decode instance should have a TP worker process"
    os.kill(children[0], signal.SIGKILL)
    decode.popen.wait(30)
    assert decode.popen.returncode != 0
    assert "TP worker" in decode.tail(50)
    assert "Traceback" not in decode.log.read_text(errors="replace")  # one line, not a stack
    wait_until(lambda: http_json(router.url + "/health")[0] == 503, 15, "the router's /health 503", 0.1)


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1
