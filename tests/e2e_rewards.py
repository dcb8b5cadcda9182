"""A reward for end-to-end tests on an untrained tiny model: varied across a group, so advantages are not all 0."""


def digit_fraction(response: str, answer: str) -> float:
    """Fraction of response characters that are digits (random tiny models emit some)."""
    return sum(c.isdigit() for c in response) / max(1, len(response))
