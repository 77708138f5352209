"""Sophia-G with a Gauss-Newton-Bartlett Hessian estimate that is really refreshed.

Sophia (Liu et al., 2023, arXiv 2305.14342) keeps an EMA ``m`` of the gradient
and an EMA ``h`` of a diagonal Hessian estimate, and takes the clipped step

    theta <- theta * (1 - lr * weight_decay)
    theta <- theta - lr * clip(m / max(rho * h, eps), 1)

(``clip`` elementwise to ``[-1, 1]``). ``h`` is refreshed every
``hessian_update_interval`` steps from the Gauss-Newton-Bartlett (GNB)
estimator: labels are sampled from the model's own softmax, one extra
forward/backward gives ``g_hat``, and

    h <- beta2 * h + (1 - beta2) * N * g_hat**2,

with ``N`` the number of examples (tokens) in the loss mean, so ``h`` estimates
the Gauss-Newton diagonal itself (independent of the batch size). This is the
paper's Algorithm 3; the reference code folds ``N`` into the step instead
(``rho * bs * h``), which is the same update.

``bias_correction`` (default on) divides ``m`` by ``1 - beta1^t`` and ``h`` by
the total weight of its EMA, ``1 - beta2^n`` after ``n`` refreshes, as Adam
does. The reference (``bias_correction=False``) does neither: its ``h`` starts
at zero and, with ``beta2 = 0.99`` and a refresh every 10 steps, is still
below two thirds of its value after 1000 steps, so most coordinates are
clipped to sign steps for most of a short run (benchmarks/SOPHIA.md measures
what this costs). Theta is the corrected ``h`` either way; an imported ``h``
counts as complete (weight 1).

How a training loop drives the refresh (the reference federated client never
does, so its ``h`` stays zero and Sophia degenerates to sign-momentum)::

    if optimizer.hessian_update_due():
        sophia_refresh(optimizer, lambda: model(**inputs).logits,
                       attention_mask=inputs.get("attention_mask"), generator=gen)
    loss = model(**inputs, labels=labels).loss
    loss.backward(); optimizer.step(); optimizer.zero_grad()

A refresh is due before steps 0, k, 2k, ... of the optimizer (counted per
parameter group, saved in ``state_dict``); stepping while one is due and was
not done warns once. Theta is ``{name.hessian}``; a warm start imports ``h``,
zeroes ``m`` and restarts the step count (so the refresh cadence restarts too).
Non-finite gradients raise ``FloatingPointError`` in ``step`` and
``update_hessian`` before anything is changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.optim.optimizer import Optimizer

from .base import (
    CurvatureOptimizer,
    all_finite,
    check_curvature_keys,
    check_finite_curvature,
    check_grads,
    check_params_supported,
    constructor_option,
    curvature_dtype,
    export_device,
    named_params,
    restore_saved_state_dtypes,
    warn_once,
)
from .options import check_options, given_options

__all__ = ["GNBLoss", "Sophia", "gnb_loss", "hessian_refresh_due", "sophia_refresh"]


class GNBLoss(NamedTuple):
    """Loss on self-sampled labels and the number of terms in its mean."""

    loss: torch.Tensor
    num_samples: int


def gnb_loss(
    logits: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    generator: torch.Generator | None = None,
) -> GNBLoss:
    """Cross-entropy of ``logits`` against labels sampled from ``softmax(logits)``.

    This is the Gauss-Newton-Bartlett loss of Sophia-G: the gradient of its mean
    gives ``g_hat`` with ``E[N * g_hat**2]`` equal to the Gauss-Newton diagonal.
    A label is drawn for every position; masked positions weigh zero. Without
    ``labels`` and ``attention_mask`` it never waits for the device; with them,
    counting ``N`` is one host sync.

    Parameters
    ----------
    logits : Tensor
        ``[B, C]`` (classification) or ``[B, T, V]`` (token-level) logits.
    labels : Tensor, optional
        Same leading shape as ``logits``; positions equal to ``ignore_index`` do
        not count (only their positions are used, never their values). For a
        causal LM whose logits at ``t`` predict token ``t + 1``, pass labels
        already aligned with the logits, or just the ``attention_mask``.
    attention_mask : Tensor, optional
        Same leading shape as ``logits``; zero positions do not count.
    ignore_index : int
        Label value marking ignored positions.
    generator : torch.Generator, optional
        Source of randomness for the sampled labels (on the logits' device).

    Returns
    -------
    GNBLoss
        ``(loss, num_samples)``: the mean loss over counted positions and their number.
    """
    if logits.dim() < 2:
        raise ValueError(
            f"gnb_loss: logits need a class dimension, got shape {tuple(logits.shape)}"
        )
    flat = logits.reshape(-1, logits.shape[-1]).float()
    keep: torch.Tensor | None = None
    for mask, what in ((labels, "labels"), (attention_mask, "attention_mask")):
        if mask is None:
            continue
        if tuple(mask.shape) != tuple(logits.shape[:-1]):
            raise ValueError(
                f"gnb_loss: {what} has shape {tuple(mask.shape)}, expected {tuple(logits.shape[:-1])}"
            )
        kept = (mask.reshape(-1) != ignore_index) if what == "labels" else mask.reshape(-1).bool()
        keep = kept if keep is None else keep & kept
    with torch.no_grad():
        probs = torch.softmax(flat, dim=-1)
        sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    if keep is None:  # every position counts: no host sync
        return GNBLoss(F.cross_entropy(flat, sampled), flat.shape[0])
    count = int(keep.sum())  # the one host sync: N is a number
    if count == 0:
        raise ValueError("gnb_loss: every position is masked out; nothing to sample")
    # masked positions weigh 0 (no boolean indexing, which would be a second sync)
    losses = F.cross_entropy(flat, sampled, reduction="none")
    return GNBLoss(torch.where(keep, losses, 0.0).sum() / count, count)


class Sophia(Optimizer, CurvatureOptimizer):
    """Sophia-G with Theta = the diagonal Hessian EMA ``h``.

    Parameters
    ----------
    params : iterable
        ``(name, parameter)`` pairs (names make Theta's keys), tensors or group dicts.
    lr : float
        Learning rate (the largest per-coordinate step).
    betas : tuple of float
        EMA rates of the gradient (``beta1``) and of the Hessian estimate
        (``beta2``). The paper's 0.965 suits runs of 100k steps; 0.9 trained
        better on every rate and rho tried here (benchmarks/SOPHIA.md).
    rho : float
        Scale of ``h`` in the denominator (the paper's gamma). With the
        bias-corrected ``h`` (the Gauss-Newton diagonal itself), 15 was best on
        the validation split of benchmarks/SOPHIA.md at every rate tried;
        2-100 trained, 0.3 and below clipped most coordinates to sign steps
        (win rate under 15 %) and trailed. The step of an unclipped coordinate
        is ``lr * m / (rho * h)``: a larger rho wants a larger ``lr``
        (1e-3 to 3e-3 worked, as for AdamW).
    weight_decay : float
        Decoupled weight decay, applied before the update.
    eps : float
        Floor of the denominator ``rho * h``.
    hessian_update_interval : int
        ``k``: a GNB refresh is due before steps 0, k, 2k, ...
    bias_correction : bool
        Divide ``m`` and ``h`` by the weights of their EMAs (Adam's bias
        correction); False is the reference rule.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        rho: float = 15.0,
        weight_decay: float = 0.1,
        eps: float = 1e-12,
        hessian_update_interval: int = 10,
        bias_correction: bool = True,
    ) -> None:
        check_options("sophia", given_options(locals()), setting=None)
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "rho": rho,
            "weight_decay": weight_decay,
            "eps": eps,
            "hessian_update_interval": int(hessian_update_interval),
            "bias_correction": bool(bias_correction),
            "step": 0,
            "hessian_updated_at": -1,
            "hessian_weight": 0.0,  # 1 - beta2^n after n refreshes (1 for an imported h)
        }
        super().__init__(params, defaults)
        check_params_supported(self)

    def _state_for(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if len(state) == 0:
            dtype = curvature_dtype(p)
            state["step"] = 0
            state["exp_avg"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
            state["hessian"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
        return state

    def hessian_update_due(self) -> bool:
        """Whether a GNB refresh should run before the coming ``step()``."""
        return any(
            g["step"] % g["hessian_update_interval"] == 0 and g["hessian_updated_at"] != g["step"]
            for g in self.param_groups
        )

    @torch.no_grad()
    def update_hessian(self, batch_size: int) -> None:
        """Fold the current ``.grad`` (the GNB gradient ``g_hat``) into ``h``.

        Parameters
        ----------
        batch_size : int
            ``N``, the number of terms averaged in the GNB loss (examples, or
            tokens for token-level losses): ``h <- beta2 h + (1 - beta2) N g_hat^2``.
        """
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"Sophia.update_hessian: batch_size must be >= 1, got {batch_size}")
        check_grads(self)
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.to(curvature_dtype(p))
                self._state_for(p)["hessian"].mul_(beta2).addcmul_(
                    g, g, value=(1.0 - beta2) * float(batch_size)
                )
            group["hessian_updated_at"] = group["step"]
            group["hessian_weight"] = beta2 * group.get("hessian_weight", 0.0) + (1.0 - beta2)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one clipped Sophia step with the current ``h``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        check_grads(self)
        if self.hessian_update_due():
            warn_once(
                self,
                "refresh",
                "Sophia.step() was called while a Hessian refresh was due; call "
                "sophia_refresh(optimizer, forward_logits) when optimizer.hessian_update_due(). "
                "Without refreshes h stays zero and Sophia degenerates to sign-momentum.",
            )
        for group in self.param_groups:
            beta1 = group["betas"][0]
            lr, rho, eps, wd = group["lr"], group["rho"], group["eps"], group["weight_decay"]
            correct = group.get("bias_correction", False)
            h_scale = 1.0 / self._hessian_weight(group) if correct else 1.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state_for(p)
                state["step"] += 1
                exp_avg, hessian = state["exp_avg"], state["hessian"]
                if wd != 0.0:
                    p.mul_(1.0 - lr * wd)
                exp_avg.lerp_(p.grad.to(exp_avg.dtype), 1.0 - beta1)
                m_scale = 1.0 / (1.0 - beta1 ** state["step"]) if correct else 1.0
                # the same arithmetic as export_curvature's h * (1 / weight): a warm start
                # from Theta takes bit for bit the step this optimizer would take
                denom = (hessian * h_scale).mul_(rho).clamp_(min=eps)
                ratio = (exp_avg.abs() * m_scale).div_(denom).clamp_(max=1.0)
                p.add_((exp_avg.sign() * ratio).to(p.dtype), alpha=-lr)
            group["step"] += 1
        return loss

    @staticmethod
    def _hessian_weight(group: Mapping[str, Any]) -> float:
        """The weight of ``h``'s EMA, what bias correction divides by (1 before any refresh)."""
        weight = group.get("hessian_weight", 0.0)
        return weight if weight > 0.0 else 1.0

    def _named_states(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from named_params(self)

    def export_curvature(
        self, device: torch.device | str | None = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Return ``{name.hessian}`` (float32 on ``device``, ``None``: each parameter's
        device; zeros before the first refresh; bias-corrected with ``bias_correction``)."""
        theta = {}
        scales = {
            id(p): 1.0 / self._hessian_weight(g) if g.get("bias_correction", False) else 1.0
            for g in self.param_groups
            for p in g["params"]
        }
        for name, p in self._named_states():
            h = self.state.get(p, {}).get("hessian")
            target = export_device(p, device)
            if h is None:
                theta[f"{name}.hessian"] = torch.zeros(p.shape, dtype=torch.float32, device=target)
                continue
            h = h.detach().to(device=target, dtype=torch.float32, copy=True)
            theta[f"{name}.hessian"] = h.mul_(scales[id(p)]) if scales[id(p)] != 1.0 else h
        return theta

    def import_curvature(self, state: Mapping[str, torch.Tensor]) -> None:
        """Warm-start: ``h`` from Theta, first moment zero, step counts restart at 0."""
        named = list(self._named_states())
        check_curvature_keys({f"{n}.hessian": tuple(p.shape) for n, p in named}, state)
        values = list(state.values())
        if values:  # one host sync when all is well: every entry finite and non-negative
            device = values[0].device
            nonnegative = torch.stack([(v >= 0).all().to(device) for v in values]).all()
            if not bool(nonnegative & all_finite(values).to(device)):
                check_finite_curvature(state)  # names the entries with NaN or infinity
                bad = sorted(k for k, v in state.items() if bool((v < 0).any()))
                raise ValueError(
                    f"Sophia: Hessian estimate must be non-negative; negative in {bad[:5]}"
                )
        for name, p in named:
            self.state.pop(p, None)
            self._state_for(p)["hessian"].copy_(state[f"{name}.hessian"])
        for group in self.param_groups:
            group["step"] = 0
            group["hessian_updated_at"] = -1
            group["hessian_weight"] = 1.0  # a complete estimate: nothing to correct

    @classmethod
    def curvature_retention(cls, options: Mapping[str, Any], num_steps: int) -> float:
        """``beta2**n``, ``n = ceil(K / hessian_update_interval)``: a warm start's step count is
        0, so the refreshes fall before steps 0, k, 2k, ..., and each decays ``h`` once (its
        EMA weight stays 1, so the export does not rescale it)."""
        beta2 = float(constructor_option(cls.__init__, options, "betas")[1])
        interval = int(constructor_option(cls.__init__, options, "hessian_update_interval"))
        return beta2 ** ((max(int(num_steps), 0) + interval - 1) // interval)

    def reset_basis_moments(self) -> None:
        """Zero the first moment (the client's own direction) and its step count."""
        for state in self.state.values():
            if "exp_avg" in state:
                state["exp_avg"].zero_()
                state["step"] = 0

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, keeping the saved (float32) dtype of ``m`` and ``h``."""
        super().load_state_dict(state_dict)
        restore_saved_state_dtypes(self, state_dict)


def hessian_refresh_due(optimizer: torch.optim.Optimizer) -> bool:
    """True when ``optimizer`` is a :class:`Sophia` whose Hessian refresh is due;
    lets a generic training loop ask without knowing the optimizer type."""
    return isinstance(optimizer, Sophia) and optimizer.hessian_update_due()


def sophia_refresh(
    optimizer: Sophia,
    forward_logits: Callable[[], torch.Tensor],
    *,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run one GNB refresh of ``optimizer``'s Hessian estimate.

    ``zero_grad -> logits = forward_logits() -> gnb_loss -> backward ->
    update_hessian(N) -> zero_grad``. Call it before the real forward/backward
    of a step (it clears gradients). ``forward_logits`` takes no argument and
    returns logits for the current batch, e.g. ``lambda: model(**inputs).logits``.

    Returns
    -------
    Tensor
        The detached GNB loss (for logging).
    """
    optimizer.zero_grad(set_to_none=True)
    with torch.enable_grad():
        result = gnb_loss(
            forward_logits(),
            labels=labels,
            attention_mask=attention_mask,
            ignore_index=ignore_index,
            generator=generator,
        )
        result.loss.backward()
    optimizer.update_hessian(result.num_samples)
    optimizer.zero_grad(set_to_none=True)
    return result.loss.detach()
