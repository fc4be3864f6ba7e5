"""Checkpoint files, written atomically: the tutorial's ckpt.pt and ema_ckpt.pt (plain state dicts), train_state.pt
(all that an exact resume needs) and config.json (the settings load_run and evaluate.py read); clear read errors."""
import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from data import UserError
from options import MACHINE_OPTIONS, constant_comments
from utils import replace_atomically


# Options that may change when a run resumes; any other difference makes another run.
RESUMABLE_CHANGES = {"epochs", "lr", "sample_steps", "save_every", "device", "amp", "compile", "data_dir",
                     "cfg_scale", "sampler", "logger"}
# The settings a run's model and sampler are built from (make_model, make_diffusion), and those the scripts add.
MODEL_SETTINGS = {"img_size", "channels", "num_classes", "width", "attention", "norm_groups", "film", "schedule",
                  "prediction", "loss_weighting", "timesteps"}
ADDED_SETTINGS = {"channels", "classes", "multi_label", "num_classes", "world_size"}  # (data.complete_config's)
TRAIN_STATE_KEYS = {"model", "ema_model", "optimizer", "ema_step", "generator", "generator_device", "scaler",
                    "importance", "epoch", "batch", "step", "losses", "config", "window"}  # (save_train_state's)


def earlier_version(folder):
    """The one line for a run that an earlier version of this repo wrote: no code here reads it."""
    return UserError(f"{folder} was made by an earlier version of this repo: load its weights by hand: model = "
                     f"UNet_conditional(...) (UNet(...) for ddpm.py's runs) with the settings of its config.json; "
                     f"model.load_state_dict(torch.load('{Path(folder) / 'ema_ckpt.pt'}'))")


def read_config(run):
    """The settings of a run (models/<run_name>, or a checkpoint file in it) from its config.json."""
    folder = Path(run) if Path(run).is_dir() or not Path(run).suffix else Path(run).parent
    if not folder.is_dir():
        runs = sorted(p.parent.name for p in folder.parent.glob("*/config.json"))
        raise UserError(f"no run folder '{folder}'" + (f": the runs in {folder.parent} are {', '.join(runs)}"
                                                       if runs else f" (and no runs in '{folder.parent}')"))
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"no {path}: the training scripts write config.json beside their checkpoints; a checkpoint "
                        f"from elsewhere loads by hand (UNet_conditional(...).load_state_dict)")
    config = json.loads(path.read_text())
    known = {n.lower() for n in [*constant_comments(Path(__file__).with_name("ddpm_conditional.py")), *MACHINE_OPTIONS]}
    if not MODEL_SETTINGS <= config.keys() <= known | ADDED_SETTINGS:  # settings lacking, or unknown here
        raise earlier_version(folder)
    return argparse.Namespace(**config)


def read_train_state(models_dir, config):
    """models/<run>/train_state.pt, or None for a new run; a run of other settings is refused, naming them."""
    path = Path(models_dir) / "train_state.pt"
    state = read_checkpoint(path) if path.exists() and (not dist.is_initialized() or dist.get_rank() == 0) else None
    if dist.is_initialized():  # torchrun: rank 0's, on every machine (they need not share a filesystem)
        shared = [state]
        dist.broadcast_object_list(shared, src=0)
        state = shared[0]
    if state is None:
        return None
    saved = state["config"]
    if state.keys() != TRAIN_STATE_KEYS or saved.keys() != config.keys():
        raise earlier_version(models_dir)
    differ = [f"{k}={saved[k]!r}, now {config[k]!r}" for k in saved
              if k not in RESUMABLE_CHANGES and saved[k] != config[k]]
    if differ:
        raise UserError(f"{models_dir} holds a run with other settings ({'; '.join(differ)}): pass another "
                        f"--run_name, or delete {models_dir} to start this one afresh")
    return state


def save_train_state(models_dir, config, run, epoch, batch, step, losses, window=(0.0, 0)):
    """ckpt.pt, ema_ckpt.pt, train_state.pt and config.json; `window`: the losses since the last readout (sum, count).
    Tensors go to the CPU first, so the files load on any machine."""
    weights, ema_weights = on_cpu(run["model"].state_dict()), on_cpu(run["ema_model"].state_dict())
    save_checkpoint(weights, models_dir / "ckpt.pt")
    save_checkpoint(ema_weights, models_dir / "ema_ckpt.pt")
    save_checkpoint({"model": weights, "ema_model": ema_weights, "optimizer": on_cpu(run["optimizer"].state_dict()),
                     "ema_step": run["ema"].step, "generator": run["generator"].get_state(),
                     "generator_device": run["generator"].device.type,
                     "scaler": run["scaler"].state_dict() if run["scaler"] else {},
                     "importance": run["importance"].state_dict() if run["importance"] else None,
                     "epoch": epoch, "batch": batch, "step": step, "losses": losses, "config": vars(config),
                     "window": on_cpu(window)}, models_dir / "train_state.pt")
    replace_atomically(models_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(vars(config), indent=2)))


def resume(state, run, log, epochs):
    """Load a train_state.pt into the run's parts; returns (epoch, batch, step, losses, loss sum, loss count), the
    last two (the losses since the last readout) on the generator's device."""
    for part in ("model", "ema_model"):
        load_weights(run[part], state[part], f"train_state.pt ({part})")
    for part in ("optimizer", "scaler", "importance"):  # (the optimizer's learning rate is set before every step)
        if run[part] is not None and state[part]:  # (--amp may change: a scaler now and none saved, or the reverse)
            run[part].load_state_dict(state[part])
    run["ema"].step = state["ema_step"]
    generator, device, saved_on = run["generator"], run["generator"].device, state["generator_device"]
    if saved_on == device.type:
        generator.set_state(state["generator"])
    else:  # a CUDA generator's state does not fit a CPU generator: go on from a stream of (seed, step)
        generator.manual_seed(state["config"]["seed"] * 1_000_003 + state["step"])
    folder = f"models/{state['config']['run_name']}"
    if state["epoch"] >= epochs:
        log(f"{folder} has already trained {state['epoch']} epochs (--epochs {epochs}): nothing to do")
    else:
        if saved_on != device.type:
            log(f"resuming on {device.type} a run saved on {saved_on}: its random draws go on from a new stream "
                f"(seed {state['config']['seed']}, step {state['step']}), so they differ from an uninterrupted run's")
        log(f"resuming {folder} at epoch {state['epoch'] + 1}, step {state['step']}")
    total, count = state["window"]
    return (state["epoch"], state["batch"], state["step"], state["losses"],
            total.to(device) if torch.is_tensor(total) else total, count)


def export_run(run, folder):
    """A run's EMA weights in half precision (half the size; loading casts them back) and config.json, into `folder`:

        python -c "from checkpoints import export_run; export_run('models/DDPM_conditional', 'pretrained/shapes')"
    """
    run, folder = Path(run), Path(folder)
    weights = read_checkpoint(run / "ema_ckpt.pt")
    save_checkpoint({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, folder / "ema_ckpt.pt")
    replace_atomically(folder / "config.json", lambda tmp: tmp.write_bytes((run / "config.json").read_bytes()))


def on_cpu(state):
    """A state_dict's tensors on the CPU (fused AdamW keeps its `step` counts on the GPU; loading puts them back)."""
    if torch.is_tensor(state):
        return state.cpu()
    if isinstance(state, dict):
        return {k: on_cpu(v) for k, v in state.items()}
    return type(state)(on_cpu(v) for v in state) if isinstance(state, (list, tuple)) else state


def save_checkpoint(obj, path):
    replace_atomically(path, lambda tmp: torch.save(obj, tmp))


def read_checkpoint(path):
    """torch.load(path) on the CPU, weights only, with a clear message when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds here: a truncated zip, an old pickle, a foreign object
        raise UserError(f"cannot read checkpoint '{path}': {str(e).splitlines()[0]}") from None


def load_weights(model, path_or_state, name=None):
    """Load a state dict (or its file) into model, naming keys that differ; torch.compile's and DDP's prefixes go."""
    name = name or path_or_state
    state = read_checkpoint(path_or_state) if isinstance(path_or_state, (str, Path)) else path_or_state
    if not isinstance(state, dict):
        raise UserError(f"checkpoint '{name}' holds a {type(state).__name__}, not a state dict")
    if {"model", "ema_model", "optimizer"} <= state.keys():
        raise UserError(f"'{name}' is a train_state.pt (all that a resume needs), not a model's weights: load the "
                        f"run's folder or its ema_ckpt.pt (or ckpt.pt)")
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    differ = {"missing keys": [k for k in own if k not in state], "unexpected keys": [k for k in state if k not in own],
              "shapes differ (checkpoint vs model)": [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                                                      for k in own if k in state and state[k].shape != own[k].shape]}
    problems = [f"{label}: {', '.join(keys[:4])}" + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
                for label, keys in differ.items() if keys]
    if problems:
        raise UserError(f"checkpoint '{name}' does not fit the model ({'; '.join(problems)}): was it trained with "
                        f"other WIDTH, ATTENTION, CHANNELS, NUM_CLASSES?")
    model.load_state_dict(state)
    return model
