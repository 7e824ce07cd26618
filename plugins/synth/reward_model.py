"""The `reward_model` stage (stub: the REWARD-MODEL helper fills this)."""

from __future__ import annotations

from llmforge.stage import Stage


class RewardModelStage(Stage):
    kind = "reward_model"
    summary = "A reward model (sequence classification) trained on preference rows with TRL's reward trainer (stub)."
    produces = ("reward_model",)
