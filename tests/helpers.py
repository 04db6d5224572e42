"""Helpers shared by tests."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def embeddings(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def assert_same_embeddings(model_a, model_b, images, tokens, atol=1e-6):
    """Equal to ``atol`` absolute plus ``atol`` relative (float32 rounding of O(1) values)."""
    img_a, txt_a = embeddings(model_a, images, tokens)
    img_b, txt_b = embeddings(model_b, images, tokens)
    torch.testing.assert_close(img_a, img_b, atol=atol, rtol=atol)
    torch.testing.assert_close(txt_a, txt_b, atol=atol, rtol=atol)


def labelled_image_folder(tmp_path, n=12):
    """(images_dir, labels.csv): n 32x32 PNGs, alternately red and blue (column ``colour``)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = ["file,colour"]
    for i in range(n):
        colour = "red" if i % 2 == 0 else "blue"
        arr = np.zeros((32, 32, 3), dtype=np.uint8)
        arr[..., 0 if colour == "red" else 2] = 200
        arr += rng.integers(0, 40, size=arr.shape, dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i:02d}.png")
        rows.append(f"{i:02d}.png,{colour}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return str(folder), str(tmp_path / "labels.csv")


class IdentityImageEncoder(torch.nn.Module):
    """A 'CLIP' whose image embedding is its input: build_cache over it caches given rows as they are."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))  # one parameter, so the model has a weights hash

    def encode_image(self, x):
        return x


def random_probe(n: int = 40):
    """A ProbeSet of n random 32 px images: 2 groups, 4 concepts, 3 neutral queries (the audit tests' probe)."""
    from surgery.audit.probe import ProbeSet

    gen = torch.Generator().manual_seed(0)
    return ProbeSet(
        images=torch.randn(n, 3, 32, 32, generator=gen),
        groups=torch.arange(n) % 2, group_names=["a", "b"],
        queries=["q1", "q2", "q3"], group_prompts=["ga", "gb"],
        concepts=torch.arange(n) % 4, class_prompts=["c0", "c1", "c2", "c3"],
    )


def unit_texts(dim: int, count: int, seed: int) -> torch.Tensor:
    """(count, dim) random unit vectors standing in for text embeddings."""
    return torch.nn.functional.normalize(torch.randn(count, dim, generator=torch.Generator().manual_seed(seed)),
                                         dim=-1)
