"""Importance sampling of the training timesteps: a class of its own with a state_dict, so Diffusion stays stateless."""
import torch


class ImportanceSampler:
    """TIMESTEPS = "importance": t drawn where the loss is large or varies most, weighted so that the objective stays
    the logit-normal's (Nichol & Dhariwal 2021, sec. 3.3; improved-diffusion's resample.py). The logit-normal's P(t) is
    cut into 20 bins; once each has 8 losses, bin b is drawn at the rate q_b = 0.8 p_b sqrt(E[loss^2]_b) / Z + 0.2 p_b,
    which minimises the loss estimate's variance, and weighted p_b / q_b, so that E_q[weight * loss] = E_p[loss]."""

    def __init__(self, noise_steps, device, bins=20):
        bins, steps = min(bins, noise_steps), torch.arange(noise_steps + 1, dtype=torch.float64)
        p_t = torch.special.ndtr(torch.logit(steps / noise_steps)).diff()  # t = floor(T sigmoid(u)), u ~ N(0, 1)
        bin_of_t = torch.arange(noise_steps) * bins // noise_steps
        p_bin = torch.zeros(bins, dtype=torch.float64).index_add(0, bin_of_t, p_t)
        self.p_t, self.p_bin, self.bin_of_t = p_t.float().to(device), p_bin.float().to(device), bin_of_t.to(device)
        # each bin's mean squared loss (over about its last 32 losses), and how many losses it has seen
        self.loss_square, self.loss_count = torch.zeros_like(self.p_bin), torch.zeros_like(self.p_bin)

    def proposal(self):
        """q, the rate of each bin: p until every bin has 8 losses."""
        mean_square = self.loss_square / (1 - (31 / 32) ** self.loss_count).clamp(min=1e-12)  # as Adam's bias fix
        q = self.p_bin * mean_square.sqrt()
        q = 0.8 * q / q.sum().clamp(min=1e-30) + 0.2 * self.p_bin
        return torch.where((self.loss_count >= 8).all(), q, self.p_bin)

    def sample_timesteps(self, n, generator=None):
        """n timesteps: a bin drawn at rate q, then t within it as the logit-normal draws it there."""
        q_t = self.p_t * (self.proposal() / self.p_bin)[self.bin_of_t]
        return torch.multinomial(q_t, n, replacement=True, generator=generator)

    def weight(self, t):
        """p(t) / q(t)."""
        return (self.p_bin / self.proposal())[self.bin_of_t[t]]

    def update(self, t, losses):
        """Each bin's mean squared loss takes in the (unweighted) losses at t, an older loss weighted (31/32)^k, k the
        bin's losses after it. Called with the global batch after its step: q is fixed within a step. A NaN or infinite
        loss is left out (the run's NaN stop reports it)."""
        bins, finite = self.bin_of_t[t], losses.isfinite()
        seen = torch.zeros_like(self.loss_count).index_add_(0, bins, finite.float())
        batch_square = torch.zeros_like(self.loss_square).index_add_(0, bins, losses.float().where(finite, 0).square())
        kept = (31 / 32) ** seen
        self.loss_square = kept * self.loss_square + (1 - kept) * batch_square / seen.clamp(min=1)
        self.loss_count = self.loss_count + seen

    def state_dict(self):
        return {"loss_square": self.loss_square.cpu(), "loss_count": self.loss_count.cpu()}

    def load_state_dict(self, state):
        self.loss_square, self.loss_count = (state[k].to(self.p_bin.device) for k in ("loss_square", "loss_count"))
