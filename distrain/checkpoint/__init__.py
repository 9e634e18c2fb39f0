"""Checkpoints by content: atomic step directories of safetensors parts (``store``) and the
configuration check a resume passes first (``compare``). What goes into the parts, and how a run
resumes them into its topology, is ``distrain.worker.state`` and ``distrain.runtime.resume``."""

from distrain.checkpoint.compare import (
    CONFIG_KEY,
    RESUME_MAY_CHANGE,
    check_config,
    comparable_config,
    config_differences,
)
from distrain.checkpoint.store import (
    FORMAT_VERSION,
    LATEST,
    MANIFEST,
    OLD_FORMAT,
    CheckpointError,
    Part,
    abort_step,
    begin_step,
    check_checkpoint_dir,
    check_manifest,
    checkpoint_steps,
    commit_step,
    decode_part,
    encode_part,
    is_old_format,
    list_checkpoints,
    read_all,
    read_manifest,
    read_part,
    write_part,
)

__all__ = [
    "CONFIG_KEY", "FORMAT_VERSION", "LATEST", "MANIFEST", "OLD_FORMAT", "RESUME_MAY_CHANGE", "CheckpointError", "Part",
    "abort_step", "begin_step", "check_checkpoint_dir", "check_config", "check_manifest", "checkpoint_steps",
    "commit_step", "comparable_config", "config_differences", "decode_part", "encode_part", "is_old_format",
    "list_checkpoints", "read_all", "read_manifest", "read_part", "write_part",
]
