"""The original VirNucPro classifier and the loading of its checkpoints.

Architecture (the original's `MLPClassifier`): Linear(3328, 512) -> BatchNorm1d(512) -> ReLU ->
Dropout(0.5) -> Linear(512, 2); input = concat(DNABERT-S, ESM-2).

The original saves the whole module with `torch.save(model)`, so its 300_model.pth / 500_model.pth
pickles name the class `__main__.MLPClassifier`. Those load here without the caller defining that
class and without running pickled code: torch's weights-only unpickler is told that
`__main__.MLPClassifier` means the class below, and is allowed the few torch.nn classes inside.
Plain state_dicts (`model.state_dict()`) load too.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, first_line

ORIGINAL_INPUT_DIM = 3328  # DNABERT-S 768 + ESM-2 3B 2560
ORIGINAL_HIDDEN_DIM = 512
NUM_CLASSES = 2


class MLPClassifier(nn.Module):
    """Same attribute names as the original, so its pickles and state_dicts map onto this class."""

    def __init__(self, input_dim: int = ORIGINAL_INPUT_DIM, hidden_dim: int = ORIGINAL_HIDDEN_DIM, num_class: int = NUM_CLASSES):
        super().__init__()
        self.hidden_layer = nn.Linear(input_dim, hidden_dim)
        self.bn1 = nn.BatchNorm1d(hidden_dim)
        self.output_layer = nn.Linear(hidden_dim, num_class)
        self.dropout = nn.Dropout(0.5)
        nn.init.xavier_uniform_(self.hidden_layer.weight)
        nn.init.xavier_uniform_(self.output_layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, input_dim] -> logits [B, 2]
        x = self.hidden_layer(x)
        x = self.bn1(x)
        x = F.relu(x)
        x = self.dropout(x)
        return self.output_layer(x)

    @property
    def input_dim(self) -> int:
        return self.hidden_layer.in_features


# What a whole-module pickle of the original classifier references, besides tensors.
_PICKLE_GLOBALS = [
    (MLPClassifier, "__main__.MLPClassifier"),
    nn.Linear,
    nn.BatchNorm1d,
    nn.Dropout,
    nn.modules.linear.Linear,
    torch.nn.parameter.Parameter,
    set,
]


class _TorchOnlyUnpickler(pickle.Unpickler):
    """Resolves `__main__.MLPClassifier` to the class above and refuses anything outside torch and
    the standard containers, so a checkpoint cannot run arbitrary code."""

    _ALLOWED_BUILTINS = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "dict"), ("builtins", "list"),
                         ("builtins", "tuple"), ("builtins", "int"), ("builtins", "float"), ("builtins", "bool")}

    def find_class(self, module, name):
        if (module, name) == ("__main__", "MLPClassifier"):
            return MLPClassifier
        module = "builtins" if module == "__builtin__" else module  # protocol-2 pickles (torch.save)
        if module == "torch" or module.startswith("torch.") or (module, name) in self._ALLOWED_BUILTINS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a classifier checkpoint")


class _TorchOnlyPickle:
    """A pickle module for torch.load whose Unpickler is the restricted one above."""

    Unpickler = _TorchOnlyUnpickler
    load = staticmethod(lambda fh, **kw: _TorchOnlyUnpickler(fh, **kw).load())
    __name__ = "virnuc_ds_torch_only_pickle"


def _from_state_dict(state: dict) -> MLPClassifier:
    w = state.get("hidden_layer.weight")
    out = state.get("output_layer.weight")
    if w is None or out is None:
        raise KeyError("hidden_layer.weight / output_layer.weight")
    model = MLPClassifier(w.shape[1], w.shape[0], out.shape[0])
    model.load_state_dict(state, strict=True)
    return model


def load_classifier(path: str | os.PathLike, expected_input_dim: int | None = ORIGINAL_INPUT_DIM) -> MLPClassifier:
    """Load an original whole-module checkpoint or a state_dict; eval mode, on the CPU.

    expected_input_dim: refuse a checkpoint whose input width differs (None: accept any).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "classifier checkpoint not found")
    try:
        with torch.serialization.safe_globals(_PICKLE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for an unexpected pickle
        # Pickles from other torch versions can name a few more torch classes: retry with an
        # unpickler that still only builds classes from torch and the standard containers.
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_TorchOnlyPickle)
        except Exception:  # noqa: BLE001
            raise InputError(path, f"not a VirNucPro classifier checkpoint ({first_line(exc)})") from None
    if isinstance(obj, MLPClassifier):
        model = obj
    elif isinstance(obj, dict):
        state = obj.get("state_dict", obj.get("model_state_dict", obj))
        try:
            model = _from_state_dict(state)
        except (KeyError, RuntimeError, AttributeError) as exc:
            raise InputError(path, f"state_dict does not fit the VirNucPro classifier ({first_line(exc)})") from None
    else:
        raise InputError(path, f"holds a {type(obj).__name__}, not a VirNucPro classifier")
    if model.output_layer.out_features != NUM_CLASSES:
        raise InputError(path, f"classifier has {model.output_layer.out_features} outputs, expected 2")
    if expected_input_dim is not None and model.input_dim != expected_input_dim:
        raise InputError(
            path,
            f"classifier takes {model.input_dim} features but the embeddings have {expected_input_dim} "
            f"(VirNucPro's models take 3328 = DNABERT-S 768 + ESM-2 3B 2560)",
        )
    return model.eval()


def save_original_style(model: MLPClassifier, path: str | os.PathLike) -> None:
    """Pickle the whole module under the name `__main__.MLPClassifier`, as the original's train.py did."""
    cls = type(model)
    old = (cls.__module__, cls.__qualname__)
    cls.__module__, cls.__qualname__ = "__main__", "MLPClassifier"
    import sys

    main = sys.modules["__main__"]
    had = hasattr(main, "MLPClassifier")
    prev = getattr(main, "MLPClassifier", None)
    main.MLPClassifier = cls
    try:
        torch.save(model, path)
    finally:
        cls.__module__, cls.__qualname__ = old
        if had:
            main.MLPClassifier = prev
        else:
            del main.MLPClassifier
