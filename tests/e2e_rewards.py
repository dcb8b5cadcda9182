"""A reward for end-to-end tests on an untrained tiny model: varied within a group, so advantages are not all 0."""


def odd_char_fraction(response: str, answer: str) -> float:
    """Fraction of response characters with an odd code point (continuous, so groups are almost never flat)."""
    return sum(ord(c) % 2 for c in response) / max(1, len(response))


def gated_odd_char_fraction(response: str, answer: str) -> float:
    """`odd_char_fraction`, but held while the file $M2PO_TEST_REWARD_GATE exists: a producer that stalls."""
    import os
    import time

    gate = os.environ.get("M2PO_TEST_REWARD_GATE")
    while gate and os.path.exists(gate):
        time.sleep(0.05)
    return odd_char_fraction(response, answer)


def held_from_checkpoint(response: str, answer: str) -> float:
    """`odd_char_fraction`, held while the file $M2PO_TEST_REWARD_GATE exists once the directory $M2PO_TEST_HOLD_FROM
    exists (a checkpoint: generation stalls from a known step on); the file GATE.waiting says it is held."""
    import os
    import time

    gate, hold_from = os.environ.get("M2PO_TEST_REWARD_GATE"), os.environ.get("M2PO_TEST_HOLD_FROM")
    if gate and hold_from and os.path.exists(hold_from):
        while os.path.exists(gate):
            open(gate + ".waiting", "a").close()
            time.sleep(0.05)
    return odd_char_fraction(response, answer)


def checksum_parity(response: str, answer: str) -> float:
    """The parity of the response's CRC-32: binary, so a small group's rewards are often all equal (the groups
    dynamic sampling drops), and unlike a response's length not something a few updates can learn to satisfy
    for every response (which would saturate the prompts)."""
    import zlib

    return float(zlib.crc32(response.encode()) % 2)


def always_zero(response: str, answer: str) -> float:
    """Every response wrong: every group's rewards are flat (prompts saturated for dynamic sampling)."""
    return 0.0
