"""FlashAttention-style fused attention: forward and backward, memory linear in sequence length.

Forward (``forward.py``; one program per block of BLOCK_M query rows of one head): scores are
computed tile by tile against BLOCK_N keys, masked, and folded into an online softmax in fp32
(running max and sum); only the output and the per-row log-sum-exp are written. Backward
(``backward.py``) recomputes the probabilities tile by tile from the saved log-sum-exp: a
preprocessing kernel forms delta = rowsum(dO * O), one kernel accumulates dK and dV per block of
keys (looping over every query head that shares the key head, so grouped-query attention needs
no repeated K/V) and, by default, adds each tile's share of dQ to an fp32 buffer with atomics
(FlashAttention-2's scheme); with ``deterministic=True`` another kernel accumulates dQ per block
of queries instead. No (Sq, Sk) matrix is ever written. ``common.py`` holds what both share: tile masks,
scores, layouts; ``tiles.py`` the tile configurations.

Masks: causal (top-left aligned as torch's SDPA, or bottom-right aligned for a KV cache), and a
boolean (True = attend) or additive mask read tile by tile through strides, so broadcast
dimensions (a (B, 1, 1, Sk) key-padding mask) cost no memory. Key tiles past a causal diagonal,
query or key blocks past their sequence's end, and the key tiles a mask shared by every query
row hides before its first or after its last visible key are skipped (loop bounds, no branch in
the inner loop). A row with every key masked gets zeros and zero gradients (log-sum-exp +inf).

Scores run in base 2 (the softmax scale folded with log2(e)), except with an additive mask: then
they stay in natural-log units, so the very negative finite values models write into masks
(torch.finfo(dtype).min) never overflow, and the log-sum-exp is kept as a (high, low) pair whose
low part recovers what rounding the high part loses when such a value dominates a row.

Dropout: keep-mask bits come from Philox (tl.rand) keyed by (seed + batch*heads + head) and the
(row, column) position, so backward regenerates the forward's mask exactly. The seed is a (1,)
int64 device tensor the kernels read themselves: drawing it needs no host round trip, so
torch.compile keeps it in the graph (a fresh mask every step, tested); CUDA-graph capture is
not tried yet.

Decoding (``decode.py``): few queries over a long cache split the keys over programs, the query
heads of a GQA group packed into one tile, and merge the splits by their log-sum-exp; the same
kernels read a paged cache (pages of a fixed size, a block table per sequence, each sequence's
own length) in place.

User-defined attention (``flex.py``): @triton.jit score and mask functions compiled into the
forward and backward kernels, and the block mask that lets them skip hidden blocks.

Layouts: padded tensors (B, H, S, D) with any strides but unit stride over D, or packed
variable-length tensors (total, H, D) with cumulative sequence starts (B + 1,) int32.

``count_tiles()`` (engine.kernels) counts the key tiles each kernel actually processed, exactly
and on any device; it is compiled in only while counting.
"""

from engine.kernels.attention.backward import attention_backward
from engine.kernels.attention.common import ATTENTION_DTYPES, MAX_HEAD_DIM, MIN_HEAD_DIM, dropout_keep_mask
from engine.kernels.attention.decode import paged_attention_forward
from engine.kernels.attention.forward import attention_forward

__all__ = ["ATTENTION_DTYPES", "MAX_HEAD_DIM", "MIN_HEAD_DIM", "attention_backward", "attention_forward",
           "dropout_keep_mask", "paged_attention_forward"]
