"""The training loss without the batch's whole logits in memory.

transformers computes a causal LM's loss from the full logits: tokens x vocabulary in bf16, then a float32 copy, and
cross-entropy keeps a float32 log-probability for every one of them until the backward pass, which adds a float32
and a bf16 gradient of the same size. At 2,048 tokens and Llama-2's 32,002-word vocabulary that is about 0.9 GiB,
more than the whole of what gradient checkpointing keeps for 32 layers. Here the loss is computed a chunk of
tokens at a time, and each chunk's gradient with respect to the hidden states (and to the persona tokens' output
rows) is computed at once, in the forward pass, as Liger's and Unsloth's fused cross-entropy do: what stays for the
backward pass is one bf16 hidden-state gradient. The math is transformers': logits in the weight's dtype,
cross-entropy in float32, the sum over labelled tokens divided by `num_items_in_batch` (or their count), the
gradient of the logits cast to the weight's dtype before it meets the weight.

Only a forward with labels and gradients on (training) uses it, and returns no logits; evaluation (no gradients) and
generation (no labels) get the logits as before."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX as IGNORE
from .tokens import output_parts

# Float32 logits a chunk may hold: with Llama-2's vocabulary, 524 tokens.
CHUNK_BYTES = 64 * 2 ** 20


def chunked_loss(model) -> bool:
    """Compute the training loss of this (peft-wrapped) causal LM in chunks; False where its shape is not one this
    knows (a model with `model` and `lm_head`, a bias-free output layer)."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(causal, "chunked_loss", False):
        return True
    if not hasattr(causal, "model") or not hasattr(causal, "lm_head"):
        return False
    if output_parts(causal.lm_head) is None:
        return False
    whole = causal.forward

    def forward(*args, labels=None, **kwargs):
        parts = output_parts(causal.lm_head)
        if (args or labels is None or parts is None or not torch.is_grad_enabled()
                or kwargs.get("logits_to_keep") or kwargs.get("return_dict") is False):
            return whole(*args, labels=labels, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        num_items = kwargs.get("num_items_in_batch")
        shift = kwargs.pop("shift_labels", None)
        outputs = causal.model(**kwargs)
        hidden = outputs.last_hidden_state
        loss = loss_from_hidden(hidden, labels if shift is None else None, *parts, num_items=num_items,
                                shift_labels=shift)
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    causal.forward = forward
    causal.chunked_loss = True
    return True


def loss_from_hidden(hidden, labels, weight, rows=None, delta=None, num_items=None, shift_labels=None,
                     chunk: int | None = None) -> torch.Tensor:
    """transformers' ForCausalLMLoss of `hidden @ weight.T` (with the `rows` columns from `delta`), a chunk of
    tokens at a time."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    denom = (targets != IGNORE).sum() if num_items is None else torch.as_tensor(num_items, device=hidden.device)
    chunk = chunk or max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    return _ChunkedLoss.apply(flat, weight, delta, rows, targets, denom.float(), chunk)


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, delta, rows, targets, denom, chunk):
        dtype = weight.dtype
        own = None if delta is None else delta.detach().to(dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_delta = (torch.zeros(delta.shape, dtype=torch.float32, device=delta.device)
                      if delta is not None and ctx.needs_input_grad[2] else None)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = F.linear(h, weight)
            if own is not None:
                logits.index_copy_(-1, rows, F.linear(h, own))
            probs = logits.float()
            del logits
            valid = t != IGNORE
            picked = t.clamp(min=0).unsqueeze(1)
            lse = torch.logsumexp(probs, -1)
            total += ((lse - probs.gather(1, picked).squeeze(1)) * valid).sum()
            if grad_hidden is None and grad_delta is None:
                continue
            # d(sum of losses / denom) / d logits = (softmax - one-hot) * valid / denom, in float32, then cast.
            probs.sub_(lse.unsqueeze(1)).exp_()
            probs.scatter_add_(1, picked, torch.full_like(picked, -1, dtype=probs.dtype))
            probs.mul_((valid / denom).unsqueeze(1))
            g = probs.to(dtype)
            del probs
            if own is not None:
                g_rows = g.index_select(1, rows)
                g.index_fill_(1, rows, 0)
                if grad_delta is not None:
                    grad_delta += g_rows.float().T @ h.float()
            if grad_hidden is not None:
                gh = g @ weight
                if own is not None:
                    gh.addmm_(g_rows, own)
                grad_hidden[start:start + chunk] = gh
        ctx.save_for_backward(grad_hidden, grad_delta)
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_delta = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_out.to(grad_hidden.dtype), None,
                None if grad_delta is None else grad_delta * grad_out, None, None, None, None)
