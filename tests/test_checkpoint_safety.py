"""Checkpoints from anyone are safe to load: no pickle runs code, ``latest`` cannot redirect the
load, a missing, corrupt or refused file is named, and ``resume=auto`` finds a complete one.

Real DeepSpeed engines (ZeRO-2 and ZeRO-3 with a moved reference) on the tiny model save one
checkpoint each per module; every test tampers with its own copy, as an attacker or a crash would.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shlex
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_engine import grpo_config, make_batch, weights, with_reference

from dynalign.config import DeepSpeedConfig, LoraConfig, ModelConfig
from dynalign.engine import (
    LATEST_FILE,
    CheckpointError,
    PolicyEngine,
    checkpoint,
    newest_complete_checkpoint,
    resolve_checkpoint,
    resumable_checkpoint,
)
from dynalign.engine.checkpoint import STATE_FILE

# DeepSpeed calls torch.distributed APIs that torch 2.13 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

CLIENT_STATE = {"iteration": 2, "data_position": 9}
ENGINES = {
    "zero2": lambda: (ModelConfig(), grpo_config(), DeepSpeedConfig(stage=2)),
    "zero3_reference": lambda: (ModelConfig(), grpo_config(beta=0.1), DeepSpeedConfig(stage=3)),
}


class Payload:
    """Unpickled by plain pickle, it runs ``touch <marker>``: the attack being refused."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def torch_payload(marker: Path, where: Path) -> bytes:
    """A well-formed torch checkpoint (zip) whose pickle carries the payload."""
    torch.save({"module": Payload(marker), "optimizer_state_dict": None}, where)
    return where.read_bytes()


class Saved:
    """One engine and what it looked like when it saved ``root``."""

    def __init__(self, engine: PolicyEngine, root: Path) -> None:
        self.engine, self.root = engine, root
        self.step_dir = root / (root / LATEST_FILE).read_text()
        # save() leaves the RNGs as they were at the save: these are the draws a load must repeat
        self.draws = draw()
        self.global_step = engine.global_step
        self.weights = weights(engine)
        self.batch = make_batch(16, seed=21)
        self.reference = engine.reference_logprobs(self.batch) if engine.grpo.beta > 0 else None


@pytest.fixture(scope="module")
def saved(tiny_model_path, tmp_path_factory) -> Callable[[str], Saved]:
    """``saved(name)``: the engine of ``ENGINES[name]`` after a step and a save, built once per module."""
    built: dict[str, Saved] = {}

    def get(name: str) -> Saved:
        if name not in built:
            model, grpo, ds = ENGINES[name]()
            model.name_or_path = str(tiny_model_path)
            engine = PolicyEngine(model, grpo, ds, seed=0)
            engine.train_step(with_reference(engine, make_batch(16, seed=20)))
            engine.update_reference()  # a no-op without a reference; with one, reference/ is saved
            root = tmp_path_factory.mktemp(name) / "checkpoints"
            engine.save(root, CLIENT_STATE)
            built[name] = Saved(engine, root)
        return built[name]

    yield get
    for entry in built.values():
        entry.engine.close()


def copy_of(saved_entry: Saved, tmp_path: Path) -> tuple[Path, Path]:
    """``(root, step_dir)`` of a private copy of the saved checkpoint."""
    root = tmp_path / "checkpoints"
    shutil.copytree(saved_entry.root, root)
    return root, root / saved_entry.step_dir.name


def replace_file(step_dir: Path, name: str, data: bytes, *, restate: bool = True) -> Path:
    """Write ``data`` over ``step_dir/name``; ``restate``: fix its recorded size, as an attacker
    would, so the load reaches the file's contents."""
    file = step_dir / name
    file.write_bytes(data)
    if restate:
        state = json.loads((step_dir / STATE_FILE).read_text())
        state["files"][name] = len(data)
        (step_dir / STATE_FILE).write_text(json.dumps(state))
    return file


def draw() -> tuple[float, float, float, float, torch.Tensor]:
    """One draw from each global generator (python's cached gaussian and numpy's included)."""
    return random.random(), random.gauss(0, 1), np.random.standard_normal(), np.random.rand(), torch.rand(3)


def same_draws(a: tuple, b: tuple) -> bool:
    return a[:-1] == b[:-1] and torch.equal(a[-1], b[-1])


def assert_names(error: pytest.ExceptionInfo[CheckpointError], file: Path, *words: str) -> None:
    message = str(error.value)
    assert error.value.path == file
    assert message.startswith(f"{file}: ") and "\n" not in message, message
    for word in words:
        assert word in message, message


def record_torch_loads(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The ``weights_only`` argument of every later ``torch.load`` call, DeepSpeed's included."""
    calls: list[object] = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    return calls


def assert_restores(entry: Saved) -> None:
    """A load of the original checkpoint gives back weights, counters, reference and RNG draws."""
    assert entry.engine.load(entry.root) == CLIENT_STATE
    assert entry.engine.global_step == entry.global_step
    assert same_draws(draw(), entry.draws)
    after = weights(entry.engine)
    assert all(torch.equal(after[name], tensor) for name, tensor in entry.weights.items())
    if entry.reference is not None:
        assert torch.equal(entry.engine.reference_logprobs(entry.batch), entry.reference)


# ----------------------------------------------------------------- no pickle runs


def test_the_payload_runs_under_plain_torch_load_but_not_through_safe_torch_load(tmp_path):
    marker = tmp_path / "MARKER"
    file = tmp_path / "model_states.pt"
    torch_payload(marker, file)
    with pytest.raises(CheckpointError) as error:
        checkpoint.safe_torch_load(file)
    assert_names(error, file, "refused to load", "posix.system")
    assert not marker.exists()
    torch.load(file, weights_only=False)  # the control: the file really is an attack
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_plain_pickle_is_refused_too(tmp_path):
    marker, file = tmp_path / "MARKER", tmp_path / "optim_states.pt"
    file.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError) as error:
        checkpoint.safe_torch_load(file, map_location="cpu")
    assert_names(error, file, "refused to load")
    assert not marker.exists()


@pytest.mark.parametrize(("name", "file"), [
    ("zero2", "mp_rank_00_model_states.pt"),
    ("zero2", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ("zero3_reference", "zero_pp_rank_0_mp_rank_00_model_states.pt"),
    ("zero3_reference", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
])
def test_a_crafted_deepspeed_file_is_refused_and_runs_nothing(saved, tmp_path, name, file):
    entry = saved(name)
    root, step_dir = copy_of(entry, tmp_path)
    marker = tmp_path / "MARKER"
    target = replace_file(step_dir, file, torch_payload(marker, tmp_path / "payload.pt"))
    with pytest.raises(CheckpointError) as error:
        entry.engine.load(root)
    assert_names(error, target, "refused to load")
    assert not marker.exists()
    assert_restores(entry)  # the engine is not left broken


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_round_trip_is_exact_and_every_torch_load_refuses_arbitrary_globals(saved, name, monkeypatch):
    entry = saved(name)
    entry.engine.train_step(with_reference(entry.engine, make_batch(16, seed=22)))
    entry.engine.update_reference()
    random.random(), np.random.rand(), torch.rand(1)  # move every RNG on
    calls = record_torch_loads(monkeypatch)
    assert_restores(entry)
    assert calls and all(weights_only is True for weights_only in calls), calls


# ----------------------------------------------------------------------- latest


@pytest.mark.parametrize("content", ["/etc", "../x", "step_3/../../x", "step_1/", "step_x", "", "step_²",
                                     "step_1\nstep_2", "step_" + "1" * 80])
def test_latest_must_be_a_tag(tmp_path, content):
    (tmp_path / "step_1").mkdir()
    (tmp_path / LATEST_FILE).write_text(content)
    for call in (resolve_checkpoint, resumable_checkpoint):
        with pytest.raises(CheckpointError) as error:
            call(tmp_path)
        assert_names(error, tmp_path / LATEST_FILE, "not a checkpoint tag")


def test_latest_must_name_an_existing_sibling(tmp_path):
    (tmp_path / LATEST_FILE).write_text("step_7")
    with pytest.raises(CheckpointError) as error:
        resolve_checkpoint(tmp_path)
    assert_names(error, tmp_path / LATEST_FILE, "step_7")


def test_a_redirecting_latest_fails_the_load_before_deepspeed(saved, tmp_path):
    entry = saved("zero3_reference")
    root, _ = copy_of(entry, tmp_path)
    (root / LATEST_FILE).write_text("/etc")
    with pytest.raises(CheckpointError) as error:
        entry.engine.load(root)
    assert_names(error, root / LATEST_FILE, "'/etc'")


def test_resolve_takes_a_root_or_a_checkpoint_directory(saved, tmp_path):
    entry = saved("zero3_reference")
    assert resolve_checkpoint(entry.root) == (entry.root, entry.step_dir.name)
    assert resolve_checkpoint(entry.step_dir) == (entry.root, entry.step_dir.name)
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(tmp_path)


# ------------------------------------------------------------ corrupt files


def _garbage_json(step_dir: Path) -> Path:
    (step_dir / STATE_FILE).write_text("{not json")
    return step_dir / STATE_FILE


def _truncated_json(step_dir: Path) -> Path:
    text = (step_dir / STATE_FILE).read_text()
    (step_dir / STATE_FILE).write_text(text[: len(text) // 2])
    return step_dir / STATE_FILE


def _wrong_type_in_state(step_dir: Path) -> Path:
    state = json.loads((step_dir / STATE_FILE).read_text())
    state["global_step"] = "3"
    (step_dir / STATE_FILE).write_text(json.dumps(state))
    return step_dir / STATE_FILE


def _truncated_rng(step_dir: Path) -> Path:
    data = (step_dir / "rng_rank0.safetensors").read_bytes()
    return replace_file(step_dir, "rng_rank0.safetensors", data[:100], restate=False)


def _corrupt_rng_header(step_dir: Path) -> Path:
    data = (step_dir / "rng_rank0.safetensors").read_bytes()
    return replace_file(step_dir, "rng_rank0.safetensors", b"\xff" * 8 + data[8:])


def _pickled_rng(step_dir: Path) -> Path:
    return replace_file(step_dir, "rng_rank0.safetensors", pickle.dumps(Payload(step_dir / "MARKER")))


def _missing_optimizer_shard(step_dir: Path) -> Path:
    (step_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    return step_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _truncated_model_states(step_dir: Path) -> Path:
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt"
    return replace_file(step_dir, name, (step_dir / name).read_bytes()[:1000])


def _corrupt_reference(step_dir: Path) -> Path:
    name = "reference/model.safetensors"
    return replace_file(step_dir, name, b"\x00" * (step_dir / name).stat().st_size, restate=False)


CORRUPTIONS = {  # what is done to the checkpoint, words the error must say
    "garbage_state": (_garbage_json, ["unreadable"]),
    "truncated_state": (_truncated_json, ["unreadable"]),
    "wrong_type_in_state": (_wrong_type_in_state, ["global_step"]),
    "truncated_rng": (_truncated_rng, ["truncated or changed"]),
    "corrupt_rng_header": (_corrupt_rng_header, ["unreadable RNG state"]),
    "pickled_rng": (_pickled_rng, ["unreadable RNG state"]),
    "missing_optimizer_shard": (_missing_optimizer_shard, ["missing"]),
    "truncated_model_states": (_truncated_model_states, ["unreadable"]),
    "corrupt_reference": (_corrupt_reference, ["unreadable safetensors"]),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_bad_file_is_named(saved, tmp_path, case):
    corrupt, words = CORRUPTIONS[case]
    entry = saved("zero3_reference")
    root, step_dir = copy_of(entry, tmp_path)
    file = corrupt(step_dir)
    with pytest.raises(CheckpointError) as error:
        entry.engine.load(root)
    assert_names(error, file, *words)
    assert not (step_dir / "MARKER").exists()
    assert_restores(entry)


def test_another_world_size_is_a_checkpoint_error(saved, tmp_path):
    entry = saved("zero3_reference")
    root, step_dir = copy_of(entry, tmp_path)
    state = json.loads((step_dir / STATE_FILE).read_text())
    (step_dir / STATE_FILE).write_text(json.dumps(state | {"world_size": 2}))
    with pytest.raises(CheckpointError) as error:
        entry.engine.load(root)
    assert_names(error, step_dir / STATE_FILE, "2 rank(s)", "same world size")


# ------------------------------------------------------------------ RNG file


def test_rng_file_restores_every_generator_exactly(tmp_path):
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    np.random.standard_normal()  # numpy caches the second gaussian: has_gauss = 1
    random.gauss(0, 1)  # python caches one too: gauss_next is a float
    file = tmp_path / "rng_rank0.safetensors"
    checkpoint.write_rng(file, checkpoint.rng_state())
    expected = draw()
    checkpoint.set_rng_state(checkpoint.read_rng(file))
    assert same_draws(draw(), expected)
    assert b"pickle" not in file.read_bytes() and file.read_bytes()[8:9] == b"{"  # a safetensors header


# ---------------------------------------------------------- complete checkpoints


def fake_checkpoint(root: Path, name: str, *, step: int | None = None, files: dict[str, bytes] | None = None,
                    listed: dict[str, int] | None = None) -> Path:
    """A checkpoint directory with ``files`` and a state listing ``listed`` (default: their sizes)."""
    path = root / name
    path.mkdir(parents=True)
    if files is None:
        files = {"rng_rank0.safetensors": b"x" * 10, "mp_rank_00_model_states.pt": b"y" * 20}
    for file, data in files.items():
        (path / file).write_bytes(data)
    state = {"client_state": {}, "global_step": checkpoint.checkpoint_step(path) if step is None else step,
             "skipped_steps": 0, "reference_updated": False, "world_size": 1,
             "files": {f: len(d) for f, d in files.items()} if listed is None else listed}
    (path / STATE_FILE).write_text(json.dumps(state))
    return path


def test_newest_complete_checkpoint_skips_incomplete_and_temporary_ones(tmp_path):
    fake_checkpoint(tmp_path, "step_2")
    five = fake_checkpoint(tmp_path, "step_5")
    fake_checkpoint(tmp_path, "step_7", listed={"rng_rank0.safetensors": 10, "gone.pt": 4})  # a file missing
    fake_checkpoint(tmp_path, "step_8", listed={"rng_rank0.safetensors": 11})  # a size changed
    fake_checkpoint(tmp_path, "step_9", step=8)  # the state is not of this step
    (fake_checkpoint(tmp_path, "step_10") / STATE_FILE).write_text("{")  # a corrupt state
    fake_checkpoint(tmp_path, "step_11", step=11).joinpath(STATE_FILE).unlink()  # no state yet
    fake_checkpoint(tmp_path, ".tmp-step_12", step=12)
    fake_checkpoint(tmp_path, ".trash-step_13", step=13)
    fake_checkpoint(tmp_path, "step_14x", step=14)
    assert newest_complete_checkpoint(tmp_path) == five
    assert newest_complete_checkpoint(tmp_path / "none") is None
    assert newest_complete_checkpoint(tmp_path / "step_2") is None


def test_resumable_checkpoint_prefers_a_complete_latest(tmp_path):
    two, five = fake_checkpoint(tmp_path, "step_2"), fake_checkpoint(tmp_path, "step_5")
    fake_checkpoint(tmp_path, "step_7", listed={"gone.pt": 4})
    assert resumable_checkpoint(tmp_path) == five  # no latest: a crash before it was written
    (tmp_path / LATEST_FILE).write_text("step_2")
    assert resumable_checkpoint(tmp_path) == two  # what latest names, though newer ones exist
    for broken in ("step_7", "step_6"):  # incomplete, or removed by a crash while replacing it
        (tmp_path / LATEST_FILE).write_text(broken)
        assert resumable_checkpoint(tmp_path) == five
    assert resumable_checkpoint(tmp_path / "empty") is None


def test_resume_auto_refuses_a_dropped_checkpoint_before_any_model_loads(tmp_path):
    from dynalign.config import TrainConfig
    from dynalign.train import check_auto_resume

    root = tmp_path / "checkpoints"  # RunDir(tmp_path).checkpoints
    auto, never = TrainConfig(resume="auto"), TrainConfig(resume="never")
    check_auto_resume(auto, tmp_path)  # no checkpoint: starts from step 0
    step_dir = fake_checkpoint(root, "step_4")
    check_auto_resume(auto, tmp_path)  # a resumable one
    state = json.loads((step_dir / STATE_FILE).read_text())
    (step_dir / STATE_FILE).write_text(json.dumps(state | {"resumable": False}))
    with pytest.raises(CheckpointError) as error:
        check_auto_resume(auto, tmp_path)
    assert_names(error, step_dir, "checkpoint_optimizer_at_end=false", "iter_<k>/")
    check_auto_resume(never, tmp_path)  # a fresh run reads no checkpoint


def test_a_saved_checkpoint_is_complete_and_lists_its_files(saved):
    entry = saved("zero3_reference")
    assert checkpoint.checkpoint_complete(entry.step_dir)
    assert resumable_checkpoint(entry.root) == entry.step_dir
    listed = json.loads((entry.step_dir / STATE_FILE).read_text())["files"]
    assert {"rng_rank0.safetensors", "reference/model.safetensors",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= set(listed)
    assert not any(name.endswith(".pt") and name.startswith("rng") for name in listed)


# ------------------------------------------------------------- the run's end


def _sizes(directory: Path) -> dict[str, int]:
    return {p.relative_to(directory).as_posix(): p.stat().st_size
            for p in directory.rglob("*") if p.is_file()}


def test_dropping_the_training_state_frees_deepspeeds_files_and_refuses_a_resume(saved, tmp_path):
    entry = saved("zero3_reference")
    root, step_dir = copy_of(entry, tmp_path)
    on_disk = _sizes(step_dir)
    deepspeed = {name for name in on_disk if name.endswith(".pt")}
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in deepspeed
    assert checkpoint.checkpoint_bytes(step_dir) == sum(on_disk.values())

    assert entry.engine.drop_training_state(root) == sum(on_disk[name] for name in deepspeed)
    kept = _sizes(step_dir)
    assert set(kept) == set(on_disk) - deepspeed  # RNG states, the moved reference, the state file
    assert "reference/model.safetensors" in kept and "rng_rank0.safetensors" in kept
    assert checkpoint.checkpoint_bytes(step_dir) == sum(kept.values())
    assert resumable_checkpoint(root) == step_dir  # complete: what resume=auto finds, and refuses
    state = json.loads((step_dir / STATE_FILE).read_text())
    assert state["resumable"] is False and state["client_state"] == CLIENT_STATE
    with pytest.raises(CheckpointError) as error:
        entry.engine.load(root)
    assert_names(error, step_dir, "checkpoint_optimizer_at_end=false", "iter_<k>/")
    assert entry.engine.drop_training_state(root) == 0  # once is enough


def _disk_estimate(model: ModelConfig, grpo, ds: DeepSpeedConfig):
    from dynalign.config import TrainConfig
    from dynalign.memory import disk_bytes
    from dynalign.plan import model_shape

    return disk_bytes(TrainConfig(model=model, grpo=grpo, deepspeed=ds), model_shape(model))


def _weight_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


@pytest.mark.parametrize("name", ENGINES)
def test_the_plans_disk_estimate_is_what_a_checkpoint_and_an_export_take(saved, name, tiny_model_path,
                                                                          tmp_path):
    entry = saved(name)
    model, grpo, ds = ENGINES[name]()
    disk = _disk_estimate(replace(model, name_or_path=str(tiny_model_path)), grpo, ds)
    # optimizer shards, the module below stage 3, the moved reference: within DeepSpeed's pickle framing
    assert checkpoint.checkpoint_bytes(entry.step_dir) == pytest.approx(disk.checkpoint, rel=0.01)
    assert _weight_bytes(entry.engine.export_hf(tmp_path / "iter_1")) == pytest.approx(disk.export, rel=0.01)


def test_the_disk_estimate_of_lora_on_zero3_counts_deepspeeds_frozen_fragments(tiny_model_path, tmp_path):
    model = ModelConfig(name_or_path=str(tiny_model_path), dtype="bfloat16",
                        lora=LoraConfig(enabled=True, r=4, alpha=8))
    grpo, ds = grpo_config(beta=0.1), DeepSpeedConfig(stage=3)
    engine = PolicyEngine(model, grpo, ds, seed=0)
    try:
        engine.train_step(with_reference(engine, make_batch(16, seed=20)))
        engine.update_reference()
        path = engine.save(tmp_path / "checkpoints", {})
        disk = _disk_estimate(model, grpo, ds)
        # the frozen base is most of it; each of its tensors adds some pickle framing (a few KiB)
        assert checkpoint.checkpoint_bytes(path) == pytest.approx(disk.checkpoint, abs=256 << 10)
        assert _weight_bytes(engine.export_hf(tmp_path / "iter_1")) == pytest.approx(disk.export, rel=0.01)
    finally:
        engine.close()


def test_a_state_whose_resumable_flag_is_not_a_bool_is_named(tmp_path):
    path = fake_checkpoint(tmp_path, "step_3")
    state = json.loads((path / STATE_FILE).read_text())
    (path / STATE_FILE).write_text(json.dumps({**state, "resumable": "no"}))
    with pytest.raises(CheckpointError, match="resumable is 'no', expected a bool"):
        checkpoint.read_state(path)


# --------------------------------------------------------------- the allowlist


ALLOWLIST_ENGINES = {
    "stage0": (ModelConfig(), {}, DeepSpeedConfig(stage=0)),
    "stage1_float16": (ModelConfig(dtype="float16"), {}, DeepSpeedConfig(stage=1)),
    "stage2_bfloat16_offload": (ModelConfig(dtype="bfloat16"), {},
                                DeepSpeedConfig(stage=2, offload_optimizer="cpu")),
    "stage3_float16": (ModelConfig(dtype="float16"), {}, DeepSpeedConfig(stage=3)),
    "stage3_lora_bfloat16": (ModelConfig(dtype="bfloat16", lora=LoraConfig(enabled=True, r=4, alpha=8)),
                             {"beta": 0.1}, DeepSpeedConfig(stage=3)),
}


FP16_ONLY_GLOBALS = {"deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"}  # fp16's dynamic loss scaling


@pytest.mark.slow
def test_the_allowlist_is_what_deepspeed_writes_and_loads_every_stage(tiny_model_path, tmp_path, monkeypatch):
    """Every type in the allowlist appears in some stage's files, and every stage loads with it,
    through torch.load(weights_only=True) only."""
    from deepspeed.accelerator import get_accelerator

    fp16 = bool(get_accelerator().is_fp16_supported())  # DeepSpeed's CPU fp16 needs mkldnn's, per CPU
    needed: set[str] = set()
    calls = record_torch_loads(monkeypatch)
    for name, (model, grpo, ds) in ALLOWLIST_ENGINES.items():
        if model.dtype == "float16" and not fp16:
            continue
        model.name_or_path = str(tiny_model_path)
        with PolicyEngine(model, grpo_config(**grpo), ds, seed=0) as engine:
            engine.train_step(with_reference(engine, make_batch(16, seed=23)))
            saved_dir = engine.save(tmp_path / name, CLIENT_STATE)
            for file in saved_dir.glob("*.pt"):
                needed.update(torch.serialization.get_unsafe_globals_in_checkpoint(file))
            assert engine.load(tmp_path / name) == CLIENT_STATE, name
    allowed = {f"{kind.__module__}.{kind.__qualname__}" for kind in checkpoint.deepspeed_safe_globals()}
    assert needed == (allowed if fp16 else allowed - FP16_ONLY_GLOBALS)
    assert calls and all(weights_only is True for weights_only in calls), calls
    if not fp16:
        pytest.skip("the float16 stages did not run: DeepSpeed has no fp16 on this CPU; the others "
                    f"wrote and loaded every allowed type but {sorted(FP16_ONLY_GLOBALS)}")


def test_the_leftovers_of_interrupted_writes_are_found_by_name(tmp_path):
    from dynalign.rundir import RunDir

    layout = RunDir(tmp_path / "run")
    keep = [layout.path / "iter_1", layout.path / ".hydra", layout.prompts / "iter_1.json",
            layout.path / "eval" / "iter_1", layout.path / ".dynalign.lock", layout.path / ".iter_3.tmp"]
    gone = [layout.path / ".iter_2.4242-0a1b2c3d.tmp", layout.path / ".iter_1.old-4242",
            layout.prompts / ".iter_2.json.17-deadbeef.tmp", layout.path / "eval" / ".iter_2.9-00ff00ff.tmp"]
    for path in keep + gone:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json" or path.name.startswith(".dynalign") or ".json." in path.name:
            path.write_bytes(b"x" * 10)
        else:
            path.mkdir()
            (path / "weights").write_bytes(b"x" * 100)
    assert layout.clear_leftovers() == 100 + 100 + 10 + 100
    assert all(p.exists() for p in keep) and not any(p.exists() for p in gone)
    assert layout.clear_leftovers() == 0
