"""Seeding, as the reference does it."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def fix_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) and make cuDNN deterministic.

    Also sets ``PYTHONHASHSEED`` and ``CUBLAS_WORKSPACE_CONFIG`` as the reference does, so runs on a GPU can be
    made deterministic too.
    """
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
