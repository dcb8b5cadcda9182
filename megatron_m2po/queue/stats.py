"""Per-token staleness histogram of what the trainer consumed (the `queue/staleness*` metrics)."""

from __future__ import annotations

import bisect
from collections import Counter

from megatron_m2po.types import Group

# Bucket upper edges (inclusive); staleness in (edge[i-1], edge[i]] lands in bucket i.
_EDGES = (0, 1, 3, 7, 15, 31, 63, 127, 255)
BUCKET_NAMES = ("0", "1", "2-3", "4-7", "8-15", "16-31", "32-63", "64-127", "128-255", "256+")


def _bucket(staleness: int) -> int:
    return bisect.bisect_left(_EDGES, staleness)  # the first edge >= staleness


class StalenessHistogram:
    """Token-weighted staleness of consumed groups since the last `reset`.

    Tokens produced by a version newer than the consumer's (possible right after a restart
    from an older checkpoint) count as staleness 0 in the buckets and as negative in the mean.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tokens = 0
        self.total = 0
        self.max = None
        self.buckets = [0] * len(BUCKET_NAMES)

    def add_group(self, group: Group, consumer_version: int) -> None:
        for s in group.samples:
            vs = s.versions
            if not vs:
                continue
            first = vs[0]
            counts = {first: len(vs)} if vs.count(first) == len(vs) else Counter(vs)
            for producing, n in counts.items():
                st = consumer_version - producing
                self.tokens += n
                self.total += st * n
                self.max = st if self.max is None else max(self.max, st)
                self.buckets[_bucket(st)] += n

    def metrics(self, prefix: str = "queue/") -> dict[str, float]:
        out = {
            f"{prefix}staleness_mean": self.total / self.tokens if self.tokens else 0.0,
            f"{prefix}staleness_max": float(self.max if self.max is not None else 0),
            f"{prefix}staleness_tokens": float(self.tokens),
        }
        for name, n in zip(BUCKET_NAMES, self.buckets):
            out[f"{prefix}staleness_frac/{name}"] = n / self.tokens if self.tokens else 0.0
        return out
