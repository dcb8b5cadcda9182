"""megatron_m2po: asynchronous RL post-training of Megatron-core policies with the M2PO loss."""

__version__ = "0.1.0"
