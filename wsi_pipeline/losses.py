"""Training losses: cross-entropy for classification, the discrete-hazard NLL (MCAT/Zadeh & Schmid) for survival."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .models.blocks import survival_from_logits


def cross_entropy(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """logits (B, C), label (B,) long."""
    return F.cross_entropy(logits.float(), label)


def nll_survival(logits: torch.Tensor, bin_index: torch.Tensor, censorship: torch.Tensor, alpha: float = 0.0,
                 eps: float = 1e-7) -> torch.Tensor:
    """Negative log-likelihood of discrete hazards; logits (B, K), bin_index (B,) long, censorship (B,) 1 = censored.

    An event in bin y contributes -log S(y-1) - log h(y); a censored case -log S(y). `alpha` up-weights the
    uncensored term: loss = (1 - alpha) * full + alpha * uncensored_only (MCAT's convention).
    """
    hazards, surv, _ = survival_from_logits(logits.float())
    c = censorship.float()
    y = bin_index.long().unsqueeze(1)
    s_pad = torch.cat([torch.ones_like(surv[:, :1]), surv], dim=1)  # S(-1) = 1
    s_before = s_pad.gather(1, y).clamp(min=eps).squeeze(1)
    h_at = hazards.gather(1, y).clamp(min=eps).squeeze(1)
    s_at = s_pad.gather(1, y + 1).clamp(min=eps).squeeze(1)
    uncensored = -(1 - c) * (torch.log(s_before) + torch.log(h_at))
    censored = -c * torch.log(s_at)
    return ((1 - alpha) * (censored + uncensored) + alpha * uncensored).mean()
