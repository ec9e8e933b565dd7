"""Training losses: on class logits with autograd (the generic engine, the plain loop), and AttAI's
batched value + gradient (the fast engine) for k clients' padded batches at once.

`contrastive` is the reference code's symmetric in-batch CLIP loss: row i of a batch is paired with the
prompt of its own label, the other rows' prompts are negatives (same-class ones included).
`ce` is plain cross-entropy over all class prompts.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

LOSSES = ("contrastive", "ce")


def in_batch_loss(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss on in-batch logits [B, B] (row i: image i; column j: the prompt of image j's label)."""
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def masked_loss(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, kind: str) -> torch.Tensor:
    """The training loss of one padded batch from its class logits [B, C] (valid [B]: real rows); written
    without data-dependent shapes so that torch.func can vmap it over clients."""
    if kind == "ce":
        nll = -torch.log_softmax(logits, dim=1).gather(1, labels[:, None])[:, 0]
        return torch.where(valid, nll, 0).sum() / valid.sum()
    pairs = logits.index_select(1, labels)  # [B, B]: image i against the prompt of image j's label
    log_p_row = torch.log_softmax(pairs.masked_fill(~valid[None, :], float("-inf")), dim=1)
    log_p_col = torch.log_softmax(pairs.masked_fill(~valid[:, None], float("-inf")), dim=0)
    nll = -(log_p_row.diagonal() + log_p_col.diagonal())
    return torch.where(valid, nll, 0).sum() / (2 * valid.sum())


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """image, text: normalised [B, d], text[i] = prompt of image i's label."""
    logits = scale * image @ text.T
    target = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def ce_loss(image: torch.Tensor, class_text: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """image: normalised [B, d]; class_text: normalised [C, d]."""
    return F.cross_entropy(scale * image @ class_text.T, labels)


@functools.lru_cache(maxsize=8)
def _eye(n: int, dtype: torch.dtype, device: torch.device, times: float = 1.0) -> torch.Tensor:
    return torch.eye(n, dtype=dtype, device=device).mul_(times)  # built once, not every step


def contrastive_grad(image, text, valid, scale: float, text_grad: bool = True):
    """Batched contrastive loss over padded batches.

    image, text: [k, B, d] normalised; valid: [k, B] bool (padding rows are False), or None when no
    batch has padding (the common case: it skips the masking).
    Returns (loss [k], d loss / d image [k, B, d], d loss / d text [k, B, d], or None with
    text_grad=False: fixed prompts need none).
    """
    logits = torch.bmm(image, text.transpose(1, 2)).mul_(scale)  # [k, B, B]
    eye = _eye(logits.shape[1], image.dtype, image.device)
    if valid is None:
        log_p_row, log_p_col = torch.log_softmax(logits, dim=2), torch.log_softmax(logits, dim=1)
        nll_sum = torch.add(log_p_row.diagonal(dim1=1, dim2=2), log_p_col.diagonal(dim1=1, dim2=2)).sum(1)
        n = logits.shape[1]
        dlogits = log_p_row.exp_().add_(log_p_col.exp_()).sub_(_eye(n, image.dtype, image.device, 2.0))
        dlogits.mul_(scale / (2 * n))
        d_text = torch.bmm(dlogits.transpose(1, 2), image) if text_grad else None
        return nll_sum.div_(-2 * n), torch.bmm(dlogits, text), d_text
    row_ok, col_ok = valid[:, :, None], valid[:, None, :]
    n = valid.sum(1).to(image.dtype)  # valid rows per client (>= 2)
    log_p_row = torch.log_softmax(logits.masked_fill(~col_ok, float("-inf")), dim=2)
    log_p_col = torch.log_softmax(logits.masked_fill(~row_ok, float("-inf")), dim=1)
    nll = -(log_p_row.diagonal(dim1=1, dim2=2) + log_p_col.diagonal(dim1=1, dim2=2))
    loss = torch.where(valid, nll, 0).sum(1) / (2 * n)
    dlogits = (torch.where(row_ok, log_p_row.exp() - eye, 0) + torch.where(col_ok, log_p_col.exp() - eye, 0))
    dlogits = dlogits * (scale / (2 * n))[:, None, None]
    return loss, torch.bmm(dlogits, text), torch.bmm(dlogits.transpose(1, 2), image) if text_grad else None


def ce_grad(image, class_text, labels, valid, scale: float):
    """Batched cross-entropy over class prompts.

    image: [k, B, d]; class_text: [k, C, d] normalised; labels: [k, B]; valid: [k, B] bool.
    Returns (loss [k], d loss / d image [k, B, d], d loss / d class_text [k, C, d]).
    """
    loss, dlogits = _ce(scale * torch.bmm(image, class_text.transpose(1, 2)), labels, valid, scale)  # [k, B, C]
    return loss, torch.bmm(dlogits, class_text), torch.bmm(dlogits.transpose(1, 2), image)


def _ce(logits, labels, valid, scale: float):
    """Mean cross-entropy of each client's valid rows, and its gradient with respect to the logits before
    their `scale` (what the two batched CE gradients above and below share)."""
    if valid is None:
        valid = torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
    n = valid.sum(1).to(logits.dtype)
    log_p = torch.log_softmax(logits, dim=2)
    nll = -log_p.gather(2, labels[:, :, None]).squeeze(2)
    loss = torch.where(valid, nll, 0).sum(1) / n
    onehot = F.one_hot(labels, logits.shape[2]).to(logits.dtype)
    return loss, torch.where(valid[:, :, None], log_p.exp() - onehot, 0) * (scale / n)[:, None, None]


def head_ce_grad(image, weight, bias, labels, valid, scale: float):
    """Batched cross-entropy of linear heads, logits = scale * (image @ weight^T + bias) (federate/heads.py).

    image: [k, B, d]; weight: [k, C, d]; bias: [k, C]; labels: [k, B]; valid: [k, B] bool or None.
    Returns (loss [k], d loss / d image [k, B, d], d loss / d weight [k, C, d], d loss / d bias [k, C]).
    """
    logits = torch.baddbmm(bias.unsqueeze(1), image, weight.transpose(1, 2)).mul_(scale)  # [k, B, C]
    loss, dlogits = _ce(logits, labels, valid, scale)
    return loss, torch.bmm(dlogits, weight), torch.bmm(dlogits.transpose(1, 2), image), dlogits.sum(1)
