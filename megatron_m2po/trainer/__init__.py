"""The trainer's building blocks: batching, the update step, optimizer, checkpoints, weight sync, distribution."""
