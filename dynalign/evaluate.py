"""``python -m dynalign.evaluate checkpoint=PATH``: evaluate a policy against its base model.

``PATH`` is a Hugging Face model directory (a training run exports ``iter_<k>/`` after each
iteration) or a dynalign run directory (its newest ``iter_<k>/`` is used). The config tree
is the training one (``conf/train.yaml``), so ``model`` names the base model (the default
baseline), ``judge`` the self-judge whose calibration is measured, and the ``eval`` group
the rest::

    python -m dynalign.evaluate checkpoint=outputs/2026-01-01/12-00-00 model=llama3_8b \\
        eval=full eval.judge.backend=openai eval.judge.base_url=http://localhost:8000/v1 \\
        eval.judge.model=Qwen/Qwen2.5-72B-Instruct

Results land in Hydra's run directory: ``eval_results.json``, ``eval_samples.jsonl``,
``eval_summary.md`` (printed at the end), and in W&B (``logger``): the policy of a training run
is evaluated into that run's own W&B run (resumed by the id its directory keeps), so the
evaluation sits in its summary and history; any other model gets a W&B run of its own.
Exit status 2 with a message naming the key for a bad value, ``checkpoint`` included.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from dynalign.cli import launch_record, run_main, save_launch_record, validated_config
from dynalign.config import ConfigError, TrainConfig, register_configs
from dynalign.eval.settings import CHECKPOINT_KEY
from dynalign.rundir import iteration_of, resolve_model_dir

register_configs()


def _fail(err: ConfigError) -> None:
    print(f"dynalign: invalid config: {err}", file=sys.stderr)
    raise SystemExit(2) from None


def _warn_on_base_mismatch(policy: Path, config: TrainConfig) -> None:
    """A run directory remembers its base model: say so when the baseline is another one."""
    saved = policy.parent / ".hydra" / "config.yaml"
    if not saved.exists() or config.eval.baseline:
        return
    trained = OmegaConf.select(OmegaConf.load(saved), "model.name_or_path")
    if trained and trained != config.model.name_or_path:
        warnings.warn(f"{policy.parent} trained model.name_or_path={trained} but the baseline is "
                      f"model.name_or_path={config.model.name_or_path}: pass model=... (or eval.baseline) "
                      "to compare with the model it started from", stacklevel=2)


def _run_info(out_dir: Path, config: TrainConfig, policy: Path):
    """The evaluation's own W&B run, or the training run that exported ``policy`` when it has one."""
    from hydra.core.hydra_config import HydraConfig

    from dynalign.tracking import RunInfo, evaluated_run

    hc = HydraConfig.get()
    name = "eval-" + (hc.job.override_dirname or "default")
    return RunInfo(run_dir=out_dir, name=name, group=str(hc.run.dir),
                   config=OmegaConf.to_container(OmegaConf.structured(config), resolve=True),  # type: ignore[arg-type]
                   resume=evaluated_run(policy))


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    from dynalign.eval.settings import resolve_eval

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    save_launch_record(out_dir, launch_record(cfg))
    config = validated_config(cfg)
    checkpoint = config.checkpoint
    try:
        if not checkpoint:
            raise ConfigError(CHECKPOINT_KEY, "required: python -m dynalign.evaluate checkpoint=PATH (a "
                                              "Hugging Face model directory or a dynalign run directory)")
        policy = resolve_model_dir(checkpoint, CHECKPOINT_KEY)
        resolve_eval(config)  # a bad eval.baseline fails here, before any model is loaded
    except ConfigError as err:
        _fail(err)
    from dynalign.distributed import get_rank, init_distributed
    from dynalign.eval.runner import evaluate_policy  # torch, transformers: after the cheap checks
    from dynalign.tracking import build_tracker

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: the ranks share the evaluation
        init_distributed()
    _warn_on_base_mismatch(policy, config)
    info = _run_info(out_dir, config, policy)
    tracker = build_tracker(replace(config.logger, job_type="eval"), info, rank=get_rank())
    try:
        results = evaluate_policy(config, policy, out_dir=out_dir, iteration=iteration_of(policy),
                                  tracker=tracker, history_path=out_dir / "eval_history.jsonl")
    except ConfigError as err:  # e.g. an unknown lm-eval task, found while indexing the tasks
        tracker.finish()
        _fail(err)
    tracker.finish(results.get("metrics"))
    if results:  # rank 0
        print((out_dir / "eval_summary.md").read_text(encoding="utf-8"))
        print(f"dynalign: evaluation written to {out_dir}")
    return results


if __name__ == "__main__":
    run_main(main)
