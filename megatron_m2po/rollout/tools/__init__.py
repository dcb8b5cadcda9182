"""Tools a multi-turn environment gives the model: a sandboxed Python interpreter and its pool."""

from megatron_m2po.rollout.tools.pool import SandboxPool
from megatron_m2po.rollout.tools.sandbox import Capabilities, Sandbox, SandboxUnavailable, ToolResult

__all__ = ["Capabilities", "Sandbox", "SandboxPool", "SandboxUnavailable", "ToolResult"]
