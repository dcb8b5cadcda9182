"""Weight sync trainer -> engines: gather HF-named tensors, stream bounded buckets, bump the version."""

from megatron_m2po.sync.buckets import iter_buckets
from megatron_m2po.sync.weight_sync import TRANSPORTS, WeightSync

__all__ = ["TRANSPORTS", "WeightSync", "iter_buckets"]
