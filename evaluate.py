"""How good is a trained model? Sample it, then measure the samples with a classifier trained on the real data.

    python evaluate.py --ckpt models/DDPM_conditional/ema_ckpt.pt
    python evaluate.py --ckpt models/DDPM_conditional/ema_ckpt.pt --sweep     # cfg_scale, samplers and steps
    python evaluate.py --ckpt models/DDPM_conditional/ema_ckpt.pt --ode_error 48   # each sampler's own error

The run's settings (dataset, image size, model) come from config.json beside the checkpoint. Reported:
  1. conditional accuracy: the fraction of samples that the classifier assigns to the class that was asked for
     (and, for reference, the classifier's accuracy on the real test images); for multi-hot labels (attributes), the
     fraction of samples in which the classifier sees each attribute as asked for (present or absent), and their mean;
  2. FD: the Frechet distance between the classifier's penultimate-layer features of the samples and of real
     held-out images, computed exactly as FID is; beside it the FD between two halves of the real data (the floor);
  3. FID with Inception-v3 where its weights are already on this machine (they are never downloaded here);
  4. with --ode_error N: the sampler's error alone, apart from the model's (see ode_errors).
The classifier, a small CNN (one sigmoid output per attribute for multi-hot labels), is trained on the first call
for a dataset and size, and cached beside the data. A dataset without a test split (a folder) lends a fifth of its
images, held out from the classifier, as the real set. Multi-hot samples are asked for the attributes of real test
images.
"""
import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from checkpoints import load_weights, read_config
from data import ImageTensors, UserError, attribute_names, default_flip, image_size, load_dataset
from ddpm import load_run
from options import clear_errors
from utils import amp_dtype, autocast, pick_device

TF_FID_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # the file torchmetrics (torch-fidelity) loads for FID


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


def classifier_path(dataset, data_dir, size, channels, flip=True, multi_label=False, attributes=None):
    """Beside the data: in data_dir for the named datasets, next to a data file or an image folder otherwise. A
    multi-label classifier's name says so, and names the attributes it sees when they are a selection."""
    kind = "".join(["_multilabel" if multi_label else "",
                    "" if attributes is None else "_" + "-".join(attribute_names(attributes))])
    tag = f"classifier_{size[0]}x{size[1]}_c{channels}{'' if flip else '_noflip'}{kind}.pt"
    if dataset in ("shapes", "multishapes", "cifar10", "mnist", "fashion_mnist"):
        return Path(data_dir) / f"{dataset}_{tag}"
    return Path(str(dataset).rstrip("/\\") + "." + tag)


def get_classifier(train, path, device, amp_dtype=None, flip=True, epochs=4, max_steps=1000, seed=0):
    """The classifier cached at `path`, trained now on the ImageTensors `train` when there is none: `epochs` passes
    over the data in batches of 128, at least 200 and at most max_steps steps (about 2 minutes on a 2-core CPU),
    under autocast to amp_dtype (bfloat16 or None: float16 would need a GradScaler), with random horizontal flips
    if `flip`. Class indices train it with cross-entropy, multi-hot labels with binary cross-entropy (one sigmoid
    per attribute)."""
    model = Classifier(train.channels, len(train.classes)).to(device)
    if path.exists():
        return load_weights(model, path).eval()
    print(f"training a classifier on {len(train)} real images, once: it is cached as {path}")
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    images, labels = train.images.to(device), train.labels.to(device)
    batch_size = min(128, len(train))
    steps = min(max(epochs * (len(train) // batch_size), 200), max_steps)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    model.train()
    start = time.perf_counter()
    for step in tqdm(range(steps), desc="classifier", leave=False):
        batch = torch.randint(0, len(train), (batch_size,), device=device)
        x = images[batch]
        if flip:
            x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(-1), x)
        with autocast(device, amp_dtype):
            logits, y = model(x).float(), labels[batch]
            multi_hot = y.is_floating_point()
            loss = F.binary_cross_entropy_with_logits(logits, y) if multi_hot else F.cross_entropy(logits, y)
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
def classify(classifier, images, multi_label=False, batch_size=500):
    """(predictions, penultimate features in float64) of uint8 images, on the CPU: the predicted classes, or for a
    multi-label classifier whether each attribute is present (probability over 0.5). The images go to the
    classifier's device a batch at a time (float64 only on the CPU: MPS has none)."""
    device = next(classifier.parameters()).device
    predictions, features = [], []
    for batch in images.split(batch_size):
        f = classifier.features(batch.to(device))
        features.append(f.cpu().double())
        logits = classifier.head(f).cpu()
        predictions.append(logits > 0 if multi_label else logits.argmax(1))
    return torch.cat(predictions), torch.cat(features)


def agreement(predictions, labels):
    """How often the predictions match the labels: over all images for class indices; for each attribute (present
    or absent) for multi-hot labels."""
    labels = labels.cpu()
    return (predictions == (labels > 0.5 if labels.is_floating_point() else labels)).float().mean(0)


def in_memory(data):
    """A dataset from load_dataset as ImageTensors: a folder's images decoded and held in memory."""
    if isinstance(data, ImageTensors):
        return data
    images, labels = data[torch.arange(len(data))]
    return ImageTensors(images, labels, data.classes)


def real_data(dataset, size, channels, data_dir, held_out_fraction=0.2, seed=0, attributes=None):
    """(images to train the classifier on, real reference images, what the reference images are). The reference
    images are the test split; a dataset without one (a folder of images) holds out a fraction of each class of its
    training images from the classifier instead."""
    train = in_memory(load_dataset(dataset, size, channels, "train", data_dir, attributes=attributes))
    try:
        test = load_dataset(dataset, size, channels, "test", data_dir, attributes=attributes)
        return train, in_memory(test), "held-out test images"
    except UserError:
        if train.labels.is_floating_point():  # (an attribute table too short to have a test split)
            raise
    g = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(train), dtype=torch.bool)
    for c in train.labels.unique():
        idx = (train.labels == c).nonzero().squeeze(1)
        held[idx[torch.randperm(len(idx), generator=g)[:round(held_out_fraction * len(idx))]]] = True
    if held.all() or not held.any():
        raise UserError(f"'{dataset}' has {len(train)} images: too few to hold some out from the classifier")
    part = (lambda keep: ImageTensors(train.images[keep], train.labels[keep], train.classes))
    return part(~held), part(held), (f"training images held out from the classifier ({held_out_fraction:.0%} of each "
                                     f"class; '{dataset}' has no test split)")


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


def inception_network(device):
    """(network, what it is), or (None, why not). The network maps uint8 images (N, 3, H, W) to (N, 2048) Inception-v3
    pool features. Standard FID uses the TF-FID weights that torchmetrics (torch-fidelity) loads; torchvision's
    ImageNet weights give an FID comparable only with itself. Only weights already on this machine are used: nothing
    is downloaded."""
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    if (checkpoints / TF_FID_WEIGHTS).exists():  # else torchmetrics would download them
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError:
            pass
        else:
            net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
            return net.to(device).eval(), "standard (torchmetrics' TF-FID weights)"
    import torchvision
    weights = torchvision.models.Inception_V3_Weights.IMAGENET1K_V1
    path = checkpoints / Path(weights.url).name
    if not path.exists():
        return None, (f"no Inception-v3 weights on this machine (no {checkpoints / TF_FID_WEIGHTS} with torchmetrics, "
                      f"no {path})")
    # transform_input=True, as torchvision's own builder sets for these weights: they expect ImageNet-normalised input
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    net.fc = nn.Identity()
    return ImageNetInput(net).to(device).eval(), "torchvision's ImageNet Inception-v3 (comparable only with itself)"


class ImageNetInput(nn.Module):
    """uint8 images -> 299x299, ImageNet-normalised -> a torchvision ImageNet network."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406])[:, None, None])
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225])[:, None, None])

    def forward(self, images):
        x = F.interpolate(images.float() / 255, size=(299, 299), mode="bilinear", antialias=True, align_corners=False)
        return self.net((x - self.mean) / self.std)


@torch.no_grad()
def inception_features(net, images, batch_size=100):
    """(N, 2048) float64 features on the CPU of uint8 images (grayscale repeated to RGB), a batch at a time on the
    network's device."""
    device = next(net.parameters()).device
    features = []
    for batch in images.split(batch_size):
        batch = batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch
        features.append(net(batch.to(device)).reshape(len(batch), -1).cpu().double())
    return torch.cat(features)


def reference_halves(labels, counts, seed=0):
    """Two disjoint index sets holding counts[c] images of each class c (fewer where a class has fewer than 2x)."""
    g = torch.Generator().manual_seed(seed)
    a, b = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = min(int(counts[c]), len(idx) // 2)
        a.append(idx[:k])
        b.append(idx[k:2 * k])
    return torch.cat(a), torch.cat(b)


def reference_counts(train_labels, num_classes, n_per_class, conditional):
    """How many real images of each class the reference sets hold, and so how many samples of each class are drawn:
    n_per_class of every class for a conditional model; for an unconditional one, as many in all, in the training
    data's class mix (the mix the model learned)."""
    if conditional:
        return torch.full((num_classes,), n_per_class)
    mix = torch.bincount(train_labels, minlength=num_classes).double() / len(train_labels)
    return (mix * n_per_class * num_classes).round().long()


def measure(samples, sample_labels, classifier, real_features, floor, conditional, classes=()):
    """FD of the samples' features to the real ones and, if conditional, the accuracy: for multi-hot labels the
    mean over the attributes (`classes`), each one's in attribute_accuracy."""
    multi_label = conditional and sample_labels.is_floating_point()
    predictions, features = classify(classifier, samples, multi_label)
    result = {"fd": frechet_distance(features, real_features), "fd_floor": floor}
    if conditional:
        accuracy = agreement(predictions, sample_labels)
        result["accuracy"] = accuracy.mean().item()
        if multi_label:
            result["attribute_accuracy"] = dict(zip(classes, accuracy.tolist()))
    return result


def generate(diffusion, model, labels, n, cfg_scale, steps, amp_dtype, seed=0, batch_size=250, sampler="ddim"):
    """n samples (of `labels`, if conditional) in batches, from a fixed seed."""
    generator = torch.Generator(diffusion.device).manual_seed(seed)
    images = []
    for start in range(0, n, batch_size):
        batch_labels = None if labels is None else labels[start:start + batch_size]
        size = min(batch_size, n - start)
        with autocast(diffusion.device, amp_dtype):
            images.append(diffusion.sample(model, size, batch_labels, cfg_scale, steps, generator, progress=False,
                                           sampler=sampler))
    return torch.cat(images).cpu()


def ode_errors(diffusion, model, labels, n, cfg_scale, amp_dtype, seed=0, reference_steps=250):
    """The solver's error alone, whatever the model's: the RMS distance (in [-1, 1] units) of each deterministic
    sampler's output (DDIM 10, 20, 50, 100 and DPM++ 10, 20, 50 steps) to the diffusion ODE's own solution for the
    same noise and labels, taken as DPM++ at `reference_steps` steps (fewer when T is smaller). FD measures both
    errors together. Returns (the reference's steps, a row for each setting)."""
    generator = torch.Generator(diffusion.device).manual_seed(seed)
    x_T = torch.randn((n, diffusion.channels, *diffusion.img_size), device=diffusion.device, generator=generator)

    def solve(sampler, steps):
        with autocast(diffusion.device, amp_dtype):
            return diffusion.denoise(model, x_T, labels, cfg_scale, steps, sampler=sampler).float()

    reference_steps = min(reference_steps, diffusion.noise_steps - 1)  # all T steps would be the ancestral sampler
    reference = solve("dpm++", reference_steps)
    return reference_steps, [{"sampler": sampler, "steps": steps, "cfg_scale": cfg_scale, "n_samples": n,
                              "rms": (solve(sampler, steps) - reference).square().mean().sqrt().item()}
                             for sampler, steps in [("ddim", s) for s in (10, 20, 50, 100)]
                             + [("dpm++", s) for s in (10, 20, 50)] if steps < reference_steps]


def sweep_plot(rows, path):
    """FD (circles) and accuracy (squares) against cfg_scale and against the sampler steps: DDIM solid (1000 steps:
    the ancestral sampler), DPM++ dotted."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 4))
    for ax, key, label in ((fig.add_subplot(1, 2, 1), "cfg_scale", "cfg_scale"),
                           (fig.add_subplot(1, 2, 2), "steps", "sampler steps (1000: ancestral)")):
        twin = ax.twinx() if "accuracy" in rows[0] else None
        for sampler, style in (("ddim", "-"), ("dpm++", ":")):
            part = [r for r in rows if r["sweep"] == key and r["sampler"] == sampler]
            xs = [r[key] for r in part]
            ax.plot(xs, [r["fd"] for r in part], "o" + style, color="tab:blue")
            if twin:
                twin.plot(xs, [r["accuracy"] for r in part], "s" + style, color="tab:red")
        ax.set(xlabel=label, yscale="log")
        ax.set_ylabel("FD (classifier features), circles", color="tab:blue")
        if twin:
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
    parser.add_argument("--steps", type=int, default=50, help="sampler steps; 1000 (= T) is the ancestral sampler")
    parser.add_argument("--sampler", default="ddim", help="ddim or dpm++ (DPM-Solver++(2M))")
    parser.add_argument("--sweep", action="store_true", help="also sweep cfg_scale (1,2,3,5) and steps: DDIM "
                                                             "10,20,50,100, DPM++ 10,20,50, ancestral; a table and "
                                                             "a PNG plot")
    parser.add_argument("--ode_error", type=int, default=0, metavar="N",
                        help="also measure each DDIM and DPM++ setting's distance to the ODE's solution (DPM++ at 250 "
                             "steps) from the same noise, on N samples (0: off)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    with clear_errors():  # bad input: one line; Ctrl-C: one line
        evaluate(args)


def evaluate(args):
    if args.sampler not in ("ddim", "dpm++"):
        raise UserError(f"sampler '{args.sampler}': expected 'ddim' or 'dpm++'")
    if args.ode_error < 0:
        raise UserError(f"--ode_error {args.ode_error}: expected a number of samples (0: off)")
    device = pick_device(args.device)
    amp = amp_dtype(device)
    config = read_config(args.ckpt)
    diffusion, model = load_run(args.ckpt, device)
    dataset, data_dir = args.dataset or config.dataset, args.data_dir or config.data_dir
    size, channels = image_size(config.img_size), config.channels
    conditional, multi_label = bool(config.num_classes), config.multi_label
    attributes = getattr(config, "attributes", None)  # (ddpm.py's runs have none)
    train, real, held_out = real_data(dataset, size, channels, data_dir, attributes=attributes)
    if train.labels.is_floating_point() != multi_label:
        kinds = "multi-hot labels (attributes)", "one class an image"
        raise UserError(f"'{args.ckpt}' was trained on {kinds[not multi_label]}, but '{dataset}' has "
                        f"{kinds[multi_label]}: pass a --dataset like the run's")
    flip = default_flip(dataset)
    path = classifier_path(dataset, data_dir, size, channels, flip, multi_label, attributes)
    classifier = get_classifier(train, path, device, amp if amp == torch.bfloat16 else None, flip)

    num_classes = len(real.classes)
    if multi_label:  # two random real sets (one "class"), the samples asked for the attributes of the first
        a, b = reference_halves(torch.zeros(len(real.labels), dtype=torch.long),
                                torch.tensor([args.n_per_class * num_classes]), args.seed)
    else:
        counts = reference_counts(train.labels, num_classes, args.n_per_class, conditional)
        a, b = reference_halves(real.labels, counts, args.seed)  # two real sets shaped like the samples
    real_a, real_b = real[a], real[b]  # (images, labels)
    predictions, real_features = classify(classifier, torch.cat([real_a[0], real_b[0]]), multi_label)
    real_features_a, real_features_b = real_features[:len(a)], real_features[len(a):]
    floor = frechet_distance(real_features_b, real_features_a)
    report = {"checkpoint": str(args.ckpt), "dataset": dataset, "n_samples": len(a),
              "class_counts": (real_a[1].sum(0).long() if multi_label  # multi-label: images with each attribute
                               else torch.bincount(real_a[1], minlength=num_classes)).tolist(),
              "real_reference": f"{len(a)} {held_out}",
              "classifier_accuracy_real": agreement(predictions, torch.cat([real_a[1], real_b[1]])).mean().item()}
    print(f"classifier accuracy on {len(predictions)} real {held_out}: {report['classifier_accuracy_real']:.3f}")
    print(f"FD floor (between two sets of {len(a)} real images): {floor:.2f}")

    # the samples have the reference set's classes, in the same numbers (a class with few real images has few)
    labels = real_a[1].to(device) if conditional else None
    n = len(a)

    done = {}

    def run(cfg_scale, steps, sampler):
        sampler = sampler if steps < diffusion.noise_steps else "ddim"  # all T steps: the ancestral sampler, whichever
        key = cfg_scale if conditional else None, steps, sampler  # an unconditional model has no guidance
        if key not in done:  # the main setting comes back in both sweeps
            start = time.perf_counter()
            ancestral = steps >= diffusion.noise_steps
            samples = generate(diffusion, model, labels, n, cfg_scale, None if ancestral else steps, amp, args.seed,
                               sampler="ancestral" if ancestral else sampler)
            result = measure(samples, labels, classifier, real_features_a, floor, conditional, real.classes)
            result.update(steps=steps, sampler=sampler, seconds=round(time.perf_counter() - start, 1))
            done[key] = result, samples
        result, samples = done[key]
        return {**result, "cfg_scale": cfg_scale}, samples

    main_result, samples = run(args.cfg_scale, args.steps, args.sampler)
    report["main"] = main_result
    guidance = f", cfg_scale {args.cfg_scale:g}" if conditional else ""  # an unconditional model has none
    line = f"{n} samples{guidance}, {sampler_name(args.steps, args.sampler, diffusion)}: FD {main_result['fd']:.2f}"
    if conditional:
        line += f", conditional accuracy {main_result['accuracy']:.3f}"
    if "attribute_accuracy" in main_result:
        line += " (the mean of " + ", ".join(f"{name} {accuracy:.3f}" for name, accuracy in
                                             main_result["attribute_accuracy"].items()) + ")"
    print(line)

    inception, how = inception_network(device)
    if inception is None:
        print(f"FID: skipped, {how}")
        report["fid"] = None
    else:
        report["fid"] = frechet_distance(inception_features(inception, samples),
                                         inception_features(inception, real_a[0]))
        report["fid_network"] = how
        print(f"FID ({how}): {report['fid']:.2f}")

    if args.sweep:
        rows = []
        scales = (1, 2, 3, 5) if conditional else (1,)
        for scale in scales:
            rows.append({"sweep": "cfg_scale", **run(scale, args.steps, args.sampler)[0]})
        for sampler, steps in [("ddim", s) for s in (10, 20, 50, 100)] + [("dpm++", s) for s in (10, 20, 50)] + \
                [("ddim", diffusion.noise_steps)]:
            rows.append({"sweep": "steps", **run(args.cfg_scale, steps, sampler)[0]})
        report["sweep"] = rows
        print("\n| sweep | cfg_scale | sampler | FD | accuracy | seconds |\n|---|---|---|---|---|---|")
        for r in rows:
            accuracy = f"{r['accuracy']:.3f}" if "accuracy" in r else "-"
            print(f"| {r['sweep']} | {r['cfg_scale']:g} | {sampler_name(r['steps'], r['sampler'], diffusion)} | "
                  f"{r['fd']:.2f} | {accuracy} | {r['seconds']} |")
        plot = Path(args.ckpt).with_name("sweep.png")
        sweep_plot(rows, plot)
        print(f"plot: {plot}")
    if args.ode_error:
        m = min(args.ode_error, n)
        spread = torch.linspace(0, n - 1, m, device=device).long()  # over the classes
        reference_steps, rows = ode_errors(diffusion, model, None if labels is None else labels[spread], m,
                                           args.cfg_scale, amp, args.seed)
        report["ode_error"] = {"reference": f"DPM++ {reference_steps} steps", "rows": rows}
        print(f"\ndistance to the ODE's solution (DPM++ {reference_steps} steps), RMS in [-1, 1] units, {m} samples"
              f"{guidance}:\n| sampler | RMS |\n|---|---|")
        for r in rows:
            print(f"| {sampler_name(r['steps'], r['sampler'], diffusion)} | {r['rms']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def sampler_name(steps, sampler, diffusion):
    if steps >= diffusion.noise_steps:
        return f"ancestral {diffusion.noise_steps} steps"
    return f"{'DPM++' if sampler == 'dpm++' else 'DDIM'} {steps} steps"


if __name__ == "__main__":
    main()
