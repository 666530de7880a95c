"""``python -m dynalign.plan``: will this launch fit? Memory per rank, before anything loads.

It composes the training config (``conf/train.yaml``, the same overrides as
``python -m dynalign.train``), sizes the model from its ``config.json`` (the embedded models,
a local directory, the Hugging Face cache) or from the known presets' shapes, and prints
each term of one rank's memory (:mod:`dynalign.memory`) against what the machine has::

    python -m dynalign.plan model=llama3_8b plan.device_memory_gib=80
    python -m dynalign.plan model=llama3_8b model.lora.enabled=true plan.world_size=8

The world is ``plan.world_size`` (else the launcher's ``WORLD_SIZE``); the accelerator's
memory ``plan.device_memory_gib`` (else CUDA's; a CPU run plans against host RAM). A plan
that does not fit exits with status 2 and one line naming the overrides that would make it
fit, ranked by the memory each saves; ``plan.enforce=false`` warns instead. Training checks
the same plan before it loads anything (:func:`check_launch`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from dynalign.cli import run_main
from dynalign.config import ConfigError, ModelConfig, TrainConfig, register_configs, to_train_config
from dynalign.memory import (
    CHARS_PER_TOKEN,
    DEVICE,
    DTYPE_BYTES,
    HOST,
    GiB,
    Launch,
    ModelShape,
    Term,
    disk_bytes,
    known_architecture,
    launch_terms,
    lora_targets,
    peak,
    shape_from_config,
    vllm_max_model_len,
    vllm_share,
)
from dynalign.memory import fmt_bytes as fmt

register_configs()

MODEL_KEY = "model.name_or_path"
HOST_RAM = "host RAM"  # the one memory of a CPU run


# ------------------------------------------------------------------ the model's shape


def model_shape(model: ModelConfig, key: str = MODEL_KEY) -> ModelShape:
    """The shape of ``model``, read without loading it: the tiny model's spec, a ``config.json``
    (an embedded model's directory, a local one, the hub cache) or the known architectures.

    A local directory's parameters are counted from its safetensors headers. A name none of
    these knows is a :class:`ConfigError` naming ``key``.
    """
    name = model.name_or_path
    if name == "tiny":
        spec = {f.name: getattr(model.tiny, f.name) for f in dataclasses.fields(model.tiny)}
        return shape_from_config({**spec, "tie_word_embeddings": True}, "model.tiny")  # dynalign.tiny_model
    directory = _model_dir(name)
    config = directory / "config.json" if directory is not None else _hub_cached_config(name)
    if config is not None and config.is_file():
        try:
            counted = safetensors_params(config.parent)
            return shape_from_config(json.loads(config.read_text()), str(config), counted)
        except (KeyError, ValueError, struct.error) as err:
            raise ConfigError(key, f"{config}: not a decoder the plan can size ({err!r})") from None
    known = known_architecture(name)
    if known is None:
        raise ConfigError(key, f"no config.json for {name!r} (not a local directory, not in the Hugging "
                               "Face cache) and not a known architecture, so the plan cannot size it")
    return known


def _model_dir(name: str) -> Path | None:
    if name == "gemma3_270m":
        from dynalign.gemma_model import gemma_dir

        return gemma_dir()
    path = Path(name).expanduser()
    return path if path.is_dir() else None


def _hub_cached_config(name: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid repo id: nothing cached under it
        return None
    return Path(cached) if isinstance(cached, str) else None


def safetensors_params(directory: Path) -> tuple[int, int] | None:
    """(parameters, largest tensor) from the headers of ``directory``'s safetensors files; None
    when it has none. A header is an 8-byte little-endian length and that much JSON."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    total = largest = 0
    for file in files:
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                count = math.prod(info["shape"])
                total, largest = total + count, max(largest, count)
    return total, largest


def judge_prompt_tokens(cfg: TrainConfig) -> int:
    """Tokens of the judge prompt around the user prompt and the answer (system prompt, rubric,
    instructions), counted as :data:`~dynalign.memory.CHARS_PER_TOKEN` characters a token."""
    from dynalign.judge.prompt import render_judge_prompt

    messages, _ = render_judge_prompt(cfg.judge.rubric, "", "", nonce="0" * 8,
                                      reasoning=cfg.judge.mode == "generate")
    return math.ceil(sum(len(m["content"]) for m in messages) / CHARS_PER_TOKEN)


# ------------------------------------------------------------------ the machine


@dataclass(frozen=True)
class Machine:
    """What one node offers, and where the figures come from."""

    device_bytes: int  # per rank
    host_bytes: int  # per node
    accelerator: bool
    device_source: str
    host_source: str


def detect_machine(cfg: TrainConfig) -> Machine:
    """``plan.device_memory_gib`` / ``plan.host_memory_gib``, else this machine's: the CUDA device
    of this rank (``LOCAL_RANK``) or, without CUDA, host RAM (a CPU run: one memory for all)."""
    p = cfg.plan
    if p.host_memory_gib is not None:
        host, host_source = int(p.host_memory_gib * GiB), "plan.host_memory_gib"
    else:
        import psutil

        host, host_source = int(psutil.virtual_memory().total), "this machine's RAM"
    if p.device_memory_gib is not None:
        return Machine(int(p.device_memory_gib * GiB), host, True, "plan.device_memory_gib", host_source)
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0")))
        return Machine(int(props.total_memory), host, True, props.name, host_source)
    return Machine(host, host, False, "none: a CPU run", host_source)


# ------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Check:
    """One memory the plan must fit into: the device's, or a rank's share of the host's."""

    where: str
    need: int
    phase: str  # when the peak is reached
    available: int

    @property
    def fits(self) -> bool:
        return self.need <= self.available


@dataclass(frozen=True)
class LaunchPlan:
    """Every term of one rank's memory under a config, and whether they fit the machine."""

    cfg: TrainConfig
    world_size: int
    shape: ModelShape
    machine: Machine
    terms: list[Term]
    checks: list[Check]
    vllm_shortfall: int  # bytes vLLM's share lacks for one max_model_len sequence
    notes: tuple[str, ...] = ()  # what the plan leaves out

    @property
    def fits(self) -> bool:
        return all(c.fits for c in self.checks) and self.vllm_shortfall == 0

    def check(self, where: str) -> Check:
        return next(c for c in self.checks if c.where == where)


@dataclass(frozen=True)
class Sizing:
    """What a plan needs besides the config and the world: read once, reused for every variant."""

    shape: ModelShape
    machine: Machine
    judge_tokens: int
    judge_shape: ModelShape | None = None
    notes: tuple[str, ...] = ()


def make_plan(cfg: TrainConfig, world_size: int, sizing: Sizing) -> LaunchPlan:
    """The terms of ``cfg`` on ``world_size`` ranks, checked against the machine (pure)."""
    machine, shape = sizing.machine, sizing.shape
    rpn = ranks_per_node(cfg, world_size)
    launch = Launch(world_size, machine.device_bytes, machine.accelerator, sizing.judge_tokens)
    terms = launch_terms(cfg, shape, launch, sizing.judge_shape)
    host_share = machine.host_bytes // rpn
    if machine.accelerator:
        checks = [Check(DEVICE, *peak(terms, (DEVICE,)), machine.device_bytes),
                  Check(HOST, *peak(terms, (HOST,)), host_share)]
    else:
        checks = [Check(HOST_RAM, *peak(terms, (DEVICE, HOST)), host_share)]
    shortfall = 0
    if machine.accelerator and cfg.rollout.backend == "vllm":
        v = cfg.rollout.vllm
        shortfall = vllm_share(shape, DTYPE_BYTES[cfg.model.dtype], machine.device_bytes,
                               v.gpu_memory_utilization, v.tensor_parallel_size,
                               vllm_max_model_len(cfg, shape)).shortfall
    return LaunchPlan(cfg, world_size, shape, machine, terms, checks, shortfall, sizing.notes)


def ranks_per_node(cfg: TrainConfig, world_size: int) -> int:
    """``plan.ranks_per_node``, else the launcher's ``LOCAL_WORLD_SIZE``, else the whole world."""
    local = cfg.plan.ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or world_size
    return max(1, min(local, world_size))


def size_launch(cfg: TrainConfig) -> Sizing:
    """Read the model's shape, the judge prompt's length and the machine (a :class:`ConfigError`
    naming ``model.name_or_path`` when the model cannot be sized)."""
    shape = model_shape(cfg.model)
    notes = []
    judge_shape = None
    ext = cfg.judge.external
    if cfg.judge.source == "external" and ext.backend == "hf":
        try:
            judge_shape = model_shape(replace(cfg.model, name_or_path=ext.model), "judge.external.model")
        except ConfigError as err:
            notes.append(f"the external judge is not counted ({err.message})")
    elif cfg.judge.source == "external" and ext.backend == "vllm":
        notes.append("the external judge's vLLM engine is not counted")
    if cfg.model.lora.enabled:
        known = lora_targets(shape)
        unknown = sorted(set(cfg.model.lora.target_modules) - set(known))
        if unknown:
            notes.append(f"LoRA on {', '.join(unknown)} is not counted (only {', '.join(known)})")
    return Sizing(shape, detect_machine(cfg), judge_prompt_tokens(cfg), judge_shape, tuple(notes))


# ------------------------------------------------------------------ what would make it fit


@dataclass(frozen=True)
class Change:
    """An override and what it does to a plan that does not fit."""

    override: str
    saves: int  # bytes less needed where the plan overflows (and vLLM's missing KV cache)
    fits: bool


Option = tuple[str, TrainConfig, int]  # (override, changed config, world size)


def changes(plan: LaunchPlan, sizing: Sizing) -> list[Change]:
    """The overrides that reduce what overflows, most saved first; of a knob with several values
    (a batch size, vLLM's share, the GPUs) the first that fits, else the one that saves most."""
    found = []
    context = sizing.judge_tokens + plan.cfg.grpo.max_prompt_length + plan.cfg.grpo.max_completion_length
    for options in knobs(plan.cfg, plan.world_size, plan.machine.accelerator,
                         plan.vllm_shortfall > 0, vllm_max_model_len(plan.cfg, plan.shape), context):
        tried = [(override, make_plan(cfg, world, sizing)) for override, cfg, world in options]
        tried = [(o, p) for o, p in tried if p.vllm_shortfall <= plan.vllm_shortfall]
        scored = [Change(o, saved(plan, p), p.fits) for o, p in tried]
        best = next((c for c in scored if c.fits), max(scored, key=lambda c: c.saves, default=None))
        if best is not None and best.saves > 0:
            found.append(best)
    return sorted(found, key=lambda c: -c.saves)


def saved(before: LaunchPlan, after: LaunchPlan) -> int:
    """Bytes less needed in each memory ``before`` overflows, plus vLLM's KV cache regained."""
    less = sum(c.need - after.check(c.where).need for c in before.checks if not c.fits)
    return less + before.vllm_shortfall - after.vllm_shortfall


def knobs(cfg: TrainConfig, world: int, accelerator: bool, vllm_short: bool, vllm_context: int,
          judge_context: int) -> Iterator[list[Option]]:
    """Each knob that can lower one rank's memory (or give vLLM the KV cache it lacks), as options
    in order of preference. ``judge_context``: the tokens a self-judge prompt needs in vLLM."""
    m, ds, g, r = cfg.model, cfg.deepspeed, cfg.grpo, cfg.rollout
    if not m.lora.enabled:
        yield [_set(cfg, world, "model.lora.enabled", True)]
    if ds.stage < 3:
        yield [_set(cfg, world, "deepspeed.stage", 3)]
    if ds.stage >= 1 and ds.offload_optimizer == "none":
        yield [_set(cfg, world, "deepspeed.offload_optimizer", "cpu")]
    if ds.stage == 3 and ds.offload_param == "none":
        yield [_set(cfg, world, "deepspeed.offload_param", "cpu")]
    if not m.gradient_checkpointing:
        yield [_set(cfg, world, "model.gradient_checkpointing", True)]
    if accelerator and m.dtype == "float32":
        yield [_set(cfg, world, "model.dtype", "bfloat16")]
    per_rank = g.sequences_per_step // world
    yield [_set(cfg, world, "grpo.micro_batch_size", k) for k in range(g.micro_batch_size - 1, 0, -1)
           if per_rank % k == 0]
    if r.backend == "hf":
        yield [_set(cfg, world, "rollout.batch_size", k) for k in _halvings(r.batch_size)]
    elif accelerator:
        if not r.vllm.enable_sleep_mode:
            yield [_set(cfg, world, "rollout.vllm.enable_sleep_mode", True)]
        share = r.vllm.gpu_memory_utilization  # vLLM short of KV cache: more; else less, if vLLM still fits
        steps = [k / 100 for k in range(5, 100, 5)]
        shares = [u for u in steps if u > share] if vllm_short else [u for u in reversed(steps) if u < share]
        yield [_set(cfg, world, "rollout.vllm.gpu_memory_utilization", u) for u in shares]
        if vllm_short:
            yield [_set(cfg, world, "rollout.vllm.max_model_len", n) for n in _halvings(vllm_context)
                   if n >= judge_context]
    if g.beta > 0 and not m.lora.enabled:
        yield [_set(cfg, world, "grpo.beta", 0.0)]
    if cfg.judge.source == "frozen":
        yield [_set(cfg, world, "judge.source", "self")]
    if accelerator:
        yield [(f"plan.world_size={w} ({w} GPUs)", cfg, w) for w in (world * 2 ** k for k in range(1, 7))]


def _halvings(value: int) -> list[int]:
    out = []
    while value > 1:
        value //= 2
        out.append(value)
    return out


def _set(cfg: TrainConfig, world: int, key: str, value: Any) -> Option:
    """``cfg`` with the dotted ``key`` set to ``value``, as the override that does it."""
    group, *path, name = key.split(".")
    parents = [getattr(cfg, group)]
    for part in path:
        parents.append(getattr(parents[-1], part))
    node: Any = replace(parents[-1], **{name: value})
    for parent, part in zip(reversed(parents[:-1]), reversed(path), strict=True):
        node = replace(parent, **{part: node})
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return f"{key}={text}", replace(cfg, **{group: node}), world


# ------------------------------------------------------------------ output


def render(plan: LaunchPlan) -> str:
    """The plan as a table: every term of one rank, then each memory's peak against what it has."""
    lines = [*header(plan), "", f"  {'term':<52} {'per rank':>11}  {'where':<6}  when"]
    lines += [f"  {t.name:<52} {fmt(t.bytes):>11}  {t.where:<6}  {t.when}" for t in plan.terms if t.bytes]
    lines.append("")
    for c in plan.checks:
        verdict = "fits" if c.fits else "DOES NOT FIT"
        lines.append(f"  {c.where + ' peak':<16} {fmt(c.need):>11} ({c.phase}) of {fmt(c.available)}: "
                     + verdict)
    if plan.vllm_shortfall:
        lines.append(f"  vLLM's share lacks {fmt(plan.vllm_shortfall)} of KV cache for one "
                     f"{vllm_max_model_len(plan.cfg, plan.shape)}-token sequence: DOES NOT FIT")
    return "\n".join(lines + ["", disk_line(plan)] + [f"  note: {note}" for note in plan.notes])


def disk_line(plan: LaunchPlan) -> str:
    """What the run writes to its directory: checkpoints (with the optimizer) and exports."""
    cfg, disk = plan.cfg, disk_bytes(plan.cfg, plan.shape)
    exports = (f", exports {fmt(disk.export)} each ({cfg.iterations}: {fmt(disk.exports)})"
               if disk.exports else "")
    end = ("checkpoint_optimizer_at_end=false drops" if cfg.checkpoint_optimizer_at_end else "dropped")
    end = f"; {end} the checkpoints' DeepSpeed states when the run ends"
    return (f"  disk: a checkpoint {fmt(disk.checkpoint)} (checkpoints_to_keep={cfg.checkpoints_to_keep}: "
            f"{fmt(disk.kept)}){exports}{end}")


def header(plan: LaunchPlan) -> list[str]:
    """What was planned: the model, the training setup, the machine."""
    cfg, machine, ds = plan.cfg, plan.machine, plan.cfg.deepspeed
    offload = "".join(f", {what} offloaded" for what, device in (("optimizer", ds.offload_optimizer),
                                                               ("parameters", ds.offload_param))
                      if device != "none")
    tuning = f"LoRA r={cfg.model.lora.r}" if cfg.model.lora.enabled else "full fine-tuning"
    rpn = ranks_per_node(cfg, plan.world_size)
    if machine.accelerator:
        memory = (f"device {fmt(machine.device_bytes)} ({machine.device_source}), "
                  f"host {fmt(machine.host_bytes)} per node ({machine.host_source})")
    else:
        memory = (f"a CPU run, every term in host RAM: {fmt(machine.host_bytes)} per node "
                  f"({machine.host_source})")
    return [f"dynalign launch plan: {cfg.model.name_or_path}, {count(plan.shape.num_params)} parameters "
            f"({plan.shape.source})",
            f"  {cfg.model.dtype}, {tuning}, ZeRO-{ds.stage}{offload}; {plan.world_size} rank(s), "
            f"{rpn} per node; rollout={cfg.rollout.backend}, judge {cfg.judge.source} ({cfg.judge.mode})",
            f"  memory: {memory}"]


def count(n: int) -> str:
    """A parameter count: 8.03 B, 268 M, 427 K."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return str(n)


def shortage(plan: LaunchPlan) -> str:
    """What overflows, in words."""
    parts = [f"the {c.where} needs {fmt(c.need)} per rank at its peak ({c.phase}), {fmt(c.available)} "
             "available" for c in plan.checks if not c.fits]
    if plan.vllm_shortfall:
        v = plan.cfg.rollout.vllm
        tokens = vllm_max_model_len(plan.cfg, plan.shape)
        parts.append(f"vLLM's share (rollout.vllm.gpu_memory_utilization={v.gpu_memory_utilization}) lacks "
                     f"{fmt(plan.vllm_shortfall)} for the KV cache of one {tokens}-token sequence "
                     "(rollout.vllm.max_model_len)")
    return "; ".join(parts)


def refusal(plan: LaunchPlan, found: list[Change]) -> str:
    """One line: what overflows and the overrides that help, most saved first."""
    fixes = ", ".join(f"{c.override} (-{fmt(c.saves)}{', fits' if c.fits else ''})" for c in found)
    advice = f"change, by memory saved: {fixes}" if fixes else "no single override found that helps"
    return f"launch plan does not fit: {shortage(plan)}. To fit, {advice}; plan.enforce=false runs it anyway"


def summary(plan: LaunchPlan) -> str:
    """One line for a plan that fits."""
    peaks = ", ".join(f"{fmt(c.need)} of {fmt(c.available)} {c.where}" for c in plan.checks)
    return (f"dynalign: launch plan fits: {peaks} per rank at the peak "
            "(python -m dynalign.plan with the same overrides shows every term)")


# ------------------------------------------------------------------ entry points


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def enforce(plan: LaunchPlan, sizing: Sizing) -> None:
    """Exit with status 2 and one line when ``plan`` does not fit; warn under ``plan.enforce=false``."""
    if plan.fits:
        return
    message = refusal(plan, changes(plan, sizing))
    if plan.cfg.plan.enforce:
        if _main_process():
            print(f"dynalign: {message}", file=sys.stderr)
        raise SystemExit(2)
    if _main_process():
        print(f"dynalign: warning: {message.replace('; plan.enforce=false runs it anyway', '')}; "
              "going on (plan.enforce=false)", file=sys.stderr)


def check_launch(cfg: TrainConfig) -> LaunchPlan | None:
    """The training run's plan for the launcher's world: one line when it fits, else the table
    and the refusal (exit status 2) before anything loads. A model the plan cannot size is
    said once and not checked."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        sizing = size_launch(cfg)
    except ConfigError as err:
        if _main_process():
            print(f"dynalign: launch plan skipped: {err}")
        return None
    plan = make_plan(cfg, world, sizing)
    if _main_process():
        print(summary(plan) if plan.fits else render(plan))
    enforce(plan, sizing)
    return plan


def planned_config(cfg: DictConfig) -> tuple[TrainConfig, int]:
    """The validated config for ``plan.world_size`` ranks (else the launcher's), or exit 2 naming the key."""
    world = int(OmegaConf.select(cfg, "plan.world_size") or os.environ.get("WORLD_SIZE", "1"))
    try:
        return to_train_config(cfg, world), world
    except ConfigError as err:
        print(f"dynalign: invalid config: {err}", file=sys.stderr)
        raise SystemExit(2) from None


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    config, world = planned_config(cfg)
    try:
        sizing = size_launch(config)
    except ConfigError as err:
        print(f"dynalign: invalid config: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    plan = make_plan(config, world, sizing)
    print(render(plan))
    enforce(plan, sizing)


# A plan writes nothing: no run directory, no saved config, no log file.
QUIET_HYDRA = ("hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=none",
               "hydra/hydra_logging=none")


def quiet_argv(argv: list[str]) -> list[str]:
    """``argv`` with :data:`QUIET_HYDRA` before the user's first override (Hydra takes its overrides
    as one run of positional arguments: after ``--cfg job``, before a later one), so theirs win."""
    first = next((i for i, arg in enumerate(argv[1:], 1) if "=" in arg and not arg.startswith("-")), 1)
    return [*argv[:first], *QUIET_HYDRA, *argv[first:]]


if __name__ == "__main__":
    sys.argv = quiet_argv(sys.argv)
    run_main(main)
