"""PD on ONE GPU, end to end: router + prefill + decode processes, KV over CUDA IPC.

Greedy outputs through PD must equal a mixed instance's (each prompt alone) token for token,
for 20 concurrent requests of mixed lengths (half of them streamed), with the decode instance
replaying CUDA graphs, and again with ``--enforce-eager``. The model is a tiny random
ERNIE-4.5-MoE with kernel-friendly shapes (tests/test_gpu_model.py), in bf16, block size 16.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_gpu_model import save_gpu_model  # noqa: E402
from test_pd import complete, start_pd, wait_all_blocks_free  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.timeout(600)]

BLOCK = 16
# each process takes its own few blocks: several servers share the one GPU
GPU_ARGS = (
    "--block-size",
    str(BLOCK),
    "--dtype",
    "bfloat16",
    "--num-gpu-blocks-override",
    "512",
    "--max-num-seqs",
    "32",
)
LENGTHS = [1, 3, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK, 3 * BLOCK + 5, 9 * BLOCK, 13 * BLOCK + 3, 20 * BLOCK]
NUM_REQUESTS = 20
MAX_TOKENS = 16


def gpu_prompts(n: int) -> list[list[int]]:
    return [[(7 * i + 13 * j) % 250 + 3 for j in range(LENGTHS[i % len(LENGTHS)])] for i in range(n)]


@pytest.fixture(scope="module")
def gpu_model_dir(tmp_path_factory) -> str:
    return save_gpu_model("moe_shared_hd64", str(tmp_path_factory.mktemp("gpu-moe")), seed=3)


@pytest.fixture(scope="module")
def mixed_reference(gpu_model_dir, tmp_path_factory):
    """The mixed role (decode CUDA graphs on), each prompt alone, greedy."""
    from test_pd import COMMON

    from pdbus.procs import Cluster

    with Cluster(tmp_path_factory.mktemp("gpu-mixed")) as c:
        server = c.serve(gpu_model_dir, "mixed", None, *COMMON, *GPU_ARGS)
        c.wait_health(server.url, timeout=300)
        ps = gpu_prompts(NUM_REQUESTS)
        ref = [complete(server.url, p, max_tokens=MAX_TOKENS) for p in ps]
        log = server.log.read_text(errors="replace")
    assert "captured decode CUDA graphs" in log
    return ps, ref


def _pd_equals_mixed(cluster, model_dir, reference, *extra: str) -> str:
    ps, ref = reference
    router = start_pd(cluster, model_dir, "ipc", serve_extra=(*GPU_ARGS, *extra))
    with ThreadPoolExecutor(NUM_REQUESTS) as pool:
        got = list(
            pool.map(
                lambda ip: complete(router.url, ip[1], max_tokens=MAX_TOKENS, stream=ip[0] % 2 == 1),
                enumerate(ps),
            )
        )
    bad = [(i, len(ps[i]), g, r) for i, (g, r) in enumerate(zip(got, ref)) if g != r]
    for i, n, g, r in bad:
        first = next(j for j, (a, b) in enumerate(zip(g, r)) if a != b) if len(g) == len(r) else -1
        print(f"MEASURE PD{' '.join(extra)} prompt {i} (len {n}) differs from token {first}: {g} != {r}")
    print(
        f"MEASURE PD{' '.join(extra)}: {NUM_REQUESTS - len(bad)}/{NUM_REQUESTS} requests equal the mixed instance"
    )
    assert not bad
    wait_all_blocks_free(cluster)
    return next(p for p in cluster.procs if p.name == "decode").log.read_text(errors="replace")


def test_gpu_pd_ipc_with_decode_graphs_equals_mixed(cluster, gpu_model_dir, mixed_reference):
    log = _pd_equals_mixed(cluster, gpu_model_dir, mixed_reference)
    assert "captured decode CUDA graphs" in log


def test_gpu_pd_ipc_enforce_eager_equals_mixed(cluster, gpu_model_dir, mixed_reference):
    log = _pd_equals_mixed(cluster, gpu_model_dir, mixed_reference, "--enforce-eager")
    assert "captured decode CUDA graphs" not in log


@pytest.fixture(scope="module")
def mixed_tp2_reference(gpu_model_dir, tmp_path_factory):
    """A mixed TP2 instance on the one GPU (both ranks on it: gloo collectives, eager decode)."""
    from test_pd import COMMON

    from pdbus.procs import Cluster

    with Cluster(tmp_path_factory.mktemp("gpu-mixed-tp2")) as c:
        server = c.serve(gpu_model_dir, "mixed", None, *COMMON, *GPU_ARGS, "--tensor-parallel-size", "2")
        c.wait_health(server.url, timeout=300)
        ps = gpu_prompts(NUM_REQUESTS)
        ref = [complete(server.url, p, max_tokens=MAX_TOKENS) for p in ps]
        log = server.log.read_text(errors="replace")
    assert "share 1 GPU(s)" in log  # one clear line says why NCCL and graphs are off
    return ps, ref


def test_gpu_pd_tp2_to_tp2_equals_mixed_tp2(cluster, gpu_model_dir, mixed_tp2_reference):
    """Each prefill TP rank writes its KV heads into the decode TP rank that owns them (CUDA IPC)."""
    _pd_equals_mixed(cluster, gpu_model_dir, mixed_tp2_reference, "--tensor-parallel-size", "2")


def _gpu_used_share() -> float:
    import torch

    free, total = torch.cuda.mem_get_info(0)
    return (total - free) / total


# no --num-gpu-blocks-override: the caches are sized from --gpu-memory-utilization
SIZED_ARGS = ("--block-size", str(BLOCK), "--dtype", "bfloat16", "--max-num-seqs", "32")


def test_gpu_tp2_sizes_its_cache_from_gpu_memory(cluster, gpu_model_dir, mixed_tp2_reference):
    """Both TP ranks on the one GPU size their KV caches together under --gpu-memory-utilization
    (weights loaded and activations profiled on every rank first), and serve the same tokens."""
    from test_pd import COMMON

    before = _gpu_used_share()
    server = cluster.serve(gpu_model_dir, "mixed", None, *COMMON, *SIZED_ARGS, "--gpu-memory-utilization", "0.5", "--tensor-parallel-size", "2")
    cluster.wait_health(server.url, timeout=300)
    used = _gpu_used_share()
    print(f"MEASURE TP2 on one GPU at --gpu-memory-utilization 0.5: GPU {used:.0%} used (before {before:.0%})")
    assert used <= 0.55  # the budget caps the GPU's total use at 50% (contexts, allocator slack: 5%)
    ps, ref = mixed_tp2_reference
    assert [complete(server.url, p, max_tokens=MAX_TOKENS) for p in ps[:6]] == ref[:6]


def test_gpu_ep2_multi_serve_shares_gpu_memory(cluster, gpu_model_dir):
    """DP2+EP2 through multi-serve on the one GPU: the ranks split the memory left under
    --gpu-memory-utilization and both serve (expert outputs are checked in test_parallel_gpu)."""
    from test_pd import COMMON

    from pdbus.procs import free_port, http_json

    before = _gpu_used_share()
    ports = [free_port(), free_port()]
    cluster.start(
        "ep-multi",
        ["multi-serve", "--ports", f"{ports[0]},{ports[1]}", "--num-servers", "2", "--args",
         "--model", gpu_model_dir, "--splitwise-role", "mixed", *COMMON, *SIZED_ARGS,
         "--gpu-memory-utilization", "0.5", "--enable-expert-parallel", "--data-parallel-size", "2"],
        ports[0],
    )
    for port in ports:
        cluster.wait_health(f"http://127.0.0.1:{port}", timeout=300)
    used = _gpu_used_share()
    print(f"MEASURE EP2 on one GPU at --gpu-memory-utilization 0.5: GPU {used:.0%} used (before {before:.0%})")
    assert used <= 0.55
    blocks = [http_json(f"http://127.0.0.1:{p}/stats")[1]["total_blocks"] for p in ports]
    assert min(blocks) > 0.8 * max(blocks), blocks  # an even split, not first come first served
    for port in ports:
        assert len(complete(f"http://127.0.0.1:{port}", gpu_prompts(3)[2], max_tokens=MAX_TOKENS)) == MAX_TOKENS


def test_gpu_pd_tp2_on_two_gpus_with_graphs(cluster, gpu_model_dir, tmp_path):
    """TP2 with a GPU per rank (NCCL): the leader and its worker capture their decode graphs
    together, and PD (P TP2 -> D TP2) equals a mixed TP2 instance on the same GPUs."""
    import torch
    from test_pd import COMMON

    from pdbus.procs import Cluster

    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, {torch.cuda.device_count()} here")
    tp2 = ("--tensor-parallel-size", "2")
    with Cluster(tmp_path / "mixed") as c:
        server = c.serve(gpu_model_dir, "mixed", None, *COMMON, *GPU_ARGS, *tp2)
        c.wait_health(server.url, timeout=300)
        ps = gpu_prompts(NUM_REQUESTS)
        ref = [complete(server.url, p, max_tokens=MAX_TOKENS) for p in ps]
        assert "captured decode CUDA graphs" in server.log.read_text(errors="replace")
    log = _pd_equals_mixed(cluster, gpu_model_dir, (ps, ref), *tp2)
    assert "captured decode CUDA graphs" in log and "share 1 GPU" not in log
