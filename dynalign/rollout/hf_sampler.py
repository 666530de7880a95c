"""The transformers ``generate`` backend: runs anywhere, needs no extra package.

Prompts are batched ``batch_size`` sequences at a time with left padding. Under ZeRO-3,
pass ``gather``: a factory of a context manager that readies the partitioned model for
inference (:func:`zero3_gather`). It is entered once per :meth:`HFSampler.sample` call (and
once per judge query or :meth:`HFSampler.reuse_prefixes` block), because a ZeRO-3 forward
without it all-gathers every layer at every generated token (~100x slower). Given the
DeepSpeed engine, it gathers every parameter once and also takes DeepSpeed's per-module hooks
off for the block (:func:`~dynalign.zero.unhooked`), so ``generate`` runs at plain-module
speed and each rank decodes on its own, with no collective, to its own length; the same hooks
are back before the next training pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

from dynalign.lm_head import NO_LOGITS
from dynalign.onednn import onednn_linears
from dynalign.rollout.base import Prompt, Rollouts, SamplingParams
from dynalign.rollout.draws import draw
from dynalign.rollout.encoding import (
    Completion,
    build_rollouts,
    encode_text,
    eos_token_ids,
    find_stop,
    finish_completion,
    left_pad,
    prepare_request,
)
from dynalign.rollout.prefix_cache import PrefixCache, PrefixPlan, plan_prefixes, read_prefixes
from dynalign.zero import gathered, is_partitioned, unhooked, zero3_offload

GatherFactory = Callable[[], AbstractContextManager]
# Values that switch off the other logits processors a model's generation_config may enable.
NEUTRAL_DECODING: dict[str, Any] = dict(num_beams=1, num_return_sequences=1, min_new_tokens=0,
                                        repetition_penalty=1.0, no_repeat_ngram_size=0)


def zero3_gather(model: torch.nn.Module) -> GatherFactory | None:
    """A ``gather`` for :class:`HFSampler` when ``model`` is ZeRO-3 partitioned, else None.

    Pass the DeepSpeed engine that trains the sampler's module: each block then gathers the
    parameters once and runs without DeepSpeed's module hooks (:func:`~dynalign.zero.unhooked`).
    A partitioned module alone offers no hooks to take off: it is only gathered, and the hooks
    still fetch and release around every module call of every token (several times slower).
    """
    if not is_partitioned(model):
        return None
    if zero3_offload(model) is not None:
        return lambda: unhooked(model)
    params = list(model.parameters())
    return lambda: gathered(params)


class _StopOnStrings:
    """Stopping criterion: a row is done once its recent text contains a stop string.

    Only a window of the newest tokens is decoded each step (a stop string of L bytes
    spans at most L tokens), so the cost does not grow with the completion length.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.prompt_length = prompt_length
        self.window = max(len(s.encode()) for s in stops) + 8

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        tail = input_ids[:, self.prompt_length:][:, -self.window:]  # [B, <=window]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        return torch.tensor([find_stop(t, self.stops) >= 0 for t in texts], device=input_ids.device)


class _DrawLast:
    """Logits processor that samples: the warpers transformers' sampling mode would add for
    ``params`` (temperature, top-k, top-p: its own classes, in its order), then one draw per row
    (:func:`~dynalign.rollout.draws.draw`, ``torch.multinomial``'s draw at less cost); it returns
    scores that are 0 at the drawn token and -inf elsewhere. ``generate`` runs greedy with it
    last, so its argmax takes the drawn token: the tokens ``do_sample=True`` would give at the
    same seed, without ``multinomial``'s one-at-a-time exponential variates."""

    def __init__(self, params: SamplingParams) -> None:
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.warpers: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = []
        if params.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k != 0:
            self.warpers.append(TopKLogitsWarper(top_k=params.top_k, min_tokens_to_keep=1))
        if params.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=params.top_p, min_tokens_to_keep=1))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warp in self.warpers:
            scores = warp(input_ids, scores)  # [B, V]
        tokens = draw(torch.softmax(scores, dim=-1))  # [B]
        return torch.full_like(scores, -torch.inf).scatter_(1, tokens[:, None], 0.0)  # [B, V]


class HFSampler:
    """:class:`~dynalign.rollout.base.Sampler` on a transformers causal LM.

    ``shares_weights=True`` declares that ``model`` is the training engine's own module:
    the optimizer already changed the weights the sampler reads, so ``needs_weight_sync``
    is False and :meth:`update_weights` does nothing. Otherwise ``update_weights`` copies
    the given tensors into the parameters of the same names (``load_state_dict`` semantics,
    partial updates allowed, unknown names refused).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, batch_size: int = 64,
                 max_prompt_length: int | None = None, gather: GatherFactory | None = None,
                 shares_weights: bool = False, stop: Sequence[str] = ()) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_prompt_length = max_prompt_length
        self.gather = gather
        self.stop = tuple(stop)  # the model's own stop strings (model.stop), added to every call
        self.needs_weight_sync = not shares_weights
        self.eos_ids = eos_token_ids(tokenizer, getattr(model, "generation_config", None))
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else min(self.eos_ids)
        self._prefixes: PrefixCache | None = None  # set inside reuse_prefixes()
        self._inside = False  # within _inference(): gathered, eval, no grad

    # ------------------------------------------------------------------ sampling

    def sample(self, prompts: Sequence[Prompt], n: int, params: SamplingParams) -> Rollouts:
        params, prompt_ids = prepare_request(self.tokenizer, prompts, n, params, stop=self.stop,
                                             max_prompt_length=self.max_prompt_length)
        _check_nonempty(prompt_ids)
        rows = [ids for ids in prompt_ids for _ in range(n)]  # prompt-major
        completions: list[Completion] = []
        with self._inference(), self._seeded(params.seed):
            plan, shared = self._prefix_plan(rows), None
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start:start + self.batch_size]
                past = None
                if plan is not None:  # this batch's prefixes, on the prefix every row shares read once
                    indices = range(start, start + len(batch))
                    prefixes = read_prefixes(self._prefill, rows, plan, indices, shared)
                    past, shared = prefixes.past(indices, prefixes.keep(batch, indices))[0], prefixes.shared
                completions += self._generate(batch, params, past)
        return build_rollouts(prompt_ids, completions, n, self.pad_id, backend="hf")

    def _prefix_plan(self, rows: list[list[int]]) -> PrefixPlan | None:
        """Inside :meth:`reuse_prefixes`, which prefixes of ``rows`` to read once (the one all of
        them share, then each run of rows': one group's judge prompts, the samples of one prompt);
        else None.

        Each row keeps its last token to prefill: ``generate`` runs at least one column. Not under
        lock-step decoding (a partitioned model that was not gathered): there the extra forwards
        would be collectives that only ranks whose rows share a prefix run.
        """
        if self._prefixes is None or self._lockstep or len(rows) < 2:
            return None
        plan = plan_prefixes(rows, [len(r) - 1 for r in rows])
        return plan if plan.shared or plan.runs else None

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> None:
        """Extend ``cache`` by ``ids`` (a :data:`~dynalign.rollout.prefix_cache.Forward`), running no
        LM head."""
        self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                   position_ids=positions.to(self.device), past_key_values=cache, use_cache=True,
                   logits_to_keep=NO_LOGITS)

    def _generate(self, rows: list[list[int]], params: SamplingParams, past: Any = None) -> list[Completion]:
        """Decode a batch with transformers ``generate``; ``past`` (a :meth:`Prefixes.past`)
        holds the KV cache of the batch's first columns, which ``generate`` then skips."""
        input_ids, attention_mask = left_pad(rows, self.pad_id)  # [B, P]
        stopping = None
        if params.stop:
            from transformers import StoppingCriteriaList

            stopping = StoppingCriteriaList([_StopOnStrings(self.tokenizer, params.stop, input_ids.shape[1])])
        out = self.model.generate(  # type: ignore[operator]
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=self._generation_config(params),
            logits_processor=None if params.greedy else [_DrawLast(params)],
            stopping_criteria=stopping,
            past_key_values=past,
            synced_gpus=self._lockstep,
        )
        new_tokens = out.sequences[:, input_ids.shape[1]:]  # [B, C]
        logprobs: list[list[float] | None] = [None] * len(rows)
        if params.logprobs:
            logprobs = _sampled_logprobs(out.logits, new_tokens).tolist()
        return [finish_completion(self.tokenizer, ids, eos_ids=self.eos_ids, stops=params.stop,
                                  logprobs=lp)
                for ids, lp in zip(new_tokens.tolist(), logprobs, strict=True)]

    def _generation_config(self, params: SamplingParams) -> Any:
        """Greedy decoding, every other field that shapes the tokens set neutral.

        A sampling call gets its warpers and its draw from :class:`_DrawLast`, run last by the
        greedy step, so none of the sampling fields transformers would fill from the model's
        ``generation_config`` (a ``top_k``, a ``min_p``) or from its own defaults (``top_k=50``)
        takes part.
        """
        from transformers import GenerationConfig

        return GenerationConfig(
            max_new_tokens=params.max_new_tokens, eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id,
            do_sample=False, **NEUTRAL_DECODING, use_cache=True, return_dict_in_generate=True,
            output_logits=params.logprobs)

    # -------------------------------------------------------------- judge scores

    def next_token_logprobs(self, texts: Sequence[str], token_ids: Sequence[int]) -> torch.Tensor:
        """[N, K] log-softmax (temperature 1) at the position after each text, for each candidate."""
        return self.token_logprobs(self.encode_texts(texts), token_ids)[:, -1]  # [N, K]

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """The token ids :meth:`next_token_logprobs` reads for each text."""
        rows = [encode_text(self.tokenizer, t) for t in texts]
        _check_nonempty(rows)
        return rows

    def token_logprobs(self, rows: Sequence[Sequence[int]], token_ids: Sequence[int],
                       last: int = 1) -> torch.Tensor:
        """[N, last, K] log-softmax after each of the last ``last`` tokens of each row, for each
        candidate token: ``[:, -1]`` is the next-token distribution after the whole row.

        Inside :meth:`reuse_prefixes` the N rows are one batch of the prefix cache; otherwise
        they are read from scratch, ``batch_size`` rows at a time. Float32 linears on the CPU
        compute through oneDNN (:func:`~dynalign.onednn.onednn_linears`).
        """
        candidates = torch.as_tensor(list(token_ids), dtype=torch.long)  # [K]
        if not rows:
            return torch.zeros(0, last, len(candidates))
        with self._inference(), onednn_linears(self.model):
            if self._prefixes is not None:
                logp = self._prefixes.logprobs(rows, last)  # [N, last, V]
                return logp[..., candidates.to(logp.device)].cpu()  # [N, last, K]
            out = []
            for start in range(0, len(rows), self.batch_size):
                ids, mask = left_pad(rows[start:start + self.batch_size], self.pad_id)  # [B, L]
                positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                    position_ids=positions.to(self.device), logits_to_keep=last).logits
                logp = torch.log_softmax(logits.float(), -1)  # [B, last, V]
                out.append(logp[..., candidates.to(logp.device)].cpu())  # [B, last, K]
        return torch.cat(out)  # [N, last, K]

    @contextmanager
    def reuse_prefixes(self, slots: int = 8) -> Iterator[int]:
        """Within the block, each call of :meth:`next_token_logprobs` / :meth:`token_logprobs`
        is one batched forward on a KV cache (:class:`~dynalign.rollout.prefix_cache.PrefixCache`):
        the prefix all its texts share (a judge's rubric) is encoded once, then the longer one each
        run of consecutive texts shares (one group's user prompt), and texts that extend those of
        the call before (the next aspect slot) cost their new tokens only. Each call of
        :meth:`sample` reads the same prefixes of its prompts once
        (:func:`~dynalign.rollout.prefix_cache.read_prefixes`) and copies their cache under each
        row: ``generate`` then prefills the rest of each prompt and decodes as it would from
        scratch. The parameters stay
        gathered (ZeRO-3) for the whole block. Yields ``slots``: callers ask about at most that
        many texts at a time (the batch of one forward).
        """
        with self._inference():
            self._prefixes = PrefixCache(self.model, self.device)
            try:
                yield slots
            finally:
                self._prefixes = None

    @contextmanager
    def inference_session(self) -> Iterator[None]:
        """Within the block the model stays ready for inference: gathered once under ZeRO-3 (a
        collective, on entry and exit), in eval mode, without grad. Calls inside gather nothing,
        so ranks that share out work may make different numbers of them."""
        with self._inference():
            yield

    # ------------------------------------------------------------------- weights

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if not self.needs_weight_sync:
            return  # generates from the training module itself: nothing to copy
        state = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in state:
                    raise KeyError(f"update_weights: the model has no parameter {name!r}")
                state[name].copy_(tensor)

    def sleep(self) -> None:
        """Nothing to free: the model is shared with (or as cheap as) the trainer's."""

    def wake_up(self) -> None:
        """See :meth:`sleep`."""

    def close(self) -> None:
        """Drop the model and the ZeRO-3 gather (which holds the DeepSpeed engine): a model of its
        own is freed with them, the trainer's module once the engine is closed too."""
        self.model = None  # type: ignore[assignment]  # closed: sampling fails from here on
        self.gather = None
        self._prefixes = None

    # ------------------------------------------------------------------- helpers

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def _lockstep(self) -> bool:
        """Whether ranks decode in lock-step: only for a partitioned model that is not gathered.
        Left to transformers, any model in a ZeRO-3 process would, and a rank sampling alone (a
        whole side model: a baseline, a judge) would wait for the others."""
        return self.gather is None and is_partitioned(self.model)

    @contextmanager
    def _inference(self) -> Iterator[None]:
        """Gathered (and unhooked, given the engine: :func:`zero3_gather`) under ZeRO-3, eval
        mode, no grad; the model's train/eval flag is restored. Re-entrant: a nested block (a
        query inside :meth:`reuse_prefixes`) gathers nothing."""
        if self._inside:
            yield
            return
        was_training = self.model.training
        gather = self.gather() if self.gather is not None else nullcontext()
        with gather, torch.no_grad():
            self.model.eval()
            self._inside = True
            try:
                yield
            finally:
                self._inside = False
                self.model.train(was_training)

    @contextmanager
    def _seeded(self, seed: int | None) -> Iterator[None]:
        """Sample from a generator seeded with ``seed``; the global RNG state is left untouched."""
        if seed is None:
            yield
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield


def _sampled_logprobs(step_logits: Sequence[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """[B, C] float32 log-softmax of each step's raw logits [B, V] at the sampled token [B, C]."""
    columns = [torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, t, None].to(logits.device))
               for t, logits in enumerate(step_logits)]  # C x [B, 1]
    return torch.cat(columns, 1).cpu()  # [B, C]


def _check_nonempty(rows: Sequence[Sequence[int]]) -> None:
    empty = [i for i, r in enumerate(rows) if not r]
    if empty:
        raise ValueError(f"prompts {empty} are empty after tokenization: a model needs >= 1 prompt token")
