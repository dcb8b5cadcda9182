"""Tool-integrated math: the model may call a sandboxed Python interpreter before it answers.

Each of a prompt's `n` trajectories alternates model turns and tool replies, all of them in flight at once
(and with every other prompt's), so the engines keep batching and the sandbox pool stays busy. A model turn
is generated from the trajectory's token ids so far (the engine's own ids, never re-tokenized); only the
tool replies are tokenized, rendered by the model's chat template (`EnvTurnRenderer`). A trajectory ends
when a model turn makes no tool call (its answer), or at a budget: model turns, response tokens (model and
tool tokens together), tool calls. With `max_attempts` > 1 a wrong answer is met with a short feedback turn
("not correct, try again") while attempts remain. The reward is the reward function's score of the final
model turn against the answer, plus an optional bonus for using the tool (off by default;
`rollout.format_reward` gives the reward function's format term, as in single-turn math).
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass

from megatron_m2po.config import ENV_RESPONSE_BUDGET, SandboxConfig
from megatron_m2po.data.prompts import Prompt
from megatron_m2po.rollout.environments.base import Environment
from megatron_m2po.rollout.environments.tool_calls import ToolCall, ToolCallError, parse_tool_calls
from megatron_m2po.rollout.environments.trajectory import EnvTurnRenderer, Trajectory
from megatron_m2po.rollout.farm import EngineFarm
from megatron_m2po.rollout.tools import SandboxPool
from megatron_m2po.types import Sample, SamplingParams

PYTHON_TOOL = "python"
# The tool as the chat template announces it (Qwen2.5 / Qwen3 render `tools=` into the system prompt).
PYTHON_TOOL_SCHEMA = {
    "type": "function",
    "function": {
        "name": PYTHON_TOOL,
        "description": "Run Python 3 code in a fresh sandbox and return what it prints (stdout, then stderr).",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "the program to run"}},
            "required": ["code"],
        },
    },
}


@dataclass
class ToolMathSettings:
    """`rollout.env_settings` of `rollout.env=tool_math`."""

    max_turns: int = 4  # model turns per trajectory
    max_tool_calls: int = 4  # tool calls run per trajectory; later calls are answered "not run"
    # response tokens per trajectory, the model's and the tools' together
    max_total_tokens: int = ENV_RESPONSE_BUDGET["tool_math"][1]
    tool_timeout: float | None = None  # wall seconds per call (None: sandbox.wall_seconds)
    tool_use_reward: float = 0.0  # added to the reward of a trajectory in which a tool call ran
    tools_in_prompt: bool = True  # render the prompt with the tool's schema (`tools=`) by the chat template
    max_attempts: int = 1  # answers per trajectory: a wrong one gets `retry_message` while attempts remain
    retry_message: str = "That answer is not correct. Try again."

    def __post_init__(self) -> None:
        for key in ("max_turns", "max_total_tokens", "max_attempts"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {getattr(self, key)!r}")
        if not isinstance(self.max_tool_calls, int) or self.max_tool_calls < 0:
            raise ValueError(f"max_tool_calls must be an integer >= 0, got {self.max_tool_calls!r}")
        if self.tool_timeout is not None and not self.tool_timeout > 0:
            raise ValueError(f"tool_timeout must be > 0 seconds, got {self.tool_timeout!r}")
        if not isinstance(self.tool_use_reward, (int, float)):
            raise ValueError(f"tool_use_reward must be a number, got {self.tool_use_reward!r}")


@dataclass
class _Run:
    """One trajectory's counters while it is generated."""

    turns: int = 0
    calls: int = 0  # tool calls run
    attempts: int = 0  # answers given
    score: float = 0.0  # the reward function's score of the last answer
    finish: str = "stop"


class ToolMath(Environment):
    """`n` trajectories per prompt with the Python tool; see the module docstring.

    `sandbox`: a `SandboxPool` (shared, not closed here) or the `sandbox` config section to build one from
    (then owned and closed by `close`)."""

    name = "tool_math"
    Settings = ToolMathSettings
    uses_sandbox = True
    multi_turn = True

    def __init__(
        self,
        farm: EngineFarm,
        reward_pool,
        tokenizer,
        sampling: SamplingParams,
        settings: ToolMathSettings | None = None,
        *,
        sandbox: SandboxPool | SandboxConfig | None = None,
    ):
        self.farm, self.reward_pool, self.tokenizer, self.sampling = farm, reward_pool, tokenizer, sampling
        self.settings = settings if settings is not None else self.parse_settings(None)
        self._owns_pool = not isinstance(sandbox, SandboxPool)
        self.pool = SandboxPool(sandbox) if self._owns_pool else sandbox
        self.renderer = EnvTurnRenderer(tokenizer, sampling.stop_token_ids or [tokenizer.eos_token_id])
        self._counts = dict.fromkeys(
            ("trajectories", "turns", "tool_calls", "call_errors", "used_tool", "budget_ends"), 0
        )

    def for_evaluation(self, sampling: SamplingParams) -> ToolMath:
        """Shares this environment's sandbox pool. One answer per trajectory (the retry feedback is told by the
        reference answer) and no tool-use bonus: accuracy is what the model answers with the tool at hand."""
        settings = dataclasses.replace(self.settings, tool_use_reward=0.0, max_attempts=1)
        return ToolMath(self.farm, self.reward_pool, self.tokenizer, sampling, settings, sandbox=self.pool)

    @classmethod
    def prompt_extra_tokens(cls, tokenizer, settings: ToolMathSettings) -> tuple[str, int]:
        """The schema's tokens: a probe prompt rendered with the tool less the same without it."""
        if not settings.tools_in_prompt or not getattr(tokenizer, "chat_template", None):
            return "", 0
        probe = [{"role": "user", "content": "probe"}]
        texts = [
            tokenizer.apply_chat_template(probe, tools=tools, tokenize=False, add_generation_prompt=True)
            for tools in (None, [PYTHON_TOOL_SCHEMA])
        ]
        lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
        return "the tool schema (rollout.env_settings.tools_in_prompt)", lengths[1] - lengths[0]

    # -- one prompt ------------------------------------------------------------------------------------
    async def rollout(self, prompt: Prompt, n: int) -> list[Sample]:
        prompt_ids = self._prompt_ids(prompt)
        runs = await asyncio.gather(*(self._trajectory(prompt, prompt_ids, i) for i in range(n)))
        unscored = [(traj, run) for traj, run in runs if not run.attempts]  # ended by a budget, not an answer
        if unscored:
            scores = await self.reward_pool.score_async(
                [self._final_text(traj) for traj, _ in unscored], [prompt.answer] * len(unscored)
            )
            for (_, run), score in zip(unscored, scores):
                run.score = float(score)
        samples = []
        for i, (traj, run) in enumerate(runs):
            reward = run.score + (self.settings.tool_use_reward if run.calls else 0.0)
            text = self.tokenizer.decode(traj.response_ids, skip_special_tokens=False)
            samples.append(traj.to_sample(prompt.prompt_id, i, run.finish, response_text=text, reward=reward))
            self._count(run)
        return samples

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        """The prompt with the tool announced where the chat template has a place for it (else unchanged)."""
        if not self.settings.tools_in_prompt or not getattr(self.tokenizer, "chat_template", None):
            return list(prompt.prompt_ids)
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt.text}],
            tools=[PYTHON_TOOL_SCHEMA],
            tokenize=False,
            add_generation_prompt=True,
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def _trajectory(self, prompt: Prompt, prompt_ids: list[int], index: int) -> tuple[Trajectory, _Run]:
        s = self.settings
        traj, run = Trajectory(list(prompt_ids)), _Run()
        while True:
            room = s.max_total_tokens - len(traj.response_ids)
            if run.turns >= s.max_turns or room <= 0:
                run.finish = "length"
                return traj, run
            params = dataclasses.replace(
                self.sampling, max_new_tokens=min(self.sampling.max_new_tokens, room)
            )
            # its own request id per trajectory and turn: the engines seed each request from it
            (turn,) = await self.farm.generate(f"{prompt.prompt_id}/{index}/{run.turns}", traj.ids, 1, params)
            run.turns += 1
            traj.add_model_turn(list(turn.response_ids), list(turn.behavior_logprobs), list(turn.versions))
            text = self.tokenizer.decode(turn.response_ids, skip_special_tokens=True)
            calls = parse_tool_calls(text, {PYTHON_TOOL})
            if calls:
                replies = await asyncio.gather(*(self._reply(call, run) for call in calls))
                messages = [{"role": "tool", "content": reply} for reply in replies]
            else:  # an answer
                run.attempts += 1
                (score,) = await self.reward_pool.score_async([text], [prompt.answer])
                run.score, run.finish = float(score), turn.finish_reason
                if run.score >= 1.0 or run.attempts >= s.max_attempts:
                    return traj, run
                messages = [{"role": "user", "content": s.retry_message}]
            env_ids = self.renderer.messages_ids(messages, turn.response_ids)
            if len(traj.response_ids) + len(env_ids) >= s.max_total_tokens or run.turns >= s.max_turns:
                if calls:  # no room (or no turn) left for the model to read the reply
                    run.finish = "length"
                return traj, run  # (after an answer: it stands)
            traj.add_env_turn(env_ids)

    async def _reply(self, call: ToolCall | ToolCallError, run: _Run) -> str:
        """What the model reads back for one call: the program's output, or why it did not run."""
        if isinstance(call, ToolCallError):
            self._counts["call_errors"] += 1
            return call.message
        code = call.arguments.get("code")
        if not isinstance(code, str):
            self._counts["call_errors"] += 1
            return f'{PYTHON_TOOL}: "arguments" needs "code", a string; it was not run'
        if run.calls >= self.settings.max_tool_calls:
            return f"{PYTHON_TOOL}: the limit of {self.settings.max_tool_calls} tool calls is reached; it was not run"
        run.calls += 1
        result = await self.pool.run_async(code, timeout=self.settings.tool_timeout)
        return result.as_text()

    def _final_text(self, traj: Trajectory) -> str:
        """The last model turn's text: the answer the reward function scores."""
        start = traj.turn_starts[max(i for i, m in enumerate(traj.model_turns) if m)]
        end = next((b for b in traj.turn_starts if b > start), len(traj.response_ids))
        return self.tokenizer.decode(traj.response_ids[start:end], skip_special_tokens=True)

    # -- reporting -------------------------------------------------------------------------------------
    def _count(self, run: _Run) -> None:
        c = self._counts
        c["trajectories"] += 1
        c["turns"] += run.turns
        c["tool_calls"] += run.calls
        c["used_tool"] += run.calls > 0
        c["budget_ends"] += run.finish == "length"

    def metrics(self) -> dict[str, float]:
        c, n = self._counts, max(self._counts["trajectories"], 1)
        return {
            "env/turns_mean": c["turns"] / n,
            "env/tool_calls_mean": c["tool_calls"] / n,
            "env/used_tool_fraction": c["used_tool"] / n,
            "env/call_errors": float(c["call_errors"]),
            "env/length_end_fraction": c["budget_ends"] / n,
        } | {f"env/{key.replace('/', '_')}": value for key, value in self.pool.metrics().items()}

    async def close(self) -> None:
        if self._owns_pool:
            await asyncio.get_running_loop().run_in_executor(None, self.pool.close)
