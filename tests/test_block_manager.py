"""BlockManager: free list, reference counts, growth and reservation leases (pure Python)."""

from __future__ import annotations

import pytest

from actors.engine.block_manager import BlockManager, NoFreeBlocks

NUM_BLOCKS = 10
BLOCK_SIZE = 4


@pytest.fixture
def bm():
    blocks = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
    yield blocks
    # every scenario must hand every block back
    assert blocks.num_free == NUM_BLOCKS, f"{blocks.num_used} blocks leaked"
    assert blocks.ref_counts == [0] * NUM_BLOCKS
    assert not blocks.leases
    assert blocks.num_reserved == 0


def test_rejects_non_positive_sizes():
    with pytest.raises(ValueError, match="positive"):
        BlockManager(0, 4)
    with pytest.raises(ValueError, match="positive"):
        BlockManager(4, 0)


def test_blocks_for_rounds_up(bm):
    assert [bm.blocks_for(n) for n in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]


def test_allocate_and_free(bm):
    a = bm.allocate(3)
    b = bm.allocate(2)
    assert len(set(a) | set(b)) == 5
    assert bm.num_free == NUM_BLOCKS - 5 and bm.num_used == 5
    assert all(bm.ref_counts[x] == 1 for x in a + b)
    bm.free(a)
    assert bm.num_free == NUM_BLOCKS - 2
    bm.free(b)


def test_allocate_all_then_out_of_blocks(bm):
    everything = bm.allocate(NUM_BLOCKS)
    assert sorted(everything) == list(range(NUM_BLOCKS))
    assert not bm.can_allocate(1)
    with pytest.raises(NoFreeBlocks, match="need 1 blocks, 0 free"):
        bm.allocate(1)
    bm.free(everything)
    assert bm.can_allocate(NUM_BLOCKS) and not bm.can_allocate(NUM_BLOCKS + 1)


def test_allocate_zero_is_empty(bm):
    assert bm.allocate(0) == []


def test_shared_blocks_free_on_last_reference(bm):
    ids = bm.allocate(2)
    bm.share(ids)
    assert [bm.ref_counts[b] for b in ids] == [2, 2]
    bm.free(ids)
    assert bm.num_free == NUM_BLOCKS - 2  # still held by the other owner
    bm.free(ids)
    assert bm.num_free == NUM_BLOCKS


def test_share_of_free_block_raises(bm):
    with pytest.raises(ValueError, match="free and cannot be shared"):
        bm.share([0])


def test_double_free_raises(bm):
    ids = bm.allocate(1)
    bm.free(ids)
    with pytest.raises(ValueError, match="double free"):
        bm.free(ids)
    assert bm.num_free == NUM_BLOCKS  # the failed free changed nothing


def test_free_of_unknown_id_raises(bm):
    ids = bm.allocate(NUM_BLOCKS)
    for bad in (-1, NUM_BLOCKS):
        with pytest.raises(ValueError, match="outside"):
            bm.free([bad])
    assert bm.num_free == 0  # -1 did not free the last block behind our back
    bm.free(ids)


def test_ensure_grows_in_place(bm):
    table: list[int] = []
    assert bm.ensure(table, 1) and len(table) == 1
    assert bm.ensure(table, BLOCK_SIZE) and len(table) == 1  # still fits
    assert bm.ensure(table, BLOCK_SIZE + 1) and len(table) == 2
    first = list(table)
    assert bm.ensure(table, 3 * BLOCK_SIZE) and table[:2] == first and len(table) == 3
    assert bm.ensure(table, 2) and len(table) == 3  # never shrinks
    bm.free(table)


def test_ensure_fails_without_side_effects(bm):
    hog = bm.allocate(NUM_BLOCKS - 1)
    table: list[int] = []
    assert not bm.ensure(table, 2 * BLOCK_SIZE)
    assert table == [] and bm.num_free == 1  # no partial growth
    assert bm.ensure(table, BLOCK_SIZE)
    bm.free(hog)
    bm.free(table)


def test_lease_reserve_then_claim(bm):
    ids = bm.reserve("r1", num_tokens=2 * BLOCK_SIZE + 1, lease_s=5.0, now=100.0)
    assert len(ids) == 3
    assert bm.num_reserved == 3 and bm.num_free == NUM_BLOCKS - 3
    assert bm.reserve("r1", 1, 5.0, now=100.0) == ids  # idempotent: the same lease
    assert bm.num_reserved == 3
    claimed = bm.claim("r1").block_ids
    assert claimed == ids
    assert bm.num_reserved == 0 and bm.num_free == NUM_BLOCKS - 3  # now a sequence's blocks
    assert bm.claim("r1") is None
    assert bm.expire(now=1e9) == []  # claimed blocks never expire
    bm.free(claimed)


def test_a_lease_keeps_its_request_until_claimed_and_drops_it_when_it_expires(bm):
    bm.reserve("kept", BLOCK_SIZE, 5.0, now=0.0, request=("prompt", "sampling"))
    bm.reserve("dropped", BLOCK_SIZE, 1.0, now=0.0, request=("other", "sampling"))
    assert bm.expire(now=2.0) == ["dropped"]
    assert "dropped" not in bm.leases and bm.claim("dropped") is None
    lease = bm.claim("kept")
    assert lease.request == ("prompt", "sampling")
    bm.free(lease.block_ids)
    assert bm.num_free == NUM_BLOCKS


def test_lease_release(bm):
    bm.reserve("r1", BLOCK_SIZE, 5.0, now=0.0)
    assert bm.release("r1")
    assert not bm.release("r1")
    assert not bm.release("never")
    assert bm.num_free == NUM_BLOCKS


def test_lease_expiry_with_explicit_now(bm):
    bm.reserve("early", BLOCK_SIZE, lease_s=1.0, now=0.0)  # 0.0 is a time, not "unset"
    bm.reserve("late", BLOCK_SIZE, lease_s=10.0, now=0.0)
    assert bm.leases["early"].expires_at == 1.0
    assert bm.next_expiry() == 1.0  # the engine sleeps until then, not in a polling loop
    assert bm.expire(now=0.5) == []
    assert bm.expire(now=1.0) == ["early"]
    assert set(bm.leases) == {"late"} and bm.num_free == NUM_BLOCKS - 1
    assert bm.next_expiry() == 10.0
    assert bm.expire(now=9.99) == []
    assert bm.expire(now=10.0) == ["late"]
    assert bm.next_expiry() is None


def test_lease_refused_when_full(bm):
    hog = bm.allocate(NUM_BLOCKS - 1)
    assert bm.reserve("big", 2 * BLOCK_SIZE, 5.0, now=0.0) is None
    assert "big" not in bm.leases and bm.num_free == 1
    assert bm.reserve("small", BLOCK_SIZE, 5.0, now=0.0) is not None
    bm.release("small")
    bm.free(hog)


def test_expire_without_now_uses_the_clock(bm):
    bm.reserve("r", 1, lease_s=-1.0)  # already in the past on the monotonic clock
    bm.reserve("keep", 1, lease_s=3600.0)
    assert bm.expire() == ["r"]
    assert bm.release("keep")


def test_mixed_scenario_returns_to_full(bm):
    a = bm.allocate(2)
    lease = bm.reserve("x", 3 * BLOCK_SIZE, 1.0, now=0.0)
    table = list(a)
    assert bm.ensure(table, 4 * BLOCK_SIZE)
    bm.share(table[:1])
    assert bm.num_free == NUM_BLOCKS - 4 - len(lease)
    bm.free(table)
    bm.free(table[:1])
    assert bm.expire(now=2.0) == ["x"]


def test_gpu_kv_budget_is_this_instances_share():
    from native.kv_cache import gpu_kv_budget

    gib = 1 << 30
    total = 100 * gib
    # one instance alone at 0.4: its share less its weights and activations
    assert gpu_kv_budget(free=95 * gib, total=total, own=5 * gib, utilization=0.4, reserve=gib) == 34 * gib
    # a second instance at 0.4 on the same card, the first holding 40 GiB: its own share again
    assert gpu_kv_budget(free=55 * gib, total=total, own=5 * gib, utilization=0.4, reserve=gib) == 34 * gib
    # shares that overbook the card: never more than is free (1% kept for contexts)
    assert gpu_kv_budget(free=20 * gib, total=total, own=5 * gib, utilization=0.9, reserve=gib) == 18 * gib
    # two ranks of one instance on the GPU split its share
    assert gpu_kv_budget(free=90 * gib, total=total, own=5 * gib, utilization=0.5, sharing=2, reserve=gib) == 19 * gib
    assert gpu_kv_budget(free=gib, total=total, own=5 * gib, utilization=0.5) == 0.0
