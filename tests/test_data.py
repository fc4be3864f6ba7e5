"""Data sources, the batch order, options and checkpoints, and the clear messages for bad input."""
import hashlib
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import SHAPE_CLASSES, EpochBatches, UserError, draw_multishapes, draw_shapes, get_data, load_dataset
from modules import UNet
from options import parse_config
from checkpoints import load_weights, save_checkpoint
from utils import pick_device

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# --- the built-in shapes ---

def test_shapes_are_deterministic_balanced_and_any_size():
    a = load_dataset("shapes", (24, 40), num_images=60, seed=3)
    b = load_dataset("shapes", (24, 40), num_images=60, seed=3)
    c = load_dataset("shapes", (24, 40), num_images=60, seed=4)
    assert a.images.shape == (60, 3, 24, 40) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert a.classes == list(SHAPE_CLASSES) and torch.bincount(a.labels).tolist() == [10] * len(SHAPE_CLASSES)
    assert load_dataset("shapes", 16, channels=1, num_images=6).images.shape == (6, 1, 16, 16)


def test_shapes_vary_within_a_class_and_stand_out_from_the_background():
    data = load_dataset("shapes", 32, num_images=120)
    circles = data.images[data.labels == 0].float()
    assert circles.std(0).mean() > 40  # colour, size and position differ from image to image
    gray = (data.images.float() * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1)
    corners = torch.stack([gray[:, 0, 0], gray[:, 0, -1], gray[:, -1, 0], gray[:, -1, -1]], 1).median(1).values
    contrast = (gray - corners[:, None, None]).abs().flatten(1).max(1).values
    assert (contrast > 50).all()  # every shape is visible, in grayscale too


def test_shapes_images_stay_the_same_for_a_seed():
    """Fingerprints of draw_shapes taken before the multi-shape data shared its drawing code: any change to how
    `shapes` draws (or to its random draws) changes them, and the runs and measurements made on it."""
    for size, seed, pixel_sum, digest in (((16, 16), 0, 896976, "5bd22f8e804ee0f2"),
                                          ((24, 40), 3, 1780215, "07d88aeed4b018a6")):
        images = draw_shapes(6 if seed else 8, size, seed=seed).images
        assert images.sum().item() == pixel_sum
        assert hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16] == digest


def test_shapes_test_split_differs_from_train():
    train = load_dataset("shapes", 16, num_images=50)
    test = load_dataset("shapes", 16, split="test", num_images=50)
    assert not torch.equal(train.images, test.images)


# --- multishapes: 1 to 3 different shapes an image, labelled multi-hot ---

def test_multishapes_have_one_to_three_different_shapes_each_in_its_own_quarter():
    """Each label vector has 1 to 3 shapes on; exactly that many quarters hold ink, the others are the background
    itself (the top-left pixel is always background); the same images for the same seed."""
    data = draw_multishapes(24, (16, 16), seed=0)
    assert data.labels.shape == (24, 6) and data.labels.dtype == torch.float32 and data.classes == list(SHAPE_CLASSES)
    assert set(data.labels.unique().tolist()) == {0, 1} and set(data.labels.sum(1).tolist()) == {1, 2, 3}
    background = data.images[:, :, :1, :1]
    ink = (data.images != background).any(1)  # (24, 16, 16): pixels that differ from the background
    inked_quarters = ink.unflatten(1, (2, 8)).unflatten(3, (2, 8)).any(dim=(2, 4)).sum(dim=(1, 2))
    assert inked_quarters.tolist() == data.labels.sum(1).long().tolist()
    assert torch.equal(draw_multishapes(24, (16, 16), seed=0).images, data.images)
    assert not torch.equal(draw_multishapes(24, (16, 16), seed=1).labels, data.labels)


def test_multishapes_through_load_dataset_and_attributes_select_in_order():
    train = load_dataset("multishapes", 16, num_images=12)
    test = load_dataset("multishapes", 16, split="test", num_images=12)
    assert train.labels.shape == (12, 6) and not torch.equal(train.images, test.images)
    picked = load_dataset("multishapes", 16, num_images=12, attributes="star, circle")
    assert picked.classes == ["star", "circle"] and torch.equal(picked.labels, train.labels[:, [3, 0]])
    with pytest.raises(UserError, match=r"^'multishapes': no attribute 'ring' \(from --attributes\) among circle, "):
        load_dataset("multishapes", 16, num_images=12, attributes="circle,ring")
    with pytest.raises(UserError, match=r"^attributes='circle,circle': expected distinct names"):
        load_dataset("multishapes", 16, num_images=12, attributes="circle,circle")
    with pytest.raises(UserError, match=r"^attributes='circle': 'shapes' has classes, not attributes"):
        load_dataset("shapes", 16, num_images=12, attributes="circle")


# --- attribute tables: CelebA's list_attr_celeba.txt, or a CSV ---

def write_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (12, 20), (20 * i, 0, 0)).save(folder / name)


def write_celeba(root, rows, names="Smiling Eyeglasses Male", image_folder="img_align_celeba"):
    """A list_attr_celeba.txt of `rows` (file, values as text) and the images it lists."""
    lines = [str(len(rows)), names] + [f"{file}  {' '.join(values)}" for file, values in rows]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    write_images(root / image_folder, [file for file, _ in rows])
    return str(root / "list_attr_celeba.txt")


TEN_ROWS = [(f"{i:06d}.jpg", ("1" if i % 2 else "-1", "1" if i % 3 == 0 else "-1", "-1")) for i in range(10)]


def test_celeba_attribute_table_gives_multi_hot_labels_and_a_test_split(tmp_path):
    path = write_celeba(tmp_path, TEN_ROWS)
    train = load_dataset(path, 8)
    assert train.classes == ["Smiling", "Eyeglasses", "Male"] and len(train) == 9 and train.channels == 3
    images, labels = train[torch.arange(9)]
    assert images.shape == (9, 3, 8, 8) and abs(images[4, 0, 0, 0].item() - 80) <= 2  # 000004.jpg: red 80 (JPEG)
    assert labels.dtype == torch.float32 and labels[:4].tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 0]]
    test = load_dataset(path, 8, split="test")  # the last tenth of the rows
    assert len(test) == 1 and test.labels.tolist() == [[1, 1, 0]] and test.paths[0].name == "000009.jpg"
    picked = load_dataset(path, 8, attributes="Eyeglasses,Smiling")
    assert picked.classes == ["Eyeglasses", "Smiling"] and torch.equal(picked.labels, train.labels[:, [1, 0]])
    assert len(load_dataset(path, 8, num_images=4)) == 4


def test_csv_attribute_table_with_images_beside_it(tmp_path):
    (tmp_path / "faces.csv").write_text("file,Smiling,Hat\na.png,1,0\nb.png,0,0\nc.png,1,1\n")
    write_images(tmp_path, ["a.png", "b.png", "c.png"])  # no img_align_celeba/: beside the table
    data = load_dataset(str(tmp_path / "faces.csv"), 8)
    assert data.classes == ["Smiling", "Hat"] and data.labels.tolist() == [[1, 0], [0, 0], [1, 1]]
    with pytest.raises(UserError, match=r"faces\.csv' has no test rows \(the last tenth"):
        load_dataset(str(tmp_path / "faces.csv"), 8, split="test")


CELEBA = ["3", "Smiling Eyeglasses Male", "000000.jpg -1 -1 -1", "000001.jpg 1 -1 -1", "000002.jpg -1  1 -1"]


@pytest.mark.parametrize("table,lines,attributes,message", [
    ("list_attr_celeba.txt", CELEBA + ["000003.jpg 1 -1"], None, r"line 6: 2 values for the 3 attributes"),
    ("list_attr_celeba.txt", CELEBA + ["000003.jpg 1 yes -1"], None,
     r"line 6: value 'yes' for Eyeglasses: expected 1 \(present\), or -1 or 0 \(absent\)"),
    ("faces.csv", ["file,Smiling,Hat", "000000.jpg,1,0", "", "000001.jpg,1,2"], None, r"line 4: value '2' for Hat"),
    ("list_attr_celeba.txt", CELEBA + ["missing.jpg 1 -1 -1"], None,
     r"line 6: image 'missing\.jpg' does not exist in '.*img_align_celeba'"),
    ("list_attr_celeba.txt", CELEBA, "Smiling,Beard",
     r"line 2: no attribute 'Beard' \(from --attributes\) among Smiling, Eyeglasses, Male"),
    ("list_attr_celeba.txt", ["Smiling Eyeglasses Male"] + CELEBA[2:], None,
     r"line 1: 'Smiling Eyeglasses Male': expected the number of images"),
])
def test_bad_attribute_tables_name_the_file_the_line_and_the_value(tmp_path, table, lines, attributes, message):
    (tmp_path / table).write_text("\n".join(lines) + "\n")
    write_images(tmp_path / "img_align_celeba", [f"00000{i}.jpg" for i in range(4)])
    with pytest.raises(UserError, match=rf"^'.*{table}' {message}"):
        load_dataset(str(tmp_path / table), 8, attributes=attributes)


# --- the order of batches ---

def test_epoch_batches_fixed_by_seed_and_epoch_and_resumable():
    sampler = EpochBatches(103, 10, seed=5)
    first = [b.tolist() for b in sampler]
    assert len(first) == len(sampler) == 10 and all(len(b) == 10 for b in first)
    assert len({i for b in first for i in b}) == 100  # no repeats; 3 left over are dropped
    assert [b.tolist() for b in sampler] == first
    sampler.set_epoch(1)
    second = [b.tolist() for b in sampler]
    assert second != first
    sampler.set_epoch(1, start=4)
    assert [b.tolist() for b in sampler] == second[4:]


def test_epoch_batches_split_each_global_batch_across_ranks():
    single = [b.tolist() for b in EpochBatches(64, 8, seed=1)]
    ranks = [[b.tolist() for b in EpochBatches(64, 4, seed=1, rank=r, world_size=2)] for r in range(2)]
    assert [r0 + r1 for r0, r1 in zip(*ranks)] == single


def test_loader_yields_uint8_batches_and_refuses_a_dataset_smaller_than_a_batch():
    data = load_dataset("shapes", 16, num_images=20)
    images, labels = next(iter(get_data(data, batch_size=8)))
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.uint8 and labels.shape == (8,)
    with pytest.raises(UserError, match="20 images, fewer than one batch of 32"):
        get_data(data, batch_size=32)


# --- a folder of class subfolders ---

def make_folder(root, grayscale=False):
    rng = np.random.default_rng(0)
    for name, count in (("cats", 3), ("dogs", 2)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            shape = (30 + 10 * i, 50) if grayscale else (30 + 10 * i, 50, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_image_folder_is_resized_and_labelled(tmp_path):
    data = load_dataset(str(make_folder(tmp_path / "pets")), 16)
    assert data.classes == ["cats", "dogs"] and data.channels == 3 and len(data) == 5
    images, labels = next(iter(get_data(data, batch_size=5, num_workers=0)))
    assert images.shape == (5, 3, 16, 16) and images.dtype == torch.uint8
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1]
    gray = load_dataset(str(make_folder(tmp_path / "gray", grayscale=True)), (8, 16))
    assert gray.channels == 1 and gray[torch.arange(5)][0].shape == (5, 1, 8, 16)


def test_an_unreadable_image_is_named_once_and_replaced_so_batches_keep_their_size(tmp_path, capsys):
    """Wherever it is, the first file too (which sets the channels): one line naming it, once, and the next readable
    image takes its place with its label, so a batch keeps its size (under torchrun every process's must)."""
    root = make_folder(tmp_path / "pets")  # cats: 3 images, dogs: 2
    (root / "cats" / "-broken.jpg").write_bytes(b"not a jpeg at all")  # sorted first
    (root / "dogs" / "broken.jpg").write_bytes(b"nor this")
    data = load_dataset(str(root), 16)
    assert data.channels == 3 and len(data) == 7
    for _ in range(2):
        images, labels = data[torch.arange(len(data))]
        assert images.shape == (7, 3, 16, 16) and sorted(labels.tolist()) == [0, 0, 0, 0, 0, 1, 1]  # (wraps round)
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(lines) == 2 and all(re.match(r"warning: skipping unreadable image '.*broken\.jpg' \(", line)
                                   for line in lines)
    for path in data.paths:
        Path(path).write_bytes(b"junk")
    with pytest.raises(UserError, match=r"none of the 7 images \(e.g. '.*'\) can be read"):
        load_dataset(str(root), 16)


def test_an_unreadable_image_is_named_once_whichever_loader_worker_meets_it(tmp_path, capfd):
    """Two data loader workers, eight epochs: the broken file is named in one warning, not once per worker (each is a
    process of its own), on a line of its own (a progress bar may stand on the current one)."""
    root = make_folder(tmp_path / "pets")
    (root / "dogs" / "broken.jpg").write_bytes(b"not a jpeg")
    capfd.readouterr()
    loader = get_data(load_dataset(str(root), 16), 1, num_workers=2)  # batches of 1: the workers take turns
    for epoch in range(8):
        loader.sampler.set_epoch(epoch)
        assert sum(len(images) for images, labels in loader) == 6
    err = capfd.readouterr().err
    assert err.count("warning: skipping unreadable image") == 1 and "\nwarning: skipping" in err


@pytest.mark.parametrize("layout,message", [
    ("missing", r"dataset folder '.*nowhere' does not exist"),
    ("flat", "has no class subfolders"),
    ("empty", r"has no images in its class subfolders \(a, b\)"),
])
def test_bad_image_folders_are_clear_errors(tmp_path, layout, message):
    root = tmp_path / "nowhere"
    if layout == "flat":
        root.mkdir()
        Image.new("RGB", (8, 8)).save(root / "lonely.png")
    if layout == "empty":
        (root / "a").mkdir(parents=True)
        (root / "b").mkdir()
    with pytest.raises(UserError, match=message):
        load_dataset(str(root), 16)


def test_unknown_dataset_name():
    with pytest.raises(UserError, match="unknown dataset 'cifar11'"):
        load_dataset("cifar11", 32)


# --- FER-2013 ---

def write_fer(path, rows):
    lines = ["emotion,pixels,Usage"] + [f"{e},{' '.join(map(str, p))},{u}" for e, p, u in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_fer2013_csv(tmp_path):
    rows = [(i % 7, [(i * 37 + k) % 256 for k in range(2304)], "Training" if i < 5 else "PublicTest")
            for i in range(7)]
    path = write_fer(tmp_path / "fer2013.csv", rows)
    train = load_dataset(path, 48)
    assert train.images.shape == (5, 1, 48, 48) and train.labels.tolist() == [0, 1, 2, 3, 4]
    assert train.images[1, 0, 0, :3].tolist() == [37, 38, 39] and len(train.classes) == 7
    assert load_dataset(path, 32, split="test").images.shape == (2, 1, 32, 32)


def test_fer2013_bad_rows_name_the_line(tmp_path):
    path = write_fer(tmp_path / "fer.csv", [(0, [1] * 2304, "Training"), (3, [1] * 100, "Training")])
    with pytest.raises(UserError, match=r"fer\.csv' line 3: 100 pixels \(expected 2304\)"):
        load_dataset(path, 48)
    (tmp_path / "nopixels.csv").write_text("emotion,Usage\n1,Training\n")
    with pytest.raises(UserError, match="has no column pixels"):
        load_dataset(str(tmp_path / "nopixels.csv"), 48)


# --- torchvision datasets ---

def test_offline_download_says_where_to_put_the_files(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise socket.gaierror("no network here")

    monkeypatch.setattr(socket, "getaddrinfo", offline)  # simulate a machine without internet
    monkeypatch.setattr(socket.socket, "connect", offline)
    with pytest.raises(UserError, match=r"could not download mnist into '.*data' .*are you offline.*"
                                        r"train-images-idx3-ubyte\.gz.*MNIST/raw"):
        load_dataset("mnist", 32, data_dir=str(tmp_path / "data"))


@pytest.mark.skipif(not (SHARED_DATA / "FashionMNIST").is_dir(), reason="needs ../shared/data (not in a user's clone)")
def test_fashion_mnist_from_local_files():
    data = load_dataset("fashion_mnist", 32, data_dir=str(SHARED_DATA), num_images=100)
    assert data.images.shape == (100, 1, 32, 32) and len(data.classes) == 10
    assert load_dataset("fashion_mnist", 32, channels=3, data_dir=str(SHARED_DATA), num_images=4).channels == 3


# --- options, devices, checkpoints ---

def test_constants_become_typed_command_line_options():
    constants = {"IMG_SIZE": 32, "LR": 3e-4, "AMP": True, "DATASET": "shapes", "ATTENTION": (4, 8),
                 "CHANNELS": None, "lowercase": 1, "EMA": object()}
    c = parse_config(constants, [])
    assert vars(c) == {"img_size": 32, "lr": 3e-4, "amp": True, "dataset": "shapes", "attention": (4, 8),
                       "channels": None, "data_dir": "data", "save_every": 0, "compile": False}  # (MACHINE_OPTIONS)
    c = parse_config(constants, ["--img_size", "64,128", "--lr", "1", "--amp", "false", "--dataset", "data/my faces",
                                 "--attention", "8", "--channels", "1"])
    assert (c.img_size, c.lr, c.amp, c.dataset, c.attention, c.channels) == ((64, 128), 1, False, "data/my faces",
                                                                             (8,), 1)
    assert parse_config(constants, ["--attention="]).attention == ()  # none
    assert parse_config(constants, ["--attention", "()"]).attention == ()
    with pytest.raises(UserError, match=r"--lr fast: expected a value of type float \(the default is 0.0003\)"):
        parse_config(constants, ["--lr", "fast"])
    with pytest.raises(UserError, match=r"unrecognized arguments: --epochz 3 \(did you mean --epochs\?\)"):
        parse_config({**constants, "EPOCHS": 24}, ["--epochz", "3"])  # an option that no constant defines
    assert parse_config(constants, ["--amp"]).amp is True  # a bare flag
    import ddpm_conditional
    assert parse_config(vars(ddpm_conditional), ["--flip"]).flip is True  # FLIP: bool | None = None
    assert parse_config({**constants, "ATTENTION": 8}, []).attention == (8,)  # ATTENTION = 8 edited in the file


def test_options_check_their_types_floats_take_ints_and_none_defaults_use_their_annotation():
    import ddpm_conditional
    constants = vars(ddpm_conditional)
    c = parse_config(constants, ["--cfg_scale", "7.5", "--lr", "1", "--num_images", "100", "--flip", "False",
                                 "--amp", "fp16"])
    assert (c.cfg_scale, c.lr, c.num_images, c.flip, c.amp) == (7.5, 1.0, 100, False, "fp16")
    assert type(c.lr) is float and type(parse_config(constants, ["--cfg_scale", "2"]).cfg_scale) is float
    assert parse_config(constants, ["--num_images", "None"]).num_images is None
    for option, value, expected in (("--epochs", "2.5", "int"), ("--num_images", "abc", "int"),
                                    ("--num_classes", "1.5", "int"), ("--flip", "yes", "bool"),
                                    ("--cfg_scale", "True", "float")):
        with pytest.raises(UserError, match=rf"^{option} {value}: expected a value of type {expected} \(the default"):
            parse_config(constants, [option, value])


def test_a_missing_device_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="device 'cuda' is not available"):
        pick_device("cuda")
    with pytest.raises(UserError, match="device 'gpu': expected auto, cpu, cuda, cuda:N or mps"):
        pick_device("gpu")
    assert pick_device("auto").type in ("cpu", "mps")


def test_a_checkpoint_that_does_not_fit_names_the_keys(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(UNet(c_in=1, c_out=1, width=8, attention=()).state_dict(), path)
    with pytest.raises(UserError, match=r"does not fit the model \(missing keys: sa1\.mha\.in_proj_weight.*"
                                        r"shapes differ \(checkpoint vs model\): inc\.double_conv\.0\.weight "
                                        r"\(8, 1, 3, 3\) vs \(8, 3, 3, 3\)"):
        load_weights(UNet(width=8, attention=(2,)), path)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="cannot read checkpoint '.*junk.pt'"):
        load_weights(UNet(width=8), tmp_path / "junk.pt")
    with pytest.raises(UserError, match="does not exist"):
        load_weights(UNet(width=8), tmp_path / "nothing.pt")


def test_compiled_and_ddp_prefixes_are_removed_when_loading(tmp_path):
    source = UNet(width=8, attention=())
    prefixed = {"_orig_mod." + k: v for k, v in source.state_dict().items()}
    target = load_weights(UNet(width=8, attention=()), prefixed)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


def test_in_memory_batches_are_indexed_on_the_datasets_device():
    """The epoch's permutation moves to the device once (a GPU dataset indexed with CPU indices would copy them to
    the GPU, and wait, every step); "meta" stands in for a GPU here. Same order as on the CPU."""
    on_cpu, on_meta = EpochBatches(20, 4, seed=3), EpochBatches(20, 4, seed=3, device="meta")
    batches = list(on_meta)
    assert all(b.device.type == "meta" for b in batches) and len(batches) == len(list(on_cpu)) == 5
    loader = get_data(draw_shapes(12, (8, 8)), 4, device="cpu")
    assert next(iter(loader.sampler)).device.type == "cpu"


def test_folder_loaders_default_to_as_many_workers_as_cores(tmp_path):
    """NUM_WORKERS is gone: up to 4 worker processes, no more than this machine's cores (torch warns otherwise)."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(4):
            Image.new("RGB", (8, 8)).save(tmp_path / name / f"{i}.png")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert get_data(load_dataset(str(tmp_path), 8), 4).num_workers == min(4, cores)


def test_an_unusable_nvidia_gpu_is_said_loudly(monkeypatch, capsys):
    """An NVIDIA GPU that this torch cannot use (a CPU wheel, or a CUDA build newer than the driver): "auto" still
    picks the CPU, but says so once, with what to install."""
    import utils
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(utils, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(utils.warn_unusable_gpu, "said", False, raising=False)
    assert pick_device("auto").type == "cpu" and pick_device("auto").type == "cpu"
    err = capsys.readouterr().err
    assert err.count("WARNING: this machine has an NVIDIA GPU, but torch") == 1
    assert "nvidia-smi" in err and "--index-url https://download.pytorch.org/whl/cu126" in err
    monkeypatch.setattr(utils, "nvidia_gpu_present", lambda: False)
    monkeypatch.setattr(utils.warn_unusable_gpu, "said", False)
    pick_device("auto")
    assert capsys.readouterr().err == ""


def test_what_apple_mps_cannot_do_is_refused_with_what_to_change():
    """float16 training needs torch's GradScaler, which cannot run on MPS; attention's backward there holds every
    head's (positions x positions) scores: the tutorial's 64x64 attention at batch 32 would need about 16 GiB."""
    import argparse
    from utils import check_attention_memory, grad_scaler
    mps = torch.device("mps")  # (a device object; nothing runs there)
    with pytest.raises(UserError, match=r"--amp fp16 on Apple MPS: .* use --amp False"):
        grad_scaler(mps, torch.float16)
    assert grad_scaler(mps, None) is None and grad_scaler(torch.device("cpu"), torch.float16) is not None
    tutorial = argparse.Namespace(img_size=64, attention=(1, 2, 4, 8), batch_size=32, grad_accum=1)
    with pytest.raises(UserError, match=r"attention at 1/1 resolution \(4096 positions\) needs about 16 GiB for a "
                                        r"micro-batch of 32: use a smaller --batch_size \(and --grad_accum"):
        check_attention_memory(mps, tutorial)
    with pytest.raises(UserError, match="16 GiB"):  # GRAD_ACCUM adds micro-batches of BATCH_SIZE: no less memory
        check_attention_memory(mps, argparse.Namespace(**{**vars(tutorial), "grad_accum": 2}))
    check_attention_memory(mps, argparse.Namespace(**{**vars(tutorial), "batch_size": 16, "grad_accum": 2}))  # 8 GiB
    check_attention_memory(mps, argparse.Namespace(**{**vars(tutorial), "batch_size": 14}))  # the tutorial's: 7
    check_attention_memory(torch.device("cpu"), tutorial)  # fused kernels elsewhere


def test_plot_images_without_a_display_saves_the_grid_and_leaves_no_figure_open(tmp_path, capsys, monkeypatch):
    import matplotlib
    import matplotlib.pyplot as plt
    from utils import plot_images
    matplotlib.use("Agg")  # no display: plt.show() would show nothing
    images = draw_shapes(4, (8, 8)).images
    for _ in range(3):
        plot_images(images, path=tmp_path / "samples.png")
    assert Image.open(tmp_path / "samples.png").size == (2 + 4 * 10, 2 + 10)
    assert capsys.readouterr().out.count(f"no display here: the images are in {tmp_path / 'samples.png'}") == 3
    assert plt.get_fignums() == []
    monkeypatch.chdir(tmp_path)  # without a path: a file of its own for each call, none written over
    plot_images(images)
    plot_images(images[:2])
    written = sorted(tmp_path.glob("samples_*.png"), key=lambda p: p.stat().st_mtime_ns)
    assert [Image.open(p).size for p in written] == [(2 + 4 * 10, 2 + 10), (2 + 2 * 10, 2 + 10)]
    from utils import save_images
    with pytest.raises(UserError, match="name the image file with an extension"):
        save_images(images, tmp_path / "samples")
    save_images(images, tmp_path / "samples.JPG")
    assert Image.open(tmp_path / "samples.JPG").format == "JPEG"


@pytest.mark.parametrize("steps", [2, 30, 15000])
def test_the_loss_plot_has_room_for_its_labels(tmp_path, steps):
    """loss.png after a short run (a few readouts of close losses: the log axis writes its minor ticks, wide) and a
    long one: every label lies inside the picture."""
    from utils import save_loss_plot
    losses = [(s, 0.3 + 0.01 * (s % 3)) for s in range(25, 25 * steps + 1, 25)][:steps]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    figure = save_loss_plot(losses, tmp_path / "loss.png")
    FigureCanvasAgg(figure).draw()  # laid out as savefig lays it out
    renderer = figure.canvas.get_renderer()
    box, ax = figure.bbox, figure.axes[0]
    (low, high), ticks = ax.get_ylim(), ax.get_yticklabels(which="both")  # the major and minor ticks shown
    for text in [*(t for t in ticks if low <= t.get_position()[1] <= high), ax.yaxis.label, ax.xaxis.label, ax.title]:
        extent = text.get_window_extent(renderer)
        if text.get_text():
            assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1, text


def test_the_precision_said_is_the_precision_that_runs():
    """amp_dtype names only an autocast that really runs on the device (torch disables one it lacks there, e.g. bf16
    on Apple MPS before torch 2.6, and the run would go on in fp32 while its log said bf16); fp32 enters no autocast
    at all (torch 2.5 on MPS warns about a disabled fp32 one)."""
    from utils import amp_dtype, autocast, autocast_runs
    assert autocast_runs("cpu", torch.bfloat16) and not autocast_runs("cpu", torch.float64)  # CPU: bf16, fp16 only
    for amp in (True, False, "bf16", "fp16"):
        dtype = amp_dtype("cpu", amp)
        with autocast("cpu", dtype):
            product = torch.ones(2, 2) @ torch.ones(2, 2)
            assert torch.is_autocast_enabled("cpu") == (dtype is not None)
        assert product.dtype == (dtype or torch.float32)
