"""Expert parallelism over DP ranks (gloo on the CPU): logits equal no-EP, idle ranks keep the
collectives alive, and DP+EP instances serve the same tokens as one mixed instance."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from test_pd import COMMON, complete, prompts
from waits import wait_idle, wait_instances

from pdbus.procs import free_port, http_json
from pdbus.testing import exit_rank_process

PROMPTS = {0: [3, 9, 27, 81, 50, 60, 70], 1: [11, 12, 13], 2: [], 3: [40, 41, 42, 43, 44, 45, 46, 47, 48]}


def _run(model, cache, ids, bs=4, ep=None):
    """Prefill ``ids``, then decode one token (under EP each step is planned with the others)."""
    from native.attn_meta import AttnMeta

    n = len(ids)
    table = list(range((n + 1 + bs - 1) // bs + 1))
    meta = AttnMeta.build([n], [n], [table], bs)
    if ep is not None:
        ep.plan(n, decode_only=False)
    h = model(torch.tensor(ids), torch.arange(n), cache, meta)
    first = model.compute_logits(h[-1:])
    meta = AttnMeta.build([1], [n + 1], [table], bs)
    if ep is not None:
        ep.plan(1, decode_only=True)
    h = model(torch.tensor([int(first.argmax())]), torch.tensor([n]), cache, meta)
    return torch.cat([first, model.compute_logits(h)])


def _ep_rank(rank: int, size: int, port: int, model_dir: str, quant: str, out: str) -> None:
    from native.kv_cache import KVCache
    from native.model.loader import load_model
    from native.parallel.ep import EPCoordinator

    torch.set_num_threads(1)
    ep = EPCoordinator(rank, size, f"127.0.0.1:{port}", torch.device("cpu")) if size > 1 else None
    model, cfg = load_model(model_dir, dtype="float32", quantization=quant, parallel=ep.context() if ep else None)
    cache = KVCache(cfg.num_hidden_layers, 16, cfg.num_key_value_heads, 4, cfg.head_dim, torch.float32)
    ids = PROMPTS[rank % len(PROMPTS)]
    if ep is not None:
        ep.attach(model)
        # ranks of different prompt lengths pad to the longest; rank 2 has nothing to do and
        # joins both steps idle
        results = None
        if ids:
            with torch.inference_mode():
                results = _run(model, cache, ids, ep=ep)
        else:
            for decode in (False, True):
                assert ep.plan(0, decode_only=decode) > 0
                ep.idle_step()
        torch.save(results, f"{out}.{rank}")
        exit_rank_process()
    else:
        with torch.inference_mode():
            torch.save({r: _run(model, cache, p) for r, p in PROMPTS.items() if p}, out)


@pytest.mark.parametrize(
    "size,quant,model",
    [(2, "bf16", "tiny"), (3, "wint4", "tiny"), (4, "bf16", "default"), (4, "wint4", "default")],
)
def test_ep_logits_equal_no_ep(tiny_model_dir, default_model_dir, tmp_path, size, quant, model):
    """tiny: 6 experts (EP2, EP3); the built-in model: 8 experts (EP4)."""
    model_dir = tiny_model_dir if model == "tiny" else default_model_dir
    ref = tmp_path / "ref.pt"
    mp.spawn(_ep_rank, args=(1, 0, model_dir, quant, str(ref)), nprocs=1, join=True)
    mp.spawn(_ep_rank, args=(size, free_port(), model_dir, quant, str(tmp_path / "ep")), nprocs=size, join=True)
    want = torch.load(ref)
    for rank in range(size):
        got = torch.load(f"{tmp_path / 'ep'}.{rank}")
        if not PROMPTS[rank % len(PROMPTS)]:
            assert got is None
            continue
        a = want[rank % len(PROMPTS)]
        err = (a - got).abs().max() / a.abs().max()
        assert err < 1e-4, f"EP{size} rank {rank}: relative error {err:.2e}"


# (this rank's tokens, decode-only?) per step, for ranks 0 and 1; and the agreed rows per rank
PLANS = [
    ([(0, True), (0, True)], 0),  # nobody has work: nobody steps
    ([(3, True), (0, True)], 4),  # decoding: the smallest graph bucket that fits the busiest rank
    ([(5, True), (2, True)], 8),
    ([(1, True), (7, False)], 7),  # someone prefills: eager, padded to the largest count
    ([(40, True), (1, True)], 40),  # beyond the largest bucket: eager
]


def _plan_rank(rank: int, port: int, out: str) -> None:
    from types import SimpleNamespace

    from native.parallel.ep import EPCoordinator

    ep = EPCoordinator(rank, 2, f"127.0.0.1:{port}", torch.device("cpu"))
    ep.graphs = SimpleNamespace(enabled=True, buckets=[1, 2, 4, 8, 16])  # what DecodeGraphs captured
    torch.save([ep.plan(*steps[rank]) for steps, _ in PLANS], f"{out}.{rank}")
    exit_rank_process()


def test_ep_plan_agrees_on_padded_rows(tmp_path):
    """Both ranks get the same rows per rank for every step, from one all-reduce."""
    mp.spawn(_plan_rank, args=(free_port(), str(tmp_path / "plan")), nprocs=2, join=True)
    for rank in range(2):
        assert torch.load(f"{tmp_path / 'plan'}.{rank}") == [want for _, want in PLANS]


@pytest.mark.slow
def test_dp_ep_serves_same_tokens(cluster, tiny_model_dir):
    ref_server = cluster.serve(tiny_model_dir, "mixed", None, *COMMON, "--dtype", "float32")
    cluster.wait_health(ref_server.url)
    ps = prompts(8)
    ref = [complete(ref_server.url, p) for p in ps]
    router = cluster.router()
    p0, p1, d0, d1 = (free_port() for _ in range(4))
    args = [*COMMON, "--dtype", "float32", "--cache-transfer-protocol", "ipc", "--enable-expert-parallel", "--data-parallel-size", "2"]
    for role, ports in (("prefill", (p0, p1)), ("decode", (d0, d1))):
        cluster.start(
            f"{role}-multi",
            ["multi-serve", "--ports", f"{ports[0]},{ports[1]}", "--num-servers", "2", "--args",
             "--model", tiny_model_dir, "--splitwise-role", role, "--router", router.addr, *args],
            ports[0],
        )
    cluster.wait_health(router.url)
    wait_instances(router.url, lambda alive: len(alive) >= 4, 90, "all four EP ranks registered")
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda p: complete(router.url, p), ps))
    assert got == ref
    # the multi-serve ranks are not in cluster.procs as prefill/decode; check their /stats directly
    for port in (p0, p1, d0, d1):
        wait_idle(lambda url=f"http://127.0.0.1:{port}/stats": [http_json(url)[1]], 20)



@pytest.mark.slow
def test_dead_ep_rank_takes_the_group_down(cluster, tiny_model_dir):
    """A decode EP2 group (ranks started as multi-serve starts them) behind a prefill; SIGKILL one
    rank: the other cannot serve without its experts, says so in one line and exits, and the
    router sees both go."""
    router = cluster.router()
    args = [*COMMON, "--dtype", "float32", "--cache-transfer-protocol", "ipc"]
    cluster.serve(tiny_model_dir, "prefill", router, *args)
    master = f"127.0.0.1:{free_port()}"
    ep = [*args, "--enable-expert-parallel", "--data-parallel-size", "2"]
    ranks = [
        cluster.serve(tiny_model_dir, "decode", router, *ep, "--data-parallel-rank", str(r), env={"PDBUS_EP_MASTER": master})
        for r in range(2)
    ]

    def decodes(alive: list[dict]) -> int:
        return sum(i["role"] == "decode" for i in alive)

    cluster.wait_health(router.url)
    wait_instances(router.url, lambda alive: decodes(alive) >= 2, 90, "both EP ranks registered")
    assert complete(router.url, prompts(1)[0])  # the group serves
    ranks[1].kill()
    ranks[0].popen.wait(30)
    assert ranks[0].popen.returncode != 0
    log = ranks[0].log.read_text(errors="replace")
    assert "EP2 group broken at rank 0" in log and "this instance cannot continue" in log
    assert "Traceback" not in log
    wait_instances(router.url, lambda alive: decodes(alive) == 0, 15, "the router seeing both ranks go")
