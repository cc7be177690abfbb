"""Coarse to fine, alone: which size each step runs at, and what the steps cost (the time left the progress bar and
the web page show)."""

import io

import pytest

from nst_lightning.core.schedule import scale_at, sizes, work
from nst_lightning.io.console import Pace, ProgressBar, _Bar
from nst_lightning.serve.progress import eta_seconds


def test_one_size_without_scales():
    assert sizes(None, 512) == [512]
    assert [scale_at(step, None) for step in range(3)] == [0, 0, 0]


def test_each_scale_for_its_steps_then_the_last():
    assert sizes([16, 24, 32], 32) == [16, 24, 32]
    assert [scale_at(step, [2, 2, 3]) for step in range(9)] == [0, 0, 1, 1, 2, 2, 2, 2, 2]
    assert [scale_at(step, [1, 1]) for step in range(4)] == [0, 1, 1, 1]


@pytest.mark.parametrize("scale_steps, costs", [([2, 2, 3], [1.0, 4.0, 16.0]), (None, [1.0]), ([1, 1], [2.0, 3.0])])
def test_the_work_of_a_span_of_steps_is_each_steps_scales_cost(scale_steps, costs):
    for start in range(12):
        for end in range(12):
            expected = sum(costs[scale_at(step, scale_steps)] for step in range(start, end))
            assert work(scale_steps, costs, start, end) == expected, (start, end)


def test_the_time_left_is_this_scales_pace_times_the_work_left():
    # Steps at 512 px then at 1024 px (4 times the work a step), each taking a second a unit of work.
    scale_steps, costs = [4, 2], [1.0, 4.0]
    pace, now, said = Pace(0.0), 0.0, []
    for step in range(6):
        cost = work(scale_steps, costs, step, step + 1)
        now += cost + (3.0 if step == 4 else 0.0)  # the first step at 1024 px computes its targets too
        pace.step_done(cost, now)
        said.append(pace.seconds_left(work(scale_steps, costs, step + 1, 6)))
    # After the 512 px steps, 8 s (tqdm's mean pace said 2 s); at 1024 px, its own pace (targets included).
    assert said == [11.0, 10.0, 9.0, 8.0, 7.0, 0.0]
    assert Pace(0.0).seconds_left(5.0) is None


def test_the_bar_shows_the_time_left_it_is_given():
    bar = _Bar(total=6, file=io.StringIO(), bar_format=ProgressBar.BAR_FORMAT, desc="stylising: ")
    assert "0/6 iterations [00:00<?]" in str(bar)
    bar.seconds_left = 125.0
    assert "<02:05]" in str(bar)
    bar.close()


def test_the_web_pages_time_left_is_this_scales_pace_times_the_work_left():
    scale_steps, costs, end = [4, 2], [1.0, 4.0], 6
    records, now = [{"start": 0, "max_steps": end, "time": 100.0}], 100.0
    for step in range(5):  # the job's records as JobProgress writes them: a second a unit of work
        cost = work(scale_steps, costs, step, step + 1)
        now += cost
        left = work(scale_steps, costs, step + 1, end)
        records.append({"step": step + 1, "max_steps": end, "time": now, "cost": cost, "work_left": left})
    assert eta_seconds(records[:5]) == 8.0  # after the 512 px steps (the mean pace of the steps: 2 s)
    assert eta_seconds(records) == 4.0  # at 1024 px, at its own pace
    assert eta_seconds([*records, {**records[-1], "final": True}]) == 0.0, "a run stopped early has nothing left"
    plain = [{k: v for k, v in r.items() if k not in ("cost", "work_left")} for r in records[:5]]
    assert eta_seconds(plain) == 2.0, "records without the work: the mean pace times the steps left"
