"""Reward functions (TRL contract: `fn(completions, **columns) -> list[float | None]`) and their combination."""

from medvr.rewards.answer import accuracy_reward, answer_score, extract_answer, format_reward
from medvr.rewards.combine import WeightedSum

__all__ = ["WeightedSum", "accuracy_reward", "answer_score", "extract_answer", "format_reward"]
