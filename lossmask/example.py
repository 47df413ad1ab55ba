"""A tokenized, masked, verified training sequence: what the mask produces and the store writes."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lossmask.episode import Source


@dataclass
class Example:
    """One sequence ready to store.

    ``weights`` is the per-token loss weight (0.0 = no loss); ``labels`` the per-token ``Label``
    (uint8) so validate and inspect can check and show the mask without re-rendering.
    """

    input_ids: np.ndarray  # uint32
    weights: np.ndarray  # float32
    labels: np.ndarray  # uint8
    source: Source
    straddling: int = 0  # tokens that straddle a trained span edge (see mask.py for the policy)
    truncated: bool = False

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def trained_tokens(self) -> int:
        return int(np.count_nonzero(self.weights))
