"""The balancer's own decisions: which idle workers may end themselves."""

import types

import pytest

from dynamic_workload.balancer import MAX_LEASE_WAIT, Balancer
from dynamic_workload.config import Settings


def balancer(min_workers, workers):
    scaler = types.SimpleNamespace(live=len(workers), known=set(workers))
    return Balancer(Settings(min_workers=min_workers), store=None, scaler=scaler, registry=None)


@pytest.mark.parametrize("min_workers, allowed", [(0, 3), (1, 2), (3, 0)])
def test_only_as_many_idle_workers_may_leave_as_the_floor_allows(min_workers, allowed):
    app = balancer(min_workers, ["a", "b", "c"])
    answers = [app.may_leave(worker, now=0.0) for worker in ("a", "b", "c", "a", "b", "c")]
    assert sum(answers[:3]) == allowed
    assert answers[3:] == answers[:3]  # asking again gives the same answer


def test_workers_that_left_no_longer_count_against_the_floor():
    app = balancer(1, ["a", "b", "c"])
    assert [app.may_leave(w, 0.0) for w in "abc"] == [True, True, False]
    app.scaler.live, app.scaler.known = 1, {"c"}  # a and b ended themselves
    assert app.may_leave("c", 1.0) is False  # c is the floor now
    app.scaler.live, app.scaler.known = 3, {"c", "d", "e"}  # a backlog brought two more
    assert app.may_leave("d", 2.0) is True


def test_a_permission_lapses_when_the_worker_stayed():
    app = balancer(1, ["a", "b"])
    assert app.may_leave("a", 0.0) is True and app.may_leave("b", 0.0) is False
    # a found work and stayed: after two lease periods its permission is given up.
    assert app.may_leave("b", 2 * MAX_LEASE_WAIT + 1) is True
