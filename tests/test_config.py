"""Config loading: YAML and JSON, defaults, and errors that name the key."""

import json
from pathlib import Path

import pytest

from virnuc_ds.config import load_config
from virnuc_ds.errors import ConfigError

EXAMPLE = Path(__file__).parents[1] / "ds_configs" / "virnuc_ds.yaml"


def test_documented_example_loads_and_equals_defaults():
    cfg = load_config(EXAMPLE)
    defaults = load_config(None)
    assert cfg.to_dict()["esm2"] == defaults.to_dict()["esm2"]
    assert cfg.esm2.replace_with_kernel_inject is True


def test_json_and_yaml_agree(tmp_path):
    data = {"esm2": {"dtype": "fp32", "toks_per_batch": 4096}, "prepare": {"expected_length": 300}}
    (tmp_path / "c.json").write_text(json.dumps(data))
    (tmp_path / "c.yaml").write_text("esm2:\n  dtype: fp32\n  toks_per_batch: 4096\nprepare:\n  expected_length: 300\n")
    assert load_config(tmp_path / "c.json").to_dict() == load_config(tmp_path / "c.yaml").to_dict()


@pytest.mark.parametrize(
    "text, message",
    [
        ("esm2:\n  dtyp: bf16\n", "unknown config key 'esm2.dtyp' (did you mean 'dtype'?)"),
        ("esm:\n  dtype: bf16\n", "unknown config key 'esm'"),
        ("esm2:\n  toks_per_batch: lots\n", "esm2.toks_per_batch: expected an integer"),
        ("esm2:\n  replace_with_kernel_inject: 1\n", "esm2.replace_with_kernel_inject: expected true or false"),
        ("esm2:\n  dtype: int8\n", "esm2.dtype: must be one of"),
        ("prepare:\n  expected_length: 400\n", "prepare.expected_length: must be 300 or 500"),
        ("[1, 2\n", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping"),
    ],
)
def test_bad_config(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_relative_model_paths_resolve_against_config_folder(tmp_path):
    (tmp_path / "m.pth").write_bytes(b"")
    (tmp_path / "c.yaml").write_text("models:\n  classifier: m.pth\n")
    assert load_config(tmp_path / "c.yaml").models.classifier == str((tmp_path / "m.pth").resolve())
