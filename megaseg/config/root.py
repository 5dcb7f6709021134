"""The one configuration tree every megaseg command reads."""
from __future__ import annotations

from dataclasses import dataclass, field

from megaseg.config._checks import check_choice
from megaseg.config.data import DataConfig
from megaseg.config.evaluation import CompareConfig, GenerateConfig
from megaseg.config.model import ModelConfig
from megaseg.config.parallel import ParallelConfig
from megaseg.config.policy import DPOConfig, PPOConfig
from megaseg.config.reward import NormalizerConfig, RewardModelConfig
from megaseg.config.segmentation import SegmentationConfig
from megaseg.config.training import CheckpointConfig, LoggingConfig

# Which implementation the segment/vocabulary hot paths run (megaseg.kernels.dispatch): Triton on CUDA and torch
# elsewhere (auto), Triton everywhere (triton; CPU tensors only under TRITON_INTERPRET=1), or torch always.
KERNEL_CHOICES = ("auto", "triton", "torch")
# torch until scripts/gpu_check.sh has passed on a GPU: the kernels have run only in Triton's interpreter so far.
DEFAULT_KERNELS = "torch"


@dataclass(frozen=True)
class MegasegConfig:
    seed: int = 1234
    kernels: str = DEFAULT_KERNELS
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

    def __post_init__(self) -> None:
        check_choice("kernels", self.kernels, KERNEL_CHOICES)
