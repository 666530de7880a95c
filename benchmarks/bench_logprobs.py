"""Peak memory and time of chunked ``dynalign.grpo.token_logprobs`` against the naive log-softmax.

naive:     torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])  (a float32 [B, T, V] copy)
chunked:   grpo.token_logprobs(logits, labels, chunk_size)                     (float32 chunk by chunk)
gathered:  grpo.token_logprobs(logits.view(-1, V)[source] / temperature, labels)  (a copy of the rows)
by-source: grpo.token_logprobs(logits, labels, source=source, temperature=temperature)

The last two read the rows through ``source`` (each token's row of the flattened logits, here
the identity) at ``--temperature``, as the update reads a packed batch's kept logits at the
sampling temperature: "gathered" is the caller-side gather and rescale the update did before
``token_logprobs`` took ``source`` and ``temperature``, "by-source" reads the rows in place.

Each (variant, mode) runs in a fresh subprocess. Memory is the growth of the process's peak RSS
(``ru_maxrss``) over the peak reached after allocating the inputs; it includes the logits' gradient
in "fwd+bwd" for both variants. "fwd" runs under ``torch.no_grad()`` (old/reference log-probs);
"fwd+bwd" backpropagates a random [B, T] weight into the logits (the training step). Time is the
median of ``--reps`` runs after one warm-up run.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_logprobs.py [--batch 8 --seq 1024 --vocab 128256]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynalign import grpo  # noqa: E402

VARIANTS = ("naive", "chunked", "gathered", "by-source")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def make_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits [B, T, V]: 256 random rows (drawn 4 at a time) tiled, so the setup is quick and its
    own peak is (nearly) the inputs' size."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.empty(args.batch, args.seq, args.vocab, dtype=DTYPES[args.dtype])  # [B, T, V]
    flat = logits.view(-1, args.vocab)  # [B*T, V]
    tile = flat[:256]  # [256, V]
    for start in range(0, tile.shape[0], 4):
        tile[start:start + 4].copy_(torch.randn(tile[start:start + 4].shape, generator=gen).mul_(2))  # [4, V]
    for start in range(tile.shape[0], flat.shape[0], tile.shape[0]):
        end = min(start + tile.shape[0], flat.shape[0])
        flat[start:end] = tile[:end - start]  # [256, V]
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)  # [B, T]
    weights = torch.randn(args.batch, args.seq, generator=gen)  # [B, T]
    return logits, labels, weights


def naive(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    return torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)  # [B, T]


def chunked(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    return grpo.token_logprobs(logits, labels, chunk_size=chunk_size)  # [B, T]


def gathered(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int | None,
             temperature: float) -> torch.Tensor:
    source = torch.arange(labels.numel()).view(labels.shape)  # [B, T]
    rows = logits.view(-1, logits.shape[-1])[source] / temperature  # [B, T, V] a copy
    return grpo.token_logprobs(rows, labels, chunk_size=chunk_size)  # [B, T]


def by_source(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int | None,
              temperature: float) -> torch.Tensor:
    source = torch.arange(labels.numel()).view(labels.shape)  # [B, T]
    return grpo.token_logprobs(logits, labels, chunk_size=chunk_size, source=source,
                               temperature=temperature)  # [B, T]


def worker(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = {"naive": naive, "chunked": chunked,
                "gathered": lambda *a: gathered(*a, args.temperature),
                "by-source": lambda *a: by_source(*a, args.temperature)}
    fn = variants[args.variant]
    logits, labels, weights = make_inputs(args)
    logits.requires_grad_(args.mode == "fwd+bwd")
    baseline = peak_rss_mib()

    def once() -> float:
        start = time.perf_counter()
        if args.mode == "fwd":
            with torch.no_grad():
                fn(logits, labels, args.chunk_size)
        else:
            logits.grad = None
            (fn(logits, labels, args.chunk_size) * weights).sum().backward()
        return time.perf_counter() - start

    once()  # warm-up; its peak is the peak of every run
    times = [once() for _ in range(args.reps)]
    print(json.dumps({"peak_mib": peak_rss_mib() - baseline, "seconds": statistics.median(times)}))


def run_variant(args: argparse.Namespace, variant: str, mode: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", "--variant", variant, "--mode", mode,
           "--batch", str(args.batch), "--seq", str(args.seq), "--vocab", str(args.vocab),
           "--dtype", args.dtype, "--chunk-size", str(args.chunk_size), "--reps", str(args.reps),
           "--threads", str(args.threads), "--temperature", str(args.temperature)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{variant} {mode} failed (rc {done.returncode}):\n{done.stderr[-2000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="rows per chunk (default: grpo.default_chunk_size for CPU)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="sampling temperature of the gathered and by-source variants")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.chunk_size is None:
        args.chunk_size = grpo.default_chunk_size(args.vocab, "cpu")

    logits_mib = args.batch * args.seq * args.vocab * DTYPES[args.dtype].itemsize / 2**20
    threads = args.threads or torch.get_num_threads()
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"token_logprobs: B={args.batch} T={args.seq} V={args.vocab} {args.dtype} on CPU "
          f"({threads} threads, {os.cpu_count()} cores, load average {load}), "
          f"chunk_size={args.chunk_size} rows, median of {args.reps}; logits = {logits_mib:.0f} MiB; "
          f"gathered and by-source at temperature {args.temperature}")
    results = {(v, m): run_variant(args, v, m) for m in MODES for v in VARIANTS}
    print(f"{'mode':<8} {'variant':<9} {'peak MiB over inputs':>21} {'time s':>8}")
    for (variant, mode), r in results.items():
        print(f"{mode:<8} {variant:<9} {r['peak_mib']:>21.0f} {r['seconds']:>8.2f}")
    for mode in MODES:
        for ours, baseline in (("chunked", "naive"), ("by-source", "gathered")):
            n, c = results[(baseline, mode)], results[(ours, mode)]
            saved = n["peak_mib"] - c["peak_mib"]
            ratio = c["seconds"] / n["seconds"]
            print(f"{mode}: peak over inputs {c['peak_mib']:.0f} MiB {ours} vs {n['peak_mib']:.0f} MiB "
                  f"{baseline} ({saved:.0f} MiB less), time {ours}/{baseline} = {ratio:.2f}")


if __name__ == "__main__":
    main()
