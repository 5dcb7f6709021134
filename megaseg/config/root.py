"""The one configuration tree every megaseg command reads."""
from __future__ import annotations

from dataclasses import dataclass, field

from megaseg.config.data import DataConfig
from megaseg.config.evaluation import CompareConfig, GenerateConfig
from megaseg.config.model import ModelConfig
from megaseg.config.parallel import ParallelConfig
from megaseg.config.policy import DPOConfig, PPOConfig
from megaseg.config.reward import NormalizerConfig, RewardModelConfig
from megaseg.config.segmentation import SegmentationConfig
from megaseg.config.training import CheckpointConfig, LoggingConfig


@dataclass(frozen=True)
class MegasegConfig:
    seed: int = 1234
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    rm: RewardModelConfig = field(default_factory=RewardModelConfig)
    normalizer: NormalizerConfig = field(default_factory=NormalizerConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
