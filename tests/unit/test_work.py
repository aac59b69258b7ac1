"""The job's result is the contract's SHA-512 chain (CONTRACT.md section 4), computed here independently."""

import hashlib
import math

import pytest

import unit_support  # noqa: F401  (services/ on sys.path)
from dynamic_workload.work import CHECK_EVERY, Interrupted, work, work_interruptibly

# SHA-512("abc"), FIPS 180-2 appendix C.1: an anchor that does not depend on hashlib at all.
SHA512_ABC = (
    "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
    "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"
)

BUFFERS = [b"", b"abc", bytes(range(256)), b"\r\n--boundary--\r\n" * 7]


def contract_result(buffer, iterations):
    """The contract's definition, written out step by step."""
    output = hashlib.sha512(buffer).digest()
    for _ in range(iterations - 1):
        output = hashlib.sha512(output).digest()
    return output


def test_one_iteration_matches_the_published_sha512_test_vector():
    assert work(b"abc", 1).hex() == SHA512_ABC


@pytest.mark.parametrize("buffer", BUFFERS, ids=["empty", "abc", "all-bytes", "multipart-like"])
def test_one_two_and_ten_iterations_match_the_contract(buffer):
    once = hashlib.sha512(buffer).digest()
    twice = hashlib.sha512(once).digest()
    assert work(buffer, 1) == once
    assert work(buffer, 2) == twice
    assert work(buffer, 10) == contract_result(buffer, 10)
    assert work(buffer, 10) != work(buffer, 9)
    assert len(work(buffer, 10)) == 64


@pytest.mark.parametrize("iterations", [1, 2, 10, CHECK_EVERY, CHECK_EVERY + 1, 2 * CHECK_EVERY + 3])
def test_interruptible_work_gives_the_same_result_when_not_stopped(iterations):
    expected = contract_result(b"job bytes", iterations)
    assert work_interruptibly(b"job bytes", iterations, lambda: False) == expected
    assert work(b"job bytes", iterations) == expected


def test_interruptible_work_raises_interrupted_when_asked_to_stop():
    with pytest.raises(Interrupted):
        work_interruptibly(b"data", 10, lambda: True)


def test_a_long_job_checks_for_a_stop_at_least_every_check_interval():
    iterations = 3 * CHECK_EVERY + 1
    calls = []

    def should_stop():
        calls.append(1)
        return False

    assert work_interruptibly(b"data", iterations, should_stop) == contract_result(b"data", iterations)
    assert len(calls) >= math.ceil((iterations - 1) / CHECK_EVERY)


def test_a_stop_requested_midway_abandons_the_rest_of_the_chain():
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) >= 3

    with pytest.raises(Interrupted):
        work_interruptibly(b"data", 2**22, should_stop)
    assert len(calls) == 3
