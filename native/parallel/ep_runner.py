"""Expert parallelism as a runner: plan -> step -> idle step (see native.parallel.ep).

:class:`EPRunner` wraps the rank's runner. Before every step the engine asks it to ``plan``: the
ranks of the EP group agree on the step's size (``EPCoordinator.plan``, a host all-reduce). When
no rank has work nobody steps; when another rank has work and this one has none, this rank runs
``idle_step`` and joins the MoE collectives with no tokens of its own, so they never hang. While
any rank is busy the engine plans again at once (``busy``); while all are idle they meet every
``idle_wait_s``, so a rank that gets work does not wait long for the others. The engine knows
nothing of experts: it calls this like any :class:`native.runner.Runner`.
"""

from __future__ import annotations

from native.parallel.ep import EPCoordinator
from native.runner import Runner


class EPRunner(Runner):
    idle_wait_s = 0.01  # idle EP ranks meet in plan every 10 ms

    def __init__(self, inner: Runner, ep: EPCoordinator):
        self.inner = inner
        self.ep = ep
        self.kv_cache = inner.kv_cache
        self.model = inner.model

    def plan(self, num_tokens: int, decode_only: bool) -> bool:
        return bool(self.ep.plan(num_tokens, decode_only))

    def idle_step(self) -> None:
        self.ep.idle_step()

    @property
    def busy(self) -> bool:
        return bool(self.ep.tokens)

    def execute(self, token_chunks, start_positions, block_tables, sample_rows, layer_done=None):
        return self.inner.execute(token_chunks, start_positions, block_tables, sample_rows, layer_done=layer_done)
