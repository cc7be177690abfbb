"""L-BFGS whose iteration never waits for the host (:class:`DeviceLBFGS`), and the choice between it and
torch's (:func:`make_lbfgs`).

``torch.optim.LBFGS`` reads a value on the host in nearly every line (the loss, the gradient's norm, the
curvature test, the step length) and runs the two-loop recursion as hundreds of small kernels over Python
lists; each read stalls a GPU until its queue drains. Here the history is a preallocated ring buffer of
device tensors, every decision a ``torch.where`` mask, every loop of fixed length and every counter a
device tensor: straight-line tensor code with static shapes, which a CUDA graph or torch.compile can take
whole. One closure evaluation per :meth:`DeviceLBFGS.step`, as torch's with ``max_iter=1`` and no line
search.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

# Function evaluations the strong-Wolfe line search may spend in one L-BFGS iteration (torch's max_ls).
LINE_SEARCH_EVALS = 25
# torch's test for a curvature pair worth keeping: y.s above this.
CURVATURE_MIN = 1e-10
# A step that raised the loss is retried from the point before it, shortened to the minimum of the quadratic
# through the two losses and the slope there, kept within these fractions of the step that failed; a loss
# that is not finite (no quadratic to fit) shortens it by SHRINK_FALLBACK.
SHRINK_MIN, SHRINK_MAX, SHRINK_FALLBACK = 1e-3, 0.5, 0.1


def make_lbfgs(image: Tensor, lr: float, history_size: int, line_search: str | None) -> torch.optim.Optimizer:
    """The L-BFGS that ``model.lbfgs_line_search`` names: ``backtrack`` is :class:`DeviceLBFGS`,
    ``strong_wolfe`` and None torch's, with and without its line search."""
    if line_search == "backtrack":
        return DeviceLBFGS([image], lr=lr, history_size=history_size)
    # max_iter=1: each Lightning step is exactly one L-BFGS iteration (one closure evaluation
    # without line search), so trainer.max_steps counts iterations as the seed does. The curvature
    # history persists across steps in the optimiser state.
    # With max_iter=1 torch's default max_eval (max_iter * 5 // 4 = 1) would leave the line search
    # no evaluation to spend: it could only take or refuse the first trial step, and once it refused
    # one every later step would repeat it (the image would never move again).
    max_eval = 1 + LINE_SEARCH_EVALS if line_search else None
    return torch.optim.LBFGS(
        [image], lr=lr, max_iter=1, max_eval=max_eval, history_size=history_size, line_search_fn=line_search
    )


def last_accepted(image: Tensor, optimizers: Sequence[torch.optim.Optimizer]) -> Tensor:
    """``image``, or where a DeviceLBFGS among ``optimizers`` optimises it, the last point it accepted: the image
    itself then holds the next trial step, not yet evaluated, which may yet be undone. Before it has accepted any
    (a run that failed in a scale's first step) its state holds zeros, and the image is the point."""
    for optimizer in optimizers:
        # An empty state: its first step failed while allocating it (out of memory), nothing accepted.
        if isinstance(optimizer, DeviceLBFGS) and optimizer.param is image and optimizer.state.get(image):
            state = optimizer.state[image]
            return torch.where(state["n_iter"] > 0, state["x"].view_as(image), image)  # no host read
    return image


class DeviceLBFGS(torch.optim.Optimizer):
    """L-BFGS (Nocedal 1980) on one tensor, one function evaluation per step, with no host read.

    It follows ``torch.optim.LBFGS(max_iter=1, line_search_fn=None)`` step for step (the same first step
    ``min(1, 1/|g|_1) * lr``, the same curvature test and scaling ``y.s / y.y``), with these departures:

    * **Backtracking across steps** (``backtrack``): a step whose loss is higher than the point it left
      (or not finite) is undone at the next step, which starts again from that point along the same
      direction with a shorter step. Without it L-BFGS's second step, sized by the curvature along its
      tiny first one, can overshoot by orders of magnitude (issue 13); torch's strong-Wolfe line search
      prevents that with extra evaluations inside a step and host reads, this with one evaluation a step.
      The parameter therefore holds the next trial point; the run's result is the last accepted point
      (:func:`last_accepted`), whose loss :meth:`accepted_loss` gives.
    * The two-loop recursion is computed in its compact form: the inner products of the history with the
      gradient in one matrix product, the recursion itself as two triangular solves on the small Gram
      matrices (kept up to date as pairs arrive), the direction in one more product. The same direction
      up to rounding, in a handful of kernels whatever the history size.
    * A gradient already below ``tolerance_grad``, or a direction that is not a descent direction, leaves
      the image where it is (torch returns or breaks before its step); the step counts as still.

    State (all device tensors, saved in checkpoints): ``mem`` (the last ``history_size`` steps s and
    gradient changes y, rows ``[0, m)`` and ``[m, 2m)``), ``sy``/``yy`` (their Gram matrices), ``valid``,
    ``head`` (the slot of the next pair), ``h_diag``, the accepted point ``x``, its gradient ``g``, loss
    ``loss`` and slope ``gtd``, the direction ``d`` and step length ``t`` in progress, and the counters
    ``n_iter``, ``undone`` (steps undone) and ``still`` (steps in a row that left the image unchanged).

    Args:
        params: one tensor (the image), or a list holding one.
        lr: step length after the first step (torch's meaning).
        history_size: number of curvature pairs kept.
        tolerance_grad: gradient max-norm under which the image has converged (torch's meaning).
        tolerance_change: a direction whose slope is above minus this is no descent direction.
        backtrack: undo and shorten a step that raised the loss (see above).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Tensor,
        lr: float = 1.0,
        history_size: int = 100,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        backtrack: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            history_size=history_size,
            tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change,
            backtrack=backtrack,
        )
        super().__init__(params, defaults)
        tensors = [p for group in self.param_groups for p in group["params"]]
        if len(tensors) != 1:
            raise ValueError(f"DeviceLBFGS optimises exactly one tensor, got {len(tensors)}")

    @property
    def param(self) -> Tensor:
        return self.param_groups[0]["params"][0]

    def _state(self) -> dict[str, Tensor]:
        state = self.state[self.param]
        if not state:  # a fresh run (a resumed one has its state from load_state_dict)
            p, m = self.param, self.param_groups[0]["history_size"]
            vector = dict(dtype=p.dtype, device=p.device)
            count = dict(dtype=torch.long, device=p.device)
            state.update(
                mem=torch.zeros(2 * m, p.numel(), **vector),
                sy=torch.zeros(m, m, **vector),
                yy=torch.zeros(m, m, **vector),
                valid=torch.zeros(m, dtype=torch.bool, device=p.device),
                head=torch.zeros((), **count),
                h_diag=torch.ones((), **vector),
                x=torch.zeros(p.numel(), **vector),
                g=torch.zeros(p.numel(), **vector),
                loss=torch.full((), torch.inf, **vector),
                gtd=torch.zeros((), **vector),
                d=torch.zeros(p.numel(), **vector),
                t=torch.zeros((), **vector),
                n_iter=torch.zeros((), **count),
                undone=torch.zeros((), **count),
                still=torch.zeros((), **count),
            )
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every saved tensor but "step" to the parameter's dtype: the counters, head and mask
        # get their own back (exactly: they are small integers).
        dtypes = {key: value.dtype for saved in state_dict["state"].values() for key, value in saved.items()}
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key, value in state.items():
                state[key] = value.to(dtypes.get(key, value.dtype))

    def accepted_loss(self) -> Tensor:
        """The loss of the last accepted point, the run's result (a device tensor)."""
        return self._state()["loss"]

    def still_steps(self) -> Tensor:
        """Steps in a row that left the image unchanged (a device tensor: reading it waits for the device)."""
        return self._state()["still"]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        """Evaluates ``closure`` once at the image, then moves the image to the next point to evaluate."""
        with torch.enable_grad():
            loss = closure()
        # Lightning runs a mixed-precision training_step, and so this step, under autocast: its inner products
        # would run in half precision, over a half-precision copy of the whole history (m image-sized vectors'
        # worth of memory that the memory plan does not count; a 3000 px run under `ulimit -v` died of it).
        with torch.autocast(self.param.device.type, enabled=False):
            return self._advance(loss)

    def _advance(self, loss: Tensor) -> Tensor:
        """:meth:`step` after its evaluation: the curvature pair, the direction, the next point."""
        group, state, p = self.param_groups[0], self._state(), self.param
        m, lr = group["history_size"], group["lr"]
        x, g = p.view(-1), p.grad.reshape(-1)
        f = loss.detach().reshape(()).to(x.dtype)
        first = state["n_iter"] == 0
        accept = first | ~first  # every step stands without backtracking (torch's behaviour)
        if group["backtrack"]:
            accept = first | (torch.isfinite(f) & torch.isfinite(g).all() & (f <= state["loss"]))

        # The curvature pair of the step that led here, kept where accepted and y.s > CURVATURE_MIN (torch's
        # test), written over the oldest slot of the ring.
        s, y = state["d"] * state["t"], g - state["g"]
        ys, yy = torch.dot(y, s), torch.dot(y, y)
        take = accept & (ys > CURVATURE_MIN)
        mem, head, slots = state["mem"], state["head"], torch.stack((state["head"], state["head"] + m))
        mem.index_copy_(0, slots, torch.where(take, torch.stack((s, y)), mem.index_select(0, slots)))
        # Every inner product the step needs, in one pass over the history: S and Y against s, y and g.
        products = torch.mm(mem, torch.stack((s, y, g)).t())
        column = (torch.arange(m, device=x.device) == head) & take
        sy = torch.where(column[None, :], products[:m, 1, None], state["sy"])  # s_i.y_new
        state["sy"].copy_(torch.where(column[:, None], products[None, m:, 0], sy))  # s_new.y_j
        yy_new = torch.where(column[None, :], products[m:, 1, None], state["yy"])
        state["yy"].copy_(torch.where(column[:, None], products[None, m:, 1], yy_new))
        state["valid"].logical_or_(column)
        state["h_diag"].copy_(torch.where(take, ys / yy, state["h_diag"]))
        head = state["head"].copy_(torch.where(take, (head + 1) % m, head))

        direction = self._direction(state, g, products[:m, 2], products[m:, 2], m)
        gtd = torch.dot(g, direction)
        # torch: the first step is min(1, 1/|g|_1) * lr, every later one lr; no step at all where the gradient
        # is below tolerance_grad or the direction does not descend.
        length = torch.where(first, torch.clamp(g.abs().sum().reciprocal(), max=1.0) * lr, lr)
        descends = (gtd <= -group["tolerance_change"]) & (g.abs().max() > group["tolerance_grad"])
        length = torch.where(descends, length, 0.0)
        # A step undone: the minimum of the quadratic through the loss and slope at the accepted point and the
        # loss where the step landed, within [SHRINK_MIN, SHRINK_MAX] of the failed step.
        failed, slope = state["t"], state["gtd"]
        quadratic = -slope * failed * failed / (2 * (f - state["loss"] - slope * failed))
        shorter = torch.clamp(quadratic, min=failed * SHRINK_MIN, max=failed * SHRINK_MAX)
        shorter = torch.where(torch.isfinite(quadratic), shorter, failed * SHRINK_FALLBACK)

        for key, new in (("x", x), ("g", g), ("loss", f), ("gtd", gtd), ("d", direction)):
            state[key].copy_(torch.where(accept, new, state[key]))
        state["t"].copy_(torch.where(accept, length, shorter))
        after = torch.addcmul(state["x"], state["d"], state["t"])
        state["still"].copy_(torch.where((after != x).any(), 0, state["still"] + 1))
        x.copy_(after)
        state["undone"].add_(~accept)
        state["n_iter"].add_(1)
        return loss

    @staticmethod
    def _direction(state: dict[str, Tensor], g: Tensor, sg: Tensor, yg: Tensor, m: int) -> Tensor:
        """-H g, H the L-BFGS inverse Hessian of the history (two-loop recursion in compact form).

        ``sg``, ``yg``: S g and Y g, per slot. In the order oldest to newest, the first loop's coefficients
        ``al`` solve R al = S g with R the upper triangle of S^T Y (diagonal y_i.s_i), and the second loop's
        ``al - be`` solve R^T c = D al + h_diag (Y^T Y al - Y g); then H g = h_diag (g - Y^T al) + S^T c.
        Empty slots get an identity row and zeros, so they contribute nothing.
        """
        steps = torch.arange(m, device=g.device)
        order, place = (state["head"] + steps) % m, (steps - state["head"]) % m  # slot of rank k, rank of slot
        valid = state["valid"][order]
        both = valid[:, None] & valid[None, :]
        r = torch.where(both, state["sy"][order][:, order], 0.0).triu()
        r = r + torch.diag((~valid).to(r.dtype))
        gram = torch.where(both, state["yy"][order][:, order], 0.0)
        sg, yg, gamma = torch.where(valid, sg[order], 0.0), torch.where(valid, yg[order], 0.0), state["h_diag"]
        al = torch.linalg.solve_triangular(r, sg[:, None], upper=True)[:, 0]
        rhs = r.diagonal() * al + gamma * (gram @ al - yg)
        c = torch.linalg.solve_triangular(r.t(), rhs[:, None], upper=False)[:, 0]
        weights = torch.cat((c[place], -gamma * al[place]))
        return torch.addmv(g * gamma, state["mem"].t(), weights).neg_()
