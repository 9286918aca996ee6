"""llama.data: the global sample order that makes resume independent of the number of processes."""

from llama.training.data import GlobalOrder, rank_slice


def test_each_epoch_is_a_permutation_of_the_windows():
    order = GlobalOrder(10, seed=3)
    samples = order.windows(0, 25).tolist()
    assert sorted(samples[:10]) == sorted(samples[10:20]) == list(range(10))
    assert samples[:10] != samples[10:20]  # a new shuffle every epoch
    assert order.windows(7, 6).tolist() == samples[7:13]  # any range, even across an epoch boundary
    assert GlobalOrder(10, seed=3).windows(0, 10).tolist() == samples[:10]  # (seed, epoch) decide it alone
    assert GlobalOrder(10, seed=4).windows(0, 10).tolist() != samples[:10]


def test_ranks_split_each_global_batch_into_contiguous_shares():
    for world in (1, 2, 4):
        shares = [rank_slice(96, 32, rank, world) for rank in range(world)]
        covered = [s for first, count in shares for s in range(first, first + count)]
        assert covered == list(range(96, 128))
