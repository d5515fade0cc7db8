"""The model and data of the FLARE-shaped PyTorch scripts: a small network on
scikit-learn's digits (shipped with the package), each site its own share."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class SimpleNetwork(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.bn = nn.BatchNorm1d(32)  # an int64 buffer (num_batches_tracked) travels too
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.bn(self.fc1(x))))


def site_data(config: dict[str, Any], batch_size: int) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """This site's share of the training digits, and the common test set."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    test, train_x, train_y = slice(0, 297), x[297:], y[297:]
    i, n = int(config.get("site_index", 0)), int(config.get("sites", 1))
    mine = slice(i, None, n)

    def loader(xs: np.ndarray, ys: np.ndarray, shuffle: bool) -> DataLoader[Any]:
        ds = TensorDataset(torch.from_numpy(xs), torch.from_numpy(ys.astype(np.int64)))
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle)

    return loader(train_x[mine], train_y[mine], True), loader(x[test], y[test], False)
