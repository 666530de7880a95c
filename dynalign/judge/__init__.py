"""The judge: rubrics, judge prompts, verdict parsing, scoring modes and judge sources.

A rubric (``conf/judge/*.yaml``) is rendered with the user prompt and one candidate into a
judge prompt carrying a per-call nonce; only a verdict tagged with that nonce, in the text
the judge generated, is parsed. ``Judge.score`` turns candidates into rewards (NaN when no
verdict parsed) in ``generate`` or ``logprob`` mode; ``build_judge`` picks who judges;
``judge_pairs`` compares two answers in both orders.
"""

from dynalign.judge.backends import JudgeBackend, OpenAIChatBackend, SamplerBackend, SlotDistributions
from dynalign.judge.external import (
    EXTERNAL_JUDGES,
    ExternalContext,
    build_external_backend,
    resolve_judge_model,
)
from dynalign.judge.factory import JUDGE_SOURCE_BUILDERS, build_judge
from dynalign.judge.logprob import ScoreSlots, expected_scores, score_slots, verdict_prefix
from dynalign.judge.pairwise import PairJudgement, choice_logprobs, judge_pairs
from dynalign.judge.parse import (
    BACKEND_ERROR,
    FAILURE_REASONS,
    NO_SCORE_LOGPROBS,
    OK,
    PARSE_FAILURES,
    ParsedVerdict,
    parse_failure_stats,
    parse_pairwise_verdict,
    parse_verdict,
)
from dynalign.judge.prompt import (
    format_verdict,
    render_judge_prompt,
    render_judge_prompts,
    render_pairwise_prompt,
)
from dynalign.judge.rubric import COMBINE_FUNCTIONS, Aspect, Rubric, load_rubric, shipped_rubrics
from dynalign.judge.scoring import SCORING_MODES, Judge, JudgeResult
from dynalign.judge.stats import judge_stats, length_correlations

__all__ = [
    "BACKEND_ERROR", "COMBINE_FUNCTIONS", "EXTERNAL_JUDGES", "FAILURE_REASONS", "JUDGE_SOURCE_BUILDERS",
    "NO_SCORE_LOGPROBS", "OK", "PARSE_FAILURES", "SCORING_MODES", "Aspect", "ExternalContext", "Judge",
    "JudgeBackend", "JudgeResult", "OpenAIChatBackend", "PairJudgement", "ParsedVerdict", "Rubric",
    "SamplerBackend", "ScoreSlots", "SlotDistributions", "build_external_backend", "build_judge",
    "choice_logprobs", "expected_scores", "format_verdict", "judge_pairs", "judge_stats",
    "length_correlations", "load_rubric", "resolve_judge_model",
    "parse_failure_stats", "parse_pairwise_verdict", "parse_verdict", "render_judge_prompt",
    "render_judge_prompts", "render_pairwise_prompt", "score_slots", "shipped_rubrics", "verdict_prefix",
]
