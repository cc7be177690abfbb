"""Coarse to fine, alone: which size each step runs at."""

from nst_lightning.core.schedule import scale_at, sizes


def test_one_size_without_scales():
    assert sizes(None, 512) == [512]
    assert [scale_at(step, None) for step in range(3)] == [0, 0, 0]


def test_each_scale_for_its_steps_then_the_last():
    assert sizes([16, 24, 32], 32) == [16, 24, 32]
    assert [scale_at(step, [2, 2, 3]) for step in range(9)] == [0, 0, 1, 1, 2, 2, 2, 2, 2]
    assert [scale_at(step, [1, 1]) for step in range(4)] == [0, 1, 1, 1]
