"""Stragglers: the detection rule (median, factor, patience, recovery) on given times, and one real
3-rank gloo job in which `LOOM_FAULTS=slow@2:rank=1:factor=4` makes rank 1 a straggler that the
log, metrics.jsonl and the report name (and no other rank)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import tiny_args
from test_launch import finish, loom_train

from loom.core.config import Config, load_config
from loom.core.errors import LoomError
from loom.report import write_report
from loom.train.metrics import read_metrics
from loom.train.resilience import FaultInjector, parse_faults
from loom.train.stragglers import StragglerDetector
from loom.train.trainer import Trainer

# -- the rule --------------------------------------------------------------------------------


def test_a_rank_over_factor_times_the_median_for_patience_intervals_is_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    detector = StragglerDetector(factor=1.5, patience=3, hosts=["a", "b", "c", "d"])
    with caplog.at_level(logging.WARNING, logger="loom"):
        first = detector.observe([1.0, 1.6, 1.1, 0.9], [0.1] * 4)
        assert first.median_s == pytest.approx(1.05)  # the median of 4: the mean of the middle two
        assert (first.slowest_rank, first.stragglers) == (1, [])
        assert first.slowest_ratio == pytest.approx(1.6 / 1.05)
        assert detector.observe([1.0, 1.6, 1.0, 1.0], [0.1] * 4).stragglers == []
        third = detector.observe([1.0, 1.7, 1.0, 1.0], [0.1] * 4)
    assert third.stragglers == [1]
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == "straggler: rank 1 (host b) step 1.7 s vs median 1 s over 3 intervals"


def test_one_interval_at_or_under_the_factor_starts_the_count_again() -> None:
    detector = StragglerDetector(factor=2.0, patience=2)
    times = [[1, 3, 1], [1, 2, 1], [1, 3, 1], [1, 3, 1]]  # 2.0 is not over factor 2
    verdicts = [detector.observe(t, [0, 0, 0]).stragglers for t in times]
    assert verdicts == [[], [], [], [1]]


def test_a_straggler_that_keeps_up_again_recovers(caplog: pytest.LogCaptureFixture) -> None:
    detector = StragglerDetector(factor=1.5, patience=1, hosts=["h0", "h1", "h2"])
    with caplog.at_level(logging.WARNING, logger="loom"):
        assert detector.observe([1, 1, 4], [0, 0, 0]).stragglers == [2]
        assert detector.observe([1, 1, 4], [0, 0, 0]).stragglers == [2]  # named once
        assert detector.observe([1, 1, 1.2], [0, 0, 0]).stragglers == []
    assert [r.getMessage() for r in caplog.records] == [
        "straggler: rank 2 (host h2) step 4 s vs median 1 s over 1 interval",
        "straggler recovered: rank 2 (host h2) step 1.2 s vs median 1 s over 1 interval",
    ]


def test_several_stragglers_and_a_fast_rank() -> None:
    detector = StragglerDetector(factor=1.5, patience=1)
    verdict = detector.observe([0.1, 1, 1, 2, 1, 3], [0] * 6)  # a fast rank is not flagged
    assert verdict.stragglers == [3, 5] and verdict.slowest_rank == 5
    assert verdict.slowest_ratio == pytest.approx(3.0)


# -- configuration and LOOM_FAULTS -----------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--resilience.straggler_factor=1", "straggler_factor=1.0 must be greater than 1"),
        ("--resilience.straggler_factor=-2", "or 0 to turn straggler detection off"),
        ("--resilience.straggler_intervals=0", "resilience.straggler_intervals=0 must be greater"),
    ],
)
def test_bad_straggler_settings_are_refused(override: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(LoomError, match=message):
        load_config(None, tiny_args(tmp_path, tmp_path / "run", override))


def test_slow_fault_parses_with_a_factor_and_lasts_to_the_end() -> None:
    (slow, bounded) = parse_faults("slow@2:rank=1:factor=4,slow@3-5:factor=1.5")
    assert (slow.kind, slow.first, slow.rank, slow.factor) == ("slow", 2, 1, 4.0)
    assert slow.last > 10**9  # no LAST: to the end of the run
    assert (bounded.first, bounded.last, bounded.rank, bounded.factor) == (3, 5, None, 1.5)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("slow@2:rank=1", "slow needs :factor=F with F a number greater than 1"),
        ("slow@2:factor=1", "slow needs :factor=F"),
        ("slow@2:factor=x", "slow needs :factor=F"),
        ("slow@2:rank=one:factor=2", "rank must be a whole number"),
        ("kill@2:factor=2", "unknown option factor"),
        ("slow@2:factor=2:speed=3", "unknown option speed"),
    ],
)
def test_bad_slow_specs_are_refused(spec: str, message: str) -> None:
    with pytest.raises(LoomError, match=message):
        parse_faults(spec)


def test_slow_burns_factor_minus_one_times_the_compute_on_the_given_clock() -> None:
    ticks = iter(range(1000))

    def clock() -> float:  # one unit a reading
        return float(next(ticks))

    injector = FaultInjector(rank=1, text="slow@3:rank=1:factor=4")
    assert injector.slow_down(2, 5.0, clock) == 0.0  # before STEP: no reading taken
    assert injector.slow_down(3, 5.0, clock) >= 15.0  # (4 - 1) x 5 of the clock
    assert FaultInjector(rank=0, text="slow@3:rank=1:factor=4").slow_down(3, 5.0, clock) == 0.0


# -- a real job --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_slowed_rank_is_named_in_the_log_and_metrics_of_a_3_rank_job(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    monkeypatch.setenv("LOOM_FAULTS", "slow@2:rank=1:factor=4")
    process = loom_train(
        "--nproc",
        "3",
        *tiny_args(data_dir, run_dir),
        "--train.steps=16",
        "--train.batch_size=6",
        "--train.micro_batch_size=6",
        "--train.precision=fp32",
        "--metrics.log_interval=2",
        "--metrics.tensorboard=false",
        "--checkpoint.interval=100",
        "--resilience.straggler_factor=1.5",
        "--resilience.straggler_intervals=3",
    )
    code, err = finish(process)
    assert code == 0, err[-4000:]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(2, 17, 2))
    slowest = {r["step"]: (r["slowest_rank"], round(r["slowest_ratio"], 2)) for r in records}
    flagged = {rank for r in records for rank in r["straggler_ranks"]}
    assert flagged == {1}, slowest
    assert records[-1]["straggler_ranks"] == [1], slowest
    assert all(r["slowest_rank"] == 1 for r in records[1:]), slowest  # the first has warm-up
    named = [line for line in err.splitlines() if "straggler: rank" in line]
    assert len(named) == 1 and "straggler: rank 1 (host " in named[0], err[-3000:]
    assert "recovered" not in err
    page = write_report(run_dir).read_text()
    assert "stragglers: rank 1 (steps " in page and "rank 0 (" not in page


def test_a_bad_slow_spec_stops_a_job_before_it_starts(
    tiny_config: Callable[..., Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOM_FAULTS", "slow@2:rank=1")
    with pytest.raises(LoomError, match="slow needs :factor=F with F a number greater than 1"):
        Trainer(tiny_config())
    assert not (tmp_path / "run").exists()
