"""The datasets, each indexed by a whole batch at once: (uint8 images (n, C, H, W), labels), int64 class indices (n,)
or multi-hot floats (n, classes) for multi-label data. Drawn: shapes, multishapes; torchvision: CIFAR-10, MNIST,
Fashion-MNIST; files: FER-2013's CSV, an attribute table (CelebA's), class subfolders. get_data batches them."""
import csv
import os
import socket
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw


class UserError(ValueError):
    """A problem the user can fix (data, options, checkpoint): the scripts print it as one line, no traceback."""


TORCHVISION_DATASETS = {"cifar10": torchvision.datasets.CIFAR10, "mnist": torchvision.datasets.MNIST,
                        "fashion_mnist": torchvision.datasets.FashionMNIST}
FER_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
SHAPE_CLASSES = ("circle", "square", "triangle", "star", "cross", "heart")
SHAPES_TRAIN_IMAGES, SHAPES_TEST_IMAGES = 10000, 2000
ATTRIBUTE_VALUES = {"1": 1.0, "-1": 0.0, "0": 0.0}  # present; absent (CelebA's -1, a CSV's 0)
# no horizontal flips by default: a mirrored digit is no digit, and Fashion-MNIST's sandals, sneakers and ankle boots
# all point their toes to the left (93%, 99.7% and 100% of them are nearer their class's mean image than to its mirror)
MIRRORING_CHANGES_MEANING = {"mnist", "fashion_mnist"}


def default_flip(dataset):
    """FLIP None: flip unless mirroring changes what an image shows (pass --flip False for text or any such folder)."""
    return dataset not in MIRRORING_CHANGES_MEANING


class ImageTensors(torch.utils.data.TensorDataset):
    """A dataset held in memory: uint8 images (N, C, H, W) and labels: int64 (N,), or multi-hot float (N, classes)."""

    def __init__(self, images, labels, classes):
        super().__init__(images, labels)
        self.images, self.labels, self.classes, self.channels = images, labels, list(classes), images.shape[1]

    def to(self, device):
        return ImageTensors(self.images.to(device), self.labels.to(device), self.classes)


class ImageFiles(torch.utils.data.Dataset):
    """Image files and labels, decoded a batch at a time. An unreadable one is warned of once (the flags are in shared
    memory, for all workers) and replaced by the next readable one, with its label: a batch keeps its size (under
    torchrun every rank's must)."""

    def __init__(self, paths, labels, classes, img_size, channels=None):
        self.paths, self.labels, self.classes, self.img_size = list(paths), labels, list(classes), img_size
        self.warned = torch.zeros(len(self.paths), dtype=torch.bool).share_memory_()
        self.channels = channels or (1 if self.read(0)[1].mode in ("1", "L", "LA", "I", "I;16", "F") else 3)

    def __len__(self):
        return len(self.paths)

    def read(self, i):
        """(j, the decoded image of file j): the first file from i on (going round) that can be read."""
        for j in (k % len(self.paths) for k in range(i, i + len(self.paths))):
            try:
                with Image.open(self.paths[j]) as image:
                    image.load()
                    return j, image
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                if not self.warned[j]:
                    self.warned[j] = True  # (a line of its own: a progress bar may be on the current one)
                    print(f"\nwarning: skipping unreadable image '{self.paths[j]}' ({e})", file=sys.stderr)
        raise UserError(f"none of the {len(self.paths)} images (e.g. '{self.paths[0]}') can be read")

    def __getitem__(self, indices):
        kept, images = zip(*(self.read(i) for i in torch.as_tensor(indices).reshape(-1).tolist()))
        images = [resize_and_crop(TF.pil_to_tensor(image.convert("L" if self.channels == 1 else "RGB")),
                                  self.img_size) for image in images]
        return torch.stack(images), self.labels[list(kept)]


def load_image_folder(root, size, channels=None):
    """A folder of class subfolders (torchvision's ImageFolder layout) as ImageFiles."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"dataset folder '{root}' does not exist")
    try:
        folder = torchvision.datasets.ImageFolder(root, allow_empty=True)
    except FileNotFoundError:
        raise UserError(f"dataset folder '{root}' has no class subfolders: put the images in "
                        f"{root}/<class name>/ (a single subfolder for unconditional training)") from None
    if not folder.samples:
        raise UserError(f"dataset folder '{root}' has no images in its class subfolders ({', '.join(folder.classes)})")
    return ImageFiles([path for path, _ in folder.samples], torch.tensor(folder.targets), folder.classes, size,
                      channels)


def resize_and_crop(images, size):
    """Resize uint8 images (..., C, h, w) to cover `size` = (H, W), keeping the aspect ratio, then centre-crop."""
    (H, W), (h, w) = size, images.shape[-2:]
    if (h, w) != (H, W):
        scale = max(H / h, W / w)
        images = TF.resize(images, [max(H, round(h * scale)), max(W, round(w * scale))], antialias=True)
        images = TF.center_crop(images, [H, W])
    return images


def load_dataset(dataset, img_size, channels=None, split="train", data_dir="data", num_images=None, seed=0,
                 attributes=None):
    """The uint8 images (normalised later) of `dataset`'s "train" or "test" split; torchvision's download into data_dir
    on first use. num_images: a fixed random subset; attributes: comma-separated names to keep, in order (None: all)."""
    size = image_size(img_size)
    if num_images is not None and (type(num_images) is not int or num_images < 1):
        raise UserError(f"num_images={num_images!r}: expected a number of images, 1 or more (None: all)")
    if dataset in ("shapes", "multishapes"):
        count = num_images or (SHAPES_TRAIN_IMAGES if split == "train" else SHAPES_TEST_IMAGES)
        draw = draw_shapes if dataset == "shapes" else draw_multishapes
        data, num_images = draw(count, size, seed=seed if split == "train" else seed + 1_000_003), None
        if dataset == "multishapes":
            data = ImageTensors(data.images, *select_attributes(data.labels, data.classes, attributes, "'multishapes'"))
    elif dataset in TORCHVISION_DATASETS:
        data = load_torchvision(dataset, size, split, data_dir)
    elif str(dataset).lower().endswith((".csv", ".txt")):
        if not Path(dataset).is_file():
            raise UserError(f"dataset file '{dataset}' does not exist")
        with open(dataset, newline="") as f:  # FER-2013: a .csv whose header names an emotion column
            fer2013 = str(dataset).lower().endswith(".csv") and "emotion" in next(csv.reader(f), [])
        data = (load_fer2013(dataset, size, split) if fer2013 else
                load_attributes(dataset, size, channels, split, attributes))
    elif Path(dataset).is_dir() or "/" in str(dataset) or os.sep in str(dataset):  # a folder, or a path to one
        if split != "train":
            raise UserError(f"dataset folder '{dataset}' has no {split} split: its images are all training images")
        data = load_image_folder(dataset, size, channels)
    else:
        raise UserError(f"unknown dataset '{dataset}': expected shapes, multishapes, cifar10, mnist, fashion_mnist, "
                        f"a FER-2013 .csv file, an attribute table (.txt or .csv) or an existing folder of class "
                        f"subfolders")
    if attributes is not None and not data.labels.is_floating_point():
        raise UserError(f"attributes={attributes!r}: '{dataset}' has classes, not attributes (attributes are for "
                        f"multishapes and attribute tables)")
    if isinstance(data, ImageTensors) and channels not in (None, data.channels):  # grayscale <-> RGB
        images = data.images.expand(-1, 3, -1, -1).contiguous() if channels == 3 else TF.rgb_to_grayscale(data.images)
        data = ImageTensors(images, data.labels, data.classes)
    if num_images is not None and num_images < len(data):
        keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:num_images].sort().values
        if isinstance(data, ImageTensors):
            data = ImageTensors(data.images[keep], data.labels[keep], data.classes)
        else:  # ImageFiles: its unreadable-image flags stay in shared memory
            data.paths = [data.paths[i] for i in keep.tolist()]
            data.labels, data.warned = data.labels[keep], data.warned[keep].share_memory_()
    return data


def image_size(img_size):
    """An int or (height, width) as (height, width)."""
    return (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)


def load_torchvision(name, size, split, data_dir):
    cls, train = TORCHVISION_DATASETS[name], split == "train"
    try:
        data = cls(root=data_dir, train=train, download=False)
    except RuntimeError:  # not there yet: download it
        try:
            data = cls(root=data_dir, train=train, download=True)
        except (OSError, RuntimeError, socket.error) as e:
            folder = Path(data_dir) / ("" if name == "cifar10" else f"{cls.__name__}/raw")
            files = ["cifar-10-python.tar.gz"] if name == "cifar10" else [Path(url).name for url, _ in cls.resources]
            raise UserError(f"could not download {name} into '{data_dir}' ({type(e).__name__}: are you offline?); "
                            f"put {', '.join(files)} in '{folder}' or pass --data_dir") from None
    images = torch.as_tensor(np.asarray(data.data))
    images = images.permute(0, 3, 1, 2) if images.ndim == 4 else images[:, None]  # CIFAR is NHWC, MNIST NHW
    images = torch.cat([resize_and_crop(chunk, size) for chunk in images.split(4096)])
    return ImageTensors(images, torch.as_tensor(data.targets, dtype=torch.int64), data.classes)


def load_fer2013(path, size, split):
    """FER-2013 as distributed: a CSV with columns emotion,pixels,Usage; 48x48 grayscale, 7 classes. The "Training"
    rows are the train split, the others (PublicTest, PrivateTest) the test split."""
    path, images, labels = Path(path), [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if missing := {"emotion", "pixels"} - set(reader.fieldnames or []):
            raise UserError(f"'{path}' has no column {', '.join(sorted(missing))}: expected emotion,pixels,Usage")
        for row_number, row in enumerate(reader, start=2):
            if "Usage" in row and (row["Usage"] == "Training") != (split == "train"):
                continue
            try:
                pixels, label = np.array(row["pixels"].split(), dtype=np.uint8), int(row["emotion"])
                if pixels.size != 48 * 48 or not 0 <= label < len(FER_CLASSES):
                    raise ValueError(f"{pixels.size} pixels (expected 2304), emotion {label} (expected 0-6)")
            except (ValueError, OverflowError, AttributeError) as e:
                raise UserError(f"'{path}' line {row_number}: {e}") from None
            images.append(pixels.reshape(1, 48, 48))
            labels.append(label)
    if not images:
        raise UserError(f"'{path}' has no {split} rows")
    return ImageTensors(resize_and_crop(torch.from_numpy(np.stack(images)), size), torch.tensor(labels), FER_CLASSES)


def load_attributes(path, size, channels=None, split="train", attributes=None):
    """An attribute table as ImageFiles with multi-hot float labels: CelebA's list_attr_celeba.txt (a line with the
    number of images, a line of attribute names, then `file v1 v2 ...` per image, values 1 or -1, space-separated) or a
    .csv with a header `file,attr1,attr2,...` and values 1 or 0. The images: in img_align_celeba/ beside the table if
    there is one, else beside it; the last tenth of the rows is the test split."""
    path, is_csv = Path(path), str(path).lower().endswith(".csv")
    with open(path, newline="") as f:
        lines = [(number, row) for number, row in enumerate(csv.reader(f) if is_csv else map(str.split, f), start=1)
                 if row]  # (line number, values), blank lines left out
    if not is_csv:  # CelebA's: first the number of images, then the names alone (no file column)
        count = lines.pop(0)[1] if lines else []
        if len(count) != 1 or not count[0].isdigit():
            raise UserError(f"'{path}' line 1: '{' '.join(count)}': expected the number of images (CelebA's "
                            f"list_attr_celeba.txt format), or use a .csv table with a header file,attr1,...")
    if not lines:
        raise UserError(f"'{path}' has no line of attribute names")
    (header_line, header), rows = lines[0], lines[1:]
    names = header[1:] if is_csv else header
    folder = path.parent / "img_align_celeba" if (path.parent / "img_align_celeba").is_dir() else path.parent
    paths, labels = [], []
    for number, (file, *values) in rows:
        where, file, values = f"'{path}' line {number}", file.strip(), [value.strip() for value in values]
        if len(values) != len(names):
            raise UserError(f"{where}: {len(values)} values for the {len(names)} attributes")
        for name, value in zip(names, values):
            if value not in ATTRIBUTE_VALUES:
                raise UserError(f"{where}: value '{value}' for {name}: expected 1 (present), or -1 or 0 (absent)")
        if not (folder / file).is_file():
            raise UserError(f"{where}: image '{file}' does not exist in '{folder}'")
        paths.append(folder / file)
        labels.append([ATTRIBUTE_VALUES[value] for value in values])
    cut = len(rows) - len(rows) // 10
    part = slice(0, cut) if split == "train" else slice(cut, None)
    if not paths[part]:
        raise UserError(f"'{path}' has no {split} rows (the last tenth of the rows is the test split)")
    labels, names = select_attributes(torch.tensor(labels).reshape(-1, len(names)), names, attributes,
                                      f"'{path}' line {header_line}")
    return ImageFiles(paths[part], labels[part], names, size, channels)


def attribute_names(attributes):
    """The names in a comma-separated ATTRIBUTES (e.g. "Smiling,Eyeglasses"), checked: none empty, none twice."""
    names = [name.strip() for name in attributes.split(",")]
    if "" in names or len(set(names)) < len(names):
        raise UserError(f"attributes={attributes!r}: expected distinct names separated by commas, e.g. "
                        f"Smiling,Eyeglasses")
    return names


def select_attributes(labels, names, attributes, where):
    """(labels, names) of the comma-separated `attributes` only, in their order (None: all); `where`: for the error."""
    if attributes is None:
        return labels, list(names)
    wanted = attribute_names(attributes)
    for name in wanted:
        if name not in names:
            raise UserError(f"{where}: no attribute '{name}' (from --attributes) among {', '.join(names)}")
    return labels[:, [list(names).index(name) for name in wanted]], wanted


# --- the built-in datasets: procedurally drawn shapes ---

def shape_outline(kind):
    """The outline of a shape as polygon points around the origin, radius about 1."""
    s = np.linspace(0, 2 * np.pi, 48, endpoint=False)  # (circle, heart)
    if kind == "circle":
        return np.stack([np.cos(s), np.sin(s)], 1)
    if kind == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.8
    if kind == "triangle":
        a = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(a), -np.sin(a)], 1) * 1.05
    if kind == "star":
        a = np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.05, 0.45)
        return np.stack([r * np.cos(a), -r * np.sin(a)], 1)
    if kind == "cross":
        u, v = 0.32, 0.95
        return np.array([[-u, -v], [u, -v], [u, -u], [v, -u], [v, u], [u, u], [u, v], [-u, v], [-u, u], [-v, u],
                         [-v, -u], [-u, -u]])
    if kind == "heart":
        y = 13 * np.cos(s) - 5 * np.cos(2 * s) - 2 * np.cos(3 * s) - np.cos(4 * s)
        return np.stack([16 * np.sin(s) ** 3, 2.5 - y], 1) / 16
    raise ValueError(kind)


def draw_image(labels, quarters, size, rng, supersample=4):
    """One image (H, W, 3) of the shapes SHAPE_CLASSES[labels] on a random background, each of a random colour that
    stands out from it (in grayscale too), and of random size, position and rotation: anywhere in the image (quarters
    None: one shape), or smaller, inside its own quarter (0 top left, 1 top right, 2 bottom left, 3 bottom right)."""
    H, W = size[0] * supersample, size[1] * supersample
    margin = 0.1 * min(H, W) / 2  # a shape reaches up to 1.22 radii (the heart) from its centre: keep it inside
    background = rng.integers(0, 256, 3)
    image = Image.new("RGB", (W, H), tuple(background.tolist()))
    for label, q in zip(labels, [None] if quarters is None else quarters):
        colour = rng.integers(0, 256, 3)
        while abs((colour - background) @ [0.299, 0.587, 0.114]) < 60:  # (the luminance differs)
            colour = rng.integers(0, 256, 3)
        left, top, w, h = (0, 0, W, H) if q is None else (q % 2 * W / 2 + margin, q // 2 * H / 2 + margin,
                                                          W / 2 - 2 * margin, H / 2 - 2 * margin)
        radius = min(h, w) * rng.uniform(0.22, 0.42)
        centre = rng.uniform([left + radius, top + radius], [left + w - radius, top + h - radius])
        angle = rng.uniform(0, 2 * np.pi)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        points = shape_outline(SHAPE_CLASSES[label]) @ rotation.T * radius + centre
        ImageDraw.Draw(image).polygon([tuple(p) for p in points], fill=tuple(colour.tolist()))
    return np.asarray(image.resize((size[1], size[0]), Image.BOX))  # the mean of each 4x4 block: anti-aliased edges


def draw_shapes(count, size, seed=0):
    """`count` images of SHAPE_CLASSES in turn, the same for the same (count, size, seed)."""
    labels = torch.arange(count) % len(SHAPE_CLASSES)
    images = [draw_image([label], None, size, np.random.default_rng([seed, i]))
              for i, label in enumerate(labels.tolist())]
    return ImageTensors(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), labels, SHAPE_CLASSES)


def draw_multishapes(count, size, seed=0):
    """`count` images of 1-3 distinct shapes in distinct quarters, multi-hot; same for the same (count, size, seed)."""
    images, labels = [], torch.zeros(count, len(SHAPE_CLASSES))
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        present = rng.choice(len(SHAPE_CLASSES), rng.integers(1, 4), replace=False)
        images.append(draw_image(present, rng.choice(4, len(present), replace=False), size, rng))
        labels[i, present] = 1
    return ImageTensors(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), labels, SHAPE_CLASSES)


# --- the data loader: batches in a fixed order ---

class EpochBatches(torch.utils.data.Sampler):
    """An epoch's index batches, the same on every run: a permutation fixed by (seed, epoch), cut into global batches
    of batch_size * world_size (the last incomplete one dropped), each rank taking its slice. set_epoch(epoch, start)
    skips `start` batches (to resume). Indices are on `device`, where in-memory data is indexed: no copy every step."""

    def __init__(self, num_items, batch_size, seed=0, rank=0, world_size=1, device="cpu"):
        self.num_items, self.batch_size, self.seed, self.rank, self.world_size = (
            num_items, batch_size, seed, rank, world_size)
        self.epoch, self.start, self.device = 0, 0, device

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        return self.num_items // (self.batch_size * self.world_size)

    def __iter__(self):
        order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        order = order.to(self.device)  # one copy an epoch
        global_batch = order[:len(self) * self.batch_size * self.world_size].view(len(self), self.world_size, -1)
        yield from global_batch[self.start:, self.rank]


def get_data(dataset, batch_size, seed=0, device="cpu", rank=0, world_size=1, num_workers=None):
    """load_dataset's batches in EpochBatches' order: call dataloader.sampler.set_epoch(epoch) before each epoch."""
    in_memory = isinstance(dataset, ImageTensors)
    sampler = EpochBatches(len(dataset), batch_size, seed, rank, world_size, device if in_memory else "cpu")
    if len(sampler) == 0:
        raise UserError(f"the dataset has {len(dataset)} images, fewer than one batch of "
                        f"{batch_size * world_size}: lower --batch_size")
    if in_memory:
        return torch.utils.data.DataLoader(dataset.to(device), sampler=sampler, batch_size=None)
    if num_workers is None:
        num_workers = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers,
                                       pin_memory=torch.device(device).type == "cuda",
                                       persistent_workers=num_workers > 0)


def complete_config(c, dataset, conditional):
    """What the dataset decides: channels, classes, multi_label, flip (if None), num_classes (None: unconditional)."""
    c.channels, c.classes, c.multi_label = dataset.channels, dataset.classes, dataset.labels.is_floating_point()
    c.flip = default_flip(c.dataset) if c.flip is None else c.flip
    if not conditional:
        c.num_classes = None
        return
    if c.multi_label and c.num_classes not in (None, len(dataset.classes)):
        raise UserError(f"num_classes={c.num_classes}: '{c.dataset}' has {len(dataset.classes)} attributes, and a "
                        f"multi-label model has one class per attribute (leave --num_classes unset)")
    c.num_classes = c.num_classes or len(dataset.classes)
    if len(dataset.classes) > c.num_classes:
        raise UserError(f"labels outside num_classes: '{c.dataset}' has {len(dataset.classes)} classes, "
                        f"but num_classes={c.num_classes}")
