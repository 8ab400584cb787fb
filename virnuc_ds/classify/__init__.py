"""The original VirNucPro classifier: loading its checkpoints and writing its result files."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..store.embeddings import Embeddings
from .mlp import load_classifier
from .predict import predict_probabilities, write_results


def pick_device(name: str = "auto") -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        from ..errors import ConfigError

        raise ConfigError(f"classify.device / --device is {name!r} but this machine has no usable CUDA GPU "
                          "(auto picks the GPU when there is one)")
    return name


def classify_embeddings(
    emb: Embeddings, classifier_path: str | os.PathLike, output_dir: str | os.PathLike, *, device: str = "auto"
) -> tuple[Path, Path]:
    """Classify every frame and write prediction_results.txt and prediction_results_highestscore.csv."""
    features = emb.features()  # [N, H_dna + H_esm]
    model = load_classifier(classifier_path, expected_input_dim=features.shape[1])
    probabilities = predict_probabilities(model, features, device=pick_device(device))
    return write_results(output_dir, emb.ids, probabilities)
