"""How good is a trained model? Sample it, then measure the samples with a classifier trained on the real data.

    python evaluate.py --ckpt models/DDPM_conditional/ema_ckpt.pt
    python evaluate.py --ckpt models/DDPM_conditional/ema_ckpt.pt --sweep     # cfg_scale and sampler steps

The run's settings (dataset, image size, model) come from config.json beside the checkpoint. Reported:
  1. conditional accuracy: the fraction of samples that the classifier assigns to the class that was asked for
     (and, for reference, the classifier's accuracy on the real test images);
  2. FD: the Frechet distance between the classifier's penultimate-layer features of the samples and of real
     held-out images, computed exactly as FID is; beside it the FD between two halves of the real data (the floor);
  3. FID with Inception-v3 where its weights are already on this machine (they are never downloaded here).
The classifier, a small CNN, is trained on the first call for a dataset and size, and cached beside the data.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ddpm import make_diffusion, make_model
from utils import UserError, autocast, bf16_supported, image_size, load_dataset, load_weights, pick_device


class Classifier(nn.Module):
    """A small CNN: three conv stages, global average pooling, 256 features, a linear layer to the classes."""

    def __init__(self, channels, num_classes, features=256):
        super().__init__()

        def stage(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                    nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(*stage(channels, 32), nn.MaxPool2d(2), *stage(32, 64), nn.MaxPool2d(2),
                                  *stage(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(128, features), nn.ReLU())
        self.head = nn.Linear(features, num_classes)

    def features(self, images):
        """Penultimate-layer features of uint8 images."""
        return self.body(images.float() / 127.5 - 1)

    def forward(self, images):
        return self.head(self.features(images))


def classifier_path(dataset, data_dir, size, channels):
    """Beside the data: in data_dir for the named datasets, next to a CSV file or an image folder otherwise."""
    tag = f"classifier_{size[0]}x{size[1]}_c{channels}.pt"
    if dataset in ("shapes", "cifar10", "mnist", "fashion_mnist"):
        return Path(data_dir) / f"{dataset}_{tag}"
    return Path(str(dataset).rstrip("/\\") + "." + tag)


def get_classifier(dataset, data_dir, size, channels, device, amp_dtype=None, epochs=4, max_steps=1000, seed=0):
    """The cached classifier for (dataset, size, channels), trained now when there is none: `epochs` passes over the
    data in batches of 128, at most max_steps (about 2 minutes on a 2-core CPU), under autocast to amp_dtype."""
    path = classifier_path(dataset, data_dir, size, channels)
    train = load_dataset(dataset, size, channels, "train", data_dir)
    model = Classifier(channels, len(train.classes)).to(device)
    if path.exists():
        return load_weights(model, path).eval()
    print(f"training a classifier on {len(train)} real images of '{dataset}' (cached as {path})")
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    images, labels = train.images.to(device), train.labels.to(device)
    steps = min(epochs * (len(train) // 128), max_steps)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        batch = torch.randint(0, len(train), (128,), device=device)
        x = images[batch]
        x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(-1), x)
        with autocast(device, amp_dtype):
            loss = F.cross_entropy(model(x).float(), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    print(f"  {steps} steps in {time.perf_counter() - start:.0f} s")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    except OSError as e:
        print(f"warning: could not cache the classifier as {path} ({e.strerror}); the next call trains it again")
    return model.eval()


@torch.no_grad()
def classify(classifier, images, batch_size=500):
    """(predicted classes, penultimate features) of uint8 images."""
    predictions, features = [], []
    for batch in images.split(batch_size):
        f = classifier.features(batch)
        features.append(f.double().cpu())
        predictions.append(classifier.head(f).argmax(1).cpu())
    return torch.cat(predictions), torch.cat(features)


def frechet_distance(a, b):
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to the rows of a and b
    (Heusel et al. 2017). Tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of
    S_a^(1/2) S_b S_a^(1/2), a symmetric PSD matrix, which is exact and stable."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))  # (d, d), also for d = 1
    vals, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    trace_sqrt = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt).item()


def inception_fid_extractor(device):
    """A function from uint8 images to 2048-d Inception-v3 pool features, or (None, why) when no weights are here.
    Standard FID uses the TF-FID weights that torchmetrics / torch-fidelity ship; torchvision's ImageNet weights give
    an FID comparable only with itself. Nothing is downloaded."""
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3  # the standard FID network, if its weights are cached
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"]).to(device).eval()
        return (lambda images: net(images.to(device))[0].double().cpu()), "standard (torchmetrics' TF-FID weights)"
    except Exception:
        pass
    import torchvision
    weights = torchvision.models.Inception_V3_Weights.IMAGENET1K_V1
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.exists():
        return None, f"no Inception-v3 weights on this machine (torchmetrics not installed, no {path})"
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    net.fc = nn.Identity()
    net = net.to(device).eval()
    mean = torch.tensor([0.485, 0.456, 0.406], device=device)[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225], device=device)[:, None, None]

    def extract(images):
        x = images.to(device).float() / 255
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate(x, size=(299, 299), mode="bilinear", antialias=True, align_corners=False)
        return net((x - mean) / std).double().cpu()

    return extract, "torchvision's ImageNet Inception-v3 (comparable only with itself, not with published FIDs)"


@torch.no_grad()
def features_in_batches(extract, images, batch_size=100):
    return torch.cat([extract(batch) for batch in images.split(batch_size)])


def balanced_halves(labels, per_class, seed=0):
    """Two disjoint index sets with `per_class` images of each class (fewer where a class has fewer than 2x)."""
    g = torch.Generator().manual_seed(seed)
    a, b = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = min(per_class, len(idx) // 2)
        a.append(idx[:k])
        b.append(idx[k:2 * k])
    return torch.cat(a), torch.cat(b)


def load_run(ckpt, device):
    """The model and Diffusion of a checkpoint written by the training scripts, from config.json beside it."""
    config_path = Path(ckpt).with_name("config.json")
    if not config_path.is_file():
        raise UserError(f"no {config_path}: evaluate.py reads the run's settings from the config.json that the "
                        f"training scripts write beside their checkpoints")
    config = argparse.Namespace(**json.loads(config_path.read_text()))
    model = load_weights(make_model(config), ckpt).to(device).eval()
    return config, model, make_diffusion(config, device)


def measure(samples, sample_labels, classifier, real_features, floor, conditional):
    predictions, features = classify(classifier, samples)
    result = {"fd": frechet_distance(features, real_features), "fd_floor": floor}
    if conditional:
        result["accuracy"] = (predictions == sample_labels.cpu()).float().mean().item()
    return result


def generate(diffusion, model, labels, n, cfg_scale, steps, amp_dtype, seed=0, batch_size=250):
    """n samples (of `labels`, if conditional) in batches, from a fixed seed."""
    generator = torch.Generator(diffusion.device).manual_seed(seed)
    images = []
    for start in range(0, n, batch_size):
        batch_labels = None if labels is None else labels[start:start + batch_size]
        size = min(batch_size, n - start)
        with autocast(diffusion.device, amp_dtype):
            images.append(diffusion.sample(model, size, batch_labels, cfg_scale, steps, generator, progress=False))
    return torch.cat(images).cpu()


def sweep_plot(rows, path):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 4))
    for ax, key, label in ((fig.add_subplot(1, 2, 1), "cfg_scale", "cfg_scale (DDIM)"),
                           (fig.add_subplot(1, 2, 2), "steps", "sampler steps (1000: ancestral)")):
        part = [r for r in rows if r["sweep"] == key]
        xs = [r[key] for r in part]
        ax.plot(xs, [r["fd"] for r in part], "o-", color="tab:blue", label="FD")
        ax.set(xlabel=label, yscale="log")
        ax.set_ylabel("FD (classifier features), circles", color="tab:blue")
        if "accuracy" in part[0]:
            twin = ax.twinx()
            twin.plot(xs, [r["accuracy"] for r in part], "s--", color="tab:red", label="accuracy")
            twin.set(ylim=(0, 1.02))
            twin.set_ylabel("conditional accuracy, squares", color="tab:red")
        if key == "steps":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by ddpm.py / ddpm_conditional.py")
    parser.add_argument("--dataset", help="the real data to compare with (default: the run's)")
    parser.add_argument("--data_dir", help="where the torchvision datasets are (default: the run's)")
    parser.add_argument("--n_per_class", type=int, default=100, help="samples per class (unconditional: x classes)")
    parser.add_argument("--cfg_scale", type=float, default=3)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps; 1000 (= T) is the ancestral sampler")
    parser.add_argument("--sweep", action="store_true", help="also sweep cfg_scale (0,1,2,3,5) and steps "
                                                             "(10,20,50,100, ancestral): a table and a PNG plot")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    try:
        evaluate(args)
    except UserError as e:
        sys.exit(f"error: {e}")


def evaluate(args):
    device = pick_device(args.device)
    amp_dtype = torch.bfloat16 if bf16_supported(device) else None
    config, model, diffusion = load_run(args.ckpt, device)
    dataset, data_dir = args.dataset or config.dataset, args.data_dir or config.data_dir
    size, channels = image_size(config.img_size), config.channels
    conditional = bool(getattr(config, "num_classes", None))
    classifier = get_classifier(dataset, data_dir, size, channels, device, amp_dtype)

    try:
        real = load_dataset(dataset, size, channels, "test", data_dir)
        held_out = "held-out test images"
    except UserError:
        real = load_dataset(dataset, size, channels, "train", data_dir)  # a folder has no test split
        held_out = "training images (the dataset has no test split)"
    num_classes = len(real.classes)
    a, b = balanced_halves(real.labels, args.n_per_class, args.seed)  # two real sets shaped like the samples
    real_a, real_b = real[a], real[b]  # (images, labels), either kind of dataset
    predictions, real_features = classify(classifier, torch.cat([real_a[0], real_b[0]]))
    real_features_a, real_features_b = real_features[:len(real_a[0])], real_features[len(real_a[0]):]
    floor = frechet_distance(real_features_b, real_features_a)
    report = {"checkpoint": str(args.ckpt), "dataset": dataset, "n_samples": args.n_per_class * num_classes,
              "real_reference": f"{len(a)} {held_out}",
              "classifier_accuracy_real": (predictions == torch.cat([real_a[1], real_b[1]])).float().mean().item()}
    print(f"classifier accuracy on {len(predictions)} real {held_out}: {report['classifier_accuracy_real']:.3f}")
    print(f"FD floor (between two sets of {len(a)} real images): {floor:.2f}")

    labels = torch.arange(num_classes).repeat_interleave(args.n_per_class).to(device) if conditional else None
    n = args.n_per_class * num_classes

    done = {}

    def run(cfg_scale, steps):
        if (cfg_scale, steps) in done:  # the main setting comes back in both sweeps
            return done[cfg_scale, steps]
        start = time.perf_counter()
        samples = generate(diffusion, model, labels, n, cfg_scale, None if steps >= config.noise_steps else steps,
                           amp_dtype, args.seed)
        result = measure(samples, labels, classifier, real_features_a, floor, conditional)
        result.update(cfg_scale=cfg_scale, steps=steps, seconds=round(time.perf_counter() - start, 1))
        done[cfg_scale, steps] = result, samples
        return result, samples

    main_result, samples = run(args.cfg_scale, args.steps)
    report["main"] = main_result
    line = f"{n} samples, cfg_scale {args.cfg_scale:g}, {sampler_name(args.steps, config)}: FD {main_result['fd']:.2f}"
    if conditional:
        line += f", conditional accuracy {main_result['accuracy']:.3f}"
    print(line)

    extract, how = inception_fid_extractor(device)
    if extract is None:
        print(f"FID: skipped, {how}")
        report["fid"] = None
    else:
        report["fid"] = frechet_distance(features_in_batches(extract, samples), features_in_batches(extract, real_a[0]))
        report["fid_network"] = how
        print(f"FID ({how}): {report['fid']:.2f}")

    if args.sweep:
        rows = []
        scales = (0, 1, 2, 3, 5) if conditional else (1,)
        for scale in scales:
            rows.append({"sweep": "cfg_scale", **run(scale, args.steps)[0]})
        for steps in (10, 20, 50, 100, config.noise_steps):
            rows.append({"sweep": "steps", **run(args.cfg_scale, steps)[0]})
        report["sweep"] = rows
        print("\n| sweep | cfg_scale | sampler | FD | accuracy | seconds |\n|---|---|---|---|---|---|")
        for r in rows:
            accuracy = f"{r['accuracy']:.3f}" if "accuracy" in r else "-"
            print(f"| {r['sweep']} | {r['cfg_scale']:g} | {sampler_name(r['steps'], config)} | {r['fd']:.2f} | "
                  f"{accuracy} | {r['seconds']} |")
        plot = Path(args.ckpt).with_name("sweep.png")
        sweep_plot(rows, plot)
        print(f"plot: {plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def sampler_name(steps, config):
    return "ancestral 1000 steps" if steps >= config.noise_steps else f"DDIM {steps} steps"


if __name__ == "__main__":
    main()
