"""In-process rollout engine: an HF transformers model sampling token by token with a KV cache.

The CPU default (no extra dependency) and the reference the other engines are tested against.
Behaviour log-probs are log_softmax(logits / temperature) of the sampled token in fp32 over the
full vocabulary; top-p / top-k only restrict what is sampled, never the log-prob, so they equal
what the trainer recomputes from the same weights. Compute runs in one worker thread so the
asyncio loop (the rollout manager) stays responsive. A weight update waits for the decoding step
in progress, then in-flight requests continue on the new weights and record the new version for
the tokens that follow (per-token staleness); the farm can abort them instead. Buckets are staged
(checked and copied) and applied together at finish: an update with a failed bucket is discarded
whole, so the engine keeps serving the old weights and version.

Sample i of a request draws from its own generator seeded with `request_seed(params.seed, version,
prompt_id, i)` (`params.seed` is the run seed, `version` the policy version of the request's first
token), so the samples of a group are independent, no two requests share noise, and a rerun replays
them exactly; sample i does not depend on n or on when the other rows stop. Without a run seed the
seeds come from the engine's own generator (its constructor `seed`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from megatron_m2po.rollout.engines.base import Engine, EngineError, NamedTensors
from megatron_m2po.rollout.seeding import SEED_BITS, request_seed
from megatron_m2po.types import Sample, SamplingParams

logger = logging.getLogger(__name__)


class _Cancelled(Exception):
    """The request's task was cancelled; the worker thread stops decoding it."""


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
    """HF model in this process. `threads` sets torch's (process-wide) intra-op threads; None leaves it."""

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
    ):
        super().__init__(engine_id)
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
        self.tokenizer = AutoTokenizer.from_pretrained(self.hf_dir)
        self._params = dict(self.model.named_parameters(remove_duplicate=False))
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
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{engine_id}")
        self._closed = False

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
        cancel = threading.Event()
        submitted = time.perf_counter()
        future = self._executor.submit(
            self._generate_sync, prompt_id, list(prompt_ids), n, params, cancel, submitted
        )
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            cancel.set()
            raise

    def _wait_runnable(self, cancel: threading.Event) -> None:
        while (self._updating or self._paused) and not cancel.is_set():
            self._cond.wait(0.05)
        if cancel.is_set():
            raise _Cancelled

    @torch.no_grad()
    def _generate_sync(
        self,
        prompt_id: str,
        prompt_ids: list[int],
        n: int,
        params: SamplingParams,
        cancel: threading.Event,
        submitted: float,
    ) -> list[Sample]:
        started = time.perf_counter()
        generators: list[torch.Generator] = []  # one per sample, seeded at the first decoding step
        stop_ids = self._stop_ids | set(params.stop_token_ids)
        max_new = min(params.max_new_tokens, self._max_positions - len(prompt_ids))
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        versions: list[list[int]] = [[] for _ in range(n)]
        finish = ["length"] * n
        active = list(range(n))  # rows of the batch still decoding, in cache order
        cache = DynamicCache()
        step_input = torch.tensor([prompt_ids] * n, dtype=torch.long, device=self.device)
        try:
            for _ in range(max(max_new, 0)):
                with self._cond:
                    self._wait_runnable(cancel)
                    version = self._version
                    logits = self.model(
                        input_ids=step_input, use_cache=True, **{self._cache_kw: cache}
                    ).logits
                if not generators:
                    generators = self._generators(params.seed, version, prompt_id, n)
                next_tokens, token_logprobs = self._sample(
                    logits[:, -1, :].float(), params, [generators[i] for i in active]
                )
                step_tokens, step_logprobs = next_tokens.tolist(), token_logprobs.tolist()
                keep = []
                for row, sample_index in enumerate(active):
                    tok = step_tokens[row]
                    tokens[sample_index].append(tok)
                    logprobs[sample_index].append(step_logprobs[row])
                    versions[sample_index].append(version)
                    if tok in stop_ids:
                        finish[sample_index] = "stop"
                    else:
                        keep.append(row)
                if not keep:
                    break
                if len(keep) < len(active):
                    cache.batch_select_indices(torch.tensor(keep, device=self.device))
                    next_tokens = next_tokens[keep]
                    active = [active[r] for r in keep]
                step_input = next_tokens.view(-1, 1)
        except _Cancelled:
            logger.debug("engine %s: request %s cancelled", self.engine_id, prompt_id)
            raise
        done = time.perf_counter()
        timings = {"queue_s": started - submitted, "generate_s": done - started}
        return [
            Sample(
                prompt_id=prompt_id,
                group_index=i,
                prompt_ids=list(prompt_ids),
                response_ids=tokens[i],
                behavior_logprobs=logprobs[i],
                versions=versions[i],
                finish_reason=finish[i],
                engine_id=self.engine_id,
                timings=dict(timings),
                response_text=self.tokenizer.decode(tokens[i], skip_special_tokens=True),
            )
            for i in range(n)
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
        (greedy at T=0: log-probs at T=1)."""
        if params.temperature == 0:
            scaled = logits
            tokens = logits.argmax(-1)
        else:
            scaled = logits / params.temperature
            probs = sampling_distribution(scaled, params.top_p, params.top_k)
            rows = zip(probs, generators, strict=True)
            tokens = torch.cat([torch.multinomial(row[None], 1, generator=g)[0] for row, g in rows])
        return tokens, torch.log_softmax(scaled, -1).gather(-1, tokens[:, None]).squeeze(-1)

    # -- weights ---------------------------------------------------------------------------------------
    async def begin_weight_update(self, version: int) -> None:
        def begin():
            with self._cond:  # acquiring waits for the decoding step in progress
                self._updating = True
                self._staged = {}
                self._update_error = None

        await asyncio.to_thread(begin)

    async def update_weights_bucket(self, named_tensors: NamedTensors) -> None:
        """Stage one bucket (checked, copied); a failed bucket makes finish discard the whole update."""

        def stage():
            try:
                for name, tensor in named_tensors:
                    param = self._checked(name, tensor)
                    self._staged[name] = tensor.detach().to(device=param.device, dtype=param.dtype, copy=True)
            except Exception as e:
                self._update_error = e
                raise

        await asyncio.to_thread(stage)

    def _checked(self, name: str, tensor: torch.Tensor) -> torch.nn.Parameter:
        param = self._params.get(name)
        if param is None:
            raise KeyError(
                f"engine {self.engine_id}: weight {name!r} is not a parameter of {self.hf_dir} "
                f"(e.g. {sorted(self._params)[:3]})"
            )
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(
                f"engine {self.engine_id}: weight {name!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(param.shape)}"
            )
        return param

    def load_tensors(self, named_tensors: NamedTensors) -> None:
        """Copy HF-named tensors into the model in place now (shape-checked, cast to the model dtype)."""
        with self._cond:
            for name, tensor in named_tensors:
                self._checked(name, tensor).data.copy_(tensor.detach())

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
                    for name, tensor in staged.items():
                        self._params[name].data.copy_(tensor)
                    updated = {id(self._params[name]) for name in staged}
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
        """Load all weights from an HF safetensors dir (the disk transport of WeightSync)."""
        from safetensors.torch import load_file

        files = sorted(Path(hf_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"engine {self.engine_id}: no *.safetensors in {hf_dir}")
        await self.begin_weight_update(version)
        try:
            for f in files:
                await self.update_weights_bucket(load_file(f).items())
        finally:
            await self.finish_weight_update(version)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The engine's current HF-named weights (for tests and debugging)."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

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
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
