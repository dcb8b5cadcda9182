"""Weight sync trainer -> engines: gather HF-named tensors, stream bounded buckets, bump the version.

`WeightSync` is imported lazily so engine servers can use `sync.process_group` without importing Megatron.
"""

from megatron_m2po.sync.buckets import iter_buckets

__all__ = ["TRANSPORTS", "WeightSync", "iter_buckets"]


def __getattr__(name: str):
    if name in ("WeightSync", "TRANSPORTS"):
        from megatron_m2po.sync import weight_sync  # pulls in megatron-core, which engine servers never need

        return getattr(weight_sync, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
