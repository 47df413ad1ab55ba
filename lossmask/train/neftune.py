"""NEFTune (Jain et al. 2023): uniform noise on the input embeddings while training.

noise = U(-1, 1) · α / sqrt(L · d), with d the embedding width and L the sequence length. Here L is the
length of the *episode* the token belongs to, padding excluded (padding gets no noise). So an episode
gets the same noise scale whether it is trained alone, padded in a batch, or packed into a block with
others; the paper's L is the length of one unpadded example, which is exactly this. (TRL uses the
padded batch width instead, which makes the noise depend on what else is in the batch.)
"""

from __future__ import annotations

import torch


class NEFTune:
    """A forward hook on the input embedding; owns the per-token episode lengths of the current batch."""

    def __init__(self, model: torch.nn.Module, alpha: float):
        self.alpha = alpha
        self.lengths: torch.Tensor | None = None  # [B, T] episode length per token, set before each forward
        self._handle = model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if not module.training or self.alpha == 0:
            return output
        width = output.shape[-1]
        lengths = self.lengths
        if lengths is None or lengths.shape != output.shape[:2]:
            lengths = torch.full(output.shape[:2], float(output.shape[1]), device=output.device)
        lengths = lengths.to(device=output.device, dtype=torch.float32)
        scale = torch.where(
            lengths > 0, self.alpha / torch.sqrt(lengths.clamp(min=1) * width), torch.zeros_like(lengths)
        )
        noise = torch.empty(output.shape, device=output.device, dtype=torch.float32).uniform_(-1, 1)
        return output + (noise * scale[..., None]).to(output.dtype)

    def remove(self) -> None:
        self._handle.remove()
