"""A reward for end-to-end tests on an untrained tiny model: varied within a group, so advantages are not all 0."""


def first_char_parity(response: str, answer: str) -> float:
    """1.0 when the response's first character has an odd code point (about half of random outputs)."""
    return float(ord(response[0]) % 2) if response else 0.0
