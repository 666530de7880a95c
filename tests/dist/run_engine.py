"""Train the tiny model for a few GRPO iterations on synthetic rollouts; run by tests/test_engine.py.

Launch as a plain process (world of one) or under ``torchrun --nproc_per_node N``. Every rank
draws the same global batch (torch / numpy / python RNGs, reseeded after the engine is built),
trains on its contiguous share, and rank 0 writes the exported weights and per-step statistics
to ``--out``. ``--save-at K --ckpt DIR`` checkpoints after iteration K; ``--resume DIR`` loads the
newest checkpoint of DIR first and continues from the iteration stored in it. With ``--beta``
the KL reference is loaded, and ``--update-reference-every N`` moves it to the policy.
"""

from __future__ import annotations

import argparse
import os
import random

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dynalign.config import DeepSpeedConfig, GRPOConfig, ModelConfig  # noqa: E402
from dynalign.engine import PolicyEngine, TrainBatch  # noqa: E402

PROMPT, COMPLETION = 6, 5


def global_batch(rows: int, vocab: int) -> TrainBatch:
    """Synthetic rollouts drawn from the global torch, numpy and python RNGs."""
    ids = torch.randint(3, vocab, (rows, PROMPT + COMPLETION))  # [N, P+C]
    attention = torch.ones_like(ids)  # [N, P+C]
    completion = torch.ones(rows, COMPLETION, dtype=torch.long)  # [N, C]
    for row in range(rows):
        pad = random.randrange(0, 3)  # left padding of the prompt
        length = random.randrange(1, COMPLETION + 1)  # completion length before right padding
        attention[row, :pad] = 0
        attention[row, PROMPT + length:] = 0
        completion[row, length:] = 0
    advantages = torch.from_numpy(np.random.standard_normal(rows)).float()  # [N]
    return TrainBatch(ids, attention, completion, advantages)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="tiny", help="model directory (default: the embedded tiny model)")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--passes", type=int, default=2, help="optimizer steps per batch (num_iterations)")
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--loss-type", default="grpo")
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--update-reference-every", type=int, default=0,
                        help="move the reference to the policy before iterations i with i %% N == N - 1")
    parser.add_argument("--save-at", type=int, default=None)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()

    grpo = GRPOConfig(lr=1e-3, group_size=4, prompts_per_step=4, micro_batch_size=args.micro_batch_size,
                      loss_type=args.loss_type, beta=args.beta, warmup_steps=2, num_iterations=args.passes)
    ds = DeepSpeedConfig(stage=args.stage)
    engine = PolicyEngine(ModelConfig(name_or_path=args.model), grpo, ds, seed=0)
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    start = 0
    if args.resume:
        start = engine.load(args.resume)["iteration"]
    vocab = len(engine.tokenizer)
    history = []
    for iteration in range(start, args.iterations):
        every = args.update_reference_every
        if every and iteration % every == every - 1:
            engine.update_reference()
        batch = global_batch(grpo.sequences_per_step, vocab).shard(engine.rank, engine.world_size)
        batch = batch.with_logprobs(old=engine.policy_logprobs(batch))
        if args.beta > 0:
            batch = batch.with_logprobs(ref=engine.reference_logprobs(batch))
        for _ in range(args.passes):
            history.append({"iteration": iteration, **engine.train_step(batch)})
        if args.save_at == iteration + 1:
            engine.save(args.ckpt, {"iteration": iteration + 1}, keep=2)
    weights = dict(engine.export_weights())
    if engine.rank == 0:
        torch.save({"weights": weights, "history": history, "start": start,
                    "world_size": engine.world_size, "global_step": engine.global_step}, args.out)


if __name__ == "__main__":
    main()
