"""megaseg: segment-level reward models and dense-reward PPO at Megatron scale."""

__version__ = "0.1.0"
