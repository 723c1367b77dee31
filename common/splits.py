"""Splitting a site's images into training and validation: stratified by label pattern, and by patient where patients
are known; the split step of a site's data path."""

from __future__ import annotations

import numpy as np

from common.errors import DataError


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, validation), stratified by the label pattern and reproducible from the seed."""
    rng = np.random.default_rng([seed, 0x5B117])
    patterns = np.unique(labels, axis=0, return_inverse=True)[1].reshape(-1)
    train, val = [], []
    for pattern in np.unique(patterns):
        rows = rng.permutation(np.flatnonzero(patterns == pattern))
        n_val = int(round(len(rows) * val_fraction))
        if len(rows) >= 2:
            n_val = min(max(n_val, 1), len(rows) - 1)  # each split sees every class it can
        val.append(rows[:n_val])
        train.append(rows[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def patient_split(labels: np.ndarray, patients: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, validation) with every patient on one side only, stratified by label pattern where the
    patients allow, reproducible from the seed; an image without a patient ID ('') counts as a patient of its own."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    n = len(labels)
    groups = np.where(patients == "", np.char.add("\0row", np.arange(n).astype(str)), patients.astype(str))
    n_splits = max(2, int(round(1 / val_fraction)))
    if len(np.unique(groups)) < n_splits:
        raise DataError(f"{len(np.unique(groups))} patient(s): too few to keep a validation share of {val_fraction:g} apart by patient")
    patterns = np.unique(labels, axis=0, return_inverse=True)[1].reshape(-1)
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the least populated class has only k members": stratified where it can be
        train, val = next(folds.split(np.zeros(n), patterns, groups))
    return np.sort(train), np.sort(val)
