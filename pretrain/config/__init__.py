"""The run configuration: a leaf package (it imports nothing else of the project).

- `schema`: every knob as a dataclass field with a default and a one-line doc, each section
  with the check of its own values, `ConfigError`, `DTYPES`;
- `loading`: YAML plus `--set section.key=value` overrides, key and type errors;
- `checks`: checks across sections that need outside facts, passed in as arguments;
- `reference`: the README's config reference, generated from the schema.
"""

from pretrain.config.loading import dump_config, load_config, parse_override
from pretrain.config.reference import reference_markdown, write_readme_reference
from pretrain.config.schema import (
    DTYPES,
    AugmentConfig,
    BatchConfig,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    LogConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    ScheduleConfig,
    SpeedConfig,
    field,
)

__all__ = ["DTYPES", "AugmentConfig", "BatchConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig",
           "EvalConfig", "LogConfig", "ModelConfig", "ObjectiveConfig", "OptimConfig", "ParallelConfig", "RunConfig",
           "ScheduleConfig", "SpeedConfig", "dump_config", "field", "load_config", "parse_override",
           "reference_markdown", "write_readme_reference"]
