"""The resumable sharded sampler: data-parallel shards partition each epoch, resume reproduces the order exactly."""
import pytest

from megaseg.data.sampler import ResumableShardedSampler


def shards(num_samples, dp_size, **kwargs):
    return [ResumableShardedSampler(num_samples, seed=7, dp_rank=rank, dp_size=dp_size, **kwargs)
            for rank in range(dp_size)]


@pytest.mark.parametrize("num_samples, dp_size", [(12, 1), (12, 4), (13, 4), (10, 3), (5, 5)])
def test_shards_partition_the_epoch(num_samples, dp_size):
    samplers = shards(num_samples, dp_size)
    epoch = samplers[0].global_order(0)
    local = [list(sampler) for sampler in samplers]
    flat = [index for shard in local for index in shard]
    assert len(flat) == len(set(flat)) == samplers[0].samples_per_epoch == num_samples - num_samples % dp_size
    assert set(flat) == set(epoch)
    # Global position k goes to rank k % dp_size.
    assert all(shard == epoch[rank::dp_size] for rank, shard in enumerate(local))
    assert all(len(sampler) == len(shard) for sampler, shard in zip(samplers, local))


def test_epoch_is_a_seeded_permutation_that_changes_with_the_epoch():
    sampler = ResumableShardedSampler(50, seed=7, dp_rank=0, dp_size=1)
    assert sorted(sampler.global_order(0)) == list(range(50))
    assert sampler.global_order(0) == ResumableShardedSampler(50, seed=7, dp_rank=0, dp_size=1).global_order(0)
    assert sampler.global_order(0) != sampler.global_order(1)
    assert sampler.global_order(0) != ResumableShardedSampler(50, seed=8, dp_rank=0, dp_size=1).global_order(0)
    assert ResumableShardedSampler(5, seed=7, dp_rank=0, dp_size=1, shuffle=False).global_order(3) == [0, 1, 2, 3, 4]


def test_drop_last_false_repeats_the_first_samples():
    samplers = shards(10, 4, drop_last=False)
    epoch = samplers[0].global_order(0)
    assert samplers[0].samples_per_epoch == 12 and epoch[10:] == epoch[:2] and sorted(epoch[:10]) == list(range(10))
    assert sorted(i for s in samplers for i in s) == sorted(epoch)


def run_steps(samplers, num_steps, per_rank):
    """Consume num_steps global batches (per_rank samples on every rank); return what each rank saw."""
    seen = [[] for _ in samplers]
    for _ in range(num_steps):
        for rank, sampler in enumerate(samplers):
            iterator = iter(sampler)
            seen[rank] += [next(iterator) for _ in range(per_rank)]
        for sampler in samplers:
            sampler.advance(per_rank * len(samplers))
    return seen


def test_resume_reproduces_the_uninterrupted_run():
    # 20 samples, 2 ranks, global batch 4: 5 steps an epoch; run 12 steps straight vs 7 + restart + 5.
    straight = run_steps(shards(20, 2), 12, per_rank=2)
    first = shards(20, 2)
    before = run_steps(first, 7, per_rank=2)
    states = [sampler.state_dict() for sampler in first]
    assert states[0]["epoch"] == 1 and states[0]["consumed_in_epoch"] == 8
    resumed = shards(20, 2)
    for sampler, state in zip(resumed, states):
        sampler.load_state_dict(state)
    after = run_steps(resumed, 5, per_rank=2)
    assert [b + a for b, a in zip(before, after)] == straight


def test_resume_with_another_dp_size_continues_the_global_order():
    first = shards(24, 2)
    run_steps(first, 2, per_rank=3)  # 12 global samples consumed
    state = first[0].state_dict()
    resumed = shards(24, 4)
    for sampler in resumed:
        sampler.load_state_dict(state)
    rest = sorted(index for sampler in resumed for index in sampler)
    assert rest == sorted(first[0].global_order(0)[12:])


def test_prefetching_does_not_move_the_resume_point():
    sampler = ResumableShardedSampler(10, seed=1, dp_rank=0, dp_size=1)
    list(sampler)  # a loader that read the whole epoch ahead
    assert sampler.state_dict()["consumed_in_epoch"] == 0


def test_misuse_is_refused():
    with pytest.raises(ValueError, match="dp_rank=2"):
        ResumableShardedSampler(10, seed=0, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="num_samples=3 < dp_size=4"):
        ResumableShardedSampler(3, seed=0, dp_rank=0, dp_size=4)
    sampler = ResumableShardedSampler(10, seed=0, dp_rank=0, dp_size=2)
    with pytest.raises(ValueError, match="multiple of dp_size=2"):
        sampler.advance(3)
    with pytest.raises(ValueError, match="passes the end of epoch 0"):
        sampler.advance(12)
    sampler.advance(10)
    assert (sampler.epoch, sampler.consumed_in_epoch) == (1, 0)
    other = ResumableShardedSampler(11, seed=0, dp_rank=0, dp_size=2)
    with pytest.raises(ValueError, match="num_samples"):
        other.load_state_dict(sampler.state_dict())
    odd = ResumableShardedSampler(12, seed=0, dp_rank=0, dp_size=2)
    odd.advance(6)
    with pytest.raises(ValueError, match="dp_size=4"):
        ResumableShardedSampler(12, seed=0, dp_rank=0, dp_size=4).load_state_dict(odd.state_dict())
