"""The recipe's sections as plain data: one dataclass per section, every field with help text.

These modules import nothing of alignkit's behaviour (no models, data, training or scoring code), so every
part of alignkit can import them: behaviour imports settings, never the reverse. ``alignkit.recipe.loading`` reads
and validates a YAML file into them; a stage's own section (``ppo``, ``rest``, ``rlaif``) lives next to the
stage that reads it.
"""

from alignkit.recipe.settings.data import DataSettings, DataSource
from alignkit.recipe.settings.evaluate import EvaluateSettings, GenerationSettings
from alignkit.recipe.settings.judge import JudgeKind, JudgeSettings
from alignkit.recipe.settings.model import (
           Dtype,
           ModelSettings,
           QuantizationSettings,
           is_future_run,
           is_run_with_adapter,
)
from alignkit.recipe.settings.reward import RewardSettings, RewardSource

__all__ = ["DataSettings", "DataSource", "Dtype", "EvaluateSettings", "GenerationSettings", "JudgeKind",
           "JudgeSettings", "ModelSettings", "QuantizationSettings", "RewardSettings", "RewardSource",
           "is_future_run", "is_run_with_adapter"]
