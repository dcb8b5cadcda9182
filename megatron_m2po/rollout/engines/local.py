"""In-process rollout engine: an HF transformers model sampling token by token with a KV cache.

The CPU default (no extra dependency) and the reference the other engines are tested against.
Behaviour log-probs are log_softmax(logits / temperature) of the sampled token in fp32 over the
full vocabulary; top-p / top-k only restrict what is sampled, never the log-prob, so they equal
what the trainer recomputes from the same weights. Compute runs in one worker thread so the
asyncio loop (the rollout manager) stays responsive.

Concurrent requests decode as one batch: the worker holds the rows of every request it has taken
(each request's n samples, up to `max_batch_rows` rows in all; one request at a time with 0) in one
KV cache, prompts left-padded, with an attention mask and position ids that count each row's own
tokens, so a row's tokens and log-probs are those it gets decoded alone (up to float rounding of
batched matmuls). A request that arrives while the batch decodes joins it at the next step
(continuous batching) after a prefill forward of its own; rows leave at a stop token or
max_new_tokens, and a cancelled request's rows at the next step while the others go on. A closed
engine fails the requests it still holds with EngineError.

A weight update waits for the decoding step in progress, then in-flight requests continue on the
new weights and record the new version for the tokens that follow (per-token staleness); the farm can abort them instead. Buckets are staged
(checked and copied) and applied together at finish: an update with a failed bucket, or one its sender
gives up (`discard_weight_update`), is discarded whole, so the engine keeps serving the old weights and
version. An update from disk reads and checks every shard in a worker thread while decoding goes on,
and only then applies them, all or none.

Sample i of a request draws from its own generator seeded with `request_seed(params.seed, version,
prompt_id, i)` (`params.seed` is the run seed, `version` the policy version of the request's first
token), so the samples of a group are independent, no two requests share noise, and a rerun replays
them exactly; sample i does not depend on n, on when the other rows stop or on which requests share
its batch. Without a run seed the
seeds come from the engine's own generator (its constructor `seed`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
import stat
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from megatron_m2po.rollout.engines.base import Engine, EngineError, NamedTensors
from megatron_m2po.rollout.engines.routing_capture import RoutingCapture, compact
from megatron_m2po.rollout.seeding import SEED_BITS, request_seed
from megatron_m2po.types import Sample, SamplingParams

# transformers 5 holds an MoE layer's experts fused: `mlp.experts.gate_up_proj` [experts, 2 x ffn, hidden]
# (gate rows, then up rows) and `mlp.experts.down_proj` [experts, hidden, ffn]; Hub checkpoints and the
# weight sync name one tensor per expert (`mlp.experts.{e}.gate_proj.weight`, ...), the names SGLang loads.
_EXPERT_WEIGHT = re.compile(
    r"^(?P<experts>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight$"
)

logger = logging.getLogger(__name__)


class _Cancelled(Exception):
    """The request's task was cancelled; the worker thread stops decoding it."""


@dataclass(eq=False)
class _Request:
    """One generate call: its n rows' tokens so far, and the future its caller awaits."""

    prompt_id: str
    prompt_ids: list[int]
    n: int
    params: SamplingParams
    stop_ids: set[int]
    max_new: int
    submitted: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)
    generators: list[torch.Generator] = field(default_factory=list)  # per sample, seeded at its 1st step

    def __post_init__(self):
        self.tokens: list[list[int]] = [[] for _ in range(self.n)]
        self.logprobs: list[list[float]] = [[] for _ in range(self.n)]
        self.versions: list[list[int]] = [[] for _ in range(self.n)]
        self.finish = ["length"] * self.n
        self.live = self.n  # rows still decoding
        self.prompt_routing: torch.Tensor | None = None  # [prompt, layers, top_k] when routing is recorded
        self.routing: list[list[torch.Tensor]] = [[] for _ in range(self.n)]  # per fed response token


@dataclass(frozen=True)
class _Row:
    request: _Request
    index: int  # the sample's group index


class _Batch:
    """Rows decoding together: one KV cache (rows left-padded to the longest), which cache positions hold
    tokens, and each row's last token."""

    def __init__(self):
        self.rows: list[_Row] = []
        self.cache = DynamicCache()
        self.real: torch.Tensor | None = None  # bool [rows, cache length]: False at left padding
        self.last: torch.Tensor | None = None  # [rows]: each row's newest token, the next step's input
        self.joining: list[_Request] = []  # requests being prefilled this step, not yet in rows
        self.logits: torch.Tensor | None = None  # a prefilled batch's last-position logits

    def merge(self, other: _Batch) -> None:
        """Append other's rows after these, the shorter cache left-padded to the longer."""
        if not self.rows:
            self.rows, self.cache, self.real = other.rows, other.cache, other.real
            return
        length = max(self.real.shape[-1], other.real.shape[-1])

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = length - t.shape[dim]
            return torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1 - dim % t.dim()) + (missing, 0))

        self.cache = DynamicCache(
            [
                (torch.cat([pad(k, -2), pad(k2, -2)]), torch.cat([pad(v, -2), pad(v2, -2)]))
                for (k, v, _), (k2, v2, _) in zip(self.cache, other.cache, strict=True)
            ]
        )
        self.real = torch.cat([pad(self.real, -1), pad(other.real, -1)])
        self.rows = self.rows + other.rows

    def select_rows(self, index: torch.Tensor) -> None:
        """Cache and padding rows taken by `index` (rows may repeat)."""
        self.cache.batch_select_indices(index)
        self.real = self.real[index]

    def select(self, keep: list[int]) -> None:
        """Keep these rows; cache positions that are padding in every remaining row go too."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.real, self.last = DynamicCache(), None, None
            return
        index = torch.tensor(keep, device=self.real.device)
        self.last = self.last[index]
        self.select_rows(index)
        first = int(self.real.any(0).int().argmax())
        if first > 0:
            self.cache = DynamicCache([(k[..., first:, :], v[..., first:, :]) for k, v, _ in self.cache])
            self.real = self.real[:, first:]


def sampling_distribution(scaled_logits: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """Probabilities to sample from: softmax of the temperature-scaled logits restricted to top-k / top-p."""
    logits = scaled_logits
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.softmax(logits, dim=-1)


class LocalEngine(Engine):
    """HF model in this process. `threads` sets torch's (process-wide) intra-op threads; None leaves it.
    `max_batch_rows` caps the rows decoded together (a larger request still runs, alone); 0 decodes one
    request at a time. `record_routing` (MoE models): every sample carries the experts its tokens were
    routed to (`Sample.routed_experts`)."""

    def __init__(
        self,
        hf_dir: str | Path,
        *,
        engine_id: str = "local-0",
        dtype: torch.dtype = torch.float32,
        threads: int | None = 1,
        seed: int = 0,
        version: int = 0,
        attn_implementation: str = "sdpa",
        device: str | torch.device = "cpu",
        max_batch_rows: int = 256,
        record_routing: bool = False,
    ):
        super().__init__(engine_id)
        if max_batch_rows < 0:
            raise ValueError(f"LocalEngine: max_batch_rows must be >= 0, got {max_batch_rows}")
        self.max_batch_rows = max_batch_rows
        if threads is not None:
            torch.set_num_threads(threads)
        self.hf_dir = Path(hf_dir)
        self.device = torch.device(device)
        self.model = (
            AutoModelForCausalLM.from_pretrained(
                self.hf_dir, dtype=dtype, attn_implementation=attn_implementation
            )
            .to(self.device)
            .eval()
        )
        self.model.requires_grad_(False)
        self._routing = RoutingCapture(self.model) if record_routing else None
        self.tokenizer = AutoTokenizer.from_pretrained(self.hf_dir)
        self._params = dict(self.model.named_parameters(remove_duplicate=False))
        self._fused_experts = any(_is_fused_expert(name) for name in self._params)
        self._stop_ids = self._eos_ids()
        # transformers 5.x renamed forward's `past_key_values` to `cache`; accept both.
        forward_args = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in forward_args else "past_key_values"
        self._max_positions = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))
        self._version = version
        self._seeds = torch.Generator().manual_seed(seed)  # per-request seeds when there is no run seed
        self._cond = threading.Condition()  # guards weights + version; held for each decoding step
        self._updating = False
        self._paused = False
        self._staged: dict[str, torch.Tensor] = {}  # a weight update's tensors, applied by finish
        self._update_error: Exception | None = None  # a failed bucket: finish discards the update
        self._pending: deque[_Request] = deque()  # submitted, not yet in the batch
        self._pending_lock = threading.Lock()
        self._closed = False
        # The decoding loop runs on a daemon thread: an executor's worker is joined at the interpreter's
        # exit, so an engine paused (or mid-update) and never closed would hold the exit forever.
        self._wake = threading.Event()  # set when a request is pending (or on close)
        self._worker = threading.Thread(target=self._serve, name=f"engine-{engine_id}", daemon=True)
        self._worker.start()

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config):
            eos = getattr(source, "eos_token_id", None)
            ids.update([eos] if isinstance(eos, int) else (eos or []))
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # -- generation ------------------------------------------------------------------------------------
    async def generate(
        self, prompt_id: str, prompt_ids: list[int], n: int, params: SamplingParams
    ) -> list[Sample]:
        if self._closed:
            raise EngineError(f"engine {self.engine_id} is closed")
        if n < 1 or not prompt_ids:
            raise ValueError(
                f"generate {prompt_id}: need n >= 1 and a non-empty prompt (n={n}, {len(prompt_ids)} tokens)"
            )
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"generate {prompt_id}: prompt token id out of range [0, {vocab})")
        if params.temperature < 0:
            raise ValueError(f"generate {prompt_id}: temperature must be >= 0, got {params.temperature}")
        request = _Request(
            prompt_id,
            list(prompt_ids),
            n,
            params,
            stop_ids=self._stop_ids | set(params.stop_token_ids),
            max_new=min(params.max_new_tokens, self._max_positions - len(prompt_ids)),
        )
        with self._pending_lock:
            if self._closed:  # close() drains what was appended before it, under this lock
                raise EngineError(f"engine {self.engine_id} is closed")
            self._pending.append(request)
        self._wake.set()  # a no-op when the running batch takes the request in at its next step
        try:
            return await asyncio.wrap_future(request.future)
        except asyncio.CancelledError:
            request.cancel.set()
            raise

    def _take_pending(self, rows: int) -> list[_Request]:
        """Pending requests (first come, first served) that fit beside `rows` rows; at least one into an empty
        batch, and only one there when batching is off."""
        taken: list[_Request] = []
        with self._pending_lock:
            while self._pending:
                request = self._pending[0]
                if (rows or taken) and rows + request.n > self.max_batch_rows:
                    break
                self._pending.popleft()
                if request.future.set_running_or_notify_cancel():  # False: cancelled while it waited
                    taken.append(request)
                    rows += request.n
        return taken

    def _serve(self) -> None:
        """The worker thread: run the decoding loop whenever requests are pending, until close()."""
        while not self._closed:
            self._wake.wait()
            self._wake.clear()  # before the loop: a request appended during it sets the event again
            if not self._closed:
                self._work()

    def _work(self) -> None:
        """The worker thread's loop: decode until no row is left and nothing is pending."""
        batch = _Batch()
        try:
            with torch.no_grad():
                while self._step(batch):
                    pass
        except Exception as e:  # a failed step fails every request it carried
            logger.exception("engine %s: decoding step failed", self.engine_id)
            self._fail(batch, e)

    @staticmethod
    def _fail(batch: _Batch, error: Exception) -> None:
        for request in [row.request for row in batch.rows] + batch.joining:
            if not request.future.done():
                request.future.set_exception(error)

    def _step(self, batch: _Batch) -> bool:
        """Take in the pending requests that fit, then one decoding step for every row; False when idle."""
        with self._cond:  # weights and version stay fixed for the step
            while (self._updating or self._paused) and not self._closed:
                self._drop_cancelled(batch)
                self._cond.wait(0.05)
            if self._closed:
                self._fail(batch, EngineError(f"engine {self.engine_id} is closed"))
                return False
            self._drop_cancelled(batch)
            joining = batch.joining = []
            for request in self._take_pending(len(batch.rows)):
                request.started = time.perf_counter()
                if request.max_new > 0:
                    joining.append(request)
                else:  # the prompt fills the context: nothing to generate
                    request.future.set_result(self._samples(request))
            if not batch.rows and not joining:
                return False
            version = self._version
            logits = [self._forward(batch, batch.last[:, None])] if batch.rows else []
            if batch.rows and self._routing is not None:
                for row, routed in zip(batch.rows, self._routing.take(len(batch.rows), 1)):
                    row.request.routing[row.index].append(routed)
            if joining:
                fresh = self._prefill(joining, version)
                logits.append(fresh.logits)
        if joining:
            batch.merge(fresh)
        batch.joining = []
        next_tokens, token_logprobs = self._sample_rows(batch.rows, torch.cat(logits).float())
        keep = []
        for index, (row, tok, lp) in enumerate(
            zip(batch.rows, next_tokens.tolist(), token_logprobs.tolist())
        ):
            request, i = row.request, row.index
            request.tokens[i].append(tok)
            request.logprobs[i].append(lp)
            request.versions[i].append(version)
            if tok in request.stop_ids:
                request.finish[i] = "stop"
            elif len(request.tokens[i]) < request.max_new:
                keep.append(index)
                continue
            request.live -= 1
            if request.live == 0 and not request.future.done():
                request.future.set_result(self._samples(request))
        batch.last = next_tokens
        batch.select(keep)
        return True

    def _prefill(self, joining: list[_Request], version: int) -> _Batch:
        """The joining requests through their prompts (left-padded to the longest), once per request, then each
        prompt's cache and logits copied to its n rows; generators seeded with the version of the first token."""
        fresh = _Batch()
        for request in joining:
            request.generators = self._generators(request.params.seed, version, request.prompt_id, request.n)
            fresh.rows += [_Row(request, i) for i in range(request.n)]
        longest = max(len(r.prompt_ids) for r in joining)
        pads = [longest - len(r.prompt_ids) for r in joining]
        ids = torch.tensor([[0] * pad + r.prompt_ids for pad, r in zip(pads, joining)], device=self.device)
        logits = self._forward(fresh, ids, torch.arange(longest)[None] >= torch.tensor(pads)[:, None])
        if self._routing is not None:
            for request, pad, routed in zip(joining, pads, self._routing.take(len(joining), longest)):
                request.prompt_routing = routed[pad:]
        rows = torch.repeat_interleave(torch.tensor([r.n for r in joining]).to(self.device))  # row -> request
        fresh.select_rows(rows)
        fresh.logits = logits[rows]
        return fresh

    def _forward(self, batch: _Batch, ids: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        """Last-position logits of `ids` appended to the batch's cache. `real` marks which new positions are
        tokens (False: left padding); padded rows get position ids counting their tokens only and a mask that
        hides the padding (a padding query attends to itself, so no softmax row is empty)."""
        real = torch.ones(ids.shape, dtype=torch.bool) if real is None else real
        real = real.to(self.device)
        before = batch.real.sum(-1, keepdim=True) if batch.real is not None else 0
        positions = (before + real.cumsum(-1) - 1).clamp(min=0)
        batch.real = real if batch.real is None else torch.cat([batch.real, real], -1)
        mask = None
        if not batch.real.all():
            kv, q = batch.real.shape[-1], ids.shape[-1]
            query_at = torch.arange(kv - q, kv, device=self.device)[:, None]
            key_at = torch.arange(kv, device=self.device)[None]
            seen = (batch.real[:, None, :] & (key_at <= query_at)) | (key_at == query_at)
            dtype = self.model.dtype
            mask = torch.zeros(seen.shape, dtype=dtype, device=self.device)
            mask = mask.masked_fill(~seen, torch.finfo(dtype).min)[:, None]
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: batch.cache},
        )
        return out.logits[:, -1, :]

    def _sample_rows(self, rows: list[_Row], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's next token and behaviour log-prob, rows of equal sampling settings in one `_sample`."""
        by_settings: dict[tuple, list[int]] = {}
        for index, row in enumerate(rows):
            p = row.request.params
            by_settings.setdefault((p.temperature, p.top_p, p.top_k), []).append(index)
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        logprobs = torch.empty(len(rows), dtype=logits.dtype, device=logits.device)
        for indices in by_settings.values():
            generators = [rows[i].request.generators[rows[i].index] for i in indices]
            tokens[indices], logprobs[indices] = self._sample(
                logits[indices], rows[indices[0]].request.params, generators
            )
        return tokens, logprobs

    def _drop_cancelled(self, batch: _Batch) -> None:
        """Rows of cancelled requests leave the batch; the others go on."""
        keep = [index for index, row in enumerate(batch.rows) if not row.request.cancel.is_set()]
        if len(keep) < len(batch.rows):
            for row in batch.rows:
                if row.request.cancel.is_set() and not row.request.future.done():
                    logger.debug("engine %s: request %s cancelled", self.engine_id, row.request.prompt_id)
                    row.request.future.set_exception(_Cancelled())
            batch.select(keep)

    def _samples(self, request: _Request) -> list[Sample]:
        timings = {
            "queue_s": request.started - request.submitted,
            "generate_s": time.perf_counter() - request.started,
        }
        return [
            Sample(
                prompt_id=request.prompt_id,
                group_index=i,
                prompt_ids=list(request.prompt_ids),
                response_ids=request.tokens[i],
                behavior_logprobs=request.logprobs[i],
                versions=request.versions[i],
                finish_reason=request.finish[i],
                engine_id=self.engine_id,
                timings=dict(timings),
                response_text=self.tokenizer.decode(request.tokens[i], skip_special_tokens=True),
                routed_experts=None
                if request.prompt_routing is None
                else compact([request.prompt_routing, *request.routing[i]]),
            )
            for i in range(request.n)
        ]

    def _generators(
        self, run_seed: int | None, version: int, prompt_id: str, n: int
    ) -> list[torch.Generator]:
        """Sample i's generator, seeded from (run seed, version, prompt id, i), else by the engine."""
        if run_seed is None:
            seeds = torch.randint(0, (1 << SEED_BITS) - 1, (n,), generator=self._seeds).tolist()
        else:
            seeds = [request_seed(run_seed, version, prompt_id, i) for i in range(n)]
        return [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]

    @staticmethod
    def _sample(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]):
        """Row r's token drawn with generators[r], and its behaviour log-prob log_softmax(logits / T)
        (greedy at T=0: log-probs at T=1). The draw is torch.multinomial's own for one sample (ATen
        Distributions.cpp: argmax(p / q), q ~ Exp(1) from the generator), taken for all rows at once: the same
        token as `torch.multinomial(p[None], 1, generator=g)` row by row (a test), without its per-call cost."""
        if params.temperature == 0:
            scaled = logits
            tokens = logits.argmax(-1)
        else:
            scaled = logits / params.temperature
            probs = sampling_distribution(scaled, params.top_p, params.top_k)
            rows = zip(probs, generators, strict=True)
            noise = torch.stack([torch.empty_like(row).exponential_(1, generator=g) for row, g in rows])
            tokens = (probs / noise).argmax(-1)
        return tokens, torch.log_softmax(scaled, -1).gather(-1, tokens[:, None]).squeeze(-1)

    # -- weights ---------------------------------------------------------------------------------------
    async def begin_weight_update(self, version: int) -> None:
        def begin():
            with self._cond:  # acquiring waits for the decoding step in progress
                self._updating = True
                self._staged = {}
                self._update_error = None

        await asyncio.to_thread(begin)

    async def update_weights_bucket(self, named_tensors: NamedTensors, *, copy: bool = True) -> None:
        """Stage one bucket (checked; copied unless `copy=False` hands over tensors nobody else holds); a
        failed bucket makes finish discard the whole update."""

        def stage():
            try:
                for name, tensor in named_tensors:
                    target = self._checked(name, tensor)
                    self._staged[name] = tensor.detach().to(
                        device=target.device, dtype=target.dtype, copy=copy
                    )
            except Exception as e:
                self._update_error = e
                raise

        await asyncio.to_thread(stage)

    def _destination(self, name: str) -> tuple[str, torch.Tensor] | None:
        """(parameter name, the tensor a weight of this name is copied into): the parameter itself, or for
        a per-expert name its expert's slice of the fused parameter; None if the model has no such weight."""
        if name in self._params:
            return name, self._params[name].data
        match = _EXPERT_WEIGHT.match(name) if self._fused_experts else None
        if match is None:
            return None
        fused = f"{match['experts']}.{'down_proj' if match['proj'] == 'down' else 'gate_up_proj'}"
        expert = int(match["e"])
        if fused not in self._params or expert >= self._params[fused].shape[0]:
            return None
        view = self._params[fused].data[expert]
        if match["proj"] != "down":
            gate, up = view.chunk(2, dim=0)
            view = gate if match["proj"] == "gate" else up
        return fused, view

    def _checked(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor `name` is copied into, after checking the name and shape (errors name the weight)."""
        found = self._destination(name)
        if found is None:
            raise KeyError(
                f"engine {self.engine_id}: weight {name!r} is not a parameter of {self.hf_dir} "
                f"(e.g. {sorted(self._params)[:3]})"
            )
        target = found[1]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(
                f"engine {self.engine_id}: weight {name!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(target.shape)}"
            )
        return target

    def _weight_key(self, name: str) -> tuple:
        """What a weight of this name overwrites: its parameter (a tied weight once), or one expert's
        projection of a fused parameter."""
        param, _ = self._destination(name)
        match = _EXPERT_WEIGHT.match(name) if name not in self._params else None
        return (id(self._params[param]),) + ((match["e"], match["proj"]) if match else ())

    def unstaged_weights(self) -> list[str]:
        """The model's weights (Hub names) that the staged update would leave as they are: a sender that
        gave up between buckets leaves some, and publishing then would serve a mix of two versions. Empty
        when nothing is staged: an empty update changes nothing."""
        return self._missing(self._staged) if self._staged else []

    def _missing(self, names: Iterable[str]) -> list[str]:
        """The model's weights (Hub names) that weights of these names leave as they are."""
        covered = {self._weight_key(name) for name in names}
        return sorted(name for name in self.weight_names if self._weight_key(name) not in covered)

    @property
    def weight_names(self) -> list[str]:
        """The names a full update sends: fused MoE experts one tensor per expert and projection, as on the Hub."""
        names = []
        for name, param in self._params.items():
            if not _is_fused_expert(name):
                names.append(name)
                continue
            prefix, kind = name.rsplit(".", 1)
            projs = ("down",) if kind == "down_proj" else ("gate", "up")
            names += [f"{prefix}.{e}.{p}_proj.weight" for e in range(param.shape[0]) for p in projs]
        return names

    @property
    def num_elements(self) -> int:
        """Elements of the model's weights (a tied weight once)."""
        return sum(p.numel() for p in {id(p): p for p in self._params.values()}.values())

    def load_tensors(self, named_tensors: NamedTensors) -> None:
        """Copy HF-named tensors into the model in place now (shape-checked, cast to the model dtype)."""
        with self._cond:
            for name, tensor in named_tensors:
                self._checked(name, tensor).copy_(tensor.detach())

    async def discard_weight_update(self, reason: str) -> None:
        """The sender gave the update up (a broadcast broke off): drop what was staged, keep serving."""
        self._update_error = self._update_error or RuntimeError(reason)
        await self.finish_weight_update(self._version)

    async def finish_weight_update(self, version: int) -> None:
        def finish():
            with self._cond:
                staged, self._staged = self._staged, {}
                if self._update_error is not None:
                    logger.warning(
                        "engine %s: update to v%d discarded (%s); still serving v%d",
                        self.engine_id,
                        version,
                        self._update_error,
                        self._version,
                    )
                else:
                    updated = set()
                    for name, tensor in staged.items():
                        param, target = self._destination(name)
                        target.copy_(tensor)
                        updated.add(id(self._params[param]))
                    missing = [name for name, p in self._params.items() if id(p) not in updated]
                    if staged and missing:
                        logger.warning(
                            "engine %s: update to v%d left %d tensors unchanged, e.g. %s",
                            self.engine_id,
                            version,
                            len(missing),
                            sorted(missing)[:3],
                        )
                    self._version = version
                self._updating = False
                self._cond.notify_all()

        await asyncio.to_thread(finish)

    async def update_weights_from_disk(self, hf_dir: str | Path, version: int) -> None:
        """Load all weights from an HF safetensors dir (the disk transport of WeightSync). Every shard is read
        and checked first, off the event loop; a shard that fails leaves the weights and version as they were."""
        tensors = await asyncio.to_thread(self._read_hf_dir, Path(hf_dir))
        await self.begin_weight_update(version)
        try:
            await self.update_weights_bucket(tensors, copy=False)
        finally:
            await self.finish_weight_update(version)

    def _read_hf_dir(self, hf_dir: Path) -> list[tuple[str, torch.Tensor]]:
        """Every weight of an HF safetensors dir, checked against the model; errors name the file. Only
        regular files are opened (a FIFO would block the reader until some writer appeared), and the dir
        must hold every weight of the model."""
        files = sorted(hf_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"engine {self.engine_id}: no *.safetensors in {hf_dir}")
        tensors: list[tuple[str, torch.Tensor]] = []
        for f in files:
            if not stat.S_ISREG(os.stat(f).st_mode):
                raise ValueError(f"engine {self.engine_id}: {f} is not a regular file")
            try:
                shard = load_file(f)
            except Exception as e:  # safetensors' own errors name neither the file nor what is wrong in it
                raise ValueError(f"engine {self.engine_id}: cannot read {f}: {type(e).__name__}: {e}") from e
            for name, tensor in shard.items():
                try:
                    self._checked(name, tensor)
                except (KeyError, ValueError) as e:
                    raise ValueError(f"{f}: {e}") from e
                tensors.append((name, tensor))
        missing = self._missing(name for name, _ in tensors)
        if missing:
            raise ValueError(
                f"engine {self.engine_id}: {hf_dir} lacks {len(missing)} of the model's weights, e.g. {missing[:3]}"
            )
        return tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The engine's current weights under the names it loads (for tests and debugging): fused MoE
        experts appear as one tensor per expert, as on the Hub."""
        out = {}
        for name, value in self.model.state_dict().items():
            if not _is_fused_expert(name):
                out[name] = value.detach().clone()
                continue
            prefix, kind = name.rsplit(".", 1)
            for e, expert in enumerate(value):
                if kind == "down_proj":
                    out[f"{prefix}.{e}.down_proj.weight"] = expert.detach().clone()
                else:
                    gate, up = expert.chunk(2, dim=0)
                    out[f"{prefix}.{e}.gate_proj.weight"] = gate.detach().clone()
                    out[f"{prefix}.{e}.up_proj.weight"] = up.detach().clone()
        return out

    # -- control ---------------------------------------------------------------------------------------
    async def pause(self) -> None:
        def pause():
            with self._cond:
                self._paused = True

        await asyncio.to_thread(pause)

    async def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    async def health(self) -> bool:
        return not self._closed

    @property
    def paused(self) -> bool:
        """Held by pause() until resume()."""
        return self._paused

    async def close(self) -> None:
        """Requests still decoding or waiting fail with EngineError (the farm retries them elsewhere)."""
        self._closed = True
        self._wake.set()
        with self._pending_lock:
            waiting, self._pending = self._pending, deque()
        for request in waiting:
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(EngineError(f"engine {self.engine_id} is closed"))


def _is_fused_expert(name: str) -> bool:
    return name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"))
