from __future__ import annotations

import itertools

import pytest

import torch

from hybridft.engine.sampler import EpochSampler, ReshufflingSampler


def test_each_epoch_visits_every_example_exactly_once_in_a_fresh_order():
    sampler = ReshufflingSampler(103, 10, seed=3)
    it = iter(sampler)
    epochs = []
    for _ in range(3):
        batches = list(itertools.islice(it, len(sampler)))
        assert all(len(b) == 10 for b in batches[:-1]) and len(batches[-1]) == 3
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(103))
        epochs.append(flat)
    assert epochs[0] != epochs[1] != epochs[2]


def test_same_seed_same_order_different_seed_different_order():
    first = list(itertools.islice(iter(ReshufflingSampler(50, 5, seed=1)), 20))
    assert first == list(itertools.islice(iter(ReshufflingSampler(50, 5, seed=1)), 20))
    assert first != list(itertools.islice(iter(ReshufflingSampler(50, 5, seed=2)), 20))


def test_resume_from_state_continues_the_same_sequence():
    reference = list(itertools.islice(iter(ReshufflingSampler(37, 4, seed=9)), 25))
    sampler = ReshufflingSampler(37, 4, seed=9)
    head = list(itertools.islice(iter(sampler), 13))
    resumed = ReshufflingSampler(37, 4, seed=9)
    resumed.load_state_dict(sampler.state_dict())
    tail = list(itertools.islice(iter(resumed), 12))
    assert head + tail == reference


def test_with_replacement_draws_full_batches_that_repeat_examples():
    sampler = ReshufflingSampler(20, 10, seed=0, replacement=True)
    batches = list(itertools.islice(iter(sampler), 20))
    assert all(len(b) == 10 for b in batches)
    assert any(len(set(b)) < len(b) for b in batches)


def test_shards_are_disjoint_and_cover_each_batch():
    full = list(itertools.islice(iter(ReshufflingSampler(40, 8, seed=4)), 10))
    shards = [list(itertools.islice(iter(ReshufflingSampler(40, 8, seed=4, num_shards=2, shard=r)), 10)) for r in (0, 1)]
    for whole, a, b in zip(full, *shards):
        assert sorted(a + b) == sorted(whole) and not set(a) & set(b)


@pytest.mark.parametrize("n,batch", [(0, 1), (5, 0), (5, 6)])
def test_bad_sizes_are_rejected(n, batch):
    with pytest.raises(ValueError):
        ReshufflingSampler(n, batch)


@pytest.mark.parametrize("batch_size", [3, 10])
def test_epoch_sampler_in_a_dataloader_yields_the_reshuffling_batches(batch_size):
    expected = list(itertools.islice(iter(ReshufflingSampler(10, batch_size, seed=5)), 3 * -(-10 // batch_size)))
    sampler = EpochSampler(10, seed=5)
    loader = torch.utils.data.DataLoader(range(10), batch_size=batch_size, sampler=sampler)
    batches = []
    for epoch in range(3):  # as the HF Trainer does: set_epoch, then iterate
        sampler.set_epoch(epoch)
        batches += [b.tolist() for b in loader]
    assert batches == expected and len(sampler) == 10
