"""The systems that ``serve_bench.py --suite cpu`` puts side by side, and the checkpoint they share.

    python bench/peers.py build --out DIR            # the peer checkpoint of shared/PEERS.md
    python bench/peers.py hf --model DIR --batch 32  # transformers ``generate``, no server (JSON)

Servers (each returns its base URL; ``Systems.close()`` stops them all):
  pdbus mixed             ``pdbus serve --splitwise-role mixed``
  pdbus PD (ipc | tcp)    ``pdbus router`` + one prefill + one decode rank, KV over that protocol
  vLLM-CPU                ``vllm.entrypoints.openai.api_server`` from its own venv (bench/.venv-vllm)
The baseline without a server, transformers ``generate``, runs in a subprocess of this file so
that its torch threads and memory never share a process with the load generator.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_VLLM_VENV = HERE / ".venv-vllm"

# shared/PEERS.md: hidden 64, 8 heads / 2 KV heads, head_dim 32, 6 experts top-2, MoE; the
# correction bias is zero so that vLLM-CPU (which drops it) routes exactly like pdbus.
PEER_CONFIG = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    moe_num_experts=6,
    moe_k=2,
    moe_intermediate_size=64,
    moe_num_shared_experts=1,
    moe_layer_start_index=1,
    moe_layer_end_index=3,
    moe_layer_interval=1,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


# --------------------------------------------------------------------------- the checkpoint


def build_checkpoint(out_dir: str | os.PathLike, dtype: str = "float32", seed: int = 0) -> str:
    """A random ERNIE-4.5-MoE in ``save_pretrained`` form; reused when it already exists."""
    out = Path(out_dir)
    stamp = out / "peer_checkpoint.json"
    want = {"config": PEER_CONFIG, "dtype": dtype, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return str(out)
    import torch
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    torch.manual_seed(seed)
    model = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**PEER_CONFIG)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "e_score_correction_bias" in name:
                p.zero_()
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.to(getattr(torch, dtype)).save_pretrained(str(out))
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("head_dim", PEER_CONFIG["head_dim"])
    cfg.setdefault("tie_word_embeddings", True)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    stamp.write_text(json.dumps(want))
    return str(out)


# --------------------------------------------------------------------------- transformers generate


def hf_generate(
    model_dir: str, batch: int, input_len: int, output_len: int, rounds: int, threads: int, seed: int
) -> dict:
    """Greedy ``generate`` of ``output_len`` tokens for ``batch`` random prompts; per-step times
    come from a streamer's ``put`` (called once with the prompt, then once per decode step)."""
    import random

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = model.config.vocab_size

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            self.times.append(time.perf_counter())

    per_round = []
    for r in range(rounds + 1):  # round 0 warms up
        rng = random.Random(seed + r)
        ids = torch.tensor([[rng.randrange(3, vocab) for _ in range(input_len)] for _ in range(batch)])
        clock = Clock()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=output_len,
                min_new_tokens=output_len,
                do_sample=False,
                streamer=clock,
                pad_token_id=0,
            )
        t1 = time.perf_counter()
        assert out.shape[1] == input_len + output_len, out.shape
        if r == 0:
            continue
        # times[0]: prompt put; times[1]: first token; times[2..]: one per step; last: end()
        steps = [b - a for a, b in zip(clock.times[1:-1], clock.times[2:-1])]
        per_round.append(
            {
                "ttft_ms": (clock.times[1] - t0) * 1e3,
                "itl_ms": {
                    "p50": _pct(steps, 50) * 1e3,
                    "p99": _pct(steps, 99) * 1e3,
                    "mean": sum(steps) / len(steps) * 1e3,
                },
                "output_throughput": batch * output_len / (t1 - t0),
                "duration_s": t1 - t0,
            }
        )
    return {"rounds": per_round, "batch": batch, "threads": threads}


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def run_hf_subprocess(
    model_dir: str, batch: int, input_len: int, output_len: int, rounds: int, threads: int, seed: int
) -> dict:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "hf", "--model", model_dir, "--batch", str(batch),
        "--input-len", str(input_len), "--output-len", str(output_len), "--rounds", str(rounds),
        "--threads", str(threads), "--seed", str(seed),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"transformers generate failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- servers


PDBUS_COMMON = ["--dtype", "float32", "--max-model-len", "512"]


def _pdbus_common(skip_tokenizer_init: bool) -> list[str]:
    return (["--skip-tokenizer-init"] if skip_tokenizer_init else []) + PDBUS_COMMON


class Systems:
    """Starts servers one group at a time in a ``pdbus.procs.Cluster`` (own logs, clean teardown)."""

    def __init__(self, workdir: str | os.PathLike):
        from pdbus.procs import Cluster

        self.workdir = Path(workdir)
        self.cluster = Cluster(self.workdir / "procs")
        self.vllm: subprocess.Popen | None = None
        self.vllm_log: Path | None = None

    # -- pdbus
    def pdbus_mixed(self, model: str, threads: int, extra: tuple[str, ...] = (), skip_tokenizer_init: bool = True) -> str:
        env = {"PDBUS_TORCH_THREADS": str(threads)}
        server = self.cluster.serve(model, "mixed", None, *_pdbus_common(skip_tokenizer_init), *extra, env=env)
        self.cluster.wait_health(server.url)
        return server.url

    def pdbus_pd(
        self, model: str, protocol: str, threads: int, extra: tuple[str, ...] = (), skip_tokenizer_init: bool = True
    ) -> str:
        from pdbus.procs import http_json

        env = {"PDBUS_TORCH_THREADS": str(threads)}
        router = self.cluster.router()
        for role in ("prefill", "decode"):
            self.cluster.serve(
                model, role, router, *_pdbus_common(skip_tokenizer_init), "--cache-transfer-protocol", protocol, *extra, env=env
            )
        self.cluster.wait_health(router.url)
        deadline = time.monotonic() + 60
        body: dict = {}
        while time.monotonic() < deadline:
            _, body = http_json(router.url + "/instances")
            roles = sorted(i["role"] for i in body.get("instances", []) if i.get("alive"))
            if roles == ["decode", "prefill"]:
                return router.url
            time.sleep(0.1)
        raise TimeoutError(f"PD instances did not register: {body}")

    def pids(self) -> dict[str, int]:
        """name -> pid of every running server process (for py-spy)."""
        out = {f"{p.name}-{p.popen.pid}": p.popen.pid for p in self.cluster.procs if p.alive()}
        if self.vllm is not None and self.vllm.poll() is None:
            out[f"vllm-{self.vllm.pid}"] = self.vllm.pid
        return out

    # -- vLLM
    def vllm_server(
        self, model: str, venv: str | os.PathLike = DEFAULT_VLLM_VENV, timeout: float = 240.0, skip_tokenizer_init: bool = True
    ) -> str:
        from pdbus.procs import free_port, http_json

        python = Path(venv) / "bin" / "python"
        if not python.exists():
            raise FileNotFoundError(f"no vLLM venv at {venv} (bench/README.md says how to make one)")
        port = free_port()
        self.vllm_log = self.workdir / "vllm.log"
        cmd = [
            str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "float32",
            "--max-model-len", "512", "--host", "127.0.0.1", "--port", str(port), "--no-enable-prefix-caching",
            *(["--skip-tokenizer-init"] if skip_tokenizer_init else []),
        ]  # fmt: skip
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", PYTHONUNBUFFERED="1")
        with open(self.vllm_log, "wb") as log:
            self.vllm = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.vllm.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.vllm.returncode}:\n{_tail(self.vllm_log)}")
            try:
                if http_json(url + "/health", timeout=2)[0] == 200:
                    return url
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vLLM not healthy within {timeout}s:\n{_tail(self.vllm_log)}")

    def close(self) -> None:
        self.cluster.close()
        if self.vllm is not None:
            if self.vllm.poll() is None:
                os.killpg(self.vllm.pid, signal.SIGTERM)
                try:
                    self.vllm.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(self.vllm.pid, signal.SIGKILL)
                    self.vllm.wait(10)
            self.vllm = None


def _tail(path: Path | None, n: int = 30) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


# --------------------------------------------------------------------------- CLI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the peer checkpoint")
    b.add_argument("--out", required=True)
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    h = sub.add_parser("hf", help="time transformers generate; prints one JSON line")
    h.add_argument("--model", required=True)
    h.add_argument("--batch", type=int, default=32)
    h.add_argument("--input-len", type=int, default=64)
    h.add_argument("--output-len", type=int, default=64)
    h.add_argument("--rounds", type=int, default=3)
    h.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    h.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.cmd == "build":
        print(build_checkpoint(args.out, args.dtype))
    else:
        res = hf_generate(
            args.model, args.batch, args.input_len, args.output_len, args.rounds, args.threads, args.seed
        )
        print(json.dumps(res))


if __name__ == "__main__":
    main()
