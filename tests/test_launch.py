"""`./run.sh single-node`'s launcher: starts router + prefill + decode from a topology, becomes
healthy, answers, and Ctrl-C stops every process it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from waits import wait_showing

from pdbus.procs import free_port, http_json

pytestmark = pytest.mark.slow


def _children(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == pid:
            out.add(int(entry))
            out |= _children(int(entry))
    return out


def test_single_node_serves_and_ctrl_c_stops_all(tmp_path, default_model_dir):
    router, prefill, decode = free_port(), free_port(), free_port()
    conf = tmp_path / "topo.toml"
    conf.write_text(
        f"[router]\nport = {router}\n[serve]\nmodel = \"{default_model_dir}\"\nmax_model_len = 1024\n"
        f"kv_cache_memory_gb = 0.05\ncache_transfer_protocol = \"ipc,tcp\"\n"
        f"[prefill]\nports = [{prefill}]\n[decode]\nports = [{decode}]\n"
    )
    cases = json.load(open(os.path.join(default_model_dir, "eval_prompts.json"), encoding="utf-8"))
    expected = next(c["expected"] for c in cases if c["prompt"] == "你好，请介绍一下自己。")
    answer = launch_and_chat(conf, router)
    assert answer == expected


def launch_and_chat(conf, router: int, timeout: float = 180) -> str:
    """``python -m pdbus.launch single-node --config conf``: healthy, the printed curl command's
    chat request answered, and Ctrl-C stops every process it started. Returns the answer."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdbus.launch", "single-node", "--config", str(conf)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        lines = []

        def serving() -> bool:  # blocks on the launcher's next line
            line = proc.stdout.readline()
            assert line, "launcher exited early:\n" + "".join(lines[-30:])
            lines.append(line)
            return "pdbus is serving the OpenAI API" in line

        wait_showing(serving, timeout, "the launcher healthy", lambda: "".join(lines[-30:]), interval=0)
        curl = next(line for line in proc.stdout if "try: curl" in line)
        assert f":{router}/v1/chat/completions" in curl
        status, body = http_json(
            f"http://127.0.0.1:{router}/v1/chat/completions",
            {"messages": [{"role": "user", "content": "你好，请介绍一下自己。"}], "max_tokens": 128, "temperature": 0},
        )
        assert status == 200, body
        started = _children(proc.pid)
        assert len(started) >= 3  # router, prefill, decode
        proc.send_signal(signal.SIGINT)
        proc.wait(60)

        def left() -> list[int]:  # zombies count as gone (an OSError: one went while being read)
            return [p for p in started if os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z"]

        wait_showing(lambda: not left(), 30, "no process left after Ctrl-C", left)
        return body["choices"][0]["message"]["content"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
