"""Attention maps: heatmaps of every head's attention probabilities, one PNG per layer."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from engine.nn.attention import recording_attention


def attention_maps(model: torch.nn.Module, tokenizer, text: str, out_dir: str | Path, *, heads_per_row: int = 4) -> list[Path]:
    """Run ``model`` on ``text`` and draw layer-<i>.png in ``out_dir``: one panel per head,
    queries down, keys across, labelled with the tokens. Works for the engine's BERT and GPT
    models (any module built from SelfAttention). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encoding = tokenizer.encode(text)
    ids = torch.tensor([encoding.ids], device=next(model.parameters()).device)
    model.eval()
    with torch.no_grad(), recording_attention() as maps:
        model(ids)
    if not maps:
        raise ValueError(f"attention_maps: {type(model).__name__} has no engine SelfAttention to record")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = encoding.tokens
    paths = []
    for layer, probs in enumerate(maps):
        heads = probs.shape[1]
        rows = math.ceil(heads / heads_per_row)
        figure, axes = plt.subplots(rows, heads_per_row, figsize=(3.2 * heads_per_row, 3.2 * rows), squeeze=False)
        for head, axis in enumerate(axes.flat):
            if head >= heads:
                axis.axis("off")
                continue
            axis.imshow(probs[0, head].float().cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            axis.set_title(f"head {head}", fontsize=9)
            axis.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
            axis.set_yticks(range(len(tokens)), tokens, fontsize=6)
        figure.suptitle(f"layer {layer}: attention probabilities (rows: queries, columns: keys)")
        figure.tight_layout()
        path = out_dir / f"layer-{layer}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths
