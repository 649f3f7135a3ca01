"""FlexAttention for the document mask (model.attention_mask=document, parallel.attention_kernel=flex: the default on
CUDA).

Why: SDPA takes the document mask as a dense (B, 1, T, T) tensor. On CUDA that rules out the flash kernel; the
memory-efficient kernel computes every tile of QK^T, masked or not, has no native GQA (K and V are repeated to the
query heads) and keeps the mask, as an additive bias, for backward. FlexAttention reads a block mask instead: for
each 128 × 128 tile of (queries, keys), whether it is empty (skipped), full (run without a mask) or partial (the mask
function decides element by element). Below the diagonal, a packed row of short documents is mostly empty tiles, so
the work falls with the documents' length; nothing T × T is stored.

How the block mask is built: from the document ids directly, not by calling the mask function on every (query, key)
pair as torch's `create_block_mask` does (O(B · T²)). The ids never decrease along a row
(`trainer.model.document_ids`), so the documents a tile touches are the contiguous range from its first token's to its
last token's, and
  - a key tile after the query tile is empty (causal);
  - an earlier key tile is full iff its first token is in the query tile's last token's document (every token between
    is then in that document too; a short last query tile is never full), partial iff its last token reaches the
    query tile's first document, else empty;
  - the diagonal tile is partial (causal inside it).
That is O(B · (T / 128)²) small integer ops per call: cheap enough for every layer to build its own from the ids it is
given, so pipeline stages, activation checkpointing and the compiled layers pass plain tensors, never a mask object.
tests/trainer/test_document_attention.py compares it tile by tile with `create_block_mask`'s.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

TILE = 128  # FlexAttention's default block size, for queries and keys alike

# Uncompiled, flex_attention runs reference math over the full T × T scores; torch.compile generates the fused kernel
# that skips tiles. Wrapping costs nothing until the first call. Inside a compiled decoder layer (parallel.compile),
# dynamo inlines this into the layer's graph; in an eager layer it is its own compiled region. Shapes are not pinned
# (no dynamic=False): training has one sequence length, but `pretrain eval` scores tasks at lengths cut to multiples
# of 64, and past dynamo's recompile limit (8 shapes) a pinned region would fall back to the reference math; a second
# shape here compiles one dynamic kernel instead.
_compiled_flex_attention = torch.compile(flex_attention)


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """Attention of each token to the earlier tokens of its own document. q: (B, nh, T, hd); k, v: (B, nkv, T, hd),
    grouped-query heads read natively; doc_ids: (B, T) from `trainer.model.document_ids` → (B, nh, T, hd).

    CUDA runs the compiled kernel. On CPU FlexAttention has no backward pass: it runs here only without gradients
    (the tests' reference checks); training on CPU takes SDPA (parallel.attention_kernel=auto)."""
    attend = _compiled_flex_attention if q.is_cuda else flex_attention
    return attend(q, k, v, block_mask=document_block_mask(doc_ids), enable_gqa=q.shape[1] != k.shape[1])


def document_block_mask(doc_ids: torch.Tensor) -> BlockMask:
    """(B, T) non-decreasing document ids → FlexAttention's block mask (shared by the heads) of: query t attends to
    key s iff s <= t in the same document. Any T: the last tile may be short."""
    T = doc_ids.shape[-1]
    num_tiles = -(-T // TILE)
    tile = torch.arange(num_tiles, device=doc_ids.device)
    first = doc_ids[:, tile * TILE]  # (B, n): each tile's first token's document
    last = doc_ids[:, (tile * TILE + TILE - 1).clamp(max=T - 1)]  # (B, n): its last token's
    earlier = tile[None, :] < tile[:, None]  # (n_q, n_kv): the key tile lies wholly before the query tile
    # A short last query tile is never full: the kernel pads it, and only a partial tile's mask covers the padding
    # (as in torch's create_block_mask). An earlier key tile is never the short one.
    whole = (tile * TILE + TILE <= T)[:, None]  # (n_q, 1)
    # [b, query tile, key tile]: the key tile's first document is the query tile's last one
    full = earlier & whole & (first[:, None, :] == last[:, :, None])
    reaches = last[:, None, :] >= first[:, :, None]  # the key tile's last document is at least the query tile's first
    partial = ((earlier & reaches) | (tile[None, :] == tile[:, None])) & ~full
    partial_count, partial_index = _kv_tiles(partial)
    full_count, full_index = _kv_tiles(full)
    return BlockMask.from_kv_blocks(partial_count, partial_index, full_count, full_index, BLOCK_SIZE=TILE,
                                    mask_mod=same_document_causal(doc_ids), seq_lengths=(T, T))


def same_document_causal(doc_ids: torch.Tensor):  # noqa: ANN201 (FlexAttention's mask_mod signature)
    """FlexAttention's mask function for the partial tiles: the element-wise rule of `trainer.model.document_mask`."""
    last = doc_ids.shape[-1] - 1

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        # Clamped: a short last tile is padded to TILE, and the padding's indices must not read past the row (the
        # kernel masks those positions out whatever this returns).
        same = doc_ids[b, q_idx.clamp(max=last)] == doc_ids[b, kv_idx.clamp(max=last)]
        return same & (kv_idx <= q_idx)

    return mask_mod


def _kv_tiles(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n_q, n_kv) bool → FlexAttention's (B, 1, n_q) count and (B, 1, n_q, n_kv) indices of the True key tiles of
    each query tile, those first (the heads share the mask: head dimension 1)."""
    count = tiles.sum(-1, dtype=torch.int32)
    index = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return count[:, None], index[:, None]
