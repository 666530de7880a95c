"""``python -m dynalign.judge_check``: how far a judge can be trusted, measured on the sanity set.

Each item of ``dynalign/data/judge_sanity.yaml`` pairs a clearly ``better`` answer with a
length-matched ``worse`` one. The run's judge (``judge`` group, built as training builds it, on
the ``model`` group's model for ``source=self|frozen``) scores both (pointwise: correct when
``better`` scores higher) and compares them in both orders (pairwise: correct when ``better``
wins; agreement: both orders gave the same verdict)::

    python -m dynalign.judge_check model=gemma3_270m judge.mode=logprob judge_check.limit=24

No verdict (a NaN score, an order without a parsed vote) is a failure: counted, never scored.
Accuracy = (correct + 0.5 ties) / decided, with a bootstrap 95% interval, beside the accuracy of
a judge that always prefers the longer answer. ``judge_check.json`` and ``judge_check.md`` land
in Hydra's run dir (or ``judge_check.out``). A bad value exits 2 naming its key, before any model
loads.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import numpy as np
import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dynalign.cli import run_main, validated_config
from dynalign.config import ConfigError, TrainConfig, register_configs
from dynalign.datagen.taxonomy import DATA_DIR
from dynalign.eval.stats import bootstrap_ci, nan_mean, pairwise_summary
from dynalign.judge.pairwise import LOSS, TIE, WIN, order_vote, pair_outcome

if TYPE_CHECKING:
    from dynalign.judge.scoring import Judge

SANITY_FILE = DATA_DIR / "judge_sanity.yaml"
KEY = "judge_check"
CORRECT, WRONG, FAILED = "correct", "wrong", "failed"  # and TIE ("tie"): an item's outcome
POINTS = {CORRECT: 1.0, TIE: 0.5, WRONG: 0.0}
PAIR_OUTCOMES = {WIN: CORRECT, TIE: TIE, LOSS: WRONG, None: FAILED}  # better is side a
WINNER = {"a": "better", "b": "worse", "tie": "tie", None: None}  # an order's verdict, as rows say it


@dataclass
class JudgeCheckOptions:
    """The command's own options (``judge_check.KEY=VALUE``); the judge is the run's ``judge``."""

    items_file: str | None = None  # sanity items YAML; None: dynalign/data/judge_sanity.yaml
    limit: int | None = None  # judge N items, the aspects taken in turn; None: all of them
    pairwise: bool = True  # also compare better with worse in both orders (judge_pairs)
    bootstrap_samples: int = 1000  # resamples behind each 95% interval
    out: str | None = None  # directory for judge_check.json / .md; None: Hydra's run dir

    def validate(self) -> JudgeCheckOptions:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"{KEY}.limit", f"must be >= 1 or null for all items (got {self.limit})")
        if self.bootstrap_samples < 1:
            raise ConfigError(f"{KEY}.bootstrap_samples", f"must be >= 1 (got {self.bootstrap_samples})")
        return self


@dataclass
class JudgeCheckRun(TrainConfig):
    """The tree of ``conf/judge_check.yaml``: the training tree plus the ``judge_check`` node, left
    untyped here and typed by :func:`check_options` (a bad value then exits 2 naming its key)."""

    judge_check: dict[str, Any] = field(default_factory=dict)


def register_schema() -> None:
    """Make ``train_schema`` the widened :class:`JudgeCheckRun` in this process, so that
    ``conf/judge_check.yaml`` (``defaults: [train, _self_]``) may add its node; call
    ``register_configs()`` to restore the training schema."""
    register_configs()
    ConfigStore.instance().store(name="train_schema", node=JudgeCheckRun)


@dataclass(frozen=True)
class SanityItem:
    id: str
    aspect: str  # the CA aspect the contrast mainly targets
    domain: str
    prompt: str
    better: str
    worse: str
    why: str = ""  # what makes `better` better


# ------------------------------------------------------------------ config and items


def check_options(values: Any) -> JudgeCheckOptions:
    """The validated options of a ``judge_check`` node (a ConfigError names ``judge_check.<key>``)."""
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JudgeCheckOptions), values or {}))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or "<node>"
        raise ConfigError(f"{KEY}.{key}", str(err).splitlines()[0]) from None
    assert isinstance(obj, JudgeCheckOptions)
    return obj.validate()


def load_items(path: str | Path | None = None, limit: int | None = None) -> list[SanityItem]:
    """The items of a sanity file (None: the shipped one); ``limit``: the :func:`balanced_subset`."""
    path = Path(path or SANITY_FILE)
    try:
        entries = yaml.safe_load(path.read_text(encoding="utf-8"))["items"]
        items = [SanityItem(**{k: str(v) for k, v in entry.items()}) for entry in entries]
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"{KEY}.items_file", f"{path}: needs a list 'items' of {{id, aspect, domain, "
                          f"prompt, better, worse, why}} ({type(err).__name__}: {err})") from None
    if not items:
        raise ConfigError(f"{KEY}.items_file", f"{path}: no items")
    return balanced_subset(items, limit)


def balanced_subset(items: Sequence[SanityItem], limit: int | None) -> list[SanityItem]:
    """All items (None), or the first ``limit`` taking the aspects in turn, each in file order, so
    a subset covers the aspects alike (and keeps the shipped set's length balance)."""
    if limit is None:
        return list(items)
    queues: dict[str, list[SanityItem]] = {}
    for item in items:
        queues.setdefault(item.aspect, []).append(item)
    depth = max(len(q) for q in queues.values())
    return [q[k] for k in range(depth) for q in queues.values() if k < len(q)][:limit]


# ------------------------------------------------------------------ statistics (pure)


def pointwise_outcome(better: float, worse: float) -> str:
    """``correct`` if better > worse, ``wrong`` if <, ``tie`` if equal, ``failed`` if either is NaN."""
    if math.isnan(better) or math.isnan(worse):
        return FAILED
    return CORRECT if better > worse else WRONG if better < worse else TIE


def pointwise_outcomes(better: Sequence[float], worse: Sequence[float]) -> list[str]:
    """:func:`pointwise_outcome` of every item (its better and worse answer's scores)."""
    return [pointwise_outcome(b, w) for b, w in zip(better, worse, strict=True)]


def length_outcomes(better: Sequence[str], worse: Sequence[str]) -> list[str]:
    """The outcomes of a judge that always prefers the longer answer (in characters)."""
    return pointwise_outcomes([float(len(b)) for b in better], [float(len(w)) for w in worse])


def accuracy(outcomes: Sequence[str]) -> float:
    """(correct + 0.5 ties) / decided items; failed ones left out; NaN if none decided."""
    points = [POINTS[o] for o in outcomes if o != FAILED]
    return sum(points) / len(points) if points else math.nan


def accuracy_summary(outcomes: Sequence[str], aspects: Sequence[str], *, samples: int = 1000,
                     seed: int = 0) -> dict[str, Any]:
    """Accuracy with its bootstrap 95% interval, the counts behind it and accuracy per aspect."""
    counts = Counter(outcomes)
    low, high = bootstrap_ci([POINTS[o] for o in outcomes if o != FAILED], samples=samples, seed=seed)
    by_aspect: dict[str, list[str]] = {}
    for outcome, aspect in zip(outcomes, aspects, strict=True):
        by_aspect.setdefault(aspect, []).append(outcome)
    return {
        "accuracy": accuracy(outcomes), "ci_low": low, "ci_high": high,
        "correct": counts[CORRECT], "ties": counts[TIE], "wrong": counts[WRONG], "failed": counts[FAILED],
        "decided": len(outcomes) - counts[FAILED], "total": len(outcomes),
        "failure_rate": counts[FAILED] / len(outcomes) if outcomes else math.nan,
        "aspects": {a: {"accuracy": accuracy(o), "decided": len(o) - o.count(FAILED), "total": len(o)}
                    for a, o in by_aspect.items()},
    }


def pairwise_check(better_first: Sequence[str | None], worse_first: Sequence[str | None],
                   aspects: Sequence[str], *, samples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """:func:`accuracy_summary` of the pairs (``better`` is side ``a``; its votes are ``a | b |
    tie`` per order) plus ``agreement``: share of the pairs with both verdicts whose two orders
    agreed (1.0: no position bias seen; a disagreement counts as a tie in the accuracy)."""
    outcomes = [PAIR_OUTCOMES[pair_outcome(a, b)] for a, b in zip(better_first, worse_first, strict=True)]
    summary = accuracy_summary(outcomes, aspects, samples=samples, seed=seed)
    summary["agreement"] = pairwise_summary(better_first, worse_first, samples=0)["order_agreement"]
    return summary


# ------------------------------------------------------------------ the check


def load_judge(config: TrainConfig) -> Judge:
    """The run's judge, built as training builds it; the policy loads only when it judges."""
    from dynalign.judge import build_judge, resolve_judge_model
    from dynalign.models import load_hf_sampler

    def sampler(path: str | None = None):
        return load_hf_sampler(config.model, path=path, batch_size=config.rollout.batch_size)

    policy = sampler() if config.judge.source != "external" else None  # self / frozen: the policy itself
    return build_judge(config.judge, policy, frozen_sampler=policy,
                       make_sampler=lambda ext: sampler(resolve_judge_model(ext, config.model)))


def measure(judge: Judge, items: Sequence[SanityItem], options: JudgeCheckOptions, *, chunk: int,
            seed: int = 0) -> dict[str, Any]:
    """Pointwise (and pairwise) results of ``judge`` on ``items``, with per-item rows."""
    from dynalign.eval.judging import judge_pairs_in_chunks, score_in_chunks

    prompts, better, worse = ([getattr(i, f) for i in items] for f in ("prompt", "better", "worse"))
    aspects, n = [i.aspect for i in items], len(items)
    scored = score_in_chunks(judge, prompts + prompts, better + worse, chunk=chunk, desc="pointwise")
    rewards = scored.rewards.tolist()
    outcomes = pointwise_outcomes(rewards[:n], rewards[n:])
    pointwise = accuracy_summary(outcomes, aspects, samples=options.bootstrap_samples, seed=seed)
    pointwise["mean_gap"] = nan_mean(np.subtract(rewards[:n], rewards[n:]))  # better - worse
    pointwise["length_only_accuracy"] = accuracy(length_outcomes(better, worse))
    rows = [{"id": item.id, "aspect": item.aspect, "outcome": outcomes[k],
             "better_score": rewards[k], "worse_score": rewards[n + k],
             "better_reason": scored.reasons[k], "worse_reason": scored.reasons[n + k],
             "better_chars": len(item.better), "worse_chars": len(item.worse)}
            for k, item in enumerate(items)]
    pairwise = None
    if options.pairwise:
        pairs = judge_pairs_in_chunks(judge, prompts, better, worse, chunk=chunk)
        votes = [(order_vote(p.a_first), order_vote(p.b_first)) for p in pairs]
        pairwise = pairwise_check([a for a, _ in votes], [b for _, b in votes], aspects,
                                  samples=options.bootstrap_samples, seed=seed + 1)
        for row, pair, (a, b) in zip(rows, pairs, votes, strict=True):
            row["pairwise"] = {"better_shown_first": WINNER[a], "worse_shown_first": WINNER[b],
                               "outcome": PAIR_OUTCOMES[pair_outcome(a, b)], "reasons": list(pair.reasons)}
    return {"pointwise": pointwise, "pairwise": pairwise, "rows": rows}


def header_line(config: TrainConfig, items: int) -> str:
    """``Judge check: model M, judge SOURCE, mode MODE, rubric R, N items``."""
    judge = config.judge
    external = f" ({judge.external.backend}: {judge.external.model})" if judge.source == "external" else ""
    return (f"Judge check: model {config.model.name_or_path}, judge {judge.source}{external}, "
            f"mode {judge.mode}, rubric {judge.rubric.name}, {items} items")


def _num(value: Any, fmt: str = ".3f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def render_markdown(results: dict[str, Any]) -> str:
    """The header line, the headline table (length-only judge as reference) and accuracy per aspect."""
    checks = [(name, results[name]) for name in ("pointwise", "pairwise") if results[name]]
    lines = [results["header"], "", "| check | accuracy | 95% CI | decided/total | failure rate | note |",
             "|---|---|---|---|---|---|"]
    for name, s in checks:
        note = (f"mean gap {_num(s['mean_gap'], '+.3f')}" if name == "pointwise"
                else f"order agreement {_num(s['agreement'], '.2f')}")
        lines.append(f"| {name} | {_num(s['accuracy'])} | [{_num(s['ci_low'])}, {_num(s['ci_high'])}] | "
                     f"{s['decided']}/{s['total']} | {_num(s['failure_rate'], '.1%')} | {note} |")
    length_only = _num(results["pointwise"]["length_only_accuracy"])
    lines += [f"| length only | {length_only} | | | | the longer answer wins |", "",
              "| aspect | " + " | ".join(f"{name} (decided)" for name, _ in checks) + " |",
              "|---" * (len(checks) + 1) + "|"]
    for aspect in results["pointwise"]["aspects"]:
        cells = [f"{_num(s['aspects'][aspect]['accuracy'])} ({s['aspects'][aspect]['decided']})"
                 for _, s in checks]
        lines.append(f"| {aspect} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def prepare(cfg: DictConfig) -> tuple[TrainConfig, JudgeCheckOptions, list[SanityItem]]:
    """The validated config, options and items; exit status 2 naming the key on a bad value."""
    values = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(values, dict)
    options = values.pop(KEY, None)
    config = validated_config(OmegaConf.create(values))
    try:
        checked = check_options(options)
        return config, checked, load_items(checked.items_file, checked.limit)
    except ConfigError as err:
        print(f"dynalign: invalid config: {err}", file=sys.stderr)
        raise SystemExit(2) from None


@hydra.main(config_path="../conf", config_name="judge_check", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    config, options, items = prepare(cfg)
    from dynalign.eval.report import jsonable  # after the cheap checks: models load below
    from dynalign.io import atomic_write_text

    header = header_line(config, len(items))
    print(f"dynalign: {header}", file=sys.stderr)
    judge = load_judge(config)
    try:
        measured = measure(judge, items, options, chunk=max(1, config.rollout.batch_size), seed=config.seed)
    finally:
        judge.close()
    results = {"header": header, "model": config.model.name_or_path, "judge": asdict(config.judge),
               "items_file": str(options.items_file or SANITY_FILE), "options": asdict(options),
               "seed": config.seed, **measured}
    out_dir = Path(options.out or HydraConfig.get().runtime.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(results)
    atomic_write_text(out_dir / "judge_check.json", json.dumps(jsonable(results), indent=2) + "\n")
    atomic_write_text(out_dir / "judge_check.md", markdown)
    print(markdown)
    print(f"dynalign: judge check written to {out_dir}")
    return results


if __name__ == "__main__":
    register_schema()
    run_main(main)
