"""Why the rollout side can no longer deliver groups: the errors that end the trainer's wait for data, each
naming its cause, so a run stops with a reason (exit status 1, its last checkpoint kept) instead of waiting."""

from __future__ import annotations


class ProducerStopped(RuntimeError):
    """The background producer ended by itself (a persistent write failure, or a crash); says why."""


class PromptsSaturated(ProducerStopped):
    """Dynamic sampling generated its cap of prompt groups without filling an update: the prompts' rewards no
    longer vary within a group (`rollout.dynamic_sampling_max_oversampling`)."""
