"""The optimizers: AdamW (the tutorial's), or Muon for the hidden layers' weight matrices with AdamW for the rest."""
import torch

from data import UserError


def make_optimizer(model, lr, device, kind="adamw"):
    """"adamw" (the tutorial's), fused where torch has it (CUDA, CPU), else foreach; or "muon", with AdamW for the
    biases, norms, the input and output layers and the label embedding (as Jordan et al. keep them)."""
    if kind not in ("adamw", "muon"):
        raise UserError(f"optimizer={kind!r}: expected 'adamw' or 'muon'")
    if kind == "muon":
        outer = {"inc.double_conv.0.weight", "outc.weight", "label_emb.weight"}
        groups = {True: [], False: []}  # is it a hidden layer's weight matrix?
        for name, p in model.named_parameters():
            groups[p.ndim >= 2 and name not in outer].append(p)
        return Muon([{"params": groups[True], "muon": True}, {"params": groups[False], "muon": False}], lr)
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(model.parameters(), lr=lr, fused=fused, foreach=not fused)


def orthogonalise(g, steps=5):
    """U V^T of each matrix g = U S V^T (a matrix or a batch of one shape), approximately (singular values to about
    0.7 to 1.2), by the quintic Newton-Schulz iteration of Jordan et al. 2024: x <- p(a) x, a = x x^T,
    p(a) = 3.4445 - 4.7750 a + 2.0315 a^2. It runs on the short side's Gram matrix (a <- p(a) a p(a), q the product of
    the p's) and multiplies by x once at the end: the same result, with two products with the wide x, not two a step."""
    x = g / (g.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # all singular values <= 1
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    a = x @ x.mT
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    q = eye
    for _ in range(steps):
        p = 3.4445 * eye - 4.7750 * a + 2.0315 * a @ a
        q, a = p @ q, p @ a @ p
    x = q @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024) for the groups marked "muon": True, AdamW for the others, in one optimizer (one state
    to save). A matrix's update is its Nesterov momentum orthogonalised (a convolution's weight as out x in*k*k), scaled
    to AdamW's update RMS, 0.2 (Liu et al. 2025), so one LR serves both. AdamW's beta2 is 0.99 (torch's: 0.999), as in
    docs/measurements.md's Muon runs. (torch.optim.Muon takes 2-D parameters only and orthogonalises in bf16, slow on
    CPUs without it.) Matrices of one shape are orthogonalised as one batch: a few kernels a step, not thousands."""

    def __init__(self, groups, lr, momentum=0.95, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01):
        super().__init__(groups, dict(lr=lr, momentum=momentum, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)  # Muon's momentum, or AdamW's first moment
                    if not group["muon"]:
                        state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
            if not params:
                continue
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])  # decoupled weight decay
            if group["muon"]:
                by_shape = {}
                for p in params:
                    by_shape.setdefault(p.shape, []).append(p)
                for shape, same in by_shape.items():
                    momentum = [self.state[p]["exp_avg"] for p in same]
                    torch._foreach_lerp_(momentum, [p.grad for p in same], 1 - group["momentum"])
                    nesterov = torch.stack([p.grad.lerp(m, group["momentum"]) for p, m in zip(same, momentum)])
                    update = orthogonalise(nesterov.flatten(2))
                    torch._foreach_add_(same, list(update.unflatten(2, shape[1:]).unbind()),
                                        alpha=-lr * 0.2 * max(update.shape[1:]) ** 0.5)
            else:  # AdamW (Loshchilov & Hutter 2019)
                for p in params:
                    state, grad, step = self.state[p], p.grad, self.state[p]["step"].item()
                    state["exp_avg"].lerp_(grad, 1 - beta1)
                    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denominator = (state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
                    p.addcdiv_(state["exp_avg"], denominator, value=-lr / (1 - beta1 ** step))
