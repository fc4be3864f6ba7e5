"""A script's UPPERCASE constants as command-line options: preset files first (nanoGPT's configurator: `python
ddpm_conditional.py config/tutorial.py`), then `--name VALUE`; --help shows each constant's comment, in its group."""
import argparse
import ast
import contextlib
import difflib
import re
import sys
import typing
from pathlib import Path

from data import UserError, attribute_names, image_size
from utils import check_cfg_scale


# Options not among a script's constants: where and how fast a run goes, not what it learns (a resume may change them).
MACHINE_OPTIONS = {
    "DATA_DIR": ("data", "where torchvision datasets are downloaded to / looked for"),
    "SAVE_EVERY": (0, "also save every N steps within an epoch (0: only at the end of each epoch)"),
    "COMPILE": (False, "torch.compile the model"),
}


def parse_config(constants, argv=None, ignore=(), preset_run_suffix=""):
    """Constants and MACHINE_OPTIONS as lower-case names, set by preset files (each is run), then `--name VALUE` (a bare
    `--flag` is True). `ignore`: constants a preset may set that this script lacks (ddpm.py: the conditional script's);
    `preset_run_suffix`: added to a preset's RUN_NAME, so that each script's run of it has its own folders."""
    argv = sys.argv[1:] if argv is None else list(argv)
    defaults = {name: value for name, value in constants.items()
                if name.isupper() and isinstance(value, (bool, int, float, str, tuple, type(None)))}
    defaults.update((name, default) for name, (default, _) in MACHINE_OPTIONS.items() if name not in defaults)
    annotations = constants.get("__annotations__", {})
    for preset in [arg for arg in argv if not arg.startswith("-") and arg.endswith(".py")]:
        argv.remove(preset)
        if not Path(preset).is_file():
            raise UserError(f"preset file '{preset}' does not exist (the presets are in config/)")
        values = {}
        exec(compile(Path(preset).read_text(), preset, "exec"), {}, values)  # its assignments land in values
        for name, value in values.items():
            if name in defaults:
                defaults[name] = parse_value(name.lower(), repr(value), defaults[name], annotations.get(name), preset)
                if name == "RUN_NAME":
                    defaults[name] += preset_run_suffix
            elif name.isupper() and name not in ignore:
                close = difflib.get_close_matches(name, defaults, 1)
                raise UserError(f"{preset} sets {name}, which is not a constant of this script"
                                f"{f' (did you mean {close[0]}?)' if close else ''}")
    args = vars(options_parser(constants, defaults, annotations).parse_args(argv))
    config = argparse.Namespace(**{name.lower(): default if args[name.lower()] is None else
                                   parse_value(name.lower(), args[name.lower()], default, annotations.get(name))
                                   for name, default in defaults.items()})
    if isinstance(getattr(config, "attention", None), int):
        config.attention = (config.attention,)  # ATTENTION = 8 edited in the file, as --attention 8
    return config


def options_parser(constants, defaults, annotations):
    """An --option for each constant, its help the constant's comment, under the script's `# --- group ---` titles."""
    parser = ErrorParser(description=constants.get("__doc__"), formatter_class=argparse.RawDescriptionHelpFormatter,
                         allow_abbrev=False,  # --epoch is a misspelling, not --epochs
                         usage="%(prog)s [config/PRESET.py ...] [--option VALUE ...]")
    comments = {**{name: ("data and machine", comment) for name, (_, comment) in MACHINE_OPTIONS.items()},
                **constant_comments(constants.get("__file__"))}
    groups, group = {}, parser
    for name, default in defaults.items():
        title, comment = comments.get(name, (None, ""))
        if title:
            group = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
        flag = type(default) is bool or bool in typing.get_args(annotations.get(name))  # FLIP: bool | None
        group.add_argument("--" + name.lower(), help=f"{comment} (default: {default!r})".strip().replace("%", "%%"),
                           **dict(nargs="?", const="True", metavar="BOOL") if flag else dict(metavar="VALUE"))
    return parser


def constant_comments(path):
    """{NAME: [its group's title, its comment]}: the comment after `NAME = value` and the comment lines below it."""
    comments, title, name = {}, None, None
    for line in (Path(path).read_text().splitlines() if path else []):
        if match := re.match(r"# --- (.*) ---", line):
            title, name = match.group(1), None
        elif match := re.match(r"([A-Z_]+)\b[^#]*(?:#\s*(.*))?$", line):
            name = match.group(1)
            comments[name], title = [title, match.group(2) or ""], None
        elif (match := re.match(r"\s+#\s*(.*)", line)) and name:
            comments[name][1] += " " + match.group(1)
        else:
            name = None
    return comments


class ErrorParser(argparse.ArgumentParser):
    """argparse that raises a UserError (one line, no usage text) and suggests the option meant."""

    def error(self, message):
        for unknown in re.findall(r"(--?[\w-]+)", message.partition("unrecognized arguments:")[2]):
            close = difflib.get_close_matches(unknown, [o for a in self._actions for o in a.option_strings], 1)
            message += f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"{message} (--help lists the options)")


def parse_value(name, text, default, annotation=None, where=None):
    """One option's value from its text, a Python literal (64, 3e-4, true, None, "1,2,4,8") or else a string, of its
    annotation's types, or else its default's type (a None default without an annotation takes any value). An int
    does for a float (--cfg_scale 7) or a tuple (--attention 8), an empty text for an empty tuple (--attention=)."""
    types = [t for t in typing.get_args(annotation) or (annotation or type(default),) if t is not type(None)]
    try:
        value = ast.literal_eval(text.capitalize() if text.lower() in ("true", "false", "none") else text)
    except (ValueError, SyntaxError):
        value = text
    if type(value) in types or (default is None and (value is None or not annotation)):
        return value
    if type(value) is int and (float in types or tuple in types):
        return float(value) if float in types else (value,)
    if (tuple in types and value == "") or (name == "img_size" and isinstance(value, tuple)):  # (height, width)
        return tuple(value)
    if str in types:
        return text
    raise UserError(f"{f'{where}: {name.upper()}' if where else f'--{name}'} {text}: expected a value of type "
                    f"{' or '.join(t.__name__ for t in types)} (the default is {default!r})")


def check_config(c):
    """A clear message for each impossible setting unchecked before the first file is written (others: where used)."""
    size = image_size(c.img_size)
    if len(size) != 2 or not all(type(s) is int and s > 0 and s % 8 == 0 for s in size):
        raise UserError(f"img_size={c.img_size}: height and width must be positive and divisible by 8 "
                        f"(the UNet halves them 3 times), e.g. 32, 64 or (64, 128)")
    for name in ("epochs", "batch_size", "grad_accum", "sample_steps"):
        if getattr(c, name) < 1:
            raise UserError(f"{name}={getattr(c, name)}: must be at least 1")
    check_cfg_scale(getattr(c, "cfg_scale", 0))
    if not 0 <= getattr(c, "cfg_drop", 0) < 1:
        raise UserError(f"cfg_drop={c.cfg_drop}: must be in [0, 1)")
    if c.lr_schedule not in ("constant", "cosine") or c.lr_warmup < 0:
        raise UserError(f"lr_schedule={c.lr_schedule!r}, lr_warmup={c.lr_warmup}: expected 'constant' or 'cosine', "
                        f"and a warm-up of 0 or more steps")
    if c.timesteps not in ("uniform", "logit_normal", "importance"):
        raise UserError(f"timesteps={c.timesteps!r}: expected 'uniform', 'logit_normal' or 'importance'")
    if c.sampler not in ("ancestral", "ddim", "dpm++"):
        raise UserError(f"sampler={c.sampler!r}: expected 'ancestral', 'ddim' or 'dpm++'")
    if c.sampler != "ancestral" and c.sample_steps > 1000:
        raise UserError(f"sample_steps={c.sample_steps}: at most the 1000 steps of the noise schedule")
    if getattr(c, "attributes", None) is not None:
        attribute_names(c.attributes)  # a clear message for a malformed --attributes


@contextlib.contextmanager
def clear_errors():
    """A UserError, or Ctrl-C (the training loop says what it saved), stops the script with one line, no traceback."""
    try:
        yield
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("stopped (Ctrl-C)")
