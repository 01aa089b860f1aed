"""The Ray engine's coordinator, as a plain object on a hand-driven clock.

It splits the job's --concurrency/--rpm/--tpm among workers, frees a dead worker's
share, slows everyone down when the job as a whole draws 429s, stops everyone on a
fatal answer or a signal, and leases --max-cost so the job never spends past it.
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from pipeline.cluster.coordinator import (
    BUDGET_SLICES,
    DEAD_AFTER,
    MIN_EVIDENCE,
    MIN_FACTOR,
    WINDOW,
    Coordinator,
)
from tests.conftest import FakeClock

SHARE_KEYS = {
    "concurrency",
    "rpm",
    "tpm",
    "workers",
    "stop",
    "signal",
    "budget_slice",
    "largest_completion",
}


def make(clock: FakeClock, **overrides: Any) -> Coordinator:
    args: dict[str, Any] = {
        "concurrency": 100,
        "rpm": 6000.0,
        "tpm": 600_000.0,
        "max_cost": None,
        "pool_size": 2,
        "splits": 10,
    }
    args.update(overrides)
    return Coordinator(clock=clock, **args)


# ------------------------------------------------------------------ shares


def test_share_is_plain_data_with_every_field(clock: FakeClock) -> None:
    coord = make(clock, max_cost=16.0)

    share = coord.register("a")

    assert set(share) == SHARE_KEYS
    assert share == coord.heartbeat("a", {}) == coord.share()
    assert share["stop"] is None and share["signal"] is None
    assert share["budget_slice"] == pytest.approx(16.0 / (2 * BUDGET_SLICES))


def test_a_lone_worker_gets_only_its_part_of_the_pool_while_splits_remain(
    clock: FakeClock,
) -> None:
    """The second worker of the pool may register a moment later: the first must not
    take the whole limit meanwhile."""
    coord = make(clock, pool_size=2, splits=5)

    share = coord.register("a")

    assert (share["concurrency"], share["rpm"], share["tpm"]) == (50, 3000.0, 300_000.0)
    assert share["workers"] == 2


def test_last_worker_gets_the_whole_limit_once_fewer_splits_than_pool_remain(
    clock: FakeClock,
) -> None:
    coord = make(clock, pool_size=2, splits=3)
    coord.register("a")
    coord.register("b")
    assert coord.heartbeat("a", {})["concurrency"] == 50

    coord.finish("b", {})  # 2 splits left: "a" still shares with the next one
    assert coord.heartbeat("a", {})["concurrency"] == 50
    coord.register("c")
    coord.finish("c", {})  # 1 split left, and "a" is running it

    share = coord.heartbeat("a", {})
    assert (share["concurrency"], share["rpm"], share["tpm"]) == (100, 6000.0, 600_000.0)
    assert share["workers"] == 1


def test_more_live_workers_than_the_pool_divide_by_the_live_count(clock: FakeClock) -> None:
    coord = make(clock, pool_size=2, splits=10)
    for name in "abcd":
        coord.register(name)

    share = coord.heartbeat("a", {})

    assert (share["concurrency"], share["rpm"], share["workers"]) == (25, 1500.0, 4)


def test_concurrency_share_is_never_below_one(clock: FakeClock) -> None:
    coord = make(clock, concurrency=3, rpm=None, tpm=None, pool_size=8, splits=8)
    for i in range(8):
        coord.register(f"w{i}")

    share = coord.share()

    assert share["concurrency"] == 1  # 3 / 8 rounds to 0: one request in flight still
    assert share["rpm"] is None and share["tpm"] is None


def test_dead_worker_is_dropped_and_its_share_goes_to_the_others(clock: FakeClock) -> None:
    """A worker's process dies and Ray reruns its split under a new name: until the dead
    one is noticed the job has one writer too many, then the share grows back."""
    coord = make(clock, pool_size=2, splits=2)
    coord.register("a")
    coord.register("b")
    coord.register("b-retry")
    assert coord.heartbeat("a", {})["workers"] == 3

    clock.now += DEAD_AFTER  # not yet: "more than" DEAD_AFTER seconds
    coord.heartbeat("b-retry", {})
    assert coord.heartbeat("a", {})["workers"] == 3

    clock.now += 0.5
    coord.heartbeat("b-retry", {})
    share = coord.heartbeat("a", {})
    assert (share["workers"], share["concurrency"]) == (2, 50)
    assert coord.totals()["workers"] == 2


def test_dead_workers_grant_stays_spent(clock: FakeClock) -> None:
    """We cannot know what a dead worker spent of its grant, so all of it counts."""
    coord = make(clock, max_cost=10.0)
    coord.register("a")
    coord.register("b")
    assert coord.grant("a", 1.0) == pytest.approx(1.0)
    assert coord.grant("b", 3.0) == pytest.approx(3.0)
    left = coord.budget_left()
    assert left == pytest.approx(6.0)

    clock.now += DEAD_AFTER + 1
    coord.heartbeat("a", {"spent_usd": 0.5})  # "b" is silent: dropped here

    assert coord.totals()["workers"] == 1
    assert coord.budget_left() == pytest.approx(left)  # never grows back
    assert coord.totals()["spent_usd"] == pytest.approx(3.0 + 0.5)


# ------------------------------------------------------------------ 429s


def report(coord: Coordinator, name: str, answers: int, limited: int) -> dict[str, Any]:
    """A heartbeat with cumulative answer and 429 counts."""
    return coord.heartbeat(name, {"answers": answers, "rate_limited": limited})


def test_ten_percent_429s_cut_every_share_by_thirty_percent(clock: FakeClock) -> None:
    coord = make(clock, pool_size=2, splits=2)
    coord.register("a")
    coord.register("b")

    clock.now += 0.5
    report(coord, "a", 50, 5)  # 10% of 50 but the job's evidence is "a"'s alone...
    share = report(coord, "b", 50, 5)  # ...and with "b"'s: 10 of 100, 10%

    assert (share["concurrency"], share["rpm"], share["tpm"]) == (35, 2100.0, 210_000.0)
    assert coord.share()["concurrency"] == 35  # "a" is cut too


@pytest.mark.parametrize(
    ("answers", "limited"),
    [(MIN_EVIDENCE - 1, MIN_EVIDENCE - 1), (100, 9)],
    ids=["too-few-answers", "under-ten-percent"],
)
def test_too_little_evidence_of_overload_cuts_nothing(
    clock: FakeClock, answers: int, limited: int
) -> None:
    coord = make(clock)
    coord.register("a")

    clock.now += 0.5
    share = report(coord, "a", answers, limited)

    assert share["concurrency"] == 50


def test_answers_older_than_the_window_do_not_dilute_new_429s(clock: FakeClock) -> None:
    coord = make(clock)
    coord.register("a")
    report(coord, "a", 1000, 0)

    clock.now += WINDOW + 0.5
    share = report(coord, "a", 1010, 1)  # 1 of 10 recent answers; 1 of 1010 overall

    assert share["concurrency"] == 35


def test_cut_at_most_once_a_second_then_grow_back_to_the_full_share(clock: FakeClock) -> None:
    coord = make(clock)
    coord.register("a")
    answers = limited = 0
    seen = []
    for _ in range(10):  # a second of heartbeats, every one of them half 429s
        clock.now += 0.1
        answers, limited = answers + 20, limited + 10
        seen.append(report(coord, "a", answers, limited)["concurrency"])
    assert set(seen) == {35}

    clock.now += 0.1  # a second after the first cut: the 429s go on, cut again
    answers, limited = answers + 20, limited + 10
    assert report(coord, "a", answers, limited)["concurrency"] == int(100 * 0.7 * 0.7 / 2)

    grown = []
    for _ in range(40):  # 20 s without an answer, let alone a 429
        clock.now += 0.5
        grown.append(coord.heartbeat("a", {"answers": answers, "rate_limited": limited}))
    concurrency = [s["concurrency"] for s in grown]
    assert concurrency == sorted(concurrency)  # grows, never jumps back down
    assert concurrency[0] == 24  # held for a second after the cut
    assert (grown[-1]["concurrency"], grown[-1]["rpm"], grown[-1]["tpm"]) == (50, 3000, 300_000)


def test_cuts_stop_at_the_floor(clock: FakeClock) -> None:
    coord = make(clock, concurrency=10, pool_size=1, splits=1)
    coord.register("a")
    answers = 0
    for _ in range(50):
        clock.now += 1.0
        answers += 100
        share = report(coord, "a", answers, answers)

    assert share["rpm"] == pytest.approx(6000 * MIN_FACTOR)
    assert share["concurrency"] == 1


# ------------------------------------------------------------------ stopping


def fatal(reason: str) -> dict[str, Any]:
    """A worker's counts after a fatal answer (the worker sends the message in them)."""
    return {"ok": 0, "fatal": reason}


def test_a_fatal_answer_stops_every_worker_and_the_first_reason_wins(clock: FakeClock) -> None:
    coord = make(clock)
    coord.register("a")
    coord.register("b")

    coord.heartbeat("a", fatal("401: invalid api key"))
    coord.heartbeat("a", fatal("402: balance is empty"))
    coord.stop("budget: spent")

    assert coord.heartbeat("b", {})["stop"] == "401: invalid api key"
    assert coord.register("late")["stop"] == "401: invalid api key"
    assert coord.share()["signal"] is None


def test_stop_by_signal_reaches_everyone_and_the_first_signal_wins(clock: FakeClock) -> None:
    coord = make(clock)
    coord.register("a")

    coord.stop("stopped by SIGINT", 2)
    coord.stop("stopped by SIGTERM", 15)
    coord.heartbeat("a", fatal("401: invalid api key"))

    share = coord.heartbeat("a", {})
    assert (share["stop"], share["signal"]) == ("stopped by SIGINT", 2)


# ------------------------------------------------------------------ budget


def test_grant_without_max_cost_is_unlimited(clock: FakeClock) -> None:
    coord = make(clock, max_cost=None)
    coord.register("a")

    assert coord.grant("a", 1e9) == math.inf
    assert coord.budget_left() is None
    assert coord.share()["budget_slice"] == 0.0


def test_grant_gives_at_least_what_is_asked_and_a_slice_to_save_round_trips(
    clock: FakeClock,
) -> None:
    coord = make(clock, max_cost=16.0, pool_size=2)
    coord.register("a")
    slice_ = 16.0 / (2 * BUDGET_SLICES)

    assert coord.grant("a", 0.001) == pytest.approx(slice_)
    assert coord.grant("a", 5.0) == pytest.approx(5.0)
    assert coord.budget_left() == pytest.approx(16.0 - slice_ - 5.0)


def test_grant_never_passes_the_cap_even_for_a_slice(clock: FakeClock) -> None:
    coord = make(clock, max_cost=1.0, pool_size=1)
    coord.register("a")
    assert coord.grant("a", 0.95) == pytest.approx(0.95)

    assert coord.grant("a", 0.01) == pytest.approx(0.05)  # less than a slice: all that is left
    assert coord.budget_left() == pytest.approx(0.0)


def test_grant_says_wait_while_others_hold_enough_unspent(clock: FakeClock) -> None:
    coord = make(clock, max_cost=1.0)
    coord.register("a")
    coord.register("b")
    coord.grant("a", 0.9)
    coord.heartbeat("a", {"spent_usd": 0.5})  # 0.4 of "a"'s grant is still unspent

    assert coord.grant("b", 0.3) == 0.0  # 0.1 free + 0.4 "a" may give back: ask again
    assert coord.grant("b", 0.6) == -1.0  # even with all of it back: out of budget
    assert coord.budget_left() == pytest.approx(0.1)  # asking granted nothing


def test_given_back_grant_can_be_granted_to_another_worker(clock: FakeClock) -> None:
    coord = make(clock, max_cost=1.0)
    coord.register("a")
    coord.register("b")
    coord.grant("a", 0.9)
    assert coord.grant("b", 0.3) == 0.0

    coord.give_back("a", 0.4)

    assert coord.budget_left() == pytest.approx(0.5)
    assert coord.grant("b", 0.3) == pytest.approx(0.3)


def test_give_back_cannot_make_a_grant_negative(clock: FakeClock) -> None:
    """Handing back more than was granted (or a negative amount) must not create budget."""
    coord = make(clock, max_cost=1.0)
    coord.register("a")
    coord.grant("a", 0.5)

    coord.give_back("a", -3.0)
    assert coord.budget_left() == pytest.approx(0.5)
    coord.give_back("a", 3.0)
    assert coord.budget_left() == pytest.approx(1.0)
    coord.give_back("nobody", 3.0)
    assert coord.budget_left() == pytest.approx(1.0)


def test_finish_returns_the_unspent_grant(clock: FakeClock) -> None:
    coord = make(clock, max_cost=1.0)
    coord.register("a")
    coord.grant("a", 0.8)

    coord.finish("a", {"spent_usd": 0.3})

    assert coord.budget_left() == pytest.approx(0.7)
    assert coord.totals()["spent_usd"] == pytest.approx(0.3)


def test_random_leases_never_add_up_past_max_cost(clock: FakeClock) -> None:
    """Any sequence of grants, give-backs, spending, finishes and deaths keeps
    spent-by-finished-or-dead + granted-to-live <= --max-cost.

    The test keeps its own books from what the coordinator answered and checks them
    against the coordinator's after every step."""
    rng = random.Random(20240611)
    max_cost = 5.0
    coord = make(clock, max_cost=max_cost, pool_size=4, splits=10_000)
    granted: dict[str, float] = {}  # live workers: grant held, as the worker sees it
    spent: dict[str, float] = {}
    abandoned: dict[str, tuple[float, float]] = {}  # died, not yet noticed: (seen, unspent)
    committed = 0.0  # granted to live or dead workers, plus spent by finished ones
    outcomes = {"granted": 0, "wait": 0, "refused": 0}
    serial = 0

    def new_worker() -> None:
        nonlocal serial
        serial += 1
        name = f"w{serial}"
        coord.register(name)
        granted[name], spent[name] = 0.0, 0.0

    for _ in range(4):
        new_worker()
    for _ in range(2000):
        clock.now += 0.3
        for name in granted:  # the living report; the dead are noticed in time
            coord.heartbeat(name, {"spent_usd": spent[name]})
        for name in [n for n, (seen, _) in abandoned.items() if clock.now - seen > DEAD_AFTER]:
            del abandoned[name]  # its grant stays in `committed`: spent for all we know

        op = rng.random()
        name = rng.choice(sorted(granted)) if granted else ""
        if not granted or (op < 0.05 and len(granted) < 6):
            new_worker()
        elif op < 0.55:
            want = rng.choice([rng.uniform(0, 0.3), rng.uniform(0, 2.0), rng.uniform(4, 6)])
            free = max_cost - committed
            unspent_elsewhere = sum(granted[n] - spent[n] for n in granted if n != name)
            # until it is noticed, a dead worker's unspent grant looks like it may come back
            unspent_elsewhere += sum(unspent for _, unspent in abandoned.values())
            got = coord.grant(name, want)
            if got > 0:
                outcomes["granted"] += 1
                assert want <= got <= free + 1e-9
                granted[name] += got
                committed += got
            elif got == 0.0:
                outcomes["wait"] += 1
                assert free < want <= free + unspent_elsewhere + 1e-9
            else:
                outcomes["refused"] += 1
                assert got == -1.0
                assert want > free + unspent_elsewhere - 1e-9
        elif op < 0.75:
            spend = rng.uniform(0, min(0.01, granted[name] - spent[name]))
            spent[name] += spend
            coord.heartbeat(name, {"spent_usd": spent[name]})
        elif op < 0.88:
            back = rng.uniform(0, granted[name] - spent[name])
            coord.give_back(name, back)
            granted[name] -= back
            committed -= back
        elif op < 0.995:
            coord.finish(name, {"spent_usd": spent[name]})
            committed -= granted.pop(name) - spent.pop(name)
        else:
            abandoned[name] = (clock.now, granted.pop(name) - spent.pop(name))

        assert committed <= max_cost + 1e-9
        left = coord.budget_left()
        assert left is not None
        assert left == pytest.approx(max_cost - committed, abs=1e-9)
        assert left >= -1e-9
    # the sequence exercised every answer grant() can give
    assert min(outcomes.values()) > 10, outcomes


def test_a_worker_wrongly_declared_dead_is_not_counted_twice(clock: FakeClock) -> None:
    coord = make(clock, max_cost=10.0)
    coord.register("a")
    coord.register("slow")
    coord.grant("slow", 4.0)
    coord.heartbeat("slow", {"spent_usd": 1.0})

    clock.now += DEAD_AFTER + 1  # "slow" is stuck, not dead
    coord.heartbeat("a", {})
    coord.heartbeat("slow", {"spent_usd": 1.0})
    coord.finish("slow", {"spent_usd": 1.0})

    assert coord.totals()["spent_usd"] == pytest.approx(1.0)


# ------------------------------------------------------------------ progress


def test_totals_add_finished_splits_to_the_latest_report_of_live_ones(clock: FakeClock) -> None:
    coord = make(clock)
    coord.register("a")
    coord.register("b")
    coord.heartbeat("a", {"ok": 2, "prompt_tokens": 40})
    coord.finish("a", {"ok": 5, "error": 1, "prompt_tokens": 100, "spent_usd": 0.3})
    coord.heartbeat("b", {"ok": 1, "rate_limited": 2, "spent_usd": 0.1})
    coord.heartbeat("b", {"ok": 3, "rate_limited": 2, "prompt_tokens": 50, "spent_usd": 0.2})

    totals = coord.totals()

    # counts are cumulative per split: "b"'s latest report, not the sum of its reports
    assert (totals["ok"], totals["error"], totals["rate_limited"]) == (8, 1, 2)
    assert totals["prompt_tokens"] == 150
    assert totals["workers"] == 1
    assert totals["spent_usd"] == pytest.approx(0.5)


def test_largest_completion_is_the_most_any_heartbeat_reported(clock: FakeClock) -> None:
    """A worker new to the job sizes its budget holds on what the job has seen."""
    coord = make(clock)
    coord.register("a")
    coord.register("b")
    assert coord.share()["largest_completion"] == 0

    coord.heartbeat("a", {"largest_completion": 900})
    coord.finish("a", {"largest_completion": 1200})
    coord.heartbeat("b", {"largest_completion": 300})

    assert coord.register("c")["largest_completion"] == 1200


def test_give_back_from_a_worker_presumed_dead_is_kept(clock: FakeClock) -> None:
    coord = make(clock, max_cost=10.0)
    coord.register("slow")
    assert coord.grant("slow", 4.0) == 4.0
    clock.now += DEAD_AFTER + 1
    coord.share()  # "slow" is presumed dead: its grant is booked as spent
    coord.give_back("slow", 3.0)  # it was alive after all, and hands back what it can't use
    coord.heartbeat("slow", {"spent_usd": 1.0})
    assert coord.budget_left() == pytest.approx(9.0)


def test_the_jobs_spend_includes_writers_that_did_not_finish(clock: FakeClock) -> None:
    coord = make(clock, max_cost=10.0)
    for name in ("done", "alive", "dead"):
        coord.register(name)
    coord.heartbeat("alive", {"spent_usd": 0.5})
    coord.heartbeat("dead", {"spent_usd": 0.25})
    coord.finish("done", {"ok": 3, "spent_usd": 1.0})
    clock.now += DEAD_AFTER + 1
    coord.heartbeat("alive", {"spent_usd": 0.75})  # "dead" goes quiet for good
    assert coord.finished()["spent_usd"] == pytest.approx(1.0 + 0.75 + 0.25)


# ------------------------------------------------------------------ structured output


def test_the_structured_modes_each_split_used_reach_the_driver_merged(clock: FakeClock) -> None:
    """Each Ray split learns the endpoint's structured mode on its own; the run's
    manifest and end-of-run notes need what all of them did, not nothing."""
    coord = make(clock)
    url = "http://gw.test/v1"
    coord.register("a")
    coord.register("b")
    coord.register("c")

    coord.finish("a", {"ok": 3, "structured": {url: {"refused": {"json_schema": 1},
                                                     "json_schema": "json_object"}}})  # fmt: skip
    coord.finish("b", {"ok": 2, "structured": {url: {"refused": {"json_schema": 1,
                                                                 "json_object": 1},
                                                     "json_schema": "prompt"}}})  # fmt: skip
    coord.finish("c", {"ok": 1, "structured": {}})

    assert coord.finished()["structured"] == {
        url: {"refused": {"json_schema": 2, "json_object": 1}, "json_schema": "prompt"}
    }
