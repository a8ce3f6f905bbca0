"""Backdoor attack and purification benchmark pipeline.

Importable with torch, numpy and h5py alone: mlflow, snakemake, matplotlib and pandas are imported
lazily where they are needed, so the training and purification code also runs on a bare GPU box.
"""

__version__ = "0.1.0"
