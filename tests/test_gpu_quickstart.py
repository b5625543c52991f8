"""The quick start on a GPU host (marked gpu; skipped without CUDA): a prefill and a decode
started with the default flags share one GPU and answer, and the launcher's one-GPU topology
(`conf/single-gpu.toml`, what `./run.sh single-node` runs on such a host) serves a chat request."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from test_launch import launch_and_chat
from waits import roles, wait_instances

from pdbus.procs import free_port, http_json

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
CHAT = {"messages": [{"role": "user", "content": "What is 12 + 7?"}], "max_tokens": 32, "temperature": 0}


def _gpu_used_share() -> float:
    import torch

    free, total = torch.cuda.mem_get_info(0)
    return (total - free) / total


def test_pd_with_the_default_flags_shares_one_gpu_and_answers(cluster, default_model_dir):
    before = _gpu_used_share()
    router = cluster.router()
    prefill = cluster.serve(default_model_dir, "prefill", router)
    decode = cluster.serve(default_model_dir, "decode", router)
    cluster.wait_health(router.url, timeout=300)
    wait_instances(router.url, roles(1, 1), 60, "prefill and decode registered")
    status, body = http_json(router.url + "/v1/chat/completions", CHAT, timeout=120)
    assert status == 200 and body["choices"][0]["message"]["content"], body
    used = _gpu_used_share()
    print(f"MEASURE default flags, built-in model, P + D on one GPU: GPU {used:.0%} used (before {before:.0%})")
    assert used - before < 0.1, "a 2 M-parameter model's KV caches take what they can use, not the card"
    for proc in (prefill, decode):  # ipc,tcp by default: tcp needs a CPU cache and is left out, saying so
        assert "--cache-transfer-protocol tcp is left out" in proc.log.read_text(errors="replace")
    stats = [http_json(p.url + "/stats")[1] for p in (prefill, decode)]
    assert all(s["total_blocks"] > 0 for s in stats), stats


def test_the_launchers_one_gpu_topology_answers_a_chat_request(tmp_path, default_model_dir):
    conf = tomllib.loads((ROOT / "conf" / "single-gpu.toml").read_text())
    router, ports = free_port(), {"prefill": free_port(), "decode": free_port()}
    lines = [f"[router]\nport = {router}\n", "[serve]\n", f'model = "{default_model_dir}"\n']
    lines += [f"{k} = {v!r}\n".replace("'", '"') for k, v in conf["serve"].items() if k != "model"]
    for role in ("prefill", "decode"):
        lines.append(f"[{role}]\nports = [{ports[role]}]\n")
        lines += [f"{k} = {v!r}\n".replace("'", '"').replace("True", "true") for k, v in conf[role].items() if k != "ports"]
    topo = tmp_path / "single-gpu.toml"
    topo.write_text("".join(lines))
    assert launch_and_chat(topo, router, timeout=300)
