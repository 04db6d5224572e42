"""Probe inputs an export is checked on (example, batch-1, odd-batch and real-prompt inputs per
tower), and the check that a model's outputs on them are finite.
"""
from __future__ import annotations

import torch

from surgery.errors import SurgeryError
from surgery.model.loading import LoadedModel
from surgery.model.preprocess import tokenize


def example_inputs(loaded: LoadedModel, tower: str) -> tuple[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if tower == "vision":
        size = loaded.preprocess["size"]
        h, w = (size, size) if isinstance(size, int) else size
        return (torch.randn(2, 3, h, w, generator=gen),)
    ctx = loaded.tokenizer["context_length"]
    vocab = loaded.config["text_cfg"].get("vocab_size", 49408)
    ids = torch.randint(1, vocab - 1, (2, ctx), generator=gen)
    ids[:, -1] = vocab - 1  # an end-of-text token (the argmax) in every row
    return (ids,)


def gate_inputs(loaded: LoadedModel, tower: str) -> list[torch.Tensor]:
    """Extra parity-gate inputs: batch 1 and an odd batch; for text, real prompts through the
    model's tokenizer (end-of-text mid-sequence, zero padding)."""
    gen = torch.Generator().manual_seed(1)
    if tower == "vision":
        size = loaded.preprocess["size"]
        h, w = (size, size) if isinstance(size, int) else size
        return [torch.randn(1, 3, h, w, generator=gen), torch.randn(3, 3, h, w, generator=gen)]

    prompts = tokenize(["a photo of a dog", "a diagram", "two people talking in a park at night"], loaded.tokenizer)
    return [prompts[:1], prompts]


@torch.no_grad()
def check_finite_outputs(loaded: LoadedModel, towers: tuple[str, ...] = ("vision", "text")) -> None:
    """Refuse a model whose embeddings on the probe inputs hold NaN or inf (a broken plan or broken
    weights would otherwise ship, and NaN slips through a max-abs-error gate)."""
    model = loaded.model
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    for tower in towers:
        encode = model.encode_image if tower == "vision" else model.encode_text
        for batch in (example_inputs(loaded, tower)[0], *gate_inputs(loaded, tower)):
            batch = batch.to(device, dtype) if tower == "vision" else batch.to(device)
            if not torch.isfinite(encode(batch)).all():
                raise SurgeryError(f"the {tower} tower's embeddings are not finite (NaN or inf) on the probe inputs; "
                                   "the weights or the plan baked into them are broken: nothing was written")
