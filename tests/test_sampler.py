import math
import time

import pytest
import torch

from native.sampler import Sampler, hash64
from pdbus.messages import SamplingParams

V = 64


def _logits(rows: int = 1, vocab: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _run(sampler, logits, params, prompts=None, outputs=None, eos=frozenset()):
    n = len(params)
    return sampler(logits, params, prompts or [[]] * n, outputs or [[]] * n, set(eos))


def test_greedy_is_argmax():
    logits = _logits(8)
    params = [SamplingParams(temperature=0.0)] * 4 + [SamplingParams(top_k=1)] * 4
    out = _run(Sampler(), logits, params)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is None and out.top_logprobs is None


def test_greedy_in_mixed_batch_is_argmax():
    logits = _logits(4)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)] * 2
    out = _run(Sampler(seed=1), logits, params)
    assert out.token_ids[0] == logits[0].argmax().item()
    assert out.token_ids[2] == logits[2].argmax().item()


def test_bf16_logits_accepted():
    logits = _logits(2).to(torch.bfloat16)
    out = _run(Sampler(), logits, [SamplingParams(temperature=0.0)] * 2)
    assert out.token_ids == logits.float().argmax(-1).tolist()


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        Sampler()(_logits(2), [SamplingParams()], [[]], [[]], set())


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.full((1, V), -10.0)
    logits[0, 3], logits[0, 5], logits[0, 7] = 4.0, 3.0, -0.5
    # 3 is in the prompt: 4 / 2 = 2 < 3 -> 5 wins.
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert _run(Sampler(), logits, [p], prompts=[[3]]).token_ids == [5]
    # 3 (prompt) and 5 (output) penalized: 2, 1.5; 7 unseen stays -0.5 -> 3 wins again.
    assert _run(Sampler(), logits, [p], prompts=[[3]], outputs=[[5]]).token_ids == [3]
    # Negative logits get more negative: -0.5 * 2 = -1 loses to an unseen -0.8.
    logits2 = torch.full((1, V), -10.0)
    logits2[0, 7], logits2[0, 9] = -0.5, -0.8
    assert _run(Sampler(), logits2, [p], outputs=[[7]]).token_ids == [9]
    # The caller's logits are untouched.
    assert logits[0, 3].item() == 4.0


def test_frequency_penalty_scales_with_count():
    logits = torch.full((1, V), -10.0)
    logits[0, 1], logits[0, 2] = 5.0, 3.5
    p = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    assert _run(Sampler(), logits, [p], outputs=[[1]]).token_ids == [1]  # 4.0 > 3.5
    assert _run(Sampler(), logits, [p], outputs=[[1, 1]]).token_ids == [2]  # 3.0 < 3.5
    # Prompt tokens do not count for frequency.
    assert _run(Sampler(), logits, [p], prompts=[[1, 1, 1]]).token_ids == [1]


def test_presence_penalty_is_flat():
    logits = torch.full((1, V), -10.0)
    logits[0, 1], logits[0, 2] = 5.0, 3.5
    p = SamplingParams(temperature=0.0, presence_penalty=1.0)
    assert _run(Sampler(), logits, [p], outputs=[[1, 1, 1, 1]]).token_ids == [1]  # 4.0 > 3.5
    p = SamplingParams(temperature=0.0, presence_penalty=2.0)
    assert _run(Sampler(), logits, [p], outputs=[[1]]).token_ids == [2]
    # A negative penalty encourages repeats.
    p = SamplingParams(temperature=0.0, presence_penalty=-2.0)
    assert _run(Sampler(), logits, [p], outputs=[[2]]).token_ids == [2]


def test_penalties_only_touch_their_rows():
    logits = _logits(3)
    top = logits.argmax(-1).tolist()
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0),
        SamplingParams(temperature=0.0),
    ]
    out = _run(Sampler(), logits, params, outputs=[[top[0]] * 5, [top[1]] * 5, [top[2]] * 5])
    assert out.token_ids[0] == top[0] and out.token_ids[2] == top[2]
    assert out.token_ids[1] != top[1]


def test_min_tokens_blocks_eos_and_stop_ids():
    logits = torch.zeros(1, V)
    logits[0, 0], logits[0, 9], logits[0, 4] = 10.0, 9.0, 1.0
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[9])
    assert _run(Sampler(), logits, [p], outputs=[[4]], eos={0}).token_ids == [4]
    assert _run(Sampler(), logits, [p], outputs=[[4, 4]], eos={0}).token_ids == [0]
    # ignore_eos is not the sampler's business: eos stays possible.
    p = SamplingParams(temperature=0.0, ignore_eos=True)
    assert _run(Sampler(), logits, [p], eos={0}).token_ids == [0]
    # Random rows are blocked too.
    p = SamplingParams(temperature=1.0, min_tokens=5, stop_token_ids=[9])
    for _ in range(20):
        assert _run(Sampler(), logits, [p], eos={0}).token_ids[0] not in (0, 9)


def _support(sampler, logits, p, draws=300):
    params = [p] * draws
    return set(
        sampler(logits.expand(draws, -1).contiguous(), params, [[]] * draws, [[]] * draws, set()).token_ids
    )


def test_top_k_restricts_support():
    logits = torch.linspace(0, 1, V)[None, :]  # nearly flat: all tokens likely without top_k
    assert _support(Sampler(seed=0), logits, SamplingParams(top_k=3)) == {V - 1, V - 2, V - 3}
    assert len(_support(Sampler(seed=0), logits, SamplingParams())) > 30


def test_top_p_restricts_support():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * (V - 4))
    logits = torch.log(probs.clamp_min(1e-30))[None, :]
    assert _support(Sampler(seed=0), logits, SamplingParams(top_p=0.5)) == {0}
    assert _support(Sampler(seed=0), logits, SamplingParams(top_p=0.7)) == {0, 1}
    assert _support(Sampler(seed=0), logits, SamplingParams(top_p=0.85)) == {0, 1, 2}
    # top_k and top_p together: the tighter one wins.
    assert _support(Sampler(seed=0), logits, SamplingParams(top_p=0.85, top_k=2)) == {0, 1}


def test_min_p_restricts_support():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1] + [0.0] * (V - 4))
    logits = torch.log(probs.clamp_min(1e-30))[None, :]
    assert _support(Sampler(seed=0), logits, SamplingParams(min_p=0.6)) == {0, 1}
    assert _support(Sampler(seed=0), logits, SamplingParams(min_p=0.2)) == {0, 1, 2, 3}
    assert _support(Sampler(seed=0), logits, SamplingParams(min_p=0.3)) == {0, 1, 2}


def test_mixed_filters_in_one_batch():
    logits = torch.linspace(0, 1, V)[None, :].expand(3, -1).contiguous()
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.999999), SamplingParams(top_k=1)]
    seen = [set(), set(), set()]
    sampler = Sampler(seed=3)
    for _ in range(100):
        for row, t in enumerate(_run(sampler, logits, params).token_ids):
            seen[row].add(t)
    assert seen[0] == {V - 1, V - 2}
    assert len(seen[1]) > 30
    assert seen[2] == {V - 1}


def test_temperature_sharpens():
    logits = torch.linspace(0, 20, V)[None, :]
    cold = _support(Sampler(seed=0), logits, SamplingParams(temperature=0.05))
    hot = _support(Sampler(seed=0), logits, SamplingParams(temperature=2.0))
    assert cold <= {V - 1, V - 2} and len(hot) > 10


def test_sampling_follows_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1] + [0.0] * (V - 3))
    logits = torch.log(probs.clamp_min(1e-30))[None, :].expand(4000, -1).contiguous()
    out = _run(Sampler(seed=7), logits, [SamplingParams()] * 4000).token_ids
    freq = [out.count(t) / len(out) for t in range(3)]
    assert all(abs(f - p) < 0.04 for f, p in zip(freq, [0.7, 0.2, 0.1], strict=True))


def test_unseeded_rows_beside_seeded_ones_keep_their_support_and_distribution():
    """A batch mixing seeded rows (exponential race) and unseeded ones (inverse CDF): each
    unseeded row draws only from its own support, in proportion to its probabilities."""
    probs = torch.tensor([0.6, 0.0, 0.3, 0.1] + [0.0] * (V - 4))
    logits = torch.log(probs.clamp_min(1e-30))[None, :].expand(4, -1).contiguous()
    params = [SamplingParams(seed=11), SamplingParams(), SamplingParams(seed=12), SamplingParams(top_k=2)]
    sampler = Sampler(seed=5)
    seen: list[list[int]] = [[], [], [], []]
    for _ in range(1500):
        for row, t in enumerate(_run(sampler, logits, params).token_ids):
            seen[row].append(t)
    assert set(seen[1]) <= {0, 2, 3} and set(seen[3]) <= {0, 2}
    assert abs(seen[1].count(0) / 1500 - 0.6) < 0.05 and abs(seen[3].count(0) / 1500 - 2 / 3) < 0.05
    assert len(set(seen[0])) == 1 and len(set(seen[2])) == 1  # seeded, same step: the same draw


def test_seeded_rows_ignore_batch_composition():
    logits = _logits(6, seed=1)
    target = SamplingParams(seed=1234, temperature=1.5)
    alone = _run(Sampler(), logits[5:6], [target], outputs=[[1, 2]]).token_ids[0]
    others = [
        SamplingParams(),
        SamplingParams(temperature=0.0),
        SamplingParams(seed=5),
        SamplingParams(top_k=5),
    ]
    for pos in range(5):
        params = others[:pos] + [target] + others[pos:]
        batch = logits[:5].clone()
        batch[pos] = logits[5]
        outputs = [[7]] * 5
        outputs[pos] = [1, 2]
        got = Sampler()(batch, params, [[3]] * 5, outputs, set()).token_ids[pos]
        assert got == alone


def test_seeded_draws_vary_with_step_and_seed():
    logits = torch.zeros(1, V)  # uniform: the draw is the noise
    p = SamplingParams(seed=42)
    by_step = {_run(Sampler(), logits, [p], outputs=[[0] * s]).token_ids[0] for s in range(12)}
    by_seed = {_run(Sampler(), logits, [SamplingParams(seed=s)]).token_ids[0] for s in range(12)}
    assert len(by_step) > 4 and len(by_seed) > 4
    assert hash64(1, 0) != hash64(0, 1) and hash64(-1, 3) == hash64(-1, 3)


def test_seeded_split_matches_one_process():
    """Prefill samples token 0 in one sampler, decode continues in another: same as one sampler."""
    torch.manual_seed(0)
    steps = [_logits(1, seed=10 + s) for s in range(6)]
    p = SamplingParams(seed=99, temperature=0.9, top_p=0.95, repetition_penalty=1.1)
    prompt = [1, 2, 3]

    def generate(samplers):
        out: list[int] = []
        for step, logits in enumerate(steps):
            sampler = samplers[min(step, len(samplers) - 1)]
            out.append(sampler(logits, [p], [prompt], [list(out)], set()).token_ids[0])
        return out

    one = generate([Sampler()])
    split = generate([Sampler(seed=1), Sampler(seed=2)])
    assert one == split
    assert one == generate([Sampler()])


def test_logprobs_are_raw_log_softmax():
    logits = _logits(3)
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.7, logprobs=0, presence_penalty=1.0),
        SamplingParams(temperature=0.0),
    ]
    out = _run(Sampler(seed=0), logits, params, outputs=[[], [1], []])
    ref = torch.log_softmax(logits, -1)
    for row in (0, 1):
        assert out.logprobs[row] == pytest.approx(ref[row, out.token_ids[row]].item(), abs=1e-5)
    assert math.isnan(out.logprobs[2])
    top = out.top_logprobs[0]
    assert [t for t, _ in top] == ref[0].topk(3).indices.tolist()
    assert [lp for _, lp in top] == pytest.approx(ref[0].topk(3).values.tolist(), abs=1e-5)
    assert all(a[1] >= b[1] for a, b in zip(top, top[1:], strict=False))
    assert out.top_logprobs[1] == [] and out.top_logprobs[2] is None


def test_logprobs_k_larger_than_vocab():
    out = _run(Sampler(), _logits(1, vocab=5), [SamplingParams(temperature=0.0, logprobs=20)])
    assert len(out.top_logprobs[0]) == 5


def test_out_of_vocab_history_ids_are_ignored():
    logits = _logits(1)
    p = SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5)
    out = _run(Sampler(), logits, [p], prompts=[[V + 5, -1]], outputs=[[V + 100]])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_greedy_batch_speed():
    logits = torch.randn(32, 103424)
    params = [SamplingParams(temperature=0.0)] * 32
    prompts, outputs = [[1, 2, 3]] * 32, [[4]] * 32
    sampler = Sampler()
    for _ in range(3):
        sampler(logits, params, prompts, outputs, {2})
    runs = 20
    start = time.perf_counter()
    for _ in range(runs):
        sampler(logits, params, prompts, outputs, {2})
    ms = (time.perf_counter() - start) / runs * 1e3
    print(f"\ngreedy 32x103424: {ms:.2f} ms per batch")
