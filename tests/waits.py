"""The tests' waits, all on ``pdbus.procs.wait_until`` (the one poll-with-a-deadline loop).

Import from test files as ``from waits import ...`` (tests/ is on sys.path).
"""

from __future__ import annotations

from pdbus.procs import http_json, wait_until


def idle(stats: dict) -> bool:
    """A rank's /stats with every KV block back in the free pool and nothing running; where the
    stats carry them, nothing waiting and no reservation left either."""
    return (
        stats["free_blocks"] == stats["total_blocks"]
        and stats["running"] == 0
        and stats.get("waiting", 0) == 0
        and stats.get("reserved_blocks", 0) == 0
    )


def wait_showing(predicate, timeout: float, what: str, show, interval: float = 0.1):
    """``wait_until``, its timeout error ending with ``show()`` (the state the test was waiting on)."""
    try:
        return wait_until(predicate, timeout, what, interval)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}\n{show()}") from None


def wait_idle(read_stats, timeout: float, what: str = "KV blocks all back in the free pool") -> list[dict]:
    """Poll ``read_stats()`` (a list of /stats dicts) until every one is ``idle``; returns the last
    read. On timeout the error shows what was last read."""
    seen: list = [None]

    def done() -> bool:
        seen[0] = read_stats()
        return all(idle(s) for s in seen[0])

    wait_showing(done, timeout, what, lambda: seen[0])
    return seen[0]


def alive_instances(router_url: str, read=None) -> list[dict]:
    """The router's alive instances; ``read(url)`` fetches /instances (default: ``http_json``)."""
    _, body = (read or http_json)(router_url + "/instances")
    return [i for i in body.get("instances", []) if i["alive"]]


def wait_instances(router_url: str, ready, timeout: float, what: str, read=None) -> list[dict]:
    """Poll the router's /instances until ``ready(alive instances)``; returns those instances."""
    seen: list = [None]

    def done() -> bool:
        seen[0] = alive_instances(router_url, read)
        return ready(seen[0])

    wait_showing(done, timeout, what, lambda: seen[0])
    return seen[0]


def roles(prefill: int, decode: int):
    """A ``wait_instances`` readiness: exactly ``prefill`` prefill and ``decode`` decode instances."""

    def ready(alive: list[dict]) -> bool:
        r = [i["role"] for i in alive]
        return r.count("prefill") == prefill and r.count("decode") == decode

    return ready

