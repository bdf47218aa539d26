"""Per-sample early exit: stop a sample once its running prediction is confident.

After t steps an SNN's prediction is the mean of its outputs so far; a sample stops at the
first t whose mean output scores ≥ τ under a rule:

- ``"confidence"``: the largest softmax probability of the mean output;
- ``"margin"``: the difference between the two largest softmax probabilities;

and a sample that never reaches τ runs to ``T_max``. :meth:`SpikingModel.predict_early`
does it while running (samples that stopped are dropped from the batch, so their
neurons are not computed any more); :func:`exit_steps` computes the same from the running
means of a full ``T_max`` run, which is how the evaluation reports many τ from one pass.
"""

from __future__ import annotations

import torch

__all__ = ["RULES", "exit_scores", "exit_steps", "summarise_exits"]

RULES = ("confidence", "margin")


def exit_scores(means: torch.Tensor, rule: str = "confidence") -> torch.Tensor:
    """The score of each mean output (``[..., C]`` → ``[...]``) under ``rule``."""
    probs = means.float().softmax(-1)
    if rule == "confidence":
        return probs.amax(-1)
    if rule == "margin":
        top = probs.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    raise ValueError(f"unknown early-exit rule {rule!r}; valid: {', '.join(RULES)}")


def exit_steps(means: torch.Tensor, threshold: float, rule: str = "confidence") -> tuple[torch.Tensor, torch.Tensor]:
    """(steps ``[B]``, predictions ``[B]``) from running means ``[T_max, B, C]`` (mean over the first t steps at row t−1)."""
    confident = exit_scores(means, rule) >= threshold  # [T, B]
    confident[-1] = True  # whoever is still running stops at T_max
    first = confident.float().argmax(0)  # the first step (0-based) at which each sample is confident
    predictions = means[first, torch.arange(means.shape[1], device=means.device)].argmax(-1)
    return first + 1, predictions


def summarise_exits(steps: torch.Tensor, correct: torch.Tensor) -> dict:
    """Accuracy, mean and 95th-percentile steps of one τ over an evaluation set."""
    steps = steps.double()
    return {
        "top1": correct.double().mean().item(),
        "mean_steps": steps.mean().item(),
        "p95_steps": torch.quantile(steps, 0.95, interpolation="higher").item(),  # a step count, not between two
        "max_steps": steps.max().item(),
    }
