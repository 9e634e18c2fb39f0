"""Typed run configuration: dataclass sections, TOML presets, ``--section.key=value`` overrides.

Unknown keys and wrong types are errors that name the key and where it came from, and every value
is checked when the config is loaded (ranges, combinations, files that must exist, devices that
must be present), so a typo in a preset never silently trains the wrong model and a bad value
never costs a tokenisation pass. The topology is a list of ``[[topology.replica]]`` tables
(``distrain.topology`` resolves them into workers); ``topology.replicas = N`` is the shorthand for
N identical single-device full replicas.
"""

from distrain.config.load import REMOVED, config_dir, load_config, resolve_config_path, save_config
from distrain.config.replica import CompressConfig, ReplicaConfig, TopologyConfig
from distrain.config.sections import (
    ALGORITHMS,
    INNER_OPTIMIZERS,
    MODEL_PRESETS,
    Algorithm,
    CheckpointConfig,
    ChunkwiseConfig,
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    NetworkConfig,
    OuterConfig,
    RunConfig,
    RuntimeConfig,
    TrainConfig,
)
from distrain.config.tomlconf import ConfigError, to_toml

__all__ = ["ALGORITHMS", "INNER_OPTIMIZERS", "MODEL_PRESETS", "REMOVED", "Algorithm", "CheckpointConfig", "ChunkwiseConfig",
           "CompressConfig", "Config", "ConfigError", "DataConfig", "LoggingConfig", "ModelConfig", "NetworkConfig",
           "OuterConfig", "ReplicaConfig", "RunConfig", "RuntimeConfig", "TopologyConfig", "TrainConfig", "config_dir",
           "load_config", "resolve_config_path", "save_config", "to_toml"]
