"""The int4 fused MoE at decode rows (16 / 32 / 64 tokens) at each tile height (block_m 16 / 32 / 64),
for spread routing (random rows) and skewed routing (rows close to each other, so a few experts
draw most pairs). Outputs equal across heights (err column); times from CUDA graphs of 10 calls.

    python3 bench/moe_tile_height.py      (on the GPU machine; ERNIE-4.5-21B-A3B expert shapes)
"""

import sys

import torch

from native import kernels as KN

sys.path.insert(0, "bench")
from kernel_variants import E, graph_ms, qweights  # noqa: E402

H, MI, K = 2560, 1536, 6
torch.manual_seed(0)
gate = torch.randn(E, H, device="cuda") * 0.05
bias = torch.rand(E, device="cuda") * 0.01
w13, s13 = qweights((E, 2 * MI, H), 4)
w2, s2 = qweights((E, H, MI), 4)
for T in (16, 32, 64):
    for routing in ("spread", "skewed"):
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        if routing == "skewed":  # rows close to each other: a few experts draw most pairs
            x = (x[:1] + 0.15 * x).contiguous()
        ref = None
        row = []
        for bm in (16, 32, 64):
            def f(bm=bm, x=x):
                return KN.fused_moe(x, gate, w13, w2, K, bias, s13, s2, block_m=bm)

            y = f()
            if ref is None:
                ref = y.float()
            err = ((y.float() - ref).norm() / ref.norm()).item()
            row.append(f"bm{bm} {graph_ms(f) * 1000:7.1f}us (err {err:.0e})")
        _, ids = KN.moe_route(x, gate, K, bias)
        cnt = torch.bincount(ids.view(-1).long(), minlength=E)
        print(f"T={T:3d} {routing:6s} max/expert {int(cnt.max()):3d} experts {int((cnt > 0).sum()):2d} | " + " | ".join(row), flush=True)
