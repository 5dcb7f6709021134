"""Trainers (reward model, PPO, DPO) and what they share: optimizer, checkpoints, metrics."""
