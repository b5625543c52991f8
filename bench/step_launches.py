"""How many kernels one captured step launches (bench/gpu_bench.py's launch counts).

Two counts of the same graph: its nodes by type, read with the CUDA runtime's
``cudaGraphGetNodes`` / ``cudaGraphNodeGetType`` (through ctypes on the libcudart this process
loaded), and the kernels that torch.profiler (CUPTI) sees during replays. They should agree; the
second also names the kernels.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util

import torch

NODE_TYPES = {0: "kernel", 1: "memcpy", 2: "memset", 3: "host", 4: "graph", 5: "empty",
              6: "wait_event", 7: "event_record"}


def _cudart():
    paths = []
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({ln.split()[-1] for ln in f if "libcudart" in ln and ln.split()[-1].startswith("/")})
    except OSError:
        pass
    found = ctypes.util.find_library("cudart")
    for p in paths + ([found] if found else []):
        try:
            return ctypes.CDLL(p)
        except OSError:
            continue
    return None


def graph_nodes(graph: torch.cuda.CUDAGraph) -> dict[str, int] | None:
    """Node counts by type of a graph captured with ``keep_graph=True``, or None if the runtime
    cannot be reached."""
    rt = _cudart()
    if rt is None:
        return None
    g = ctypes.c_void_p(graph.raw_cuda_graph())
    n = ctypes.c_size_t(0)
    if rt.cudaGraphGetNodes(g, None, ctypes.byref(n)) != 0:
        return None
    nodes = (ctypes.c_void_p * n.value)()
    if rt.cudaGraphGetNodes(g, nodes, ctypes.byref(n)) != 0:
        return None
    counts: collections.Counter = collections.Counter()
    for node in nodes:
        t = ctypes.c_int(-1)
        rt.cudaGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(t))
        counts[NODE_TYPES.get(t.value, f"type{t.value}")] += 1
    return dict(counts)


def step_launches(fn, replays: int = 3) -> dict:
    """Capture ``fn`` (already warmed up) in a graph; its node counts and the kernels the profiler
    sees per replay (count and the 12 most frequent names)."""
    from torch.profiler import ProfilerActivity, profile

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(g):
        fn()
    if hasattr(g, "instantiate"):
        g.instantiate()
    g.replay()
    torch.cuda.synchronize()
    out: dict = {"graph_nodes": graph_nodes(g)}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            g.replay()
        torch.cuda.synchronize()
    names: collections.Counter = collections.Counter()
    for ev in prof.events():
        if ev.device_type.name == "CUDA" and not ev.name.startswith(("Memcpy", "Memset")):
            names[ev.name[:50]] += 1
    out["profiled_kernels"] = sum(names.values()) / replays
    out["top"] = [(k, v / replays) for k, v in names.most_common(12)]
    del g
    return out
