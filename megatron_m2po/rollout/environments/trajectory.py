"""A multi-turn trajectory as token ids, built without ever re-tokenizing what the model wrote.

Each model turn is appended as the engine's own ids (with its log-probs and the policy version of each
token); only the environment's text is tokenized, rendered with the model's chat template, so the ids the
trainer sees are the ids the engine sampled and were conditioned on. `loss_mask` is 1 on the model's
tokens and 0 on the environment's: the loss and every diagnostic count the 1s only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_m2po.types import Sample

_PROBE_USER, _PROBE_REPLY = "probe question", "probe reply"
# The probe's model turn carries a reasoning block: Qwen3's template drops an assistant turn's thinking or adds
# an empty one depending on whether the turn is the conversation's last, unless the turn has reasoning of its
# own, so only then does the probe render the same with and without the message after it.
_PROBE_ASSISTANT = f"<think>\nprobe thought\n</think>\n\n{_PROBE_REPLY}"


@dataclass
class Trajectory:
    """Everything after the prompt. `turn_starts[i]` is where turn i begins in `response_ids`;
    `model_turns[i]` says whose it is. Environment tokens carry log-prob 0 and the version of the model
    token before them (they were appended under that policy), so per-token arrays stay aligned."""

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    turn_starts: list[int] = field(default_factory=list)
    model_turns: list[bool] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        """What the next model turn is generated from."""
        return self.prompt_ids + self.response_ids

    def add_model_turn(self, ids: list[int], logprobs: list[float], versions: list[int]) -> None:
        if not (len(ids) == len(logprobs) == len(versions)):
            raise ValueError(
                f"model turn: {len(ids)} ids but {len(logprobs)} log-probs and {len(versions)} versions"
            )
        self._start(model=True)
        self.response_ids += ids
        self.loss_mask += [1] * len(ids)
        self.logprobs += list(logprobs)
        self.versions += list(versions)

    def add_env_turn(self, ids: list[int]) -> None:
        self._start(model=False)
        version = self.versions[-1] if self.versions else 0
        self.response_ids += ids
        self.loss_mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.versions += [version] * len(ids)

    def _start(self, *, model: bool) -> None:
        self.turn_starts.append(len(self.response_ids))
        self.model_turns.append(model)

    @property
    def model_tokens(self) -> int:
        return sum(self.loss_mask)

    def to_sample(self, prompt_id: str, group_index: int, finish_reason: str, **fields) -> Sample:
        """The trajectory as the queue and trainer take it: the mask and turn starts ride along."""
        return Sample(
            prompt_id=prompt_id,
            group_index=group_index,
            prompt_ids=list(self.prompt_ids),
            response_ids=list(self.response_ids),
            behavior_logprobs=list(self.logprobs),
            versions=list(self.versions),
            finish_reason=finish_reason,
            loss_mask=list(self.loss_mask),
            turn_starts=list(self.turn_starts),
            **fields,
        )


class EnvTurnRenderer:
    """The ids of an environment message between two model turns, as the chat template renders them.

    The template's text around one message is found by rendering a probe conversation with and without
    it, once per role. The model's turn ends with its end-of-turn token (or is cut off by the token limit):
    the renderer adds whatever of the template's end-of-turn text the model did not write, so the whole
    trajectory reads as the template's rendering of the conversation."""

    def __init__(self, tokenizer, eos_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        probe = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ASSISTANT}]
        rendered = self._render(probe, generation_prompt=False)
        self._probe, self._turn_end = rendered, rendered[rendered.rindex(_PROBE_REPLY) + len(_PROBE_REPLY) :]
        self._probe_messages = probe

    def _render(self, messages: list[dict], *, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def ids(self, role: str, content: str, last_model_ids: list[int]) -> list[int]:
        """Ids of `content` as a `role` message, followed by the opening of the next assistant turn."""
        return self.messages_ids([{"role": role, "content": content}], last_model_ids)

    def messages_ids(self, messages: list[dict], last_model_ids: list[int]) -> list[int]:
        """Ids of several environment messages in one turn (e.g. one tool reply per call: Qwen3's template
        groups consecutive tool messages into one user turn), then the opening of the next assistant turn."""
        full = self._render([*self._probe_messages, *messages], generation_prompt=True)
        if not full.startswith(self._probe):
            roles = ", ".join(repr(m["role"]) for m in messages)
            raise ValueError(
                f"chat template: rendering {roles} message(s) after a model turn changes the text before them; "
                "the environment turn cannot be appended token-exactly"
            )
        closing = self._turn_end
        if last_model_ids and last_model_ids[-1] in self.eos_token_ids:
            eos_text = self.tokenizer.decode([last_model_ids[-1]])
            closing = closing[len(eos_text) :] if closing.startswith(eos_text) else closing
        return self.tokenizer.encode(closing + full[len(self._probe) :], add_special_tokens=False)
