"""Windowed shuffling: a permutation per window and epoch, resumable from any position."""

import pytest

from easylm_align import shuffling


def reader(n_records):
    return lambda start: iter([f"r{i}" for i in range(start, n_records)])


def epoch(n_records, buffer, seed=0, epoch_index=0, start=0):
    return list(shuffling.ordered(reader(n_records), start, buffer, seed, epoch_index))


def test_no_buffer_keeps_the_source_order():
    assert epoch(5, 0) == [(i, i, f"r{i}") for i in range(5)]
    assert epoch(5, 0, start=3) == [(3, 3, "r3"), (4, 4, "r4")]


@pytest.mark.parametrize("n_records, buffer", [(10, 4), (12, 4), (7, 100), (1, 3)])
def test_each_window_is_a_permutation_of_its_records(n_records, buffer):
    rows = epoch(n_records, buffer)
    assert [position for position, _, _ in rows] == list(range(n_records))
    assert sorted(number for _, number, _ in rows) == list(range(n_records))
    for position, number, record in rows:
        assert record == f"r{number}"
        assert position // buffer == number // buffer  # records stay in their window


def test_order_depends_on_seed_and_epoch_and_is_reproducible():
    base = epoch(50, 50)
    assert base == epoch(50, 50)
    assert [n for _, n, _ in base] != list(range(50))
    assert base != epoch(50, 50, seed=1) and base != epoch(50, 50, epoch_index=1)


@pytest.mark.parametrize("start", [0, 3, 4, 5, 9])
def test_resuming_from_a_position_continues_the_same_order(start):
    assert epoch(10, 4, seed=7, start=start) == epoch(10, 4, seed=7)[start:]
