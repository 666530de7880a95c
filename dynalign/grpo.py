"""The GRPO core: group-relative advantages, memory-frugal log-probs, KL estimators and policy losses.

Pure tensor functions: no model state, no ``torch.distributed``, no I/O. The trainer gathers what
crosses ranks (rewards, the optimizer batch's token count) and passes it in.

Conventions
-----------
* Shapes: ``B`` sequences, ``T`` completion tokens, ``V`` vocabulary, ``N`` rewards ordered as
  ``N / G`` consecutive groups of ``G`` answers to the same prompt.
* ``mask`` [B, T] marks the completion tokens that count (1/True) against padding (0/False).
  Padded positions never reach an ``exp``: their log-ratio is zeroed first, so arbitrary values
  there produce neither NaN nor gradient.
* ``logp`` is the policy's log-prob of the sampled tokens (with grad); ``old_logp`` (the sampling
  policy) and ``ref_logp`` (the reference model) are constants and are detached here.
* Log-probs are computed in float32 (float64 stays float64), upcasting bf16/fp16 logits one chunk
  of rows at a time, so no float32 [B, T, V] copy exists in the forward or the backward pass.
  Chunks are small on CPU (they stay in cache) and large on accelerators (few kernel launches).
* Statistics are detached python floats, for logging only.

Policy losses (``POLICY_LOSSES``; per token ``r = exp(logp - old_logp)``)::

    objective = min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)   [dual clip: A < 0 -> max(., c * A)]
    loss_t    = -w_t * objective + beta * KL_t                         [KL_t only with ref_logp, beta > 0]
    w_t       = min(exp(old_logp - sampler_logp), is_cap)              [1 unless the IS correction is on]
    grpo      mean over sequences with >= 1 token of  sum_t loss_t m_t / sum_t m_t
    bnpo      sum loss_t m_t / sum m_t                  (the micro-batch's tokens)
    dr_grpo   sum loss_t m_t / (B * max_completion_length)
    dapo      sum loss_t m_t / total_tokens             (tokens of the whole optimizer batch)
    gspo      sequence ratio s = exp(mean_t log r), clipped per sequence, mean over sequences

Each loss is registered with its normaliser (``PolicyLoss.units``: sequences with tokens, tokens,
rows, or None for dapo's ``total_tokens``), which a trainer needs to weight its micro-batches.

KL estimators (``KL_ESTIMATORS``) of KL(pi || pi_ref) from samples of pi, with x = ref_logp - logp
clamped to [-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP]: k1 = -x, k2 = x^2 / 2, k3 = exp(x) - x - 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from dynalign.packing import Packing, logits_at, packed_logits

ADVANTAGE_SCALES = ("group", "batch", "none")
CHUNK_BYTES_CPU = 16 * 2**20  # float32 bytes of logits upcast at once on CPU: cache-friendly, heap-served
CHUNK_BYTES_ACCELERATOR = 256 * 2**20  # ... on GPUs: large enough to keep kernel launches few
KL_LOG_RATIO_CLAMP = 20.0  # |ref_logp - logp| is clamped to this before a KL estimator (exp(20) ~ 5e8)


def _check_name(kind: str, name: str, valid: Any) -> None:
    if name not in valid:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(valid)}")


# ---------------------------------------------------------------------- advantages


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """Rewards [N] as a float [N / G, G] table (detached); raises if N is not a multiple of G."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"number of rewards ({rewards.numel()}) must be a positive multiple of "
                         f"group_size ({group_size}): rewards are N / group_size consecutive groups")
    dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return rewards.detach().to(dtype).view(-1, group_size)  # [N/G, G]


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Group-relative advantages [N]: ``r - mean(group)``, divided by a std chosen by ``scale``.

    ``scale``: "group" -> the group's std, "batch" -> the std of all finite rewards of the batch,
    "none" -> no division (Dr. GRPO). Stds are population stds (unbiased=False), ``eps`` is added.
    NaN rewards (unparseable judgements) are left out of every mean and std and get advantage 0;
    so does every answer of an all-NaN group. The result is detached.
    """
    _check_name("advantage scale", scale, ADVANTAGE_SCALES)
    table = _grouped(rewards, group_size)  # [N/G, G]
    finite = ~torch.isnan(table)  # [N/G, G]
    count = finite.sum(-1, keepdim=True).clamp(min=1)  # [N/G, 1]
    filled = torch.where(finite, table, torch.zeros_like(table))  # [N/G, G]
    mean = filled.sum(-1, keepdim=True) / count  # [N/G, 1]
    centered = torch.where(finite, table - mean, torch.zeros_like(table))  # [N/G, G]
    if scale == "none":
        return centered.reshape(-1)  # [N]
    if scale == "group":
        std = (centered.square().sum(-1, keepdim=True) / count).sqrt()  # [N/G, 1]
    else:
        kept = table[finite]  # [K]
        std = kept.std(unbiased=False) if kept.numel() > 0 else table.new_zeros(())  # []
    return (centered / (std + eps)).reshape(-1)  # [N]


def zero_spread_groups(rewards: Tensor, group_size: int) -> Tensor:
    """Bool [N / G]: True where a group cannot teach anything (all finite rewards equal, or < 2 finite).

    Used by dynamic sampling to drop groups whose advantages are all zero.
    """
    table = _grouped(rewards, group_size)  # [N/G, G]
    finite = ~torch.isnan(table)  # [N/G, G]
    high = torch.where(finite, table, torch.full_like(table, -float("inf"))).amax(-1)  # [N/G]
    low = torch.where(finite, table, torch.full_like(table, float("inf"))).amin(-1)  # [N/G]
    return (finite.sum(-1) < 2) | (high == low)  # [N/G]


# ------------------------------------------------------------------------ log-probs


def default_chunk_size(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Rows per chunk when ``chunk_size`` is None: CHUNK_BYTES_CPU or _ACCELERATOR of float32 logits."""
    budget = CHUNK_BYTES_CPU if torch.device(device).type == "cpu" else CHUNK_BYTES_ACCELERATOR
    return max(1, budget // (4 * max(vocab_size, 1)))


def _chunk_rows(logits: Tensor, chunk_size: int | None) -> int:
    """Rows per chunk: ``chunk_size``, or :func:`default_chunk_size` for None."""
    if chunk_size is None:
        chunk_size = default_chunk_size(logits.shape[-1], logits.device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (got {chunk_size})")
    return chunk_size


def _row_chunks(logits: Tensor, chunk_size: int) -> Iterator[tuple[int, int, Tensor]]:
    """``(start, end, rows)`` with rows [n, V] = flattened logits[start:end], one chunk at a time: a view
    when the leading dims flatten without a copy, else (a time slice of a batch) a gather of the chunk."""
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    n_rows = lead.numel()
    try:
        flat: Tensor | None = logits.view(n_rows, vocab)  # [R, V]
    except RuntimeError:
        flat = None
    for start in range(0, n_rows, chunk_size):
        end = min(start + chunk_size, n_rows)
        if flat is not None:
            yield start, end, flat[start:end]  # [n, V]
        else:
            index = torch.arange(start, end, device=logits.device)  # [n]
            yield start, end, logits[torch.unravel_index(index, lead)]  # [n, V]


def _tokens_by_chunk(source: Tensor, rows: int, chunk_size: int) -> tuple[Tensor, list[int]]:
    """The tokens sorted by the row they read (``order`` [T]), and where each chunk's tokens start
    in that order (``bounds``: one more than there are chunks of ``chunk_size`` rows)."""
    if source.numel() and not 0 <= int(source.min()) <= int(source.max()) < rows:
        raise ValueError(f"source must index the {rows} rows of the logits "
                         f"(got values in [{int(source.min())}, {int(source.max())}])")
    order = torch.argsort(source, stable=True)  # [T]
    starts = torch.arange(0, rows + chunk_size, chunk_size, device=source.device).clamp_(max=rows)
    bounds = torch.searchsorted(source[order], starts)  # [chunks + 1]
    return order, bounds.tolist()


def _scaled(rows: Tensor, dtype: torch.dtype, temperature: float) -> Tensor:
    """``rows`` [n, V] in ``dtype``, divided by the sampling temperature."""
    rows = rows.to(dtype)
    return rows if temperature == 1.0 else rows / temperature


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """log_softmax(row / temperature)[label] for each token by chunks of rows; the backward recomputes
    the softmax by chunks from the saved logits (no copy). Token t reads the flattened row
    ``source[t]`` of the logits: one row may serve several tokens (a packed prompt's last position
    predicts the first token of each of its answers), a row may serve none (it is computed, and its
    gradient is 0). Per chunk, the fused log_softmax / softmax kernels (one float32 [n, V] result
    each) beat ``logit - logsumexp``, whose CPU kernel makes several passes and temporaries. With
    ``with_entropy``, the entropy of each token's row comes from the same log-softmax (no grad);
    else the second output is empty."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, labels: Tensor, source: Tensor, temperature: float,
                chunk_size: int, with_entropy: bool) -> tuple[Tensor, Tensor]:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        rows_total = logits.shape[:-1].numel()
        flat_labels, flat_source = labels.reshape(-1), source.reshape(-1)  # [T] each
        order, bounds = _tokens_by_chunk(flat_source, rows_total, chunk_size)
        logp = torch.empty(flat_labels.shape[0], dtype=dtype, device=logits.device)  # [T]
        row_entropy = torch.empty(rows_total if with_entropy else 0, dtype=dtype, device=logits.device)
        lowest = torch.finfo(dtype).min
        for i, (start, end, rows) in enumerate(_row_chunks(logits, chunk_size)):
            rows_logp = torch.log_softmax(_scaled(rows, dtype, temperature), dim=-1)  # [n, V]
            tokens = order[bounds[i]:bounds[i + 1]]  # [k] the tokens these rows predict
            logp[tokens] = rows_logp[flat_source[tokens] - start, flat_labels[tokens]]  # [k]
            if with_entropy:  # -sum p log p; a -inf logit has p = 0 and adds 0 (not 0 * -inf)
                probs = rows_logp.exp()  # [n, V]
                row_entropy[start:end] = -(probs * rows_logp.clamp_(min=lowest)).sum(-1)  # [n]
        ctx.save_for_backward(logits, flat_labels, flat_source, order)
        ctx.bounds, ctx.chunk_size, ctx.temperature = bounds, chunk_size, temperature
        entropy = row_entropy[flat_source].view(labels.shape) if with_entropy else row_entropy  # [B, T]
        ctx.mark_non_differentiable(entropy)
        return logp.view(labels.shape), entropy  # [B, T] each

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_logp: Tensor, _: Tensor) -> tuple[Tensor | None, ...]:
        logits, flat_labels, flat_source, order = ctx.saved_tensors
        dtype = torch.promote_types(logits.dtype, torch.float32)
        vocab = logits.shape[-1]
        grad_tokens = grad_logp.reshape(-1).to(dtype)  # [T]
        # each row's summed upstream gradient: a 1-D index_add_ adds in index order, on any number
        # of CPU threads, so packed runs stay bitwise repeatable
        grad_rows = torch.zeros(logits.shape[:-1].numel(), dtype=dtype, device=logits.device)
        grad_rows.index_add_(0, flat_source, grad_tokens)  # [R]
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # [..., V]
        flat_grad = grad.view(-1, vocab)  # [R, V]
        for i, (start, end, rows) in enumerate(_row_chunks(logits, ctx.chunk_size)):
            # d logp[label] / d logits = (onehot(label) - softmax(logits / T)) / T, summed over the
            # tokens that read the row
            chunk = torch.softmax(_scaled(rows, dtype, ctx.temperature), dim=-1)  # [n, V]
            chunk.mul_(grad_rows[start:end, None].neg())  # [n, V]
            tokens = order[ctx.bounds[i]:ctx.bounds[i + 1]]  # [k]
            cells = (flat_source[tokens] - start) * vocab + flat_labels[tokens]  # [k] into the chunk
            chunk.view(-1).index_add_(0, cells, grad_tokens[tokens])  # [n, V]
            if ctx.temperature != 1.0:
                chunk.div_(ctx.temperature)
            flat_grad[start:end] = chunk  # [n, V]
        return grad, None, None, None, None, None


def token_logprobs(logits: Tensor, labels: Tensor, chunk_size: int | None = None, *,
                   source: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """Log-probs [B, T] of ``labels`` [B, T] under ``logits`` [B, T, V], differentiable.

    Equals ``log_softmax(logits.float() / temperature, -1).gather(-1, labels[..., None])[..., 0]``
    but works on ``chunk_size`` rows of the flattened logits at a time (None:
    :func:`default_chunk_size`), upcast to float32 per chunk, in the forward and in the backward,
    so memory beyond the logits and their gradient is O(chunk_size * V). Result dtype: float32
    (float64 for float64 logits). Any leading dims work. Labels must be valid token ids; mask
    padding in the loss.

    With ``source`` [B, T], token (b, t) is read from row ``source[b, t]`` of the logits flattened
    to [R, V] (any R): several tokens may share a row, whose log-softmax is computed once and whose
    gradient sums theirs; rows no token reads get a zero gradient.
    """
    return _token_logprobs(logits, labels, chunk_size, with_entropy=False, source=source,
                           temperature=temperature)[0]  # [B, T]


def _token_logprobs(logits: Tensor, labels: Tensor, chunk_size: int | None, *, with_entropy: bool,
                    source: Tensor | None = None, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    if source is None:
        if logits.shape[:-1] != labels.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: "
                             "expected logits [..., V] and labels [...]")
        source = torch.arange(labels.numel(), device=labels.device).view(labels.shape)
    elif source.shape != labels.shape:
        raise ValueError(f"source {tuple(source.shape)} and labels {tuple(labels.shape)} disagree")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    return _ChunkedTokenLogProbs.apply(logits, labels.long(), source.long(), temperature,
                                       _chunk_rows(logits, chunk_size), with_entropy)  # [B, T] each


@torch.no_grad()
def token_entropy(logits: Tensor, chunk_size: int | None = None) -> Tensor:
    """Entropy [B, T] of the softmax over ``logits`` [B, T, V], chunked like :func:`token_logprobs`.

    Computed without grad (a monitoring statistic): the result is detached. -inf logits are fine.
    """
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)  # [B, T] any id
    return _token_logprobs(logits, labels, chunk_size, with_entropy=True)[1]  # [B, T]


@overload
def completion_logprobs(model: Callable[..., Any], input_ids: Tensor, attention_mask: Tensor,
                        completion_length: int, *, temperature: float = ...,
                        with_entropy: Literal[False] = ..., chunk_size: int | None = ...,
                        packing: Packing | None = ...) -> Tensor: ...


@overload
def completion_logprobs(model: Callable[..., Any], input_ids: Tensor, attention_mask: Tensor,
                        completion_length: int, *, temperature: float = ..., with_entropy: Literal[True],
                        chunk_size: int | None = ...,
                        packing: Packing | None = ...) -> tuple[Tensor, Tensor]: ...


def completion_logprobs(model: Callable[..., Any], input_ids: Tensor, attention_mask: Tensor,
                        completion_length: int, *, temperature: float = 1.0, with_entropy: bool = False,
                        chunk_size: int | None = None,
                        packing: Packing | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probs [B, C] of the completion tokens under a causal LM (and their entropy [B, C] if asked).

    ``input_ids``/``attention_mask`` [B, P + C]: left-padded prompts, then right-padded completions
    (the last ``completion_length`` = C columns). The model keeps the last C + 1 positions
    (``logits_to_keep``, which every transformers causal LM takes), and its LM head runs on those
    that predict an answer token only (:func:`~dynalign.packing.logits_at`): the hidden states of
    the prompt and of an answer's padding never go through the head, whose output there nobody
    reads (on a 262k vocabulary the head is most of the forward). Position t predicts token
    t + 1, divided by the sampling ``temperature``. Padded completion positions get meaningless
    values: mask them in the loss. Positions are the model's own (0..P+C-1, pads included);
    rotary embeddings see only relative positions, so left padding changes nothing.

    With ``packing`` (:mod:`dynalign.packing`), rows that share a prompt are read in one packed
    row: each prompt once, no pads; the same log-probs up to float rounding.

    The log-softmax reads the model's logits where they are, each row once however many tokens it
    predicts, with the temperature applied per float32 chunk: the update holds the logits and
    their gradient, no gathered, sliced or rescaled copy of them.
    """
    length = input_ids.shape[1]
    if not 0 < completion_length < length:
        raise ValueError(f"completion_length must be in [1, {length - 1}] for {length} input columns "
                         f"(got {completion_length})")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    if packing is None:
        # kept positions P-1 .. P+C-1, [B, C+1]; token c is predicted by kept column c, and an
        # answer's padding reads its prompt's last position (meaningless values, no head work)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None] * (completion_length + 1)
        source = rows + torch.arange(completion_length, device=input_ids.device)  # [B, C]
        answer = attention_mask[:, length - completion_length:].bool()  # [B, C]
        source = torch.where(answer, source, rows)  # [B, C]
        logits, source = logits_at(model, source, input_ids=input_ids, attention_mask=attention_mask,
                                   logits_to_keep=completion_length + 1)  # [1, U, V] read by source
    else:
        logits, source = packed_logits(model, input_ids, attention_mask, completion_length, packing)
    labels = input_ids[:, length - completion_length:]  # [B, C]
    logp, entropy = _token_logprobs(logits, labels, chunk_size, with_entropy=with_entropy,
                                    source=source.to(labels.device), temperature=temperature)  # [B, C] each
    return (logp, entropy) if with_entropy else logp


# ---------------------------------------------------------------------------- KL


KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {
    "k1": lambda x: -x,  # [B, T]
    "k2": lambda x: x.square() / 2,  # [B, T]
    "k3": lambda x: torch.expm1(x) - x,  # [B, T]  exp(x) - 1 - x, accurate near x = 0
}


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate [B, T] of KL(pi || pi_ref) from tokens sampled from pi (no gradient where
    |ref_logp - logp| > KL_LOG_RATIO_CLAMP). k1 and k3 are unbiased; k1 can be negative, k3 is >= 0."""
    _check_name("KL estimator", estimator, sorted(KL_ESTIMATORS))
    x = (ref_logp - logp).clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)  # [B, T]
    return KL_ESTIMATORS[estimator](x)  # [B, T]


# -------------------------------------------------------------------- policy losses


@dataclass(frozen=True)
class LossInputs:
    """Arguments of one policy-loss call; ``mask`` is float, ``old_logp``/``ref_logp`` detached."""

    logp: Tensor  # [B, T]
    old_logp: Tensor  # [B, T]
    advantages: Tensor  # [B]
    mask: Tensor  # [B, T]
    clip_eps_low: float
    clip_eps_high: float
    ref_logp: Tensor | None  # [B, T]
    beta: float
    kl_estimator: str
    max_completion_length: int | None
    total_tokens: float | Tensor | None
    dual_clip: float | None
    sampler_logp: Tensor | None = None  # [B, T] the sampler's own log-probs of the tokens
    is_cap: float | None = None  # truncated IS correction towards the sampler: weights <= is_cap


PolicyLossFn = Callable[[LossInputs], tuple[Tensor, dict[str, float]]]
UnitsFn = Callable[[Tensor], float]  # mask [B, T] -> how many units the loss averages a micro-batch over


@dataclass(frozen=True)
class PolicyLoss:
    """A loss and its normaliser: ``units(mask)`` counts what it averages a micro-batch over (so a
    trainer can weight micro-batches into one batch); None: it divides by ``total_tokens`` itself."""

    fn: PolicyLossFn
    units: UnitsFn | None

    @property
    def uses_total_tokens(self) -> bool:
        return self.units is None


POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str, *, units: UnitsFn | None) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator adding a loss and its normaliser to :data:`POLICY_LOSSES` (``grpo.loss_type`` names)."""

    def register(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered")
        POLICY_LOSSES[name] = PolicyLoss(fn, units)
        return fn

    return register


def get_policy_loss(name: str) -> PolicyLoss:
    """The registered loss ``name``; an unknown name lists the valid ones."""
    _check_name("loss_type", name, sorted(POLICY_LOSSES))
    return POLICY_LOSSES[name]


def _sequences_with_tokens(mask: Tensor) -> float:
    return float((mask.sum(-1) > 0).sum())


def _masked_mean(values: Tensor, mask: Tensor) -> float:
    """Detached mean of ``values`` over ``mask`` (0.0 when the mask is empty)."""
    return float((values.detach() * mask).sum() / mask.sum().clamp(min=1))


def _clipped_objective(ratio: Tensor, adv: Tensor, inp: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO objective min(r A, clip(r) A), dual-clipped for A < 0 (ratio/adv broadcast together), and
    bool masks of where the low clip, the high clip and the dual clip are active."""
    low, high = 1.0 - inp.clip_eps_low, 1.0 + inp.clip_eps_high
    objective = torch.minimum(ratio * adv, ratio.clamp(low, high) * adv)  # [B, T] or [B]
    active = {"clip_frac_low": (ratio < low) & (adv < 0), "clip_frac_high": (ratio > high) & (adv > 0)}
    if inp.dual_clip is not None:
        bound = inp.dual_clip * adv  # [B, 1] or [B]
        active["dual_clip_frac"] = ((adv < 0) & (objective < bound)).expand_as(objective)
        objective = torch.where(adv < 0, torch.maximum(objective, bound), objective)  # [B, T] or [B]
    return objective, active


def _add_kl(loss: Tensor, stats: dict[str, float], inp: LossInputs,
            reduce: Callable[[Tensor], Tensor] = lambda kl: kl) -> tuple[Tensor, dict[str, float]]:
    """``loss + beta * reduce(KL_t)`` with a reference (``kl_mean`` always reported), and ``tokens``."""
    if inp.ref_logp is not None:
        kl = kl_penalty(inp.logp, inp.ref_logp, inp.kl_estimator)  # [B, T]
        stats["kl_mean"] = _masked_mean(kl, inp.mask)
        if inp.beta > 0:
            loss = loss + inp.beta * reduce(kl)  # [B, T] or []
    stats["tokens"] = float(inp.mask.sum())
    return loss, stats


def sampler_mismatch(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor,
                     cap: float | None) -> tuple[Tensor, dict[str, float]]:
    """Truncated importance-sampling weights [B, T] from the sampler to the trainer, and the mismatch.

    The tokens were drawn by the sampler (vLLM, or ``generate``), whose log-probs
    ``sampler_logp`` differ from the trainer's ``old_logp`` for the same weights (other
    kernels, precision, a stale sync): the batch is slightly off-policy. Weight of token t:
    ``w_t = min(exp(old_logp_t - sampler_logp_t), cap)`` (no gradient; all 1 when ``cap`` is
    None, which only measures). Statistics over the masked tokens: ``sampler_logp_abs_diff``
    (mean |old - sampler|), ``sampler_ratio_max`` (largest untruncated ratio; a max, not a
    mean), ``sampler_is_weight_mean`` and ``sampler_is_clipped_frac`` (share of ratios above
    the cap).
    """
    log_ratio = (old_logp - sampler_logp).detach().masked_fill(mask == 0, 0.0)  # [B, T]
    ratio = log_ratio.exp()  # [B, T]
    weights = torch.ones_like(ratio) if cap is None else ratio.clamp(max=cap)  # [B, T]
    seen = ratio.masked_fill(mask == 0, -math.inf)  # [B, T]
    stats = {"sampler_logp_abs_diff": _masked_mean(log_ratio.abs(), mask),
             "sampler_ratio_max": float(seen.max()) if bool(mask.any()) else 1.0,
             "sampler_is_weight_mean": _masked_mean(weights, mask),
             "sampler_is_clipped_frac": _masked_mean((ratio > cap).to(mask.dtype), mask) if cap else 0.0}
    return weights, stats


def _sampler_weights(inp: LossInputs) -> tuple[Tensor | None, dict[str, float]]:
    """The IS weights [B, T] when the correction is on (else None) and the mismatch statistics."""
    if inp.sampler_logp is None:
        return None, {}
    weights, stats = sampler_mismatch(inp.old_logp, inp.sampler_logp, inp.mask, inp.is_cap)
    return (weights if inp.is_cap is not None else None), stats


def _token_loss(inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """Per-token loss [B, T] (-w * objective + beta * KL, w the sampler IS weight) and token-level
    statistics."""
    ratio = (inp.logp - inp.old_logp).masked_fill(inp.mask == 0, 0.0).exp()  # [B, T]
    objective, active = _clipped_objective(ratio, inp.advantages[:, None], inp)  # [B, T]
    weights, sampler_stats = _sampler_weights(inp)
    loss = -objective if weights is None else -objective * weights  # [B, T]
    stats = {name: _masked_mean(where.to(loss.dtype), inp.mask) for name, where in active.items()}
    stats["ratio_mean"] = _masked_mean(ratio, inp.mask)
    return _add_kl(loss, stats | sampler_stats, inp)


def _sequence_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    """Mean over sequences with >= 1 token of each one's token mean; 0 (with grad) if there are none."""
    lengths = mask.sum(-1)  # [B]
    per_seq = (per_token * mask).sum(-1) / lengths.clamp(min=1)  # [B]
    has_tokens = (lengths > 0).to(per_seq.dtype)  # [B]
    return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1)  # []


@register_policy_loss("grpo", units=_sequences_with_tokens)
def _grpo(inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """Token mean per sequence, then mean over the sequences that have tokens."""
    loss, stats = _token_loss(inp)  # [B, T]
    return _sequence_mean(loss, inp.mask), stats


@register_policy_loss("bnpo", units=lambda mask: float(mask.sum()))  # tokens
def _bnpo(inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """Token mean over the micro-batch."""
    loss, stats = _token_loss(inp)  # [B, T]
    return (loss * inp.mask).sum() / inp.mask.sum().clamp(min=1), stats


@register_policy_loss("dr_grpo", units=lambda mask: float(mask.shape[0]))  # rows
def _dr_grpo(inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """Token sum over the constant B * max_completion_length (Dr. GRPO: no length bias)."""
    if inp.max_completion_length is None or inp.max_completion_length < 1:
        raise ValueError(f"loss_type 'dr_grpo' needs max_completion_length >= 1 "
                         f"(got {inp.max_completion_length})")
    loss, stats = _token_loss(inp)  # [B, T]
    return (loss * inp.mask).sum() / (inp.mask.shape[0] * inp.max_completion_length), stats


@register_policy_loss("dapo", units=None)  # divided by total_tokens
def _dapo(inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """Token sum over the optimizer batch's token count (all accumulation steps and ranks)."""
    loss, stats = _token_loss(inp)  # [B, T]
    total = inp.mask.sum() if inp.total_tokens is None else inp.total_tokens
    denom = total.clamp(min=1) if isinstance(total, Tensor) else max(float(total), 1.0)
    return (loss * inp.mask).sum() / denom, stats


@register_policy_loss("gspo", units=_sequences_with_tokens)
def _gspo(inp: LossInputs) -> tuple[Tensor, dict[str, float]]:
    """Sequence-level ratio exp(mean_t log r), clipped per sequence; stats are per sequence.

    The gradient of each sequence's ratio flows through its mean log-ratio (no per-token clip).
    """
    lengths = inp.mask.sum(-1)  # [B]
    log_ratio = (inp.logp - inp.old_logp).masked_fill(inp.mask == 0, 0.0)  # [B, T]
    seq_ratio = (log_ratio.sum(-1) / lengths.clamp(min=1)).exp()  # [B]
    objective, active = _clipped_objective(seq_ratio, inp.advantages, inp)  # [B]
    weights, sampler_stats = _sampler_weights(inp)
    if weights is not None:  # the sequence's weight: its token weights' geometric mean, like its ratio
        log_w = (weights.log() * inp.mask).sum(-1) / lengths.clamp(min=1)  # [B]
        objective = objective * log_w.exp()  # [B]
    has_tokens = (lengths > 0).to(objective.dtype)  # [B]
    loss = -(objective * has_tokens).sum() / has_tokens.sum().clamp(min=1)  # []
    stats = {name: _masked_mean(where.to(objective.dtype), has_tokens) for name, where in active.items()}
    stats["ratio_mean"] = _masked_mean(seq_ratio, has_tokens)
    return _add_kl(loss, stats | sampler_stats, inp, lambda kl: _sequence_mean(kl, inp.mask))


def _check_shapes(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                  ref_logp: Tensor | None, sampler_logp: Tensor | None) -> None:
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    optional = {"ref_logp": ref_logp, "sampler_logp": sampler_logp}
    others = {"old_logp": old_logp, "mask": mask} | {k: v for k, v in optional.items() if v is not None}
    for name, tensor in others.items():
        if tensor.shape != logp.shape:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} != logp shape {tuple(logp.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logp.shape[0]}], got {tuple(advantages.shape)}")


def policy_loss(loss_type: str, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, ref_logp: Tensor | None = None,
                beta: float = 0.0, kl_estimator: str = "k3", max_completion_length: int | None = None,
                total_tokens: float | Tensor | None = None, dual_clip: float | None = None,
                sampler_logp: Tensor | None = None,
                is_cap: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """Scalar policy loss of ``loss_type`` (a name in :data:`POLICY_LOSSES`) and detached stats.

    ``logp``/``old_logp``/``ref_logp``/``sampler_logp``/``mask`` are [B, T], ``advantages`` [B].
    Stats: ``clip_frac_low`` (share of tokens with r < 1 - eps_low and A < 0), ``clip_frac_high``
    (r > 1 + eps_high, A > 0), ``ratio_mean``, ``tokens``, ``kl_mean`` (with ``ref_logp``),
    ``dual_clip_frac`` (with ``dual_clip``); for "gspo" the clip fractions and ``ratio_mean`` are
    over sequences, of the sequence ratio. With ``sampler_logp``, the mismatch statistics of
    :func:`sampler_mismatch`; with ``is_cap`` too, the policy term of each token is weighted by
    its truncated IS weight (gspo: each sequence by the geometric mean of its tokens' weights).
    """
    loss = get_policy_loss(loss_type)
    _check_name("KL estimator", kl_estimator, sorted(KL_ESTIMATORS))
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (got {dual_clip})")
    if is_cap is not None and (sampler_logp is None or not is_cap >= 1.0):
        raise ValueError(f"is_cap needs sampler_logp and must be >= 1 (got {is_cap})")
    _check_shapes(logp, old_logp, advantages, mask, ref_logp, sampler_logp)
    inputs = LossInputs(
        logp=logp, old_logp=old_logp.detach(), advantages=advantages.detach().to(logp.dtype),
        mask=mask.to(logp.dtype), clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high,
        ref_logp=None if ref_logp is None else ref_logp.detach(), beta=beta, kl_estimator=kl_estimator,
        max_completion_length=max_completion_length, total_tokens=total_tokens, dual_clip=dual_clip,
        sampler_logp=None if sampler_logp is None else sampler_logp.detach().to(logp.dtype), is_cap=is_cap)
    return loss.fn(inputs)
