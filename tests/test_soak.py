"""The soak harness (bench/soak.py), short: ~45 s of mixed load with a prefill and a decode killed
and restarted, then every check of the long run (terminal answers, no 5xx, blocks free, router
empty, no process / socket / shm segment left)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

from soak import BAD_KINDS, SoakConfig, run_soak  # noqa: E402


@pytest.mark.slow
def test_soak_short(tmp_path):
    cfg = SoakConfig(
        duration_s=45,
        concurrency=6,
        seed=1,
        fault_interval_s=10,
        max_faults=2,  # a prefill, then a decode
        bad_kinds=BAD_KINDS,  # every kind, the two that once got a plain-text 500 included
        workdir=str(tmp_path),
    )
    report = run_soak(cfg)
    print(report.summary())
    assert report.ok, report.summary()
    assert [f["role"] for f in report.faults] == ["prefill", "decode"]
    assert all(f["restarted_s"] is not None for f in report.faults)
    assert report.outcomes.get("finished", 0) > 50
    assert report.by_kind.get("bad", {}).get("rejected", 0) > 0
    assert report.by_kind.get("vanish", {}).get("vanished", 0) > 0
    assert not any(report.leaks.values())


def test_leak_detectors_see_a_leftover():
    """The teardown checks find what they look for: a process carrying the run's marker, the
    port it listens on, and a shm segment named after its pid."""
    import subprocess
    import uuid

    from soak import MARKER, listening_ports, port_open, shm_segments, tagged_processes

    from pdbus.procs import wait_until

    tag = uuid.uuid4().hex[:12]
    code = "import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); print(s.getsockname()[1], flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=dict(os.environ, **{MARKER: tag}))
    seg = f"/dev/shm/pdbus-kv-{proc.pid}-test"
    try:
        port = int(proc.stdout.readline())
        open(seg, "wb").close()
        assert any(f"pid {proc.pid} " in p for p in tagged_processes(tag))
        assert tagged_processes(uuid.uuid4().hex[:12]) == []
        assert wait_until(lambda: port in listening_ports(proc.pid), 10, "the port seen")
        assert port_open(port)
        assert shm_segments({proc.pid}) == [os.path.basename(seg)]
    finally:
        proc.kill()
        proc.wait(10)
        os.unlink(seg)
    assert tagged_processes(tag) == [] and not port_open(port) and shm_segments({proc.pid}) == []
