"""The command line: inconsistent flags fail at start with one clear line, help works.

Failures run the real entry points (``python -m pdbus ...``) in a subprocess: each must exit
non-zero with exactly one ``pdbus: error: ...`` line on stderr and no traceback. Every case fails
in validation, before a model or socket is touched, so each run takes a fraction of a second.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pdbus.config import (
    ConfigError,
    add_router_args,
    add_serve_args,
    router_config_from_args,
    serve_config_from_args,
)
from pdbus.procs import free_port
from pdbus.security import load_key_file

ENV = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}


def pdbus(*args: str, module: str = "pdbus") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=60, env=ENV
    )


def fails_with(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Non-zero exit, one ``pdbus: error:`` line on stderr that names the problem, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("pdbus: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def busy_port():
    """A port held by a listening socket for the test's duration."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "model"
    path.mkdir()
    return str(path)


# --------------------------------------------------------------------------- serve


SERVE_CASES = [
    (["--enable-expert-parallel", "--tensor-parallel-size", "2"], ["--enable-expert-parallel", "tensor-parallel-size 1"]),
    (["--cache-transfer-protocol", "foo"], ["--cache-transfer-protocol", "foo", "ipc, tcp, rdma"]),
    (["--cache-transfer-protocol", "ipc,foo"], ["unknown foo"]),
    (["--splitwise-role", "prefill"], ["--splitwise-role prefill needs --router"]),
    (["--splitwise-role", "decode"], ["--splitwise-role decode needs --router"]),
    (["--splitwise-role", "boss"], ["--splitwise-role", "boss"]),
    (["--splitwise-role", "decode", "--router", "127.0.0.1:1", "--seed", "3"], ["--seed", "pdbus router --seed"]),
    (["--seed", str(1 << 64)], ["--seed", "out of range"]),
    (["--seed", "x"], ["--seed: 'x'"]),
    (["--tool-call-parser", "hermes"], ["--tool-call-parser must be one of ernie_x1", "hermes"]),
    (["--reasoning-parser", "deepseek_r1"], ["--reasoning-parser must be one of ernie_x1"]),
    (["--enable-auto-tool-choice"], ["--enable-auto-tool-choice needs --tool-call-parser"]),
    (["--splitwise-role", "prefill", "--router", "127.0.0.1:1", "--tool-call-parser", "ernie-x1"], ["belong to the OpenAI frontend", "pdbus router"]),
    (["--splitwise-role", "decode", "--router", "localhost"], ["--router must be HOST:PORT", "localhost"]),
    (["--router", "127.0.0.1:99999"], ["--router must be HOST:PORT"]),
    (["--router", "127.0.0.1:http"], ["--router must be HOST:PORT"]),
    (["--model", "/nonexistent/model"], ["--model", "/nonexistent/model", "not a directory"]),
    (["--quantization", "int3"], ["--quantization", "int3", "wint4"]),
    (["--block-size", "48"], ["--block-size", "power of two"]),
    (["--max-num-seqs", "many"], ["--max-num-seqs", "many"]),
    (["--max-model-len", "0"], ["--max-model-len must be positive"]),
    (["--gpu-memory-utilization", "1.5"], ["--gpu-memory-utilization"]),
    (["--data-parallel-rank", "2", "--data-parallel-size", "2"], ["--data-parallel-rank 2"]),
    (["--heartbeat-interval", "0"], ["--heartbeat-interval must be positive"]),
    (["--port", "70000"], ["--port 70000 is not a port number"]),
    (["--host", "203.0.113.7"], ["cannot bind on 203.0.113.7"]),  # an address this host does not have
]


@pytest.mark.parametrize("args, needles", SERVE_CASES, ids=[" ".join(args) for args, _ in SERVE_CASES])
def test_serve_rejects(model_dir, args, needles):
    fails_with(pdbus("serve", "--model", model_dir, "--port", str(free_port()), *args), *needles)


def test_serve_port_in_use(model_dir, busy_port):
    fails_with(pdbus("serve", "--model", model_dir, "--port", str(busy_port)), f"--port {busy_port}", "in use")


def test_serve_bad_config_file(model_dir, tmp_path):
    fails_with(pdbus("serve", "--model", model_dir, "--config", str(tmp_path / "nope.toml")), "does not exist")
    broken = tmp_path / "broken.toml"
    broken.write_text("[serve\nmax_num_seqs = 1\n")
    fails_with(pdbus("serve", "--model", model_dir, "--config", str(broken)), "--config", "broken.toml")
    invalid = tmp_path / "invalid.toml"
    invalid.write_text('[serve]\nquantization = "int3"\n')
    fails_with(pdbus("serve", "--model", model_dir, "--port", str(free_port()), "--config", str(invalid)), "int3")


# --------------------------------------------------------------------------- router


def test_router_ports_in_use(busy_port):
    fails_with(pdbus("router", "--port", str(busy_port)), f"--port {busy_port}", "in use")
    fails_with(pdbus("router", "--port", str(free_port()), "--bus-port", str(busy_port)), f"--bus-port {busy_port}", "in use")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--bus-port", "{port}"], "--bus-port must differ from --port"),
        (["--port", "70000"], "--port 70000 is not a port number"),
        (["--heartbeat-interval", "-1"], "--heartbeat-interval must be positive"),
        (["--max-retries", "two"], "--max-retries"),
        (["--seed", "-99999999999999999999"], "--seed -99999999999999999999 is out of range"),
        (["--tool-call-parser", "qwen"], "--tool-call-parser must be one of ernie_x1, got 'qwen'"),
        (["--reasoning-parser", "x"], "--reasoning-parser must be one of ernie_x1"),
        (["--enable-auto-tool-choice"], "--enable-auto-tool-choice needs --tool-call-parser"),
    ],
    ids=["same-ports", "port-range", "heartbeat", "not-int", "seed-range", "tool-parser", "reasoning-parser", "auto-tools"],
)
def test_router_rejects(args, needle):
    port = str(free_port())
    fails_with(pdbus("router", "--port", port, *[a.format(port=port) for a in args]), needle)


# --------------------------------------------------------------------------- multi-serve


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--ports", "{a},{b}", "--num-servers", "3"], ["--ports lists 2 ports but --num-servers is 3"]),
        (["--ports", "{a},{b}", "--num-servers", "2", "--args", "--data-parallel-size", "4"],
         ["--data-parallel-size 4", "--num-servers 2"]),
        (["--ports", "{a},{b}", "--num-servers", "2", "--args", "--data-parallel-size", "x"],
         ["--data-parallel-size 'x'", "not an integer"]),
        (["--ports", "{a},{b}", "--num-servers", "2", "--args", "--port", "{a}"], ["--port must not be in --args"]),
        (["--ports", "{a},nope", "--num-servers", "2"], ["--ports", "'nope'"]),
        (["--ports", "{a},{b}", "--num-servers", "2", "--args", "--enable-expert-parallel",
          "--tensor-parallel-size", "2"], ["--enable-expert-parallel"]),
        (["--ports", "{a},{b}", "--num-servers", "2", "--args", "--cache-transfer-protocol", "foo"], ["foo"]),
    ],
    ids=["ports-count", "dp-size", "dp-not-int", "port-in-args", "bad-port", "ep-tp", "protocol"],
)
def test_multi_serve_rejects(model_dir, args, needles):
    a, b = free_port(), free_port()
    args = [x.format(a=a, b=b) for x in args]
    if "--args" in args:
        args += ["--model", model_dir]
    fails_with(pdbus("multi-serve", *args), *needles)


def test_multi_serve_checks_each_rank_port(model_dir, busy_port):
    result = pdbus("multi-serve", "--ports", f"{free_port()},{busy_port}", "--num-servers", "2", "--args", "--model", model_dir)
    fails_with(result, f"--port {busy_port}", "in use")


# --------------------------------------------------------------------------- TOML topologies


TOPOLOGY = """
[router]
port = 9100
heartbeat_interval = 0.5

[serve]
max_num_seqs = 32
block_size = 32
quantization = "wint8"
enforce_eager = true
kv_cache_memory_gb = 0.25
cache_transfer_protocol = "ipc,tcp"

[prefill]
max_num_seqs = 7
ports = [8188]          # run.sh's keys: read by the launcher, not by `pdbus serve`

[decode]
max_num_seqs = 128
router = "127.0.0.1:9000"
cache_transfer_protocol = ["tcp"]
"""


def _serve_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_serve_args(p)
    return p.parse_args(argv)


def _router_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_router_args(p)
    return p.parse_args(argv)


def test_toml_sets_values_and_flags_override(tmp_path, model_dir):
    conf = tmp_path / "topology.toml"
    conf.write_text(TOPOLOGY)
    base = ["--config", str(conf), "--model", model_dir]

    decode = serve_config_from_args(_serve_args([*base, "--splitwise-role", "decode", "--block-size", "16"]), check_port=False)
    assert decode.max_num_seqs == 128  # [decode] over [serve]
    assert decode.block_size == 16  # the flag over [serve]
    assert decode.router == "127.0.0.1:9000" and decode.cache_transfer_protocol == ["tcp"]
    assert decode.quantization == "wint8" and decode.enforce_eager is True and decode.kv_cache_memory_gb == 0.25

    prefill = serve_config_from_args(
        _serve_args([*base, "--splitwise-role", "prefill", "--router", "10.0.0.2:8109", "--max-num-seqs", "3"]),
        check_port=False,
    )
    assert prefill.max_num_seqs == 3 and prefill.router == "10.0.0.2:8109"
    assert prefill.cache_transfer_protocol == ["ipc", "tcp"]

    mixed = serve_config_from_args(_serve_args(base), check_port=False)
    assert mixed.splitwise_role == "mixed" and mixed.max_num_seqs == 32 and mixed.router is None

    router = router_config_from_args(_router_args(["--config", str(conf), "--bus-port", "9101"]), check_port=False)
    assert router.port == 9100 and router.bus_port == 9101 and router.heartbeat_interval == 0.5
    router = router_config_from_args(_router_args(["--config", str(conf), "--port", "9200"]), check_port=False)
    assert router.port == 9200


def test_toml_values_are_validated(tmp_path, model_dir):
    conf = tmp_path / "bad.toml"
    conf.write_text('[serve]\nmax_num_seqs = "many"\n')
    with pytest.raises(ConfigError, match="--max-num-seqs: 'many'"):
        serve_config_from_args(_serve_args(["--config", str(conf), "--model", model_dir]), check_port=False)
    conf.write_text("[decode]\ncache_transfer_protocol = ['ipc', 'carrier-pigeon']\n")
    with pytest.raises(ConfigError, match="carrier-pigeon"):
        serve_config_from_args(
            _serve_args(["--config", str(conf), "--model", model_dir, "--splitwise-role", "decode", "--router", "h:1"]),
            check_port=False,
        )


# --------------------------------------------------------------------------- help and commands


@pytest.mark.parametrize(
    "module, args, flags",
    [
        ("pdbus.router", [], ["--port", "--bus-port", "--heartbeat-interval"]),
        ("pdbus.serve", [], ["--splitwise-role", "--cache-transfer-protocol", "--tensor-parallel-size", "--config"]),
        ("pdbus.multi_serve", [], ["--ports", "--num-servers", "--args"]),
        ("pdbus", ["client"], ["--router", "--max-tokens", "--bus-key-file"]),
        ("pdbus", ["multi-serve"], ["--num-servers"]),
        ("pdbus", ["keygen"], ["path"]),
    ],
    ids=["router", "serve", "multi_serve", "client", "pdbus-multi-serve", "keygen"],
)
def test_help(module, args, flags):
    result = pdbus(*args, "--help", module=module)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")
    for flag in flags:
        assert flag in result.stdout


def test_unknown_command_fails_cleanly():
    line = fails_with(pdbus("frobnicate"), "unknown command 'frobnicate'")
    assert "router" in line and "serve" in line  # names what exists
    result = pdbus()
    assert result.returncode == 2 and "usage: pdbus" in result.stderr
    assert pdbus("--help").returncode == 0


def test_client_without_router_fails_cleanly():
    fails_with(pdbus("client", "hello", "--router", f"127.0.0.1:{free_port()}"), "client:", "refused")


def test_keygen(tmp_path):
    path = tmp_path / "bus.key"
    result = pdbus("keygen", str(path))
    assert result.returncode == 0, result.stderr
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    public, secret = load_key_file(str(path))
    assert len(public) == len(secret) == 40
    fails_with(pdbus("keygen", str(tmp_path / "missing" / "bus.key")), "keygen:", "No such file")


def test_toml_unknown_keys_are_refused(tmp_path, model_dir):
    """A misspelt key or section is one line naming it and the file, from every reader of the
    topology: `pdbus serve`, `pdbus router` and the run.sh launcher."""
    conf = tmp_path / "typo.toml"
    conf.write_text("[serve]\nmax_num_seq = 8\n")
    line = fails_with(pdbus("serve", "--model", model_dir, "--port", str(free_port()), "--config", str(conf)), "'max_num_seq'", "[serve]")
    assert str(conf) in line
    conf.write_text("[router]\nport = 9100\nbus-prot = 9101\n")
    fails_with(pdbus("router", "--port", str(free_port()), "--config", str(conf)), "'bus-prot'", "[router]", str(conf))
    conf.write_text("[prefil]\nports = [8188]\n")
    fails_with(pdbus("single-node", "--config", str(conf), module="pdbus.launch"), "'prefil'", str(conf))
    conf.write_text("[decode]\ngpu = \"0\"\n")
    fails_with(pdbus("single-node", "--config", str(conf), module="pdbus.launch"), "'gpu'", "[decode]")


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).resolve().parent.parent / "conf").glob("*.toml")))
def test_shipped_topologies_load(name):
    from pdbus.config import load_toml

    conf = load_toml(str(Path(__file__).resolve().parent.parent / "conf" / name))
    assert "router" in conf and "serve" in conf


def test_fastdeploy_only_flags_say_they_have_no_effect(model_dir, capsys):
    args = _serve_args(["--model", model_dir, "--pd-comm-port", "8201", "--engine-worker-queue-port", "8202"])
    cfg = serve_config_from_args(args, check_port=False)
    assert cfg.splitwise_role == "mixed"
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert "--pd-comm-port 8201 is FastDeploy's and has no effect here: prefill/decode control messages travel over the router's bus" in lines[0]
    assert "--engine-worker-queue-port 8202" in lines[1]
