"""What the generator is asked to write: the taxonomy, the meta-prompt templates, the seed prompts.

All three are data (YAML under ``dynalign/data/``), loaded into small frozen dataclasses.
The functions here are pure: which cell and template call ``k`` uses depends only on
``(seed, iteration, k)``, and rendering a meta-prompt is plain ``str.format``, so any row's
meta-prompt can be rebuilt from its provenance.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from dynalign.runtime import step_seed

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
TAXONOMY_FILE = DATA_DIR / "ca_taxonomy.yaml"
TEMPLATES_FILE = DATA_DIR / "meta_prompts.yaml"
SEED_PROMPTS_FILE = DATA_DIR / "ca_seed_prompts.yaml"

PLACEHOLDERS = frozenset({"n", "domain", "domain_description", "task_type", "task_description",
                          "aspects", "aspect_guidance", "examples", "numbered_examples", "next_number"})
EXAMPLES_PER_META_PROMPT = 2  # seed prompts shown by templates that use {examples}
FORMATS = ("chat", "raw")


@dataclass(frozen=True)
class Cell:
    """One point of the taxonomy: what a generated prompt is about and what it should test."""

    domain: str
    task_type: str
    aspects: tuple[str, ...]


@dataclass(frozen=True)
class Taxonomy:
    name: str
    aspects: dict[str, str]  # aspect -> what a good answer must do for it
    aspect_sets: tuple[tuple[str, ...], ...]  # aspect focus of one prompt
    domains: dict[str, str]  # domain -> description
    task_types: dict[str, str]  # task type -> description

    @property
    def cells(self) -> tuple[Cell, ...]:
        """Every domain x task type x aspect set, in file order."""
        return tuple(Cell(d, t, a) for d in self.domains for t in self.task_types for a in self.aspect_sets)


@dataclass(frozen=True)
class Template:
    """One meta-prompt template.

    ``format`` says how the rendered text is sent: ``chat`` as one user message (rendered
    by the model's chat template: for instruction-tuned models), ``raw`` as plain text the
    model continues (for base models: a document whose next line is the next prompt; the
    completion is parsed as the continuation of the text's last line). ``stop`` adds
    stop strings to the calls of this template; ``endings`` (e.g. ``["?", "."]``) drops
    prompts that end with none of them (filter ``unfinished``: an item cut off by the token
    limit, or a line that is no request).
    """

    id: str
    text: str
    format: str = "chat"
    stop: tuple[str, ...] = ()
    endings: tuple[str, ...] = ()

    @property
    def raw(self) -> bool:
        return self.format == "raw"

    def fingerprint(self) -> dict:
        """What a resumed run must match: id and text, and the options that differ from the defaults."""
        out: dict = {"id": self.id, "text": self.text}
        if self.format != "chat":
            out["format"] = self.format
        if self.stop:
            out["stop"] = list(self.stop)
        if self.endings:
            out["endings"] = list(self.endings)
        return out


@dataclass(frozen=True)
class SeedPrompt:
    id: str
    prompt: str
    domain: str
    task_type: str
    aspects: tuple[str, ...]


class DataFileError(ValueError):
    """A taxonomy, template or seed-prompt file that cannot be used (the message names the file)."""


def _read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise DataFileError(f"{path}: cannot read ({err})") from None
    if not isinstance(data, dict):
        raise DataFileError(f"{path}: expected a mapping at the top level")
    return data


def load_taxonomy(path: str | Path | None = None) -> Taxonomy:
    """Load and check a taxonomy file (``None``: the shipped Collective Agency taxonomy; a bare
    name that is not a file here: that shipped file)."""
    path = resolve_data_file(path, TAXONOMY_FILE)
    data = _read_yaml(path)
    try:
        taxonomy = Taxonomy(
            name=str(data.get("name", path.stem)),
            aspects={str(k): str(v) for k, v in data["aspects"].items()},
            aspect_sets=tuple(tuple(str(a) for a in s) for s in data["aspect_sets"]),
            domains={str(k): str(v) for k, v in data["domains"].items()},
            task_types={str(k): str(v) for k, v in data["task_types"].items()},
        )
    except (KeyError, AttributeError, TypeError) as err:
        raise DataFileError(f"{path}: needs mappings aspects, domains, task_types and a list "
                            f"aspect_sets ({err!r})") from None
    for aspect_set in taxonomy.aspect_sets:
        unknown = set(aspect_set) - set(taxonomy.aspects)
        if not aspect_set or unknown:
            raise DataFileError(f"{path}: aspect set {list(aspect_set)} names unknown aspects "
                                f"{sorted(unknown)}; known: {sorted(taxonomy.aspects)}")
    if not (taxonomy.domains and taxonomy.task_types and taxonomy.aspect_sets):
        raise DataFileError(f"{path}: domains, task_types and aspect_sets must not be empty")
    return taxonomy


def resolve_data_file(path: str | Path | None, default: Path) -> Path:
    """``path`` as given; a bare file name that does not exist here is looked up among the
    shipped data files (``dynalign/data/``), so configs can say ``meta_prompts_base.yaml``."""
    if not path:
        return default
    path = Path(path)
    if not path.exists() and path.name == str(path) and (DATA_DIR / path).exists():
        return DATA_DIR / path
    return path


def _strings(value: object, what: str, path: Path, template_id: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise DataFileError(f"{path}: template {template_id!r}: {what} must be a list of non-empty strings")
    return tuple(value)


def _template(entry: object, path: Path) -> Template:
    if not isinstance(entry, dict) or "id" not in entry or "text" not in entry:
        raise DataFileError(f"{path}: every template needs an id and a text (got {entry!r:.80})")
    template_id = str(entry["id"])
    unknown = set(entry) - {"id", "text", "format", "stop", "endings"}
    if unknown:
        raise DataFileError(f"{path}: template {template_id!r} has unknown keys {sorted(unknown)}")
    fmt = str(entry.get("format") or "chat")
    if fmt not in FORMATS:
        raise DataFileError(f"{path}: template {template_id!r}: format must be one of {list(FORMATS)} "
                            f"(got {fmt!r})")
    return Template(id=template_id, text=str(entry["text"]), format=fmt,
                    stop=_strings(entry.get("stop"), "stop", path, template_id),
                    endings=_strings(entry.get("endings"), "endings", path, template_id))


def load_templates(path: str | Path | None = None, ids: Sequence[str] = ()) -> tuple[Template, ...]:
    """Load meta-prompt templates, keeping ``ids`` (in that order) when given.

    ``path`` None: the shipped chat templates; a bare name such as ``meta_prompts_base.yaml``
    that is not a file here: that shipped file (:func:`resolve_data_file`).
    """
    path = resolve_data_file(path, TEMPLATES_FILE)
    entries = _read_yaml(path).get("templates")
    if not isinstance(entries, list) or not entries:
        raise DataFileError(f"{path}: needs a non-empty list 'templates' of {{id, text}}")
    templates = {}
    for entry in entries:
        template = _template(entry, path)
        fields = {name for _, name, _, _ in string.Formatter().parse(template.text) if name is not None}
        if fields - PLACEHOLDERS:
            raise DataFileError(f"{path}: template {template.id!r} uses unknown placeholders "
                                f"{sorted(fields - PLACEHOLDERS)}; known: {sorted(PLACEHOLDERS)}")
        if template.id in templates:
            raise DataFileError(f"{path}: duplicate template id {template.id!r}")
        templates[template.id] = template
    if not ids:
        return tuple(templates.values())
    missing = [i for i in ids if i not in templates]
    if missing:
        raise DataFileError(f"{path}: unknown template ids {missing}; known: {sorted(templates)}")
    return tuple(templates[i] for i in ids)


@lru_cache(maxsize=1)
def _shipped_seed_prompts() -> tuple[SeedPrompt, ...]:
    entries = _read_yaml(SEED_PROMPTS_FILE)["prompts"]
    return tuple(SeedPrompt(id=str(e["id"]), prompt=" ".join(str(e["prompt"]).split()),
                            domain=str(e["domain"]), task_type=str(e["task_type"]),
                            aspects=tuple(e["aspects"])) for e in entries)


def seed_prompts() -> list[SeedPrompt]:
    """The shipped hand-written Collective Agency prompts (64), each with its id, cell and aspects."""
    return list(_shipped_seed_prompts())


# ------------------------------------------------------------------ the call schedule


def cell_for_call(cells: Sequence[Cell], call_index: int, *, seed: int, iteration: int) -> Cell:
    """Cells in a shuffled order that visits all of them before any twice (even coverage).

    Pass ``e = k // len(cells)`` through the cells uses its own permutation drawn from
    ``(seed, iteration, e)``, so the order differs between iterations and passes.
    """
    epoch, position = divmod(call_index, len(cells))
    order = list(range(len(cells)))
    random.Random(step_seed(seed, iteration, epoch, 7919)).shuffle(order)
    return cells[order[position]]


def template_for_call(templates: Sequence[Template], call_index: int) -> Template:
    """Templates in turn, so each shard mixes output formats."""
    return templates[call_index % len(templates)]


def examples_for_call(pool: Sequence[SeedPrompt], call_index: int, *, seed: int, iteration: int,
                      k: int = EXAMPLES_PER_META_PROMPT) -> list[SeedPrompt]:
    rng = random.Random(step_seed(seed, iteration, call_index, 104729))
    return rng.sample(list(pool), min(k, len(pool)))


def render_meta_prompt(template: Template, cell: Cell, taxonomy: Taxonomy, *, n: int,
                       examples: Sequence[SeedPrompt] = ()) -> str:
    """The text a generator model reads for one call.

    ``{examples}`` lists the few-shot examples as ``- `` bullets, ``{numbered_examples}`` as
    ``1.`` ``2.`` ...; ``{next_number}`` is the number after them (a raw template ends with
    ``{next_number}.`` so that the model's continuation is the next item).
    """
    guidance = "\n".join(f"- {a}: {taxonomy.aspects[a]}" for a in cell.aspects)
    aspects = cell.aspects[0] if len(cell.aspects) == 1 else (
        ", ".join(cell.aspects[:-1]) + " and " + cell.aspects[-1])
    return template.text.format(
        n=n,
        domain=cell.domain.replace("_", " "),
        domain_description=taxonomy.domains[cell.domain],
        task_type=cell.task_type.replace("_", " "),
        task_description=taxonomy.task_types[cell.task_type],
        aspects=aspects,
        aspect_guidance=guidance,
        examples="\n".join(f"- {e.prompt}" for e in examples),
        numbered_examples="\n".join(f"{i}. {e.prompt}" for i, e in enumerate(examples, 1)),
        next_number=len(examples) + 1,
    )
