"""Attention maps: heatmaps of every head's attention probabilities, one PNG per layer."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from engine.nn.attention import recording_attention


def _token_ticks(axis, tokens: list[str], most: int = 32) -> None:
    """Token labels on both axes, rotated on x; every k-th only when there are more than ``most``."""
    step = max(1, math.ceil(len(tokens) / most))
    shown = range(0, len(tokens), step)
    size = 7 if len(tokens) <= 16 else 5
    axis.set_xticks(shown, [tokens[i] for i in shown], rotation=90, fontsize=size)
    axis.set_yticks(shown, [tokens[i] for i in shown], fontsize=size)


def attention_maps(model: torch.nn.Module, tokenizer, text: str, out_dir: str | Path, *, heads_per_row: int = 4) -> list[Path]:
    """Run ``model`` on ``text`` and draw layer-<i>.png in ``out_dir``: one panel per head,
    queries down, keys across, labelled with the tokens, on one colour scale (probability 0 to
    1). The text is encoded alone: a tokenizer's padding (to a fixed length) is dropped, so every
    position drawn is a real token. Works for the engine's BERT and GPT models (any module built
    from SelfAttention). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encoding = tokenizer.encode(text)
    real = [i for i, keep in enumerate(encoding.attention_mask) if keep]  # padding, if the tokenizer adds it, out
    ids = torch.tensor([[encoding.ids[i] for i in real]], device=next(model.parameters()).device)
    tokens = [encoding.tokens[i] for i in real]
    model.eval()
    with torch.no_grad(), recording_attention() as maps:
        model(ids)
    if not maps:
        raise ValueError(f"attention_maps: {type(model).__name__} has no engine SelfAttention to record")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    panel = min(4.0, max(2.6, 0.12 * len(tokens)))  # inches per head
    paths = []
    for layer, probs in enumerate(maps):
        heads = probs.shape[1]
        rows = math.ceil(heads / heads_per_row)
        figure, axes = plt.subplots(rows, heads_per_row, figsize=(panel * heads_per_row + 1.2, panel * rows + 0.6),
                                    squeeze=False, layout="constrained")
        for head, axis in enumerate(axes.flat):
            if head >= heads:
                axis.axis("off")
                continue
            image = axis.imshow(probs[0, head].float().cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            axis.set_title(f"head {head}", fontsize=9)
            _token_ticks(axis, tokens)
        figure.colorbar(image, ax=axes, shrink=0.6, label="attention probability")
        figure.suptitle(f"layer {layer}: attention probabilities (rows: queries, columns: keys)")
        path = out_dir / f"layer-{layer}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths
