"""The job: a chain of SHA-512 digests over the uploaded bytes (contract section 4)."""

import hashlib

# Checking for a stop request every so many iterations costs nothing measurable
# and lets a worker abandon a long job within a few milliseconds.
CHECK_EVERY = 1 << 16


def work(buffer: bytes, iterations: int) -> bytes:
    """Return the contract's result: sha512 applied `iterations` times, first to `buffer`."""
    output = hashlib.sha512(buffer).digest()
    for _ in range(iterations - 1):
        output = hashlib.sha512(output).digest()
    return output


class Interrupted(Exception):
    """Raised by `work_interruptibly` when asked to stop before the chain is finished."""


def work_interruptibly(buffer: bytes, iterations: int, should_stop) -> bytes:
    """Same result as `work`, but checks `should_stop()` every CHECK_EVERY iterations."""
    sha512 = hashlib.sha512
    output = sha512(buffer).digest()
    remaining = iterations - 1
    while remaining > 0:
        if should_stop():
            raise Interrupted()
        for _ in range(min(remaining, CHECK_EVERY)):
            output = sha512(output).digest()
        remaining -= CHECK_EVERY
    return output
