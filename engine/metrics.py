"""Evaluation metrics: accuracy, precision, recall and F1 (per class and macro), the confusion
matrix, and perplexity. Where a ratio is undefined (a class never predicted, or never present) it
scores 0, as scikit-learn's zero_division=0; macro averages run over the classes that occur in the
labels or the predictions, as scikit-learn's do."""

from __future__ import annotations

import math

import torch


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts: row = true label, column = prediction."""
    index = labels.to(torch.int64) * num_classes + predictions.to(torch.int64)
    return torch.bincount(index.flatten().cpu(), minlength=num_classes * num_classes).view(num_classes, num_classes)


def classification_report(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """accuracy, per-class precision/recall/f1/support, their macro averages, and the confusion matrix."""
    for name, values in (("predictions", predictions), ("labels", labels)):
        if values.numel() and not 0 <= int(values.min()) <= int(values.max()) < num_classes:
            raise ValueError(f"classification_report: {name} must lie in [0, {num_classes}), "
                             f"got [{int(values.min())}, {int(values.max())}]")
    matrix = confusion_matrix(predictions, labels, num_classes).double()
    true_positive = matrix.diagonal()
    predicted, actual = matrix.sum(0), matrix.sum(1)

    def ratio(numerator, denominator):
        return torch.where(denominator > 0, numerator / denominator.clamp(min=1), torch.zeros_like(numerator))

    precision, recall = ratio(true_positive, predicted), ratio(true_positive, actual)
    f1 = ratio(2 * precision * recall, precision + recall)
    seen = (predicted + actual) > 0
    macro = lambda values: values[seen].mean().item() if seen.any() else 0.0  # noqa: E731
    total = matrix.sum().item()
    return {
        "accuracy": true_positive.sum().item() / total if total else 0.0,
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": actual.long().tolist(),
        "macro_precision": macro(precision),
        "macro_recall": macro(recall),
        "macro_f1": macro(f1),
        "confusion_matrix": matrix.long().tolist(),
    }


def perplexity(mean_loss: float) -> float:
    """exp(mean next-token cross-entropy in nats)."""
    return math.exp(mean_loss)
