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
