"""``build_judge``: a :class:`Judge` from ``cfg.judge`` and the samplers the loop owns.

Who judges is picked by name (``judge.source``, then ``judge.external.backend`` from the
registry of :mod:`dynalign.judge.external`):

- ``self``: the current policy, through the sampler that generated the candidates
  (call the judge before the update);
- ``frozen``: the policy as the iteration began (the base model in the first iteration,
  then the export ``iter_<k>/``); the loop loads that model whole and passes its sampler
  as ``frozen_sampler``, anew each iteration;
- ``external``: ``hf`` / ``vllm``, another local model whose sampler the loop builds
  from ``judge.external.model`` (``external_sampler``, or ``make_sampler(cfg.external)``);
  ``openai``, an OpenAI-compatible endpoint built from ``judge.external``.
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from dynalign.config import ConfigError, ExternalJudgeConfig, JudgeConfig
from dynalign.judge.backends import JudgeBackend, SamplerBackend
from dynalign.judge.external import ExternalContext, build_external_backend
from dynalign.judge.rubric import Rubric
from dynalign.judge.scoring import Judge
from dynalign.rollout.base import Sampler, SamplingParams

SamplerFactory = Callable[[ExternalJudgeConfig], Sampler]


def _self_source(cfg, policy_sampler, frozen_sampler, external_sampler, make_sampler) -> JudgeBackend:
    if policy_sampler is None:
        raise ConfigError("judge.source", "source=self needs the policy sampler")
    return SamplerBackend(policy_sampler)


def _frozen_source(cfg, policy_sampler, frozen_sampler, external_sampler, make_sampler) -> JudgeBackend:
    if frozen_sampler is None:
        raise ConfigError("judge.source", "source=frozen needs frozen_sampler: a sampler of the "
                                          "iteration's starting policy or of the base model")
    return SamplerBackend(frozen_sampler, owns_sampler=True)  # loaded for this judge, anew each iteration


def _external_source(cfg, policy_sampler, frozen_sampler, external_sampler, make_sampler) -> JudgeBackend:
    context = ExternalContext(sampler=external_sampler, make_sampler=make_sampler)
    return build_external_backend(cfg.external, context)


# Judge sources by name (judge.source).
JUDGE_SOURCE_BUILDERS: dict[str, Callable[..., JudgeBackend]] = {
    "self": _self_source,
    "frozen": _frozen_source,
    "external": _external_source,
}


def judge_config(cfg: JudgeConfig | DictConfig | dict) -> JudgeConfig:
    """A validated :class:`JudgeConfig` from the dataclass or a composed ``cfg.judge`` node."""
    if not isinstance(cfg, JudgeConfig):
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JudgeConfig), cfg))
        assert isinstance(obj, JudgeConfig)
        cfg = obj
    cfg.validate("judge")
    return cfg


def build_judge(cfg: JudgeConfig | DictConfig | dict, policy_sampler: Sampler | None = None, *,
                frozen_sampler: Sampler | None = None, external_sampler: Sampler | None = None,
                make_sampler: SamplerFactory | None = None) -> Judge:
    """The judge ``cfg`` (``cfg.judge`` of the run) describes, backed by the right model."""
    cfg = judge_config(cfg)
    backend = JUDGE_SOURCE_BUILDERS[cfg.source](cfg, policy_sampler, frozen_sampler, external_sampler,
                                                make_sampler)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    return Judge(Rubric.from_config(cfg.rubric, "judge.rubric"), backend, mode=cfg.mode,
                 num_samples=cfg.num_samples, params=params)
