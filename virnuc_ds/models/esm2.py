"""ESM-2 checkpoints: find a fair-esm `.pt` file and load it with fair-esm's own loader.

Checkpoints are the files fair-esm downloads (`esm2_t36_3B_UR50D.pt` and friends), read from an
explicit path or from the torch hub cache; nothing is ever downloaded. The contact-regression file
next to a checkpoint is optional: the contact head is not used for embeddings.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pickle
import threading
import warnings
from pathlib import Path

import torch
from esm.pretrained import load_model_and_alphabet_core

from virnuc_ds.errors import ConfigError, ModelNotFoundError, first_line, is_out_of_memory

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIX = ".pt"
REGRESSION_SUFFIX = "-contact-regression.pt"


def torch_hub_checkpoint_dirs() -> list[Path]:
    """Folders where torch hub (and so fair-esm) keeps downloaded checkpoints, in search order."""
    dirs = []
    if os.environ.get("TORCH_HOME"):
        dirs.append(Path(os.environ["TORCH_HOME"]).expanduser() / "hub" / "checkpoints")
    dirs.append(Path(torch.hub.get_dir()).expanduser() / "checkpoints")
    dirs.append(Path("~/.cache/torch/hub/checkpoints").expanduser())
    return list(dict.fromkeys(dirs))  # drop duplicates, keep order


def resolve_esm2_checkpoint(path_or_name: str | os.PathLike) -> Path:
    """The checkpoint file for an explicit path, or for a bare model name in the torch hub caches."""
    given = str(path_or_name)
    path = Path(given).expanduser()
    if path.is_file():
        return path
    if os.sep in given or path.is_dir():  # an explicit path, and not a file
        raise ModelNotFoundError(f"ESM-2 checkpoint {given!r}", [path])
    has_suffix = given.endswith(CHECKPOINT_SUFFIX)
    file_name = given if has_suffix else given + CHECKPOINT_SUFFIX
    candidates = [folder / file_name for folder in torch_hub_checkpoint_dirs()]
    if has_suffix:
        candidates.insert(0, path)  # `esm2_....pt`: here first, then the caches
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(f"ESM-2 checkpoint {given!r}", candidates)


def load_checkpoint_file(path: Path) -> dict:
    """torch.load a fair-esm file on CPU.

    fair-esm stores its config as an argparse.Namespace, so that class is allowed in the safe
    (weights_only) unpickler. A file needing anything else is loaded with the full unpickler, as
    fair-esm itself always did: the user points us at a checkpoint they trust. Memory-mapped where
    the file format allows, so ranks loading the same file share the page cache.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return _torch_load(path, weights_only=True)
    except pickle.UnpicklingError as error:
        log.warning("%s needs the full unpickler (%s); loading it as fair-esm does", path, error)
        return _torch_load(path, weights_only=False)


def _torch_load(path: Path, *, weights_only: bool) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        return torch.load(path, map_location="cpu", weights_only=weights_only)  # legacy format


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                   "xavier_uniform_", "xavier_normal_", "zeros_", "ones_", "constant_")


_SKIP_INIT_LOCK = threading.Lock()
_SKIP_INIT_USERS = 0
_SAVED_INIT_FUNCTIONS: dict = {}


@contextlib.contextmanager
def skip_weight_init():
    """Make torch.nn.init a no-op while a model is built whose every weight then comes from a
    checkpoint (strict loading): random init of 3B parameters on the CPU costs ~20 s a rank.
    Re-entrant across threads (ESM-2 and DNABERT-S load side by side): the last one out restores."""
    global _SKIP_INIT_USERS
    with _SKIP_INIT_LOCK:
        if _SKIP_INIT_USERS == 0:
            _SAVED_INIT_FUNCTIONS.update({name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS})
            for name in _INIT_FUNCTIONS:
                setattr(torch.nn.init, name, lambda tensor, *a, **k: tensor)
        _SKIP_INIT_USERS += 1
    try:
        yield
    finally:
        with _SKIP_INIT_LOCK:
            _SKIP_INIT_USERS -= 1
            if _SKIP_INIT_USERS == 0:
                for name, fn in _SAVED_INIT_FUNCTIONS.items():
                    setattr(torch.nn.init, name, fn)


def load_esm2(path_or_name: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model, alphabet) for an ESM-2 checkpoint of any size: fair-esm's ESM2, eval mode, fp32.

    The model is built on `device` and the memory-mapped weights are copied straight there: on a
    GPU this skips a CPU copy of the fp32 model (11 GB for the 3B model, per rank)."""
    path = resolve_esm2_checkpoint(path_or_name)
    try:
        model_data = load_checkpoint_file(path)
    except Exception as error:  # noqa: BLE001 - truncated, empty, not a torch file: one line naming it
        raise ConfigError(f"{path}: not a readable ESM-2 checkpoint ({first_line(error)})") from None
    if not isinstance(model_data, dict) or "cfg" not in model_data or "model" not in model_data:
        raise ConfigError(f"{path}: not an ESM-2 checkpoint (no 'cfg'/'model' entries)")
    if torch.device(device).type != "cpu":
        # the file's own dtype (fp16) crosses the bus, the fp32 conversion runs on the device:
        # copying CPU fp16 into GPU fp32 would convert on the CPU and move twice the bytes
        model_data = dict(model_data, model={k: v.to(device) if isinstance(v, torch.Tensor) else v
                                             for k, v in model_data["model"].items()})
    regression_path = path.with_name(path.stem + REGRESSION_SUFFIX)
    regression_data = None
    if regression_path.is_file():
        try:
            regression_data = load_checkpoint_file(regression_path)
        except Exception as error:  # noqa: BLE001 - the contact head is never used: a bad file is no reason to stop
            log.warning("%s: unreadable (%s); not needed, ignored", regression_path, first_line(error))

    # fair-esm picks the ESM-2 builder by the name's prefix; a renamed file is still ESM-2.
    model_name = path.stem if path.stem.startswith("esm2") else f"esm2_{path.stem}"
    with warnings.catch_warnings(), skip_weight_init(), torch.device(device):
        warnings.filterwarnings("ignore", message="Regression weights not found")  # head unused
        try:
            model, alphabet = load_model_and_alphabet_core(model_name, model_data, regression_data)
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as error:
            if is_out_of_memory(error):
                raise
            raise ConfigError(f"{path}: its weights do not fit the ESM-2 its own config describes "
                              f"({first_line(error)})") from None
    if regression_data is None:  # the contact head is never used; give it defined values
        torch.nn.init.zeros_(model.contact_head.regression.weight)
        torch.nn.init.zeros_(model.contact_head.regression.bias)
    model = model.float().eval().requires_grad_(False)
    return model, alphabet
