"""The persona tokens' trainable rows (peft's trainable tokens on embed_tokens and lm_head) without a copy of either
whole matrix.

peft computes each forward with a merged copy of the matrix (`weight.index_copy(rows, deltas)`): 32,002 x 4,096
bf16 values, 250 MiB, for the embedding and again for lm_head, where the copy stays alive for the backward pass and
the backward pass then computes a full-size gradient for it only to keep its two trainable rows. Here the frozen
matrix is used as it is and only the trainable rows are computed apart:

- embedding: the frozen matrix's rows, with the positions that hold a trainable token taken from that token's
  delta row instead;
- lm_head: the frozen matrix's logits, with the trainable tokens' columns overwritten in place by the hidden states
  times their delta rows.

The embedding's values are peft's exactly; lm_head's trainable columns are the same products computed apart, which
can round differently in the last bit, so only training (gradients on) takes that path: evaluation and generation
keep peft's forward, whose logits a user reloading the adapter with stock peft gets bit for bit
(tests/test_train_e2e.py). The saved adapter is untouched: only `forward` is replaced, and peft's own forward still
serves whatever this does not cover (adapters disabled or merged, several active at once)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lean_trainable_tokens(model) -> int:
    """Give every trainable-tokens layer of a peft model the lean forward; returns how many layers."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    count = 0
    for module in model.modules():
        if isinstance(module, TrainableTokensLayer) and not getattr(module, "lean_forward", False):
            module.forward = _lean(module, module.forward)
            module.lean_forward = True
            count += 1
    return count


def _lean(layer, peft_forward):
    base = layer.get_base_layer()

    def forward(x, *args, **kwargs):
        parts = None if args or kwargs else _parts(layer)
        if parts is None:
            return peft_forward(x, *args, **kwargs)
        rows, delta = parts
        if type(base) is torch.nn.Embedding and not (base.max_norm is not None or base.sparse
                                                      or base.scale_grad_by_freq):
            # exactly an Embedding, a plain lookup: a subclass may scale or otherwise change it
            return _embed(base, x, rows, delta)
        if type(base) is torch.nn.Linear and base.bias is None and torch.is_grad_enabled():
            return _output(base, x, rows, delta)
        return peft_forward(x, *args, **kwargs)

    return forward


def _parts(layer):
    """(the trainable tokens' ids on the device, their delta rows) of a layer's one active, unmerged adapter."""
    active = layer.active_adapters
    if layer.disable_adapters or layer.merged or len(active) != 1:
        return None
    delta = layer.trainable_tokens_delta[active[0]]
    return _rows(layer, active[0], delta.device), delta


def output_parts(lm_head):
    """An output layer as (frozen weight, trainable tokens' ids or None, their delta rows or None): a bias-free
    Linear, or one under peft's trainable tokens with one active adapter. None for anything else."""
    layer = getattr(lm_head, "token_adapter", None)
    if layer is None:
        if type(lm_head) is torch.nn.Linear and lm_head.bias is None:
            return lm_head.weight, None, None
        return None
    base, parts = layer.get_base_layer(), _parts(layer)
    if parts is None or type(base) is not torch.nn.Linear or base.bias is not None:
        return None
    return (base.weight, *parts)


def _rows(layer, adapter: str, device: torch.device) -> torch.Tensor:
    # The trainable tokens' ids as a tensor on the device, made once: peft makes it from its list on every forward,
    # a copy from host memory that makes the host wait for the GPU each time (before lm_head, after every layer's
    # forward has been queued).
    key = (adapter, tuple(layer.token_indices[adapter]), device)
    cached = getattr(layer, "lean_rows", None)
    if cached is None or cached[0] != key:
        cached = key, torch.as_tensor(key[1], device=device)
        layer.lean_rows = cached
    return cached[1]


def _embed(base: torch.nn.Embedding, ids: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    out = F.embedding(ids, base.weight, padding_idx=base.padding_idx)
    match = ids.unsqueeze(-1) == rows                       # [..., trainable tokens]
    hit = match.any(-1, keepdim=True)
    own = F.embedding(match.int().argmax(-1), delta.to(out.dtype))
    return torch.where(hit, own, out)


def _output(base: torch.nn.Linear, hidden: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, base.weight)
    return logits.index_copy_(-1, rows, F.linear(hidden, delta.to(base.weight.dtype)))
