"""model-config.yaml: schema, positions-aware loading and validation rules. No torch import here."""
from .layout import ParallelLayout
from .rules import (RULES, Finding, Report, ValidationContext, rules_table, validate_data, validate_file,
                    validate_text)
from .schema import (DeepSpeedConfig, HandlerConfig, ModelConfig, PippyConfig, TorchrunConfig, json_schema)

__all__ = [
    "RULES", "Finding", "Report", "ValidationContext", "ParallelLayout", "ModelConfig", "TorchrunConfig",
    "PippyConfig", "DeepSpeedConfig", "HandlerConfig", "json_schema", "rules_table", "validate_data", "validate_file",
    "validate_text",
]
