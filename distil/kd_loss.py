"""Token-level distillation against the teacher's stored top-k: generalized Jensen-Shannon divergence.

Stage 1 keeps, for every answer token, the teacher's k most likely next tokens and their log-probs
(distil/teacher_topk.py). Both sides are compared on the same k + 1 buckets: the teacher's top-k
tokens and one "rest" bucket with the remaining probability mass (teacher: 1 - sum of its top-k;
student: exactly, from its full softmax). The temperature tau divides the bucket log-probs, which
are then renormalized, on both sides alike (the teacher's other tokens are unknown, so it cannot be
applied before bucketing); tau = 1 leaves them as they are. No tau^2 factor.

    beta = 0    forward KL(teacher || student)   (mode covering; DistillKit's default)
    beta = 1    reverse KL(student || teacher)   (mode seeking)
    otherwise   beta * KL(teacher || M) + (1 - beta) * KL(student || M), M = beta*teacher + (1-beta)*student
                (TRL's generalized JSD; beta = 0.5 is the symmetric Jensen-Shannon divergence)

A top-k id of -1 (MISSING_ID) is a teacher token the student cannot have, dropped where the store is read
(distil.teacher_topk.keep_student_ids: Qwen2.5-72B pads its vocabulary to 152,064 rows, its students to
151,936): its bucket is empty on both sides, so the teacher's mass on it stays in the teacher's rest. Ids are
checked there, once per example on the host, not here per chunk (a host sync on GPU).

Pure torch, no distributed code: the trainer normalizes the per-token values like the cross-entropy
(distil/loss.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The teacher's rest mass is 1 - sum(top-k) from fp16 log-probs: rounding can make it 0 or negative.
REST_FLOOR = 1e-8
# A stored log-prob of -inf (a token the teacher ruled out) would make 0 * inf = NaN in the KL.
LOG_PROB_FLOOR = -1e4
MISSING_ID = -1  # a top-k column whose teacher token the student lacks (see the module docstring)


@dataclass(frozen=True)
class KDTerm:
    """loss.kd_alpha, kd_beta, kd_temperature of the config; onpolicy_beta (onpolicy.beta) is the divergence on the
    student's own samples (distil/onpolicy.py), which may differ from the one on the teachers' answers."""
    alpha: float
    beta: float = 0.5
    temperature: float = 1.0
    onpolicy_beta: float | None = None

    def divergence(self, logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_log_probs: torch.Tensor,
                   onpolicy: torch.Tensor) -> torch.Tensor:
        """token_kd with `beta` on the teachers' answers and `onpolicy_beta` where `onpolicy` [n] is true."""
        if self.onpolicy_beta is None or self.onpolicy_beta == self.beta:
            return token_kd(logits, teacher_ids, teacher_log_probs, self.beta, self.temperature)
        student, teacher = buckets(logits, teacher_ids, teacher_log_probs, self.temperature)
        return torch.where(onpolicy, generalized_jsd(student, teacher, self.onpolicy_beta),
                           generalized_jsd(student, teacher, self.beta))  # the tables are [n, k + 1]: both are cheap


def bucket_log_probs(log_probs_topk: torch.Tensor, log_rest: torch.Tensor, temperature: float) -> torch.Tensor:
    """[n, k] top-k log-probs + [n] rest log-mass -> [n, k + 1] normalized log-probs at `temperature`."""
    buckets = torch.cat([log_probs_topk, log_rest.unsqueeze(-1)], dim=-1)
    return F.log_softmax(buckets / temperature, dim=-1)


def teacher_buckets(teacher_log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher's [n, k] top-k log-probs -> [n, k + 1] bucket log-probs (rest = 1 - their sum)."""
    lp = teacher_log_probs.float().clamp(min=LOG_PROB_FLOOR)
    rest = (1.0 - lp.exp().sum(-1)).clamp(min=REST_FLOOR)
    return bucket_log_probs(lp, rest.log(), temperature)


def student_buckets(logits: torch.Tensor, teacher_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Student logits [n, V] -> [n, k + 1] bucket log-probs over the teacher's top-k ids + the rest
    (a MISSING_ID column: an empty bucket)."""
    logits = logits.float()
    total = logits.logsumexp(-1)
    missing = teacher_ids == MISSING_ID
    # a missing column reads the row's largest id (a real one unless all are missing) and is emptied after
    # the gather; scattering -inf onto that id twice takes nothing more out of the rest
    ids = torch.where(missing, teacher_ids.max(-1, keepdim=True).values.clamp(min=0), teacher_ids)
    topk = (logits.gather(-1, ids) - total.unsqueeze(-1)).masked_fill(missing, LOG_PROB_FLOOR)
    rest = logits.scatter(-1, ids, float("-inf")).logsumexp(-1) - total  # exact, not 1 - sum
    return bucket_log_probs(topk, rest, temperature)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row (every log-prob here is finite: see teacher_buckets)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def generalized_jsd(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row divergence [n] between two [n, B] log-prob tables (see the module docstring)."""
    if beta == 0.0:
        return _kl(teacher_log_probs, student_log_probs)
    if beta == 1.0:
        return _kl(student_log_probs, teacher_log_probs)
    mixture = torch.logsumexp(torch.stack([teacher_log_probs + math.log(beta),
                                           student_log_probs + math.log(1.0 - beta)]), dim=0)
    return beta * _kl(teacher_log_probs, mixture) + (1.0 - beta) * _kl(student_log_probs, mixture)


def buckets(logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_log_probs: torch.Tensor,
            temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's and the teacher's [n, k + 1] bucket log-probs of the same positions."""
    ids = teacher_ids.long()
    teacher_log_probs = teacher_log_probs.masked_fill(ids == MISSING_ID, float("-inf"))  # its mass: the rest
    return student_buckets(logits, ids, temperature), teacher_buckets(teacher_log_probs, temperature)


def token_kd(logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_log_probs: torch.Tensor,
             beta: float, temperature: float) -> torch.Tensor:
    """[n] fp32 divergence of the student's next-token distribution (logits [n, V]) from the teacher's
    top-k ([n, k] ids, [n, k] log-probs) at each position. Ids are in [0, V) or MISSING_ID (checked where
    the store is read, distil.teacher_topk)."""
    return generalized_jsd(*buckets(logits, teacher_ids, teacher_log_probs, temperature), beta)
