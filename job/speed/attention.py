"""Padding-free batches: each batch's sequences back to back in one row, and attention kept inside each."""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

# The attention implementation registered with transformers for padding-free batches (see below).
PADDING_FREE_ATTENTION = "sdpa_padding_free"


def _varlen_kernel():
    """torch's flash-attention varlen entry point (torch >= 2.10), with its causal argument for this version."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, {}
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal


_VARLEN, _CAUSAL = _varlen_kernel()


def padding_free_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    """Attention over a flattened batch [1, heads, tokens, dim] holding several sequences back to back.

    The sequence boundaries come from `cu_seq_lens_q` (DataCollatorWithFlattening), so no token attends across
    them. On a GPU with flash attention this is one varlen kernel over only the in-sequence causal blocks;
    elsewhere, one causal SDPA call per sequence (same result, slower). Batches without boundaries (generation,
    a padded batch) take transformers' own SDPA path.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))      # [tokens, heads, dim]
    if _VARLEN is not None and q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 8 and \
            q.dtype in (torch.float16, torch.bfloat16):
        longest = int(kwargs["max_length_q"])
        out = _VARLEN(q, k, v, cu, cu, longest, longest, scale=scaling, **_CAUSAL)
    else:
        bounds = cu.tolist()
        out = torch.cat([
            F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                                           is_causal=True, scale=scaling).transpose(0, 1)
            for s, e in zip(bounds[:-1], bounds[1:])])
    return out.unsqueeze(0), None                                        # [1, tokens, heads, dim]


def _padding_free_mask(**kwargs):
    # No 2D mask means a flattened batch (its boundaries travel as cu_seq_lens) or an unpadded one: causal either
    # way, so no dense mask is built. A padded batch gets SDPA's mask as usual.
    from transformers.masking_utils import sdpa_mask

    return None if kwargs.get("attention_mask") is None else sdpa_mask(**kwargs)


def _no_packing_search_for_flattened_batches() -> None:
    """Without a 2D mask, transformers' mask preparation looks for sequences packed in a row
    (find_packed_sequence_indices), and reads its answer on the host (`.all()`): a wait at the start of every
    padding-free forward for the GPU to finish all queued work, the step before's optimizer included, so the host
    could never issue a step while the GPU finishes the last one. A flattened batch carries its boundaries as
    cu_seq_lens and this attention needs no mask for it (_padding_free_mask's None): go straight to that None. Any
    other case (a padded batch, a cache, another attention) is left to transformers."""
    from transformers import masking_utils

    prepare = masking_utils._preprocess_mask_arguments
    if getattr(prepare, "skips_packing_search", False):
        return

    @functools.wraps(prepare)
    def without_packing_search(config, inputs_embeds, attention_mask, cache, *args, **kwargs):
        if attention_mask is None and cache is None and config._attn_implementation == PADDING_FREE_ATTENTION:
            return True, None, None, None, None, None, None      # early exit: no mask
        return prepare(config, inputs_embeds, attention_mask, cache, *args, **kwargs)

    without_packing_search.skips_packing_search = True
    masking_utils._preprocess_mask_arguments = without_packing_search


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PADDING_FREE_ATTENTION, padding_free_attention)
    AttentionMaskInterface.register(PADDING_FREE_ATTENTION, _padding_free_mask)
    _no_packing_search_for_flattened_batches()


def data_collator(plan_, tokenizer):
    """Padding-free: each batch's sequences back to back in one row, positions restarting per sequence and the
    first label of each masked, so no sequence predicts the next one's first token. Otherwise: padded."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if plan_.padding_free:
        return DataCollatorWithFlattening(return_flash_attn_kwargs=True, separator_id=-100)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

