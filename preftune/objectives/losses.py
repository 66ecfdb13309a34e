"""Preference losses: pure functions of per-sequence log-probabilities, registered by name in `LOSSES`.

Each loss takes the policy's and the reference's `SequenceLogps` (shapes (B,)) and `LossParams`, and returns
per-pair losses and implicit rewards. `compute_loss` is the training objective: the weighted sum of the chosen
losses (TRL's multi-loss semantics), per pair; the trainer takes the mean. `LOSSES` is the one list of loss
names, one `LossSpec` row each: the function, its meaning for --help and the options it reads. The CLI help,
the tests and the option checks (`preftune.config.validate`, one pass over the rows) read it; this module holds
no config code. It imports only torch at run time.

Notation in the docstrings: for a pair (x, y_w, y_l), u_w = log pi(y_w|x) - log pi_ref(y_w|x) and u_l likewise
(the log-ratios; pi_ref := 1 with --reference-free); s_w = f'(exp(u_w)) and s_l the f-divergence scores
(s = u under the default reverse KL); Delta = s_w - s_l; |y| the completion's token count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from preftune.objectives.logps import SequenceLogps

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
    """Every loss option as a plain value; `from_options` builds it from the options as given (the config's loss
    section, see `preftune.config.loss_params`), for training and `preftune eval` alike."""

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
    def from_options(
        cls, *, loss_type: str = "sigmoid", loss_weights: str | None = None, rpo_alpha: float | None = None,
        **values: Any,
    ) -> LossParams:
        """From the options by their config names (`LossConfig`'s fields, plain values): the --loss-type and
        --loss-weights lists as text and --rpo-alpha, parsed by `parse_loss_list`; every other option is a field
        of the same name. An unknown name is a TypeError."""
        loss_types, weights = parse_loss_list(loss_type, loss_weights, rpo_alpha)
        return cls(loss_types=loss_types, loss_weights=weights, **values)

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


@dataclass(frozen=True)
class LossSpec:
    """One loss: its function, its one-line meaning (--help), its paper and which loss options it reads. The
    config's checks are one pass over these rows: a changed option that none of the chosen losses reads is an
    error, and so is an option that one of them has no valid form for."""

    function: LossFunction
    meaning: str
    paper: str  # what it implements, "Authors year, Title, arXiv:id": the model card cites it
    # --label-smoothing's range (low, high, low included; high excluded); None: not read
    label_smoothing: tuple[float, float, bool] | None = None
    # f-DPO, --f-divergence-type other than reverse_kl: True for the losses of the score s_w - s_l, where its
    # normaliser log Z(x) cancels (they read it); None for a term of no log-ratio (sft), valid beside them but
    # reading none; False: no valid form
    f_divergence: bool | None = False
    ld_alpha: bool = True  # reads the log-probs as LD-DPO's --ld-alpha weights them
    per_pair: bool = True  # row i's loss is pair i's, so WPO's per-pair weight applies (--use-weighting)
    reads: tuple[str, ...] = ()  # the loss-specific options it reads (their config names)

    def reads_option(self, option: str) -> bool:
        """Whether this loss reads the loss option `option` (a config name), so that changing it changes the loss.
        False for the options that are not per loss (beta, reference_free, ...); --use-weighting is `per_pair`."""
        if option == "label_smoothing":
            return self.label_smoothing is not None
        if option == "f_divergence_type":
            return self.f_divergence is True
        if option == "ld_alpha":
            return self.ld_alpha
        return option in self.reads


FLIP_PROBABILITY = (0.0, 0.5, True)  # --label-smoothing as the probability that a label is flipped

# TRL 1.16's fifteen, then simpo
LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(sigmoid_loss, "logistic loss on the reward margin (DPO); with --label-smoothing, cDPO",
                        "Rafailov et al. 2023, Direct Preference Optimization: Your Language Model is Secretly a "
                        "Reward Model, arXiv:2305.18290",
                        label_smoothing=FLIP_PROBABILITY, f_divergence=True),
    "hinge": LossSpec(hinge_loss, "hinge on the reward margin (SLiC)",
                      "Zhao et al. 2023, SLiC-HF: Sequence Likelihood Calibration with Human Feedback, "
                      "arXiv:2305.10425", f_divergence=True),
    "ipo": LossSpec(ipo_loss, "squared loss on the per-token reward margin (IPO)",
                    "Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from Human Preferences, "
                    "arXiv:2310.12036", f_divergence=True),
    "exo_pair": LossSpec(exo_pair_loss, "reverse KL to the smoothed preference labels (EXO); needs --label-smoothing",
                         "Ji et al. 2024, Towards Efficient Exact Optimization of Language Model Alignment, "
                         "arXiv:2402.00856", label_smoothing=(0.0, 1.0, False), f_divergence=True),
    "nca_pair": LossSpec(nca_pair_loss, "absolute, not only relative, rewards of chosen and rejected (NCA)",
                         "Chen et al. 2024, Noise Contrastive Alignment of Language Models with Explicit Rewards, "
                         "arXiv:2402.05369"),
    "robust": LossSpec(robust_loss, "DPO unbiased under labels flipped with probability --label-smoothing (rDPO)",
                       "Chowdhury et al. 2024, Provably Robust DPO: Aligning Language Models with Noisy Feedback, "
                       "arXiv:2403.00409", label_smoothing=FLIP_PROBABILITY, f_divergence=True),
    "bco_pair": LossSpec(bco_pair_loss, "chosen classified as good, rejected as bad (BCO)",
                         "Jung et al. 2024, Binary Classifier Optimization for Large Language Model Alignment, "
                         "arXiv:2404.04656"),
    "sppo_hard": LossSpec(sppo_hard_loss, "squared log-ratio targets +-1/(2 beta) (SPPO, hard probabilities)",
                          "Wu et al. 2024, Self-Play Preference Optimization for Language Model Alignment, "
                          "arXiv:2405.00675"),
    "aot": LossSpec(aot_loss, "policy margins dominate the reference's over the batch (AOT, paired)",
                    "Melnyk et al. 2024, Distributional Preference Alignment of LLMs via Optimal Transport, "
                    "arXiv:2406.05882", label_smoothing=FLIP_PROBABILITY, per_pair=False),
    "aot_unpaired": LossSpec(aot_unpaired_loss, "chosen log-ratios dominate the rejected ones over the batch (AOT)",
                             "Melnyk et al. 2024, Distributional Preference Alignment of LLMs via Optimal Transport, "
                             "arXiv:2406.05882", label_smoothing=FLIP_PROBABILITY, per_pair=False),
    "apo_zero": LossSpec(apo_zero_loss, "chosen up, rejected down: chosen better than the model's outputs (APO)",
                         "D'Oosterlinck et al. 2024, Anchored Preference Optimization and Contrastive Revisions, "
                         "arXiv:2408.06266"),
    "apo_down": LossSpec(apo_down_loss, "both down, rejected more: chosen worse than the model's outputs (APO)",
                         "D'Oosterlinck et al. 2024, Anchored Preference Optimization and Contrastive Revisions, "
                         "arXiv:2408.06266"),
    "discopop": LossSpec(discopop_loss, "logistic/exponential blend, --discopop-tau (DiscoPOP)",
                         "Lu et al. 2024, Discovering Preference Optimization Algorithms with and for Large Language "
                         "Models, arXiv:2406.08414", f_divergence=True, reads=("discopop_tau",)),
    "sft": LossSpec(sft_loss, "negative log-likelihood of the chosen completions (the SFT term of RPO and MPO)",
                    "Pang et al. 2024, Iterative Reasoning Preference Optimization (RPO's NLL term), arXiv:2404.19733",
                    f_divergence=None, ld_alpha=False),
    "sigmoid_norm": LossSpec(sigmoid_norm_loss, "DPO on per-token (length-normalised) log-ratios",
                             "Lambert et al. 2024, Tulu 3: Pushing Frontiers in Open Language Model Post-Training, "
                             "arXiv:2411.15124", f_divergence=True),
    "simpo": LossSpec(simpo_loss, "reference-free, length-normalised, with margin --simpo-gamma (SimPO)",
                      "Meng et al. 2024, SimPO: Simple Preference Optimization with a Reference-Free Reward, "
                      "arXiv:2405.14734", ld_alpha=False, reads=("simpo_gamma",)),
}

# Derived from the rows, for the tests that pick cases by them: the losses valid under an f-divergence other than
# reverse KL (TRL's set, sft included), and those that read no LD-DPO weighting.
F_DIVERGENCE_LOSSES = tuple(name for name, spec in LOSSES.items() if spec.f_divergence is not False)
NO_LD_ALPHA = tuple(name for name, spec in LOSSES.items() if not spec.ld_alpha)


def loss_term(loss_type: str, policy: SequenceLogps, reference: SequenceLogps, params: LossParams) -> LossOutput:
    """One registered loss by name; with use_weighting, each pair's loss times the WPO weight w_w * w_l
    (Zhou et al. 2024, "WPO", arXiv:2406.11827, eq. 2, with TRL's aligned per-token probabilities)."""
    output = LOSSES[loss_type].function(policy, reference, params)
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
