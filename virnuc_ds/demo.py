"""The demo bundle: tiny ESM-2, DNABERT-S and classifier in the real formats, plus a run config.

`virnuc-ds make-demo-models -o D` writes D/esm2_t2_demo.pt (fair-esm checkpoint), D/dnabert_s_demo/
(config.json, model.safetensors, tokenizer.json), D/classifier_demo.pth (pickled whole, as the
original saves it) and D/demo.yaml. The weights are random: predictions made with them mean
nothing; they exist to run and test the whole pipeline on a CPU in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

from .classify.mlp import MLPClassifier, save_original_style

DEMO_CONFIG = "demo.yaml"
DEMO_CLASSIFIER = "classifier_demo.pth"
DEMO_DNABERT_S = "dnabert_s_demo"


def write_demo_models(output_dir: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    from .models.demo import write_tiny_dnabert_s, write_tiny_esm2
    from .models.dnabert_s import DnabertSConfig

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    esm_path = Path(write_tiny_esm2(out, seed=seed))
    dna_dir = out / DEMO_DNABERT_S
    write_tiny_dnabert_s(dna_dir, seed=seed)
    esm_width = torch.load(esm_path, map_location="cpu", weights_only=False)["cfg"]["model"].encoder_embed_dim
    dna_width = DnabertSConfig.from_json_file(dna_dir / "config.json").hidden_size
    torch.manual_seed(seed)
    classifier = MLPClassifier(dna_width + esm_width, 16, 2).eval()
    with torch.no_grad():  # give BatchNorm non-trivial statistics
        classifier.bn1.running_mean.normal_(0, 0.1)
        classifier.bn1.running_var.uniform_(0.5, 1.5)
    save_original_style(classifier, out / DEMO_CLASSIFIER)
    config = {
        "models": {"esm2": esm_path.name, "dnabert_s": DEMO_DNABERT_S, "classifier": DEMO_CLASSIFIER},
        "esm2": {"toks_per_batch": 4096},
        "dnabert_s": {"toks_per_batch": 4096},
        "run": {"frames_per_part": 64},
    }
    text = (
        "# virnuc-ds demo config: tiny random models. Their predictions MEAN NOTHING; they only show the\n"
        "# pipeline working end to end. Real models: see ds_configs/virnuc_ds.yaml.\n" + yaml.safe_dump(config, sort_keys=False)
    )
    (out / DEMO_CONFIG).write_text(text)
    return {"esm2": esm_path, "dnabert_s": dna_dir, "classifier": out / DEMO_CLASSIFIER, "config": out / DEMO_CONFIG}
