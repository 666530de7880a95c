"""The training core, one concern a module.

* :mod:`~dynalign.engine.policy`: :class:`PolicyEngine` -- step, log-probs, reference, exports.
* :mod:`~dynalign.engine.batch`: :class:`TrainBatch`, the rollouts of one optimizer step.
* :mod:`~dynalign.engine.ds_config`: the DeepSpeed config, optimizer and LR schedule.
* :mod:`~dynalign.engine.adapters`: full fine-tuning or LoRA (model wrapping, reference, export).
* :mod:`~dynalign.engine.checkpoint`: checkpoint layout, save / load / rotation, safetensors I/O;
  loading never unpickles arbitrary objects (:class:`CheckpointError` names a bad file).
"""

from dynalign.engine.batch import TrainBatch
from dynalign.engine.checkpoint import (
    LATEST_FILE,
    CheckpointError,
    checkpoint_bytes,
    complete_checkpoints,
    newest_complete_checkpoint,
    read_safetensors_dir,
    record_client_state,
    resolve_checkpoint,
    resumable_checkpoint,
    write_safetensors_shards,
)
from dynalign.engine.ds_config import deepspeed_config, gradient_accumulation_steps, warmup_constant
from dynalign.engine.policy import PolicyEngine
from dynalign.zero import hf_zero3_init

__all__ = ["LATEST_FILE", "CheckpointError", "PolicyEngine", "TrainBatch", "checkpoint_bytes",
           "complete_checkpoints", "deepspeed_config", "gradient_accumulation_steps", "hf_zero3_init",
           "newest_complete_checkpoint", "read_safetensors_dir", "record_client_state", "resolve_checkpoint",
           "resumable_checkpoint", "warmup_constant", "write_safetensors_shards"]
