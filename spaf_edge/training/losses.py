"""SpAF training losses (DESIGN §3), with vocabulary-sized logits computed in chunks.

Per exit ``k``, on the base's cutoff states ``h`` [B, S, H]:

- adapter KL: ``KL(p_t ‖ q_t)``, ``q_t = softmax(head(a(h(t), f(t-1))))`` (``f``: the base's
  top state, read by top-aware adapter kinds only), plus optional CE of
  ``q_t`` on the data token ``x_{t+1}`` (``loss_weights.adapter_ce``);
- alignment state loss (``mse`` or ``cosine``) between ``ĥ(t+1) = AH(e(x_{t+1}), h̄(t))``
  and ``h(t+1)``;
- alignment token KL: ``KL(p_{t+1} ‖ softmax(head(a(ĥ(t+1)))))``;
- optional top-k ranking term (``loss_weights.topk``, HASS-style), on the adapter's drafts
  and on the aligned drafts of every rollout step: ``-Σ_{i ∈ topk(p)} p_i log q_i`` over the
  teacher's ``topk_distill_k`` most likely tokens, with ``p`` as it is (not renormalised on
  the top k), so a position weighs by the mass the teacher puts on its top k. It is the part
  of the cross-entropy ``H(p, q)`` (which the KL holds) that sits on those tokens, an extra
  push to rank them as the teacher does, which is what a draft tree's branches need; its
  minimum is at ``q`` = ``p`` renormalised on the top k, so it is not 0 at ``q = p``.

Rollout: step 1 feeds the exact ``h(t)``; step ``r > 1`` feeds the AH its own
prediction of step ``r-1`` (as at inference, where aligned drafts chain), giving
``ĥ_r`` for positions ``r .. S-1``; the adapter on ``ĥ_r`` reads the top state drafted by
step ``r-1`` (``final_norm(a(...))``), as chained drafts do. An attending adapter reads
the exact keys/values of earlier positions (``model.adapter_context``). Alignment losses (state,
token KL, top-k) are averaged over the rollout steps, step ``r`` weighing
``alignment_rollout_decay**(r-1)`` with the weights normalised to sum to 1 over the steps that
fit the sequence (decay 1: the plain mean). Every position-level term uses the data's loss mask.

Normalisation. Each term is a masked sum divided by its count of trained positions.
In data-parallel training ``normalize`` replaces the local counts by the global count
over all ranks divided by the number of ranks; the engines average gradients over
ranks, so the result is the gradient of the global masked mean: exactly what one
process computes on the concatenated batch (see docs/training.md).

Memory. Full-vocabulary logits of a batch are ``B*S*V`` floats (4096 x 49152 fp32 is
800 MB, and softmax/KL/grad need several such). :class:`ChunkedDistillLoss` never
holds more than ``chunk_rows`` rows of them: its forward walks the positions in
chunks, computes teacher log-probs once per chunk (shared by every student variant:
the adapter's and each rollout step's), the KL/CE values and, right there, their
analytic gradient w.r.t. the student's post-norm state (``(q - p) W`` for KL,
``(q - onehot) W`` for CE, ``(q Σ_K p - p·1_K) W`` for the top-k term, ``K`` the teacher's
top k). Only those [M, N, H] gradients are kept; backward just
scales them. So there is a single ordinary ``backward()`` (it works unchanged under
accelerate / DDP / DeepSpeed), peak memory is ``O(chunk_rows * V)``, and no logit is
recomputed.

Draft vocabulary. With ``model.draft_vocab`` (V_d ids) set, the student distribution
is the softmax over the V_d rows of the LM head (what drafting samples from), and
the teacher is ``p`` renormalised on V_d, which equals the softmax of the teacher's
logits restricted to V_d. The KL over V_d is then finite and zero exactly when the
drafts match the base's distribution within V_d. CE ignores targets outside V_d. The top-k
term takes the teacher's top k within V_d (all of V_d when k exceeds it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.nn import functional as F

from spaf_edge.core.config import SpAFConfig
from spaf_edge.model import SpAFModel
from spaf_edge.training.features import BaseFeatures, previous_exact_tops

DEFAULT_CHUNK_ROWS = 512


class DistillSums(NamedTuple):
    """Weighted per-variant sums of :class:`ChunkedDistillLoss`, each [M]."""

    kl: torch.Tensor
    ce: torch.Tensor
    topk: torch.Tensor


class ChunkedDistillLoss(torch.autograd.Function):
    """Weighted KL(p ‖ q), CE and top-k CE sums of M student variants against one teacher, chunked.

    students: [M, N, H] post-norm states (grad flows); teacher: [N, H] post-norm states;
    weight: [V, H] and bias: [V] or None, the frozen LM head rows; kl_weights, ce_weights,
    topk_weights: [M, N] per-row weights (e.g. mask / count; None: term off); targets: [N]
    index into V, -1 = none; topk_k: the teacher's tokens the top-k term reads (at most V).
    Returns (kl [M], ce [M], topk [M]).
    """

    @staticmethod
    def forward(ctx: Any, students, teacher, weight, bias, kl_weights, ce_weights, targets, topk_weights, topk_k,
                chunk_rows):
        num_variants, num_rows, _ = students.shape
        need_grad = ctx.needs_input_grad[0]
        with_ce = ce_weights is not None and bool((ce_weights > 0).any())
        with_topk = topk_weights is not None and bool((topk_weights > 0).any())
        work = torch.promote_types(students.dtype, torch.float32)  # softmax/KL precision: >= fp32
        kl = torch.zeros(num_variants, dtype=work, device=students.device)
        ce = torch.zeros_like(kl)
        topk = torch.zeros_like(kl)
        grad_kl = torch.zeros_like(students) if need_grad else None
        grad_ce = torch.zeros_like(students) if need_grad and with_ce else None
        grad_topk = torch.zeros_like(students) if need_grad and with_topk else None
        for start in range(0, num_rows, chunk_rows):
            rows = slice(start, min(num_rows, start + chunk_rows))
            kl_w = kl_weights[:, rows].to(work)  # [M, C]
            ce_w = ce_weights[:, rows].to(work) if with_ce else None
            topk_w = topk_weights[:, rows].to(work) if with_topk else None
            active = (kl_w > 0).any(1)
            if with_ce:
                active |= (ce_w > 0).any(1)
            if with_topk:
                active |= (topk_w > 0).any(1)
            if not bool(active.any()):
                continue
            teacher_logp = F.log_softmax(F.linear(teacher[rows], weight, bias).to(work), dim=-1)  # [C, V]
            teacher_p = teacher_logp.exp()
            if with_ce:
                chunk_targets = targets[rows]
                valid = chunk_targets >= 0
                target_index = chunk_targets.clamp(min=0).unsqueeze(1)  # [C, 1]
            if with_topk:
                top_p, top_index = teacher_p.topk(min(topk_k, teacher_p.shape[-1]), dim=-1)  # [C, K]
                top_mass = top_p.sum(-1)  # [C]
            for m in torch.nonzero(active).flatten().tolist():
                student_logq = F.log_softmax(F.linear(students[m, rows], weight, bias).to(work), dim=-1)  # [C, V]
                kl_rows = (teacher_p * (teacher_logp - student_logq)).sum(-1)  # [C]
                kl[m] += (kl_w[m] * kl_rows).sum()
                if with_ce:
                    row_w = ce_w[m] * valid
                    ce[m] += (row_w * -student_logq.gather(1, target_index).squeeze(1)).sum()
                if with_topk:
                    topk_rows = -(top_p * student_logq.gather(1, top_index)).sum(-1)  # [C]
                    topk[m] += (topk_w[m] * topk_rows).sum()
                student_q = student_logq.exp_()  # in place: the log-probs are not needed after this
                if not need_grad:
                    continue
                # d KL / d logits = q - p (p and q sum to 1 over V).
                grad_logits = (student_q - teacher_p).mul_(kl_w[m].unsqueeze(1))
                grad_kl[m, rows] = (grad_logits.to(weight.dtype) @ weight).to(students.dtype)
                if with_topk:
                    # d (-sum_K p log q) / d logits = q * sum_K p - p on K.
                    grad_logits = student_q * (topk_w[m] * top_mass).unsqueeze(1)
                    grad_logits.scatter_add_(1, top_index, -top_p * topk_w[m].unsqueeze(1))
                    grad_topk[m, rows] = (grad_logits.to(weight.dtype) @ weight).to(students.dtype)
                if with_ce:
                    # d CE / d logits = q - onehot(target).
                    grad_logits = student_q.mul_(row_w.unsqueeze(1))
                    grad_logits.scatter_add_(1, target_index, -row_w.unsqueeze(1))
                    grad_ce[m, rows] = (grad_logits.to(weight.dtype) @ weight).to(students.dtype)
        ctx.save_for_backward(grad_kl, grad_ce, grad_topk)
        return kl, ce, topk

    @staticmethod
    def backward(ctx: Any, grad_kl_out, grad_ce_out, grad_topk_out):
        grad_kl, grad_ce, grad_topk = ctx.saved_tensors
        grad_students = None
        if ctx.needs_input_grad[0]:
            grad_students = grad_kl * grad_kl_out.to(grad_kl.dtype).view(-1, 1, 1)
            if grad_ce is not None:
                grad_students = grad_students + grad_ce * grad_ce_out.to(grad_ce.dtype).view(-1, 1, 1)
            if grad_topk is not None:
                grad_students = grad_students + grad_topk * grad_topk_out.to(grad_topk.dtype).view(-1, 1, 1)
        return grad_students, None, None, None, None, None, None, None, None, None


def chunked_distill_terms(
    students: torch.Tensor,
    teacher: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kl_weights: torch.Tensor,
    ce_weights: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    topk_weights: torch.Tensor | None = None,
    topk_k: int = 8,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> DistillSums:
    """See :class:`ChunkedDistillLoss`. students: [M, N, H] -> DistillSums of [M] each."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows}: expected an integer >= 1.")
    if ce_weights is not None and targets is None:
        raise ValueError("ce_weights needs targets.")
    if topk_weights is not None and topk_k < 1:
        raise ValueError(f"topk_k={topk_k}: expected an integer >= 1.")
    return DistillSums(*ChunkedDistillLoss.apply(students, teacher, weight, bias, kl_weights, ce_weights, targets,
                                                 topk_weights, topk_k, chunk_rows))


def alignment_state_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str, count: torch.Tensor | None = None
) -> torch.Tensor:
    """Masked mean over positions. pred, target: [B, S, H]; mask: [B, S].

    ``mse``: mean squared error per element (on the raw cutoff states); ``cosine``: 1 - cos.
    ``count`` is the divisor (default: the mask's sum, at least 1). Computed in fp32.
    """
    pred, target, mask = pred.float(), target.float(), mask.float()
    if kind == "mse":
        per_position = (pred - target).pow(2).mean(-1)
    else:
        per_position = 1 - F.cosine_similarity(pred, target, dim=-1, eps=1e-6)
    return (per_position * mask).sum() / (mask.sum().clamp(min=1) if count is None else count)


def spaf_losses(
    model: SpAFModel,
    batch: dict[str, torch.Tensor],
    features: BaseFeatures,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """All loss components for one batch, and their weighted sum under ``"total"``.

    Keys: ``adapter_kl/{k}``, ``adapter_ce/{k}`` (when its weight > 0), ``align_state/{k}``
    and ``align_token_kl/{k}`` (when the alignment weights are > 0), ``adapter_topk/{k}`` and
    ``align_topk/{k}`` (when ``loss_weights.topk`` > 0; the latter with rollout steps), ``total``.
    ``normalize`` maps the local counts of trained positions, [C] fp32, to the divisors
    (default: each count, at least 1); see the module docstring.
    """
    config: SpAFConfig = model.config
    weights = config.loss_weights
    input_ids = batch["input_ids"]  # [B, S]
    mask = batch["loss_mask"].to(features.final.dtype)  # [B, S]
    batch_size, seq_len = input_ids.shape
    num_rows = batch_size * seq_len
    head_weight, head_bias, targets = draft_head(model, input_ids)
    norm = model.top_state
    teacher = features.final.reshape(num_rows, -1)  # [N, H]
    with_ce = weights.adapter_ce > 0
    with_topk = weights.topk > 0
    with_alignment = weights.alignment > 0 or weights.alignment_token > 0
    aligned_drafts = weights.alignment_token > 0 or with_topk  # the adapter on each rollout step's ĥ
    steps = [step for step in range(1, config.alignment_rollout_steps + 1 if with_alignment else 1) if step < seq_len]
    ce_mask = mask * (targets >= 0).view(batch_size, seq_len) if with_ce else None
    # Divisors, in fp32 whatever the features' dtype: [all positions, rollout step 1.., CE].
    exact = batch["loss_mask"].float()
    counts = torch.stack([exact.sum()] + [exact[:, step:].sum() for step in steps]
                         + ([ce_mask.float().sum()] if with_ce else []))
    divisors = normalize(counts) if normalize is not None else counts.clamp(min=1)  # [C] fp32
    decay = config.alignment_rollout_decay
    losses: dict[str, torch.Tensor] = {}
    total = features.final.new_zeros(())
    for k in config.adapter_layers:
        hidden = features.cutoff[k]  # [B, S, H]
        exact_top = previous_exact_tops(model, features, k)  # [B, S, H]
        reads_top = model.reads_top_state(k)
        context = model.adapter_context(hidden, exact_top, k)  # exact keys/values (attending kinds)
        # Variant 0: the adapter on exact states, reading the exact top state of the position before.
        states = [model.adapt(hidden, k, exact_top if reads_top else None, context=context)]
        row_masks = [mask]
        row_divisors = [divisors[0]]
        state_losses = []
        previous = hidden
        for index, step in enumerate(steps, 1):
            predicted = model.align(input_ids[:, step:], previous[:, :-1], k)  # ĥ for positions step..S-1
            step_mask = mask[:, step:]
            state_losses.append(alignment_state_loss(predicted, hidden[:, step:], step_mask,
                                                     config.alignment_loss_type, divisors[index]))
            if aligned_drafts:
                # Chained drafting: the top state read here is the previous step's drafted one.
                drafted_top = norm(states[-1][:, step - 1:-1]) if reads_top else None  # positions step-1 .. S-2
                adapted = model.adapt(predicted, k, drafted_top, offset=step, context=context)
                states.append(F.pad(adapted, (0, 0, step, 0)))  # [B, S, H]
                row_masks.append(F.pad(step_mask, (step, 0)))
                row_divisors.append(divisors[index])
            previous = predicted
        students = norm(torch.stack(states)).reshape(len(states), num_rows, -1)  # [M, N, H]
        row_weights = torch.stack([m / d for m, d in zip(row_masks, row_divisors)]).reshape(len(states), num_rows)
        kl_weights = variant_rows(row_weights, weights.adapter_base > 0, weights.alignment_token > 0)
        ce_weights = None
        if with_ce:
            ce_weights = torch.zeros_like(kl_weights)
            ce_weights[0] = (ce_mask / divisors[-1]).reshape(num_rows)
        sums = chunked_distill_terms(students, teacher, head_weight, head_bias, kl_weights, ce_weights, targets,
                                     row_weights if with_topk else None, config.topk_distill_k, chunk_rows)
        if weights.adapter_base > 0:
            losses[f"adapter_kl/{k}"] = sums.kl[0]
            total = total + weights.adapter_base * sums.kl[0]
        if with_ce:
            losses[f"adapter_ce/{k}"] = sums.ce[0]
            total = total + weights.adapter_ce * sums.ce[0]
        if with_topk:
            losses[f"adapter_topk/{k}"] = sums.topk[0]
            total = total + weights.topk * sums.topk[0]
        if state_losses and weights.alignment > 0:
            losses[f"align_state/{k}"] = rollout_mean(torch.stack(state_losses), decay)
            total = total + weights.alignment * losses[f"align_state/{k}"]
        if len(states) > 1 and weights.alignment_token > 0:
            losses[f"align_token_kl/{k}"] = rollout_mean(sums.kl[1:], decay)
            total = total + weights.alignment_token * losses[f"align_token_kl/{k}"]
        if len(states) > 1 and with_topk:
            losses[f"align_topk/{k}"] = rollout_mean(sums.topk[1:], decay)
            total = total + weights.topk * losses[f"align_topk/{k}"]
    losses["total"] = total
    return losses


def variant_rows(row_weights: torch.Tensor, adapter_on: bool, aligned_on: bool) -> torch.Tensor:
    """``row_weights`` [M, N] with variant 0 (the adapter's) and variants 1.. (aligned) zeroed where off."""
    rows = row_weights.clone()
    if not adapter_on:
        rows[0] = 0
    if not aligned_on:
        rows[1:] = 0
    return rows


def rollout_mean(values: torch.Tensor, decay: float) -> torch.Tensor:
    """Weighted mean of per-rollout-step values [R]: step r weighs ``decay**(r-1)``, normalised to sum 1.

    ``decay`` 1 is the plain mean, computed as such so that it keeps its exact bits.
    """
    if decay == 1:
        return values.mean()
    step_weights = torch.tensor([decay**step for step in range(values.shape[0])], dtype=values.dtype,
                                device=values.device)
    return (values * (step_weights / step_weights.sum())).sum()


def draft_head(model: SpAFModel, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """LM-head rows of the draft vocabulary and next-token targets indexed into it.

    Returns weight [V_d, H], bias [V_d] or None, targets [B*S] (-1: no next token in
    the sequence, or a token outside V_d).
    """
    lm_head = model.arch.lm_head(model.base)
    vocab = model.draft_vocab
    next_tokens = F.pad(input_ids[:, 1:], (0, 1), value=-1).reshape(-1)  # [B*S]
    if vocab.numel() == 0:
        return lm_head.weight, lm_head.bias, next_tokens
    lookup = torch.full((lm_head.weight.shape[0] + 1,), -1, dtype=torch.long, device=input_ids.device)
    lookup[vocab] = torch.arange(vocab.numel(), device=input_ids.device)
    targets = lookup[next_tokens]  # -1 maps to the last slot, which stays -1
    bias = lm_head.bias[vocab] if lm_head.bias is not None else None
    return lm_head.weight[vocab], bias, targets
