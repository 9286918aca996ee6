"""``sample``: which tokens each row can draw, and how often, under greedy, temperature, top-k and top-p settings.

Each test builds logits whose eligible set is known by hand, gives them to many rows at once (every row a draw of
its own) and checks the set of tokens drawn and their frequencies. Token ids are shuffled against probability
order, so that a token's rank and its id differ, as they do in a real vocabulary. 20,000 draws put a frequency's
standard deviation under 0.004; the tolerance is 0.02."""

import math

import pytest
import torch

from llama.generation.sampling import RowSampler, SamplingParams, sample

DRAWS = 20_000
IDS = [3, 0, 4, 1, 2]  # the most likely token is id 3, then id 0, ...


def logits_for(probs: list[float]) -> torch.Tensor:
    """(5,) logits giving token IDS[i] the probability probs[i]."""
    logits = torch.full((len(IDS),), -math.inf)
    for token, p in zip(IDS, probs):
        logits[token] = math.log(p)
    return logits


def draw(logits: torch.Tensor, seed: int = 0, **settings) -> torch.Tensor:
    """DRAWS tokens sampled from the same logits, one row each, with one random stream shared by the rows."""
    generator = torch.Generator().manual_seed(seed)
    rows = [RowSampler(SamplingParams(**settings), generator)] * DRAWS
    return sample(logits.expand(DRAWS, -1), rows)


def frequencies(tokens: torch.Tensor) -> dict[int, float]:
    counts = torch.bincount(tokens, minlength=len(IDS))
    return {token: count / len(tokens) for token, count in enumerate(counts.tolist()) if count}


def assert_frequencies(tokens: torch.Tensor, expected: dict[int, float]):
    """Exactly the tokens of ``expected`` were drawn, each about as often as it says."""
    got = frequencies(tokens)
    assert set(got) == set(expected), f"drew {sorted(got)}, eligible {sorted(expected)}"
    for token, p in expected.items():
        assert got[token] == pytest.approx(p, abs=0.02), (token, got)


def renormalised(probs: dict[int, float]) -> dict[int, float]:
    total = sum(probs.values())
    return {token: p / total for token, p in probs.items()}


PROBS = [0.5, 0.3, 0.12, 0.05, 0.03]


def test_plain_sampling_draws_every_token_as_often_as_its_probability():
    assert_frequencies(draw(logits_for(PROBS), temperature=1.0, top_p=1.0), dict(zip(IDS, PROBS)))


def test_temperature_sharpens_or_flattens_the_distribution():
    for temperature in (0.5, 2.0):
        scaled = renormalised({token: p ** (1 / temperature) for token, p in zip(IDS, PROBS)})
        assert_frequencies(draw(logits_for(PROBS), temperature=temperature, top_p=1.0), scaled)


@pytest.mark.parametrize(
    "top_p, kept",
    [
        (0.6, 2),  # 0.5 < 0.6: the second token (0.3) crosses 0.6 and is kept
        (0.45, 1),  # the first token alone (0.5) reaches 0.45
        (0.81, 3),  # 0.5 + 0.3 = 0.8 < 0.81: the third crosses
        (1.0, 5),
    ],
)
def test_top_p_keeps_the_smallest_prefix_whose_mass_reaches_it_including_the_token_that_crosses(top_p, kept):
    expected = renormalised(dict(zip(IDS[:kept], PROBS[:kept])))
    assert_frequencies(draw(logits_for(PROBS), temperature=1.0, top_p=top_p), expected)


def test_temperature_is_applied_before_top_p():
    # At temperature 3 the distribution is flat enough that two tokens are needed to reach 0.6; at temperature 1 the
    # first token (0.7) reaches it alone. Cooled to 0.5, top_p 0.95 keeps two tokens; at temperature 1, three.
    probs = [0.7, 0.2, 0.1]
    logits = logits_for(probs + [1e-30, 1e-30])  # two tokens that no setting here keeps
    for temperature, top_p, kept in [(3.0, 0.6, 2), (0.5, 0.95, 2)]:
        scaled = renormalised({token: p ** (1 / temperature) for token, p in zip(IDS, probs)})
        assert sum(sorted(scaled.values(), reverse=True)[: kept - 1]) < top_p  # (the hand computation's premise)
        expected = renormalised(dict(list(scaled.items())[:kept]))
        assert_frequencies(draw(logits, temperature=temperature, top_p=top_p), expected)


@pytest.mark.parametrize("top_k", [1, 2, 3, 5])
def test_top_k_keeps_exactly_the_k_most_likely_tokens(top_k):
    expected = renormalised(dict(zip(IDS[:top_k], PROBS[:top_k])))
    assert_frequencies(draw(logits_for(PROBS), temperature=1.0, top_p=1.0, top_k=top_k), expected)


def test_top_k_and_top_p_together_keep_the_smaller_set():
    two_most_likely = renormalised(dict(zip(IDS[:2], PROBS[:2])))
    assert_frequencies(draw(logits_for(PROBS), temperature=1.0, top_p=0.9, top_k=2), two_most_likely)  # top_k's
    assert_frequencies(draw(logits_for(PROBS), temperature=1.0, top_p=0.6, top_k=4), two_most_likely)  # top_p's


def test_a_greedy_row_among_sampled_rows_takes_the_argmax_and_leaves_their_draws_alone():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=generator) * 0.1  # nearly flat: sampling rarely picks the argmax
    greedy = SamplingParams(temperature=0.0, top_p=0.5, top_k=3)  # its top-p and top-k change nothing
    # Row 0 samples plainly: alone, its probabilities are never sorted; here row 2's top-k and top-p sort the batch's,
    # and row 0 must still draw what it draws alone.
    settings = [SamplingParams(temperature=1.0, top_p=1.0), greedy, SamplingParams(0.7, top_p=0.8, top_k=20), greedy]
    steps = 50
    generators = [torch.Generator().manual_seed(i) for i in range(4)]  # each row's own stream, kept over the steps
    mixed = torch.stack([
        sample(logits, [RowSampler(s, g) for s, g in zip(settings, generators)]) for _ in range(steps)
    ])
    assert (mixed[:, 1] == logits[1].argmax()).all() and (mixed[:, 3] == logits[3].argmax()).all()
    for row in (0, 2):  # the sampled rows draw what they draw alone, from the same streams
        generator = torch.Generator().manual_seed(row)
        alone = [sample(logits[row : row + 1], [RowSampler(settings[row], generator)]).item() for _ in range(steps)]
        assert mixed[:, row].tolist() == alone
        assert len(set(alone)) > 5  # and they did sample


def test_all_greedy_rows_take_the_argmax():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    rows = [RowSampler(SamplingParams(temperature=0.0), torch.Generator())] * 3
    assert sample(logits, rows).tolist() == logits.argmax(-1).tolist()
