"""The job RQ's workers run in the peer comparison: the contract's SHA-512 chain, as hex."""

import hashlib


def work(buffer, iterations):
    output = hashlib.sha512(buffer).digest()
    for _ in range(iterations - 1):
        output = hashlib.sha512(output).digest()
    return output.hex()
