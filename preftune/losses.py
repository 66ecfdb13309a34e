"""Preference losses: pure functions of per-sequence log-probabilities, registered by name in `LOSSES`.

Each loss takes the policy's and the reference's `SequenceLogps` (shapes (B,)) and `LossParams`, and returns
per-pair losses and implicit rewards. `compute_loss` is the training objective: the weighted sum of the chosen
losses (TRL's multi-loss semantics), per pair; the trainer takes the mean. `LOSSES` is the one list of loss
names: the CLI help, config errors and the tests read it. The option checks live here too
(`check_loss_options`), next to the losses that read the options. This module imports only torch at run time.

Notation in the docstrings: for a pair (x, y_w, y_l), u_w = log pi(y_w|x) - log pi_ref(y_w|x) and u_l likewise
(the log-ratios; pi_ref := 1 with --reference-free); s_w = f'(exp(u_w)) and s_l the f-divergence scores
(s = u under the default reverse KL); Delta = s_w - s_l; |y| the completion's token count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from preftune.config import LossConfig
    from preftune.logprobs import SequenceLogps

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def parse_loss_list(
    loss_type: str, loss_weights: str | None = None, rpo_alpha: float | None = None
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """'sigmoid,bco_pair,sft' and '0.8,0.2,1.0' -> the names and their weights (1.0 each when no weights are
    given); --rpo-alpha appends ('sft', rpo_alpha). The one parser of these options; ValueError on bad text."""
    names = tuple(name.strip() for name in loss_type.split(","))
    if not all(names):
        raise ValueError(f"--loss-type '{loss_type}' has an empty name; give names separated by commas")
    if loss_weights is None:
        weights = (1.0,) * len(names)
    else:
        try:
            weights = tuple(float(w) for w in loss_weights.split(","))
        except ValueError:
            raise ValueError(f"--loss-weights '{loss_weights}' is not a comma-separated list of numbers") from None
    if len(weights) != len(names):
        raise ValueError(f"--loss-weights gives {len(weights)} weights for the {len(names)} losses of "
                         f"--loss-type '{loss_type}'; give one weight per loss")
    if rpo_alpha is not None:
        names, weights = (*names, "sft"), (*weights, rpo_alpha)
    return names, weights


@dataclass(frozen=True)
class LossParams:
    """Every loss option as a plain value; `from_config` builds it, for training and `preftune eval` alike."""

    beta: float = 0.1
    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] = (1.0,)
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    ld_alpha: float | None = None
    use_weighting: bool = False
    reference_free: bool = False

    @classmethod
    def from_config(cls, options: LossConfig) -> LossParams:
        """From the config's loss section (validated by `check_loss_options`)."""
        loss_types, loss_weights = parse_loss_list(options.loss_type, options.loss_weights, options.rpo_alpha)
        return cls(
            beta=options.beta,
            loss_types=loss_types,
            loss_weights=loss_weights,
            label_smoothing=options.label_smoothing,
            f_divergence_type=options.f_divergence_type,
            f_alpha_divergence_coef=options.f_alpha_divergence_coef,
            discopop_tau=options.discopop_tau,
            simpo_gamma=options.simpo_gamma,
            ld_alpha=options.ld_alpha,
            use_weighting=options.use_weighting,
            reference_free=options.reference_free,
        )

    @property
    def length_split(self) -> bool:
        """Whether log-probs must carry LD-DPO's tails (`sequence_logps(..., length_split=True)`)."""
        return self.ld_alpha is not None


@dataclass
class LossOutput:
    """Per-pair tensors, each of shape (B,)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor  # beta * u_w, detached
    rejected_rewards: torch.Tensor  # beta * u_l, detached
    # the policy's log-probs as the losses saw them (LD-DPO weights them), detached; set by compute_loss
    chosen_logps: torch.Tensor | None = None
    rejected_logps: torch.Tensor | None = None


# ---- what every loss builds on -----------------------------------------------------------------------------
def seen_logps(logps: SequenceLogps, ld_alpha: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs as the losses see them, (B,) each. LD-DPO (Liu et al. 2024, arXiv:2409.06411, its
    length-desensitised log-likelihood):
    the tokens up to the shorter completion's length count fully, the rest times ld_alpha."""
    if ld_alpha is None:
        return logps.chosen, logps.rejected
    if logps.chosen_tail is None or logps.rejected_tail is None:
        raise ValueError("ld_alpha needs log-probs computed with sequence_logps(..., length_split=True)")
    return (
        (logps.chosen - logps.chosen_tail) + ld_alpha * logps.chosen_tail,
        (logps.rejected - logps.rejected_tail) + ld_alpha * logps.rejected_tail,
    )


def reference_logps(reference: SequenceLogps, params: LossParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's seen log-probs; zeros with --reference-free (pi_ref := 1, a uniform reference)."""
    if params.reference_free:
        return torch.zeros_like(reference.chosen), torch.zeros_like(reference.rejected)
    return seen_logps(reference, params.ld_alpha)


def log_ratios(policy: SequenceLogps, reference: SequenceLogps, params: LossParams) -> tuple[torch.Tensor, ...]:
    """u_w, u_l = log pi(y|x) - log pi_ref(y|x) for chosen and rejected, (B,) each."""
    chosen, rejected = seen_logps(policy, params.ld_alpha)
    ref_chosen, ref_rejected = reference_logps(reference, params)
    return chosen - ref_chosen, rejected - ref_rejected


def f_prime(u: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """f'(t) at t = pi/pi_ref = exp(u), for the f-divergence regulariser of f-DPO (Wang et al. 2023,
    arXiv:2309.16240, its table of f and f'): reverse KL log t; forward KL 1 - 1/t; JS log(2t / (1 + t));
    alpha-divergence (t^(alpha-1) - 1) / (alpha - 1) (reverse KL in the limit alpha -> 1)."""
    if kind == "reverse_kl":
        return u
    if kind == "forward_kl":
        return 1 - torch.exp(-u)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(u)
    if kind == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return u
        # exponent clamped so exp stays representable in the input's precision (as TRL); at least float32
        t = ((alpha - 1.0) * u).to(torch.promote_types(u.dtype, torch.float32))
        t = t.clamp(max=11.0 if u.dtype == torch.float16 else 80.0)
        return (torch.exp(t) - 1.0).to(u.dtype) * (1.0 / (alpha - 1.0))
    raise ValueError(f"unknown f_divergence_type {kind!r}; choose one of {', '.join(F_DIVERGENCES)}")


def scores(policy: SequenceLogps, reference: SequenceLogps, params: LossParams) -> tuple[torch.Tensor, ...]:
    """s_w, s_l: the log-ratios through the chosen f-divergence's f' (the log-ratios themselves under reverse KL)."""
    chosen, rejected = log_ratios(policy, reference, params)
    kind, alpha = params.f_divergence_type, params.f_alpha_divergence_coef
    return f_prime(chosen, kind, alpha), f_prime(rejected, kind, alpha)


def implicit_rewards(
    policy: SequenceLogps, reference: SequenceLogps, params: LossParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """r(x, y) = beta * u for chosen and rejected; (B,), (B,), detached. The same for every loss (as TRL)."""
    chosen, rejected = log_ratios(policy, reference, params)
    return params.beta * chosen.detach(), params.beta * rejected.detach()


def per_token(value: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """A sequence-level value averaged over the completion's tokens (at least 1)."""
    return value / tokens.clamp(min=1)


def smoothed_logistic(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z): the logistic loss when the label is flipped with prob eps."""
    losses = -F.logsigmoid(logits)
    if label_smoothing:  # skipped at 0, so that the plain loss stays exactly -log sigmoid(z)
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses


def _output(losses: torch.Tensor, policy: SequenceLogps, reference: SequenceLogps, params: LossParams) -> LossOutput:
    return LossOutput(losses, *implicit_rewards(policy, reference, params))


# ---- the losses ----------------------------------------------------------------------------------------------
def sigmoid_loss(policy: SequenceLogps, reference: SequenceLogps, params: LossParams) -> LossOutput:
    """DPO: -log sigmoid(beta * Delta); with label smoothing eps, conservative DPO (cDPO):
    -(1 - eps) log sigmoid(beta * Delta) - eps log sigmoid(-beta * Delta).

    Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290, eq. 7; cDPO: Mitchell 2023, "A note
    on DPO with noisy preferences and relationship to IPO" (no arXiv id). TRL 1.16 ignores label smoothing here.
    Shapes: every input (B,); output losses and rewards (B,).
    """
    chosen, rejected = scores(policy, reference, params)
    losses = smoothed_logistic(params.beta * (chosen - rejected), params.label_smoothing)
    return _output(losses, policy, reference, params)


def hinge_loss(policy: SequenceLogps, reference: SequenceLogps, params: LossParams) -> LossOutput:
    """SLiC's calibration hinge on the reward margin: max(0, 1 - beta * Delta).

    Zhao et al. 2023, "SLiC-HF", arXiv:2305.10425, Section 2 (as TRL's 'hinge'). Shapes: (B,) -> (B,).
    """
    chosen, rejected = scores(policy, reference, params)
    return _output(torch.relu(1 - params.beta * (chosen - rejected)), policy, reference, params)


def ipo_loss(policy: SequenceLogps, reference: SequenceLogps, params: LossParams) -> LossOutput:
    """IPO: (s_w / |y_w| - s_l / |y_l| - 1 / (2 beta))^2, beta being the paper's tau.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    arXiv:2310.12036, eq. 17; per-token averaged as TRL does (the form the paper's results used).
    Shapes: (B,) -> (B,).
    """
    chosen, rejected = scores(policy, reference, params)
    delta = per_token(chosen, policy.chosen_tokens) - per_token(rejected, policy.rejected_tokens)
    return _output((delta - 1 / (2 * params.beta)) ** 2, policy, reference, params)


def exo_pair_loss(policy: SequenceLogps, reference: SequenceLogps, params: LossParams) -> LossOutput:
    """EXO-pref: KL(p_theta || p_label) over {y_w, y_l}, p_theta = softmax(beta * s), p_label = (1 - eps, eps):
    sigmoid(z) (log sigmoid(z) - log(1 - eps)) + sigmoid(-z) (log sigmoid(-z) - log eps), z = beta * Delta.

    Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", arXiv:2402.00856,
    eq. 16. Needs label smoothing eps in (0, 1). Shapes: (B,) -> (B,).
    """
    chosen, rejected = scores(policy, reference, params)
    z = params.beta * (chosen - rejected)
    epsilon = torch.tensor(params.label_smoothing, dtype=z.dtype, device=z.device)
    losses = torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(-epsilon)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - torch.log(epsilon)
    )
    return _output(losses, policy, reference, params)


def nca_pair_loss(policy: SequenceLogps, reference: SequenceLogps, params: LossParams) -> LossOutput:
    """NCA: -log sigmoid(beta u_w) - 1/2 log sigmoid(-beta u_w) - 1/2 log sigmoid(-beta u_l).

    Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards", arXiv:2402.05369,
    Section 4.1 (pairwise NCA). Shapes: (B,) -> (B,).
    """
    chosen, rejected = log_ratios(policy, reference, params)
    chosen, rejected = params.beta * chosen, params.beta * rejected
    losses = -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    return _output(losses, policy, reference, params)


def robust_loss(policy: SequenceLogps, reference: SequenceLogps, params: LossParams) -> LossOutput:
    """Robust DPO, unbiased under labels flipped with probability eps:
    ((1 - eps) (-log sigmoid(beta Delta)) - eps (-log sigmoid(-beta Delta))) / (1 - 2 eps).

    Chowdhury et al. 2024, "Provably Robust DPO", arXiv:2403.00409, Section 3.1. eps in [0, 0.5).
    Shapes: (B,) -> (B,).
    """
    chosen, rejected = scores(policy, reference, params)
    z, eps = params.beta * (chosen - rejected), params.label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return _output(losses, policy, reference, params)


def bco_pair_loss(policy: SequenceLogps, reference: SequenceLogps, params: LossParams) -> LossOutput:
    """BCO on pairs: chosen classified as good, rejected as bad: -log sigmoid(beta u_w) - log sigmoid(-beta u_l).

    Jung et al. 2024, "Binary Classifier Optimization for LLM Alignment", arXiv:2404.04656, Section 4. As TRL
    1.16, without the paper's reward shift delta (a running mean of the rewards). Shapes: (B,) -> (B,).
    """
    chosen, rejected = log_ratios(policy, reference, params)
    losses = -F.logsigmoid(params.beta * chosen) - F.logsigmoid(-params.beta * rejected)
    return _output(losses, policy, reference, params)


def sppo_hard_loss(policy: SequenceLogps, reference: SequenceLogps, params: LossParams) -> LossOutput:
    """SPPO with hard win probabilities (1 for y_w, 0 for y_l): (u_w - 1/(2 beta))^2 + (u_l + 1/(2 beta))^2.

    Wu et al. 2024, "Self-Play Preference Optimization", arXiv:2405.00675, eq. 4.7 with P = 1 / 0.
    Shapes: (B,) -> (B,).
    """
    chosen, rejected = log_ratios(policy, reference, params)
    losses = (chosen - 0.5 / params.beta) ** 2 + (rejected + 0.5 / params.beta) ** 2
    return _output(losses, policy, reference, params)


def aot_loss(policy: SequenceLogps, reference: SequenceLogps, params: LossParams) -> LossOutput:
    """AOT (paired): logistic loss with label smoothing eps on sort(log pi_w - log pi_l) - sort(log ref_w - log
    ref_l), sorted over the batch: the policy's margins must dominate the reference's in distribution.

    Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport", arXiv:2406.05882,
    Section 3. Couples the pairs of a batch (the loss of row i is not pair i's). Shapes: (B,) -> (B,).
    """
    chosen, rejected = seen_logps(policy, params.ld_alpha)
    ref_chosen, ref_rejected = reference_logps(reference, params)
    delta = torch.sort(chosen - rejected, dim=0).values - torch.sort(ref_chosen - ref_rejected, dim=0).values
    return _output(smoothed_logistic(params.beta * delta, params.label_smoothing), policy, reference, params)


def aot_unpaired_loss(policy: SequenceLogps, reference: SequenceLogps, params: LossParams) -> LossOutput:
    """AOT (unpaired): logistic loss with label smoothing eps on sort(u_w) - sort(u_l), sorted over the batch.

    Melnyk et al. 2024, arXiv:2406.05882, Section 3 (the unpaired form). Couples the pairs of a batch.
    Shapes: (B,) -> (B,).
    """
    chosen, rejected = log_ratios(policy, reference, params)
    delta = torch.sort(chosen, dim=0).values - torch.sort(rejected, dim=0).values
    return _output(smoothed_logistic(params.beta * delta, params.label_smoothing), policy, reference, params)


def apo_zero_loss(policy: SequenceLogps, reference: SequenceLogps, params: LossParams) -> LossOutput:
    """APO-zero: 1 - sigmoid(beta u_w) + sigmoid(beta u_l): raise the chosen likelihood, lower the rejected.

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization", arXiv:2408.06266, eq. 7. Shapes: (B,) -> (B,).
    """
    chosen, rejected = log_ratios(policy, reference, params)
    losses = (1 - torch.sigmoid(params.beta * chosen)) + torch.sigmoid(params.beta * rejected)
    return _output(losses, policy, reference, params)


def apo_down_loss(policy: SequenceLogps, reference: SequenceLogps, params: LossParams) -> LossOutput:
    """APO-down: sigmoid(beta u_w) + 1 - sigmoid(beta (u_w - u_l)): lower both, the rejected more.

    D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 8. Shapes: (B,) -> (B,).
    """
    chosen, rejected = log_ratios(policy, reference, params)
    losses = torch.sigmoid(params.beta * chosen) + (1 - torch.sigmoid(params.beta * (chosen - rejected)))
    return _output(losses, policy, reference, params)


def discopop_loss(policy: SequenceLogps, reference: SequenceLogps, params: LossParams) -> LossOutput:
    """DiscoPOP (log-ratio modulated loss), z = beta * Delta, m = sigmoid(z / tau):
    (1 - m) * (-log sigmoid(z)) + m * exp(-z).

    Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms", arXiv:2406.08414, eq. 5.
    Shapes: (B,) -> (B,).
    """
    chosen, rejected = scores(policy, reference, params)
    z = params.beta * (chosen - rejected)
    modulation = torch.sigmoid(z / params.discopop_tau)
    losses = -F.logsigmoid(z) * (1 - modulation) + torch.exp(-z) * modulation
    return _output(losses, policy, reference, params)


def sft_loss(policy: SequenceLogps, reference: SequenceLogps, params: LossParams) -> LossOutput:
    """Negative log-likelihood of the chosen completions, averaged over all chosen tokens of the batch:
    -sum_i log pi(y_w,i|x_i) / sum_i |y_w,i|, the same value for every pair (as TRL).

    The NLL term of RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization", arXiv:2404.19733,
    its L_NLL term) and of MPO (Wang et al. 2024, arXiv:2411.10442). Reads no reference and no LD-DPO weighting.
    Shapes: (B,) -> (B,).
    """
    nll = -policy.chosen.sum() / policy.chosen_tokens.sum()
    return _output(nll.expand(policy.chosen.shape[0]), policy, reference, params)


def sigmoid_norm_loss(policy: SequenceLogps, reference: SequenceLogps, params: LossParams) -> LossOutput:
    """Length-normalised DPO: -log sigmoid(beta * (s_w / |y_w| - s_l / |y_l|)).

    Lambert et al. 2024, "Tulu 3", arXiv:2411.15124 (its length-normalised DPO). Shapes: (B,) -> (B,).
    """
    chosen, rejected = scores(policy, reference, params)
    delta = per_token(chosen, policy.chosen_tokens) - per_token(rejected, policy.rejected_tokens)
    return _output(-F.logsigmoid(params.beta * delta), policy, reference, params)


def simpo_loss(policy: SequenceLogps, reference: SequenceLogps, params: LossParams) -> LossOutput:
    """SimPO: -log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma), gamma = simpo_gamma.

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", arXiv:2405.14734,
    eq. 6. Reads no reference (the reported rewards still use it unless --reference-free) and no LD-DPO
    weighting (it normalises by length itself). Shapes: (B,) -> (B,).
    """
    delta = per_token(policy.chosen, policy.chosen_tokens) - per_token(policy.rejected, policy.rejected_tokens)
    return _output(-F.logsigmoid(params.beta * delta - params.simpo_gamma), policy, reference, params)


LossFunction = Callable[["SequenceLogps", "SequenceLogps", LossParams], LossOutput]

# name -> (function, one-line meaning for --help); TRL 1.16's fifteen, then simpo
LOSSES: dict[str, tuple[LossFunction, str]] = {
    "sigmoid": (sigmoid_loss, "logistic loss on the reward margin (DPO); with --label-smoothing, cDPO"),
    "hinge": (hinge_loss, "hinge on the reward margin (SLiC)"),
    "ipo": (ipo_loss, "squared loss on the per-token reward margin (IPO)"),
    "exo_pair": (exo_pair_loss, "reverse KL to the smoothed preference labels (EXO); needs --label-smoothing"),
    "nca_pair": (nca_pair_loss, "absolute, not only relative, rewards of chosen and rejected (NCA)"),
    "robust": (robust_loss, "DPO unbiased under labels flipped with probability --label-smoothing (rDPO)"),
    "bco_pair": (bco_pair_loss, "chosen classified as good, rejected as bad (BCO)"),
    "sppo_hard": (sppo_hard_loss, "squared log-ratio targets +-1/(2 beta) (SPPO, hard probabilities)"),
    "aot": (aot_loss, "policy margins dominate the reference's over the batch (AOT, paired)"),
    "aot_unpaired": (aot_unpaired_loss, "chosen log-ratios dominate the rejected ones over the batch (AOT)"),
    "apo_zero": (apo_zero_loss, "chosen up, rejected down: chosen better than the model's outputs (APO)"),
    "apo_down": (apo_down_loss, "both down, rejected more: chosen worse than the model's outputs (APO)"),
    "discopop": (discopop_loss, "logistic/exponential blend, --discopop-tau (DiscoPOP)"),
    "sft": (sft_loss, "negative log-likelihood of the chosen completions (the SFT term of RPO and MPO)"),
    "sigmoid_norm": (sigmoid_norm_loss, "DPO on per-token (length-normalised) log-ratios"),
    "simpo": (simpo_loss, "reference-free, length-normalised, with margin --simpo-gamma (SimPO)"),
}


def loss_term(loss_type: str, policy: SequenceLogps, reference: SequenceLogps, params: LossParams) -> LossOutput:
    """One registered loss by name; with use_weighting, each pair's loss times the WPO weight w_w * w_l
    (Zhou et al. 2024, "WPO", arXiv:2406.11827, eq. 2, with TRL's aligned per-token probabilities)."""
    function, _ = LOSSES[loss_type]
    output = function(policy, reference, params)
    if params.use_weighting:
        if policy.chosen_weight is None or policy.rejected_weight is None:
            raise ValueError("use_weighting needs log-probs computed with sequence_logps(..., wpo_weights=True)")
        output.losses = output.losses * (policy.chosen_weight * policy.rejected_weight)
    return output


def compute_loss(policy: SequenceLogps, reference: SequenceLogps, params: LossParams) -> LossOutput:
    """The objective: sum_k weight_k * loss_k per pair over params.loss_types, so that its mean is TRL's
    weighted sum of per-loss means; rewards and log-probs for the metrics. Shapes: (B,) -> (B,)."""
    total = None
    for loss_type, weight in zip(params.loss_types, params.loss_weights, strict=True):
        term = loss_term(loss_type, policy, reference, params).losses * weight
        total = term if total is None else total + term
    chosen, rejected = seen_logps(policy, params.ld_alpha)
    return LossOutput(total, *implicit_rewards(policy, reference, params), chosen.detach(), rejected.detach())


# ---- option checks (config.validate calls them before any model loads) -------------------------------------
# Which losses read which options; a changed option that none of the chosen losses reads is an error.
LABEL_SMOOTHING_RANGES = {  # loss -> (low, high, low included); high is excluded
    "sigmoid": (0.0, 0.5, True),
    "robust": (0.0, 0.5, True),
    "aot": (0.0, 0.5, True),
    "aot_unpaired": (0.0, 0.5, True),
    "exo_pair": (0.0, 1.0, False),
}
# The losses built on the chosen-minus-rejected score: f-DPO's log Z(x) cancels only there (TRL's set).
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
NO_LD_ALPHA = ("sft", "simpo")  # read raw log-probs: LD-DPO's weighting does not apply
BATCH_SORTING = ("aot", "aot_unpaired")  # their row i is not pair i: no per-pair WPO weight applies
ONLY_FOR = {"discopop_tau": ("discopop",), "simpo_gamma": ("simpo",)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_loss_options(options: LossConfig, changed: Collection[str]) -> list[str]:
    """Problems with the loss options, as messages; `changed` names the options the user set to a non-default
    value. Unknown names, wrong weight counts and out-of-range values are problems, and so is a changed option
    that none of the chosen losses reads."""
    try:
        names, weights = parse_loss_list(options.loss_type, options.loss_weights)
    except ValueError as error:
        return [str(error)]
    problems = [f"--loss-type '{name}' is unknown; choose one of: {', '.join(LOSSES)}"
                for name in names if name not in LOSSES]
    if problems:
        return problems
    chosen = ", ".join(names)

    def need(condition: bool, message: str) -> None:
        if not condition:
            problems.append(message)

    def unused(option: str, users: Collection[str]) -> None:
        if option in changed and not set(names) & set(users):
            problems.append(f"{_flag(option)} has no effect with --loss-type {chosen} (read only by "
                            f"{', '.join(users)})")

    need(len(set(names)) == len(names), f"--loss-type '{options.loss_type}' names a loss twice")
    need(all(math.isfinite(w) and w > 0 for w in weights), f"--loss-weights must be > 0, got {options.loss_weights}")
    need(math.isfinite(options.beta) and options.beta > 0, f"--beta must be > 0, got {options.beta}")

    smoothing = options.label_smoothing
    unused("label_smoothing", LABEL_SMOOTHING_RANGES)
    for name in names:
        if name in LABEL_SMOOTHING_RANGES:
            low, high, closed = LABEL_SMOOTHING_RANGES[name]
            inside = (low <= smoothing if closed else low < smoothing) and smoothing < high
            need(inside, f"--label-smoothing must be in {'[' if closed else '('}{low:g}, {high:g}) for {name}, "
                         f"got {smoothing}" + (" (the EXO paper suggests 1e-3)" if name == "exo_pair" else ""))

    kind = options.f_divergence_type
    if kind not in F_DIVERGENCES:
        problems.append(f"--f-divergence-type '{kind}' is unknown; choose one of: {', '.join(F_DIVERGENCES)}")
    elif kind != "reverse_kl":
        others = [name for name in names if name not in F_DIVERGENCE_LOSSES]
        need(not others, f"--f-divergence-type {kind} has no valid form for {', '.join(others)}: f-DPO's "
                         f"normaliser cancels only in the losses of the chosen-minus-rejected score "
                         f"({', '.join(F_DIVERGENCE_LOSSES)})")
        unused("f_divergence_type", [n for n in F_DIVERGENCE_LOSSES if n != "sft"])
    if "f_alpha_divergence_coef" in changed and kind != "alpha_divergence":
        problems.append("--f-alpha-divergence-coef has no effect without --f-divergence-type alpha_divergence")
    need(math.isfinite(options.f_alpha_divergence_coef),
         f"--f-alpha-divergence-coef must be finite, got {options.f_alpha_divergence_coef}")

    for option, users in ONLY_FOR.items():
        unused(option, users)
    need(math.isfinite(options.discopop_tau) and options.discopop_tau > 0,
         f"--discopop-tau must be > 0, got {options.discopop_tau}")
    need(math.isfinite(options.simpo_gamma) and options.simpo_gamma >= 0,
         f"--simpo-gamma must be >= 0, got {options.simpo_gamma}")

    if options.ld_alpha is not None:
        need(0 <= options.ld_alpha <= 1, f"--ld-alpha must be in [0, 1], got {options.ld_alpha}")
        unused("ld_alpha", [name for name in LOSSES if name not in NO_LD_ALPHA])
    if options.use_weighting:
        sorting = [name for name in names if name in BATCH_SORTING]
        need(not sorting, f"--use-weighting has no per-pair meaning for {', '.join(sorting)}: it sorts the batch, "
                          "so row i's loss is not pair i's")
    if options.rpo_alpha is not None:
        need(math.isfinite(options.rpo_alpha) and options.rpo_alpha > 0,
             f"--rpo-alpha must be > 0, got {options.rpo_alpha}")
        need("sft" not in names, "--rpo-alpha adds the sft term, which --loss-type already has; set its weight "
                                 "with --loss-weights instead")
    return problems

