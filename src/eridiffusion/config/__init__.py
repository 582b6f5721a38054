"""The config: ai-toolkit's YAML format, typed and checked at load (did-you-mean on typos,
"not supported yet" on known ai-toolkit features EriDiffusion lacks)."""
from .load import find_config, load_config, parse_config, resolved_dict
from .schema import (
    ConfigError,
    DatasetConfig,
    EmaConfig,
    JobConfig,
    LoggingConfig,
    ModelConfig,
    NetworkConfig,
    ProcessConfig,
    SampleConfig,
    SampleItem,
    SaveConfig,
    TrainConfig,
    parse_prompt_flags,
)

__all__ = [
    "ConfigError", "DatasetConfig", "EmaConfig", "JobConfig", "LoggingConfig", "ModelConfig", "NetworkConfig",
    "ProcessConfig", "SampleConfig", "SampleItem", "SaveConfig", "TrainConfig",
    "find_config", "load_config", "parse_config", "parse_prompt_flags", "resolved_dict",
]
