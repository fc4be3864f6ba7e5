"""The diffusion math, checked against closed forms: the forward process, the schedules, the samplers on Gaussian
data (whose exact noise predictor is known, so no training is needed), classifier-free guidance and label dropout."""
import math

import pytest
import torch

from data import UserError
from ddpm import Diffusion
from importance import ImportanceSampler
from ddpm_conditional import drop_labels


class GaussianEps(torch.nn.Module):
    """The exact predictor when every pixel of x_0 is N(mu, std^2), independently: x_t = sqrt(a) x_0 + sqrt(1 - a) eps
    (a = alpha_hat_t) is Gaussian, so E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a std^2 + 1 - a),
    E[x_0 | x_t] = mu + sqrt(a) std^2 (x_t - sqrt(a) mu) / (a std^2 + 1 - a), and v = sqrt(a) eps - sqrt(1 - a) x_0.
    Returns the one that diffusion.prediction names; records the timesteps it was called at."""

    def __init__(self, diffusion, mu, std):
        super().__init__()
        self.diffusion, self.mu, self.std = diffusion, mu, std
        self.timesteps = []

    def forward(self, x, t, y=None):
        self.timesteps.append(t[0].item())
        a = self.diffusion.alpha_hat[t][:, None, None, None].double()
        centred, variance = x.double() - a.sqrt() * self.mu, a * self.std ** 2 + 1 - a
        eps = (1 - a).sqrt() * centred / variance
        x0 = self.mu + a.sqrt() * self.std ** 2 * centred / variance
        exact = eps if self.diffusion.prediction == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0  # v
        return exact.float()


def test_noise_images_matches_q_xt_given_x0():
    """q(x_t | x_0) = N(sqrt(alpha_hat_t) x_0, (1 - alpha_hat_t) I), Ho et al. 2020 eq. 4."""
    diffusion = Diffusion(device="cpu")
    torch.manual_seed(0)
    x0 = torch.full((4000, 1, 8, 8), 0.7)
    for step in (0, 10, 250, 999):
        t = torch.full((len(x0),), step)
        x_t, noise = diffusion.noise_images(x0, t)
        a = diffusion.alpha_hat[step].item()
        n = x_t.numel()
        assert abs(x_t.mean().item() - math.sqrt(a) * 0.7) < 5 * math.sqrt((1 - a) / n) + 1e-6
        assert abs(x_t.var().item() / (1 - a) - 1) < 5 * math.sqrt(2 / n)
        assert torch.allclose(x_t, math.sqrt(a) * x0 + math.sqrt(1 - a) * noise, atol=1e-6)  # the noise returned
    assert abs(noise.mean().item()) < 5 / math.sqrt(n) and abs(noise.std().item() - 1) < 5 * math.sqrt(0.5 / n)


def test_logit_normal_timesteps_follow_their_distribution():
    """t / T = sigmoid(u), u ~ N(0, 1): P(t < k) = Phi(logit(k / T)), checked at a few k within 5 standard errors."""
    diffusion = Diffusion(device="cpu", timesteps="logit_normal")
    t = diffusion.sample_timesteps(200_000, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 999
    for k in (50, 200, 500, 800, 950):
        expected = 0.5 * (1 + math.erf(math.log(k / (1000 - k)) / math.sqrt(2)))
        observed = (t < k).double().mean().item()
        assert abs(observed - expected) < 5 * math.sqrt(expected * (1 - expected) / len(t))
    with pytest.raises(UserError, match="timesteps 'beta': expected 'uniform' or 'logit_normal'"):
        Diffusion(device="cpu", timesteps="beta")


def test_importance_proposal_leaves_out_non_finite_losses():
    """A NaN or infinite loss (say an fp16 overflow) does not enter the proposal: the learnt state is the one without
    it, so t stays drawable until the run's NaN stop reports the loss."""
    with_bad, without = (ImportanceSampler(1000, "cpu") for _ in range(2))
    t = torch.arange(0, 1000, 25)  # two timesteps in each of the 20 bins
    losses = torch.linspace(0.5, 2.0, 40)
    with_bad.update(t, torch.cat([torch.tensor([float("inf"), float("nan")]), losses[2:]]))
    without.update(t[2:], losses[2:])
    assert torch.equal(with_bad.loss_square, without.loss_square)
    assert torch.equal(with_bad.loss_count, without.loss_count)
    for _ in range(8):
        with_bad.update(t, losses)
    assert torch.all(with_bad.proposal().isfinite()) and torch.all(with_bad.proposal() > 0)


def test_importance_sampled_timesteps_keep_the_logit_normal_objective():
    """"importance" (Nichol & Dhariwal 2021, sec. 3.3, on the logit-normal): t is drawn as the logit-normal draws it
    until each of the 20 bins of 50 steps has 8 losses; then bin b at rate q_b = 0.8 p_b sqrt(E_b[L^2]) / Z + 0.2 p_b,
    t within it as the logit-normal there, and the weight p_b / q_b makes E_q[weight f(t)] = E_p[f(t)] for any f.
    E_b[L^2] averages the bin's losses with weights (31/32)^age."""
    diffusion = ImportanceSampler(1000, "cpu")
    cdf = [0.5 * (1 + math.erf(math.log(k / (1000 - k)) / math.sqrt(2))) if 0 < k < 1000 else float(k > 0)
           for k in range(1001)]
    p_t = torch.tensor(cdf, dtype=torch.float64).diff()  # P(t = k) of t = floor(1000 sigmoid(u)), u ~ N(0, 1)
    torch.testing.assert_close(diffusion.p_t.double(), p_t, rtol=1e-5, atol=1e-12)
    p_bin = p_t.view(20, 50).sum(1)
    assert torch.equal(diffusion.proposal(), diffusion.p_bin) and torch.all(diffusion.weight(p_t.argmax(
        keepdim=True)) == 1)
    size = torch.where(torch.arange(20) < 10, 1.0, 4.0)  # the losses of bins 10-19 four times those of bins 0-9
    starts = torch.arange(0, 1000, 50)
    for i in range(8):
        assert torch.equal(diffusion.proposal(), diffusion.p_bin)  # some bin has fewer than 8 losses
        diffusion.update(starts + i, size * (1 + i % 2))  # |L| alternating 1, 2 (times size)
    ages = (31 / 32) ** torch.arange(7, -1, -1.0)  # the last loss (age 0) was 2, the one before it 1, ...
    mean_square = (ages * torch.tensor([1.0, 4.0] * 4)).sum() / ages.sum() * size ** 2
    q = p_bin * mean_square.double().sqrt()
    q = 0.8 * q / q.sum() + 0.2 * p_bin
    torch.testing.assert_close(diffusion.proposal().double(), q, rtol=1e-5, atol=0)
    assert q[15] / p_bin[15] > 1.4 and q[5] / p_bin[5] < 0.6  # large losses drawn more often (1.48, 0.52 times)

    n = 400_000
    t = diffusion.sample_timesteps(n, torch.Generator().manual_seed(0))
    share = torch.bincount(t // 50, minlength=20).double() / n
    assert torch.all((share - q).abs() < 5 * (q * (1 - q) / n).sqrt())  # each bin drawn at its rate q_b
    for f in (lambda t: t % 50 / 50.0, lambda t: torch.cos(t / 150.0), lambda t: (t > 500).double()):
        weighted = diffusion.weight(t).double() * f(t.double())
        expected = (p_t * f(torch.arange(1000, dtype=torch.float64))).sum()
        assert abs(weighted.mean() - expected) < 5 * weighted.std() / math.sqrt(n)
    noisier = (t > 500).double()  # without the weights, another objective: the noisier half drawn more often
    assert noisier.mean() - p_t[501:].sum() > 20 * noisier.std() / math.sqrt(n)


def test_linear_schedule():
    diffusion = Diffusion(device="cpu")
    assert len(diffusion.beta) == 1000
    assert diffusion.beta[0].item() == pytest.approx(1e-4) and diffusion.beta[-1].item() == pytest.approx(0.02)
    assert torch.allclose(diffusion.alpha_hat, torch.cumprod(1 - diffusion.beta.double(), 0).float())


def test_cosine_schedule_matches_its_closed_form():
    """Nichol & Dhariwal 2021, eq. 17: alpha_hat_t = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi / 2)."""
    diffusion = Diffusion(schedule="cosine", device="cpu")
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    for step in (0, 100, 500, 900):  # index i is t = i + 1; beta is clipped at 0.999 only at the very end
        assert diffusion.alpha_hat[step].item() == pytest.approx(f(step + 1) / f(0), rel=1e-5)
    assert diffusion.beta.max() <= torch.tensor(0.999)


def test_timesteps_cover_all_of_1_to_T():
    """Training draws every timestep, including both ends; the ancestral sampler visits every one, T first."""
    diffusion = Diffusion(noise_steps=50, device="cpu")
    t = diffusion.sample_timesteps(20000, torch.Generator().manual_seed(0))
    counts = torch.bincount(t, minlength=50)
    assert len(counts) == 50 and counts.min() > 300  # uniform: 400 each on average
    model = GaussianEps(diffusion, 0.0, 0.5)
    diffusion.img_size, diffusion.channels = (8, 8), 1
    diffusion.sample(model, 2, progress=False)
    assert model.timesteps == list(range(49, -1, -1))
    model.timesteps.clear()
    diffusion.sample(model, 2, steps=7, progress=False)
    assert model.timesteps[0] == 49 and model.timesteps[-1] == 0 and len(model.timesteps) == 7


def test_steps_and_sampler_mean_what_they_say():
    """sampler="ddim" over every step is DDIM, deterministic (the same x_0 whatever the generator), not the ancestral
    sampler; "ancestral" takes every step and refuses fewer; given neither, the tutorial's call, all T steps are
    ancestral (stochastic)."""
    diffusion = Diffusion(noise_steps=50, img_size=8, device="cpu")
    model, x_T = GaussianEps(diffusion, MU, STD), torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ddim = [diffusion.denoise(model, x_T, steps=50, sampler="ddim", generator=torch.Generator().manual_seed(seed))
            for seed in (1, 2)]
    assert torch.equal(ddim[0], ddim[1]) and model.timesteps[-50:] == list(range(49, -1, -1))
    ancestral = [diffusion.denoise(model, x_T, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    assert (ancestral[0] - ancestral[1]).abs().max() > 1e-3
    assert torch.equal(ancestral[0], diffusion.denoise(model, x_T, steps=50, sampler="ancestral",
                                                       generator=torch.Generator().manual_seed(1)))
    with pytest.raises(UserError, match=r"steps=20: the ancestral sampler takes every step \(50\)"):
        diffusion.sample(model, 2, steps=20, sampler="ancestral")


MU, STD = 0.2, 0.15  # 5 standard deviations stay inside [-1, 1], where the samplers clip x_0


def gaussian_samples(steps, n=128, prediction="eps"):
    """n x 2 x 16 x 16 samples (131072 values: standard errors 0.0006 for the mean, 0.2% for the std)."""
    diffusion = Diffusion(img_size=16, channels=2, device="cpu", prediction=prediction)
    model = GaussianEps(diffusion, MU, STD)
    x_T = torch.randn(n, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    x_0 = diffusion.denoise(model, x_T, steps=steps, generator=torch.Generator().manual_seed(1))
    return diffusion, model, x_T, x_0


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", [None, 500])
def test_samplers_reproduce_gaussian_data(steps, prediction):
    """Handed the exact noise predictor of N(mu, std^2) data, ancestral sampling (Algorithm 2, all 1000 steps) and
    DDIM return samples with that mean and standard deviation. The exact bias of the std here, from the closed forms:
    ancestral +0.6% (sigma_t^2 = beta_t), DDIM with 500 steps -1.0% (its first-order step); sampling error 0.2%."""
    _, _, _, x = gaussian_samples(steps, prediction=prediction)
    assert abs(x.mean().item() - MU) < 0.003
    assert abs(x.std().item() / STD - 1) < 0.02


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", [10, 20, 50])
def test_ddim_is_the_exact_deterministic_map(steps, prediction):
    """For Gaussian data DDIM (eta = 0) is affine: x_0 = mu + K (x_T - sqrt(alpha_hat_T) mu), where, with
    u_t = (sqrt(alpha_hat_t) std, sqrt(1 - alpha_hat_t)) (signal and noise scales of x_t), each step from t to t'
    multiplies by <u_t, u_t'> / |u_t|^2, and the last one ends at u = (std, 0), the clean data."""
    diffusion, model, x_T, x_0 = gaussian_samples(steps, n=8, prediction=prediction)
    visited = model.timesteps
    assert len(visited) == steps and visited[0] == 999 and visited[-1] == 0
    assert all(a > b for a, b in zip(visited, visited[1:]))
    alpha_hat = diffusion.alpha_hat.double()
    u = [torch.stack([alpha_hat[t].sqrt() * STD, (1 - alpha_hat[t]).sqrt()]) for t in visited]
    u.append(torch.tensor([STD, 0.0], dtype=torch.float64))
    K = math.prod(((a @ b) / (a @ a)).item() for a, b in zip(u, u[1:]))
    expected = MU + K * (x_T.double() - alpha_hat[999].sqrt() * MU)
    assert torch.allclose(x_0.double(), expected, atol=2e-5)
    if steps == 50:  # x_T has std 1, so x_0 has std K: quadratic spacing keeps 95.1% of STD, uniform would keep 84.5%
        assert 0.945 < K / STD < 0.955


def test_samplers_clip_the_predicted_x0_to_the_data_range():
    """A model whose eps implies x_0 = 3 (outside [-1, 1]) ends at the clipped x_0 = 1, with either sampler."""
    diffusion = Diffusion(img_size=8, channels=1, device="cpu")

    class FarOut(torch.nn.Module):
        def forward(self, x, t):
            a = diffusion.alpha_hat[t][:, None, None, None]
            return (x - a.sqrt() * 3.0) / (1 - a).sqrt()

    for steps in (None, 20):
        x = diffusion.denoise(FarOut(), torch.randn(4, 1, 8, 8), steps=steps)
        assert torch.allclose(x, torch.ones_like(x), atol=1e-4)


def test_sample_returns_rounded_uint8_images():
    """x_0 = -0.2 is 101.99 on the [0, 255] scale: rounding gives 102 (truncation would give 101)."""
    diffusion = Diffusion(img_size=8, channels=3, device="cpu")
    target = 101.99 / 127.5 - 1

    class Target(torch.nn.Module):
        def forward(self, x, t):  # the eps for which DDIM's x_0 prediction is exactly `target`
            a = diffusion.alpha_hat[t][:, None, None, None]
            return (x - a.sqrt() * target) / (1 - a).sqrt()

    images = diffusion.sample(Target(), 3, steps=1, progress=False)
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 8, 8)
    assert (images == 102).all()


class TwoPredictions(torch.nn.Module):
    """eps_c = 1 for labelled samples, eps_u = -2 for null ones (label -1); records every forward's labels."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t, y=None):
        self.seen.append(y.clone())
        labelled = (y >= 0) if y.ndim == 1 else (y != 0).any(1)
        return torch.where(labelled[:, None, None, None], 1.0, -2.0).expand_as(x)


@pytest.mark.parametrize("scale", [0, 1, 3, 7.5])
def test_cfg_combination_and_forward_passes(scale):
    """eps = eps_u + s (eps_c - eps_u); as the tutorial guides only when s > 0, s = 0 is the conditional model, as
    s = 1 is: one plain conditional pass; any other s one batched pass of 2n holding both."""
    diffusion = Diffusion(img_size=8, device="cpu")
    model, labels = TwoPredictions(), torch.tensor([0, 3, 1])
    x, t = torch.zeros(3, 3, 8, 8), torch.full((3,), 500)
    eps = diffusion.guided_output(model, x, t, labels, scale)
    assert torch.allclose(eps, torch.full_like(x, 1.0 if scale in (0, 1) else -2.0 + scale * 3.0))
    assert len(model.seen) == 1
    assert model.seen[0].tolist() == ([0, 3, 1] if scale in (0, 1) else [0, 3, 1, -1, -1, -1])


@pytest.mark.parametrize("cfg_scale", [0, 1, 3, 7.5])
def test_the_tutorials_own_guidance_line_gives_what_sample_gives(cfg_scale):
    """The tutorial's sampler, verbatim: its cfg_scale=0 is the conditional model, unguided, and so is it here (the
    unconditional model: labels -1, or None)."""
    from modules import UNet_conditional
    torch.manual_seed(0)
    model, diffusion = UNet_conditional(num_classes=4, width=8).eval(), Diffusion(img_size=8, device="cpu")
    x, t, labels = torch.randn(4, 3, 8, 8), torch.full((4,), 300), torch.arange(4)
    with torch.no_grad():
        predicted_noise = model(x, t, labels)
        if cfg_scale > 0:
            uncond_predicted_noise = model(x, t, None)
            predicted_noise = torch.lerp(uncond_predicted_noise, predicted_noise, cfg_scale)
        ours = diffusion.guided_output(model, x, t, labels, cfg_scale)
        unconditional = diffusion.guided_output(model, x, t, torch.full((4,), -1), cfg_scale)
        assert torch.equal(unconditional, model(x, t, None))
    torch.testing.assert_close(ours, predicted_noise, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, unconditional)  # (the labels matter to this model)


def test_cfg_null_condition_for_multi_hot_labels():
    diffusion, model = Diffusion(img_size=8, device="cpu"), TwoPredictions()
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    diffusion.guided_output(model, torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), labels, 3)
    assert len(model.seen) == 1 and model.seen[0].shape == (4, 3)
    assert model.seen[0][:2].equal(labels) and (model.seen[0][2:] == 0).all()


def test_labels_are_dropped_per_sample_at_the_cfg_rate():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (200_000,), generator=g)
    dropped = drop_labels(labels, 0.1, g)
    rate = (dropped == -1).float().mean().item()
    assert abs(rate - 0.1) < 5 * math.sqrt(0.1 * 0.9 / len(labels))
    kept = dropped != -1
    assert dropped[kept].equal(labels[kept])
    per_batch = (dropped.view(-1, 64)[:, :] == -1).sum(1)  # per sample, not per batch: batches are mixed
    assert (per_batch > 0).float().mean() > 0.99 and (per_batch < 64).all()
    multi_hot = torch.ones(1000, 4)
    dropped = drop_labels(multi_hot, 0.5, g)
    rows_zero = (dropped == 0).all(1)
    assert ((dropped == 1).all(1) | rows_zero).all() and 400 < rows_zero.sum() < 600


def test_sampler_rejects_bad_labels_and_steps():
    from modules import UNet_conditional
    diffusion = Diffusion(img_size=16, device="cpu")
    model = UNet_conditional(num_classes=4, width=8, attention=())
    with pytest.raises(UserError, match="label 4 is outside the model's 4 classes"):
        diffusion.sample(model, 2, torch.tensor([1, 4]), steps=2, progress=False)
    with pytest.raises(UserError, match="expected one class index per image"):
        diffusion.sample(model, 2, torch.tensor([1, 2, 3]), steps=2, progress=False)
    with pytest.raises(UserError, match="steps=1001"):
        diffusion.sample(model, 2, torch.tensor([1, 2]), steps=1001, progress=False)
    from modules import UNet
    with pytest.raises(UserError, match="labels given to an unconditional model"):  # not a raw TypeError
        diffusion.sample(UNet(width=8, attention=()), 2, torch.tensor([1, 2]), steps=2, progress=False)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_each_training_target_implies_the_clean_image(prediction):
    diffusion = Diffusion(device="cpu", prediction=prediction)
    torch.manual_seed(0)
    x0, noise = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
    for step in (0, 300, 999):
        t = torch.full((4,), step)
        x_t, _ = diffusion.noise_images(x0, t, noise)
        target = diffusion.training_target(x0, noise, t)
        recovered = diffusion.predicted_x0(target.double(), x_t.double(), diffusion.alpha_hat_list[step])
        # eps at t = T: x_t is float32, and recovering x_0 divides its rounding by sqrt(alpha_hat) = 0.0064
        assert torch.allclose(recovered.float(), x0, atol=1e-4 if step == 999 and prediction == "eps" else 1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weighting_is_min_snr_gamma_times_the_x0_error(prediction):
    """Hang et al. 2023: the loss is min(SNR_t, gamma) |x_0 - x_0_hat|^2 whatever the network predicts. So the weight
    times the squared error of the network's own output must equal that, for any output; at the chosen timesteps the
    weights for eps are min(SNR, 5) / SNR (1 where SNR <= 5)."""
    diffusion = Diffusion(device="cpu", prediction=prediction, loss_weighting="min_snr")
    torch.manual_seed(0)
    t = torch.tensor([0, 40, 150, 400, 999])
    x0, noise = torch.rand(5, 3, 8, 8) * 2 - 1, torch.randn(5, 3, 8, 8)
    x_t, _ = diffusion.noise_images(x0, t, noise)
    target = diffusion.training_target(x0, noise, t)
    output = target + 0.1 * torch.randn_like(target)  # any prediction
    weighted = diffusion.loss_weight(t) * (output - target).square().mean(dim=(1, 2, 3))
    x0_hat = torch.stack([diffusion.predicted_x0(o.double(), x.double(), diffusion.alpha_hat_list[s])
                          for o, x, s in zip(output, x_t, t.tolist())])
    snr = (diffusion.alpha_hat[t] / (1 - diffusion.alpha_hat[t])).double()
    expected = snr.clamp(max=5.0) * (x0_hat - x0.double()).square().mean(dim=(1, 2, 3))
    assert torch.allclose(weighted.double(), expected, rtol=1e-3)
    if prediction == "eps":
        assert torch.allclose(diffusion.loss_weight(t), (snr.clamp(max=5) / snr).float())
        assert diffusion.loss_weight(t)[-1] == 1 and diffusion.loss_weight(t)[0] < 0.001  # SNR(t=1) ~ 1e4
    assert torch.equal(Diffusion(device="cpu", prediction=prediction).loss_weight(t), torch.ones(5))


def deterministic_gain(diffusion, steps, sampler):
    """K / K_exact - 1 for a deterministic sampler on Gaussian data: it maps x_T to mu + K (x_T - sqrt(alpha_hat_T) mu)
    (see test_ddim_is_the_exact_deterministic_map), and the exact probability-flow ODE to the data's std, so
    K_exact = std / sqrt(alpha_hat_T std^2 + 1 - alpha_hat_T): the sampler's relative error in the samples' std."""
    a_T = diffusion.alpha_hat_list[-1]
    x = diffusion.denoise(GaussianEps(diffusion, MU, STD), torch.ones(1, 1, 1, 1), steps=steps, sampler=sampler)
    K = (x.item() - MU) / (1 - math.sqrt(a_T) * MU)
    return K / (STD / math.sqrt(a_T * STD ** 2 + 1 - a_T)) - 1


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpm_solver_reproduces_gaussian_data_in_20_steps(prediction):
    """DPM-Solver++(2M) handed the exact predictor: 20 steps give the data's mean and std (its exact bias here is
    +1.3% of the std, DDIM's -12%; sampling error 0.2%)."""
    diffusion = Diffusion(img_size=16, channels=2, device="cpu", prediction=prediction)
    x_T = torch.randn(128, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    x = diffusion.denoise(GaussianEps(diffusion, MU, STD), x_T, steps=20, sampler="dpm++")
    assert abs(x.mean().item() - MU) < 0.003
    assert abs(x.std().item() / STD - 1) < 0.02


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpm_solver_is_more_accurate_than_ddim(schedule):
    """Second order against first: DDIM's error in the std halves as the steps double (-23%, -12%, -6% at 10, 20, 40
    steps, linear schedule), DPM-Solver++(2M)'s is at least 5 times smaller at each (+1.0%, +1.3%, +0.1%)."""
    diffusion = Diffusion(img_size=1, channels=1, device="cpu", schedule=schedule)
    for steps in (10, 20, 40):
        ddim, dpm = deterministic_gain(diffusion, steps, "ddim"), deterministic_gain(diffusion, steps, "dpm++")
        assert ddim < -0.04 and abs(dpm) < abs(ddim) / 5


class RecordsInputs(GaussianEps):
    def __init__(self, *args):
        super().__init__(*args)
        self.inputs = []

    def forward(self, x, t, y=None):
        self.inputs.append(x.clone())
        return super().forward(x, t, y)


def test_dpm_solver_starts_and_ends_with_the_ddim_step():
    """On the same timesteps, DPM-Solver++(2M)'s first step is DDIM's (both feed the model the same x_t' at the second
    step), its later ones are second order (the third input differs), and its last step, to x_0, is first order
    again: with two steps it is DDIM. Its timesteps are uniform in lambda = log(alpha / sigma) where they are not
    too close to round to distinct integers."""
    diffusion = Diffusion(img_size=8, channels=1, device="cpu")
    timesteps = diffusion.sampler_timesteps(6, "dpm++", 999)
    lam = [diffusion.logsnr(t) for t in timesteps]
    assert timesteps[0] == 999 and timesteps[-1] == 0 and len(set(timesteps)) == 6
    assert max(lam[i + 1] - lam[i] for i in range(5)) < 1.05 * (lam[-1] - lam[0]) / 5
    dpm_timesteps = diffusion.sampler_timesteps
    diffusion.sampler_timesteps = lambda steps, sampler, start: dpm_timesteps(steps, "dpm++", start)  # DDIM on these
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for steps in (6, 2):
        inputs, outputs = {}, {}
        for sampler in ("ddim", "dpm++"):
            model = RecordsInputs(diffusion, MU, STD)
            outputs[sampler] = diffusion.denoise(model, x_T, steps=steps, sampler=sampler)
            inputs[sampler] = model.inputs
        assert torch.equal(inputs["ddim"][1], inputs["dpm++"][1])
        if steps == 6:  # (float32 rounding: 1e-7)
            assert (inputs["ddim"][2] - inputs["dpm++"][2]).abs().max() > 1e-5
            assert (outputs["ddim"] - outputs["dpm++"]).abs().max() > 1e-2
        else:
            assert torch.equal(outputs["ddim"], outputs["dpm++"])


def test_dpm_timesteps_are_distinct_and_reach_every_timestep():
    diffusion = Diffusion(noise_steps=50, schedule="cosine", device="cpu")
    for steps in (2, 10, 30, 50):
        t = diffusion.sampler_timesteps(steps, "dpm++", 49)
        assert len(t) == steps and t[0] == 49 and t[-1] == 0 and all(a > b for a, b in zip(t, t[1:]))
    assert diffusion.sampler_timesteps(50, "dpm++", 49) == list(range(49, -1, -1))
    for steps in (5, None):
        with pytest.raises(UserError, match=r"sampler 'dpm': expected 'ancestral', 'ddim' or 'dpm\+\+'"):
            diffusion.denoise(GaussianEps(diffusion, MU, STD), torch.randn(1, 3, 8, 8), steps=steps, sampler="dpm")


def test_sample_returns_the_predicted_x0_every_k_steps_for_an_animation(tmp_path):
    """frames_every=4 over 10 steps: the predicted x_0 at steps 0, 4, 8 and the last, which is the images returned
    (the last step returns its x_0). The first is the data mean that the exact predictor gives from pure noise
    (153 = (MU + 1) * 127.5), where x_T itself is noise. save_frames_gif writes one grid per frame."""
    from PIL import Image
    from utils import save_frames_gif
    diffusion = Diffusion(img_size=8, channels=1, device="cpu")
    for sampler, steps in (("ddim", 10), ("dpm++", 10), ("ddim", None)):
        images, frames = diffusion.sample(GaussianEps(diffusion, MU, STD), 6, steps=steps, progress=False,
                                          sampler=sampler, frames_every=4)
        assert len(frames) == (4 if steps else 251) and all(f.dtype == torch.uint8 and f.shape == (6, 1, 8, 8)
                                                            for f in frames)
        assert torch.equal(frames[-1], images)
        assert (frames[0].int() - 153).abs().max() <= 1 and images.float().std() > 10
    frames = [torch.full((6, 1, 8, 8), value, dtype=torch.uint8) for value in (0, 100, 200)]
    save_frames_gif(frames, tmp_path / "denoising.gif", nrow=3)
    gif = Image.open(tmp_path / "denoising.gif")
    assert gif.n_frames == 3 and gif.size == (3 * 8 + 4 * 2, 2 * 8 + 3 * 2)  # make_grid's 2-pixel padding
    gif.seek(1)
    assert gif.convert("L").getpixel((2, 2)) == 100


class FlatImages(torch.nn.Module):
    """The exact v predictor when each image is one flat level mu + s z, z ~ N(0, 1), in all its P pixels: the
    image's mean m of x_t = sqrt(a) (mu + s z) + sqrt(1 - a) eps tells z, E[z | x_t] =
    sqrt(a) s (m - sqrt(a) mu) / (a s^2 + (1 - a) / P), so E[x_0 | x_t] = mu + s E[z | x_t], and
    v = (sqrt(a) x_t - x_0) / sqrt(1 - a). Records, for each call, the variance of the left half of
    x_t (the known one in the tests) about its mean, over its expected 1 - a: about 1 at the noise level of t."""

    def __init__(self, diffusion, mu, s):
        super().__init__()
        self.diffusion, self.mu, self.s, self.noise_levels = diffusion, mu, s, []

    def forward(self, x, t, y=None):
        a = self.diffusion.alpha_hat[t][:, None, None, None].double()
        m = x.double().mean((1, 2, 3), keepdim=True)
        left = x[..., :x.shape[-1] // 2]
        self.noise_levels.append(((left - left.mean((1, 2, 3), keepdim=True)).var() / (1 - a[0])).item())
        z = a.sqrt() * self.s * (m - a.sqrt() * self.mu) / (a * self.s ** 2 + (1 - a) / x[0].numel())
        return ((a.sqrt() * x.double() - (self.mu + self.s * z)) / (1 - a).sqrt()).float()


def test_inpaint_keeps_the_known_pixels_and_fills_in_what_they_imply():
    """Flat images, the left half known: the known pixels come back exactly, and the right half takes the level that
    the left half implies, to within a uint8 level once RePaint resamples (resample=2: each step but the last twice,
    so 2 x 10 - 1 model calls); without resampling, 10 steps leave it 2 levels off on average (the disharmony RePaint
    resamples away)."""
    diffusion = Diffusion(img_size=8, channels=1, device="cpu", prediction="v")
    from utils import to_images
    images = to_images(torch.linspace(-0.8, 0.8, 16)[:, None, None, None].expand(16, 1, 8, 8))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    errors = {}
    for resample in (1, 2):
        model = FlatImages(diffusion, 0.0, 0.5)
        out = diffusion.inpaint(model, images, mask, steps=10, resample=resample,
                                generator=torch.Generator().manual_seed(0))
        assert out.dtype == torch.uint8 and torch.equal(out[..., :4], images[..., :4])
        errors[resample] = (out[..., 4:].float() - images[..., 4:].float()).abs().mean().item()
        assert len(model.noise_levels) == 10 * resample - (resample - 1)
        assert all(0.7 < level < 1.3 for level in model.noise_levels)  # each call at its noise level (5 s.e.)
    assert errors[2] < 1 < 2 < errors[1]
    with pytest.raises(UserError, match=r"mask of shape \(1, 1, 8, 4\)"):
        diffusion.inpaint(model, images, mask[..., :4])
    with pytest.raises(UserError, match=r"images of shape \(16, 1, 8, 8\) and dtype torch.float32: expected uint8"):
        diffusion.inpaint(model, images.float(), mask)


def test_inpainted_pixels_follow_the_data_distribution():
    """Independent N(mu, std^2) pixels: what is filled in has the data's mean and std (all 1000 steps: the posterior
    variance of eta = 1 loses 2.6% of the std; sampling error 1.1%)."""
    from utils import to_images
    diffusion = Diffusion(img_size=16, channels=2, device="cpu")
    images = to_images(MU + STD * torch.randn(16, 2, 16, 16, generator=torch.Generator().manual_seed(0)))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8] = 1
    out = diffusion.inpaint(GaussianEps(diffusion, MU, STD), images, mask, steps=None,
                            generator=torch.Generator().manual_seed(1))
    filled = out[..., 8:].float() / 127.5 - 1
    assert abs(filled.mean().item() - MU) < 0.003 and abs(filled.std().item() / STD - 1) < 0.05
    assert torch.equal(out[..., :8], images[..., :8])


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_img2img_starts_at_the_noise_level_of_its_strength(sampler):
    """SDEdit on Gaussian data: from t = strength * T the deterministic map keeps the correlation of each pixel with
    the input that x_t has with x_0, sqrt(a std^2 / (a std^2 + 1 - a)), a = alpha_hat_t (0.998 at strength 0.001,
    0.66 at 0.05, 0 at 1), and the output has the data's mean and std (DDIM's 50 steps lose 5% of it)."""
    from utils import to_images
    diffusion = Diffusion(img_size=16, channels=2, device="cpu")
    model = GaussianEps(diffusion, MU, STD)
    images = to_images(MU + STD * torch.randn(64, 2, 16, 16, generator=torch.Generator().manual_seed(0)))
    x0 = images.float() / 127.5 - 1
    for strength in (0.001, 0.05, 1):
        out = diffusion.img2img(model, images, strength, steps=50, generator=torch.Generator().manual_seed(1),
                                sampler=sampler).float() / 127.5 - 1
        a = diffusion.alpha_hat_list[math.ceil(strength * 1000) - 1]
        correlation = torch.corrcoef(torch.stack([out.flatten(), x0.flatten()]))[0, 1].item()
        assert abs(correlation - math.sqrt(a * STD ** 2 / (a * STD ** 2 + 1 - a))) < 0.02
        assert abs(out.mean().item() - MU) < 0.003 and abs(out.std().item() / STD - 1) < 0.06
    assert torch.equal(diffusion.img2img(model, images, 0), images)  # strength 0: the images as they are
    for strength in (-0.1, 1.5):
        with pytest.raises(UserError, match=f"strength={strength}: expected a number in"):
            diffusion.img2img(model, images, strength)


def test_a_model_left_on_another_device_samples_where_the_diffusion_is():
    """The tutorial's recipe builds the model on the CPU while Diffusion() picks the GPU: sampling moves the model to
    the diffusion's device instead of failing on mixed devices ("meta" stands in for the GPU here)."""
    from modules import UNet
    diffusion = Diffusion(img_size=8, device="cpu")
    diffusion.device = torch.device("meta")
    model = UNet(width=8, attention=(8,))
    images = diffusion.sample(model, 2, steps=2, progress=False)
    assert images.device.type == "meta" and next(model.parameters()).device.type == "meta"
