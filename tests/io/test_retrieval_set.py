"""--retrieval: a CSV of image,caption rows read as a retrieval set, split for the report, and
measured by eval / compare on its own images (not the labelled ones)."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

import surgery
from surgery.audit.probe import captioned_images, caption_recalls
from surgery.errors import DataError
from surgery.eval.compare import compare
from surgery.eval.embedding import embed_images, embed_texts
from surgery.eval.encoders import TorchEncoder
from surgery.eval.evaluate import evaluate, spec_from_folder
from surgery.io.captions import caption_pairs
from surgery.io.retrieval import MIN_RETRIEVAL_IMAGES, load_retrieval_set
from surgery.metrics import retrieval_recall
from surgery.metrics.bias import BiasConventions
from surgery.world.generator import generate, write_split
from surgery.world.params import WorldParams


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """(labelled split, retrieval split): two draws of the bundled world (another seed for the second)."""
    root = tmp_path_factory.mktemp("retrieval")
    write_split(generate(WorldParams(), "eval", 60), root / "labelled")
    write_split(generate(WorldParams(seed=3), "eval", 48), root / "ret")
    return root / "labelled", root / "ret"


def _flat_set(tmp_path, splits, n=8, header="image,caption", per_image=2):
    """A retrieval CSV in a plain folder (images beside it, no labels.csv), ``per_image`` captions each."""
    folder = tmp_path / "flat"
    folder.mkdir()
    rows = [header]
    for i, src in enumerate(sorted((splits[1] / "images").iterdir())[:n]):
        shutil.copy(src, folder / f"im{i}.png")
        rows += [f"im{i}.png,caption {i} take {j}" for j in range(per_image)]
    (folder / "captions.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_a_world_split_and_a_flat_folder_load_with_every_caption(splits, tmp_path):
    ret = load_retrieval_set(str(splits[1] / "captions.csv"))
    assert ret.images_dir == str(splits[1] / "images") and len(ret) == 48 and ret.n_captions == 48
    flat = load_retrieval_set(str(_flat_set(tmp_path, splits) / "captions.csv"))
    assert flat.images_dir == str(tmp_path / "flat") and len(flat) == 8 and flat.n_captions == 16
    assert flat.captions["im3.png"] == ["caption 3 take 0", "caption 3 take 1"]
    assert flat.describe() == {"csv": str(tmp_path / "flat" / "captions.csv"), "images_dir": str(tmp_path / "flat"),
                               "images": 8, "captions": 16}


def test_split_is_disjoint_deterministic_and_keeps_captions_with_their_images(splits, tmp_path):
    ret = load_retrieval_set(str(_flat_set(tmp_path, splits, n=20) / "captions.csv"))
    chosen, report = ret.split(0.5)
    assert len(chosen) == len(report) == 10
    assert not set(chosen.files) & set(report.files) and set(chosen.files) | set(report.files) == set(ret.files)
    assert all(report.captions[f] == ret.captions[f] for f in report.files)
    assert ret.split(0.5)[1].files == report.files  # the same draw every run
    assert ret.split(0.5, seed=1)[1].files != report.files
    assert ret.split(0.0) == (ret, ret)
    with pytest.raises(DataError, match="leaves 4 of its 20 images for the report"):
        ret.split(0.2)


def test_bad_retrieval_sets_are_refused_with_what_to_do(splits, tmp_path):
    folder = _flat_set(tmp_path, splits)
    (folder / "im5.png").unlink()
    with pytest.raises(DataError, match=r"image 'im5.png' is not under .* \(1 of 8 missing\)"):
        load_retrieval_set(str(folder / "captions.csv"))
    with pytest.raises(DataError, match="expected a CSV"):
        load_retrieval_set(str(folder / "captions.json"))
    (tmp_path / "s").mkdir()
    small = _flat_set(tmp_path / "s", splits, n=MIN_RETRIEVAL_IMAGES - 1)
    with pytest.raises(DataError, match=f"has {MIN_RETRIEVAL_IMAGES - 1} images"):
        load_retrieval_set(str(small / "captions.csv"))
    with pytest.raises(DataError, match="no 'caption' column"):
        (tmp_path / "bad.csv").write_text("image,text\nim0.png,x\n")
        load_retrieval_set(str(tmp_path / "bad.csv"))
    with pytest.raises(DataError, match="is not a folder"):
        load_retrieval_set(str(splits[1] / "captions.csv"), str(tmp_path / "nowhere"))


def test_recall_is_measured_on_the_retrieval_set_and_equals_a_plain_reference(splits):
    """The report's recall is the retrieval set's (its images and captions), equal to
    retrieval_recall on the encoder's own embeddings of them; the labelled images' world captions
    are not used when a retrieval set is given, and --captions with --retrieval is refused."""
    labelled, ret_dir = splits
    ret = load_retrieval_set(str(ret_dir / "captions.csv"))
    encoder = TorchEncoder(surgery.load("builtin:world"))
    spec = spec_from_folder(str(labelled), str(labelled / "labels.csv"), conventions=BiasConventions(k=10),
                            retrieval=ret)
    assert spec.captions is None and spec.describe()["retrieval_set"]["images"] == 48
    report = evaluate(encoder, spec)
    images = F.normalize(embed_images(encoder, ret.images_dir, ret.files).embeddings, dim=-1)
    texts, owners = caption_pairs(ret.captions, ret.files)
    keys = [" ".join(t.lower().split()) for t in texts]
    want = retrieval_recall(embed_texts(encoder, texts), images, torch.from_numpy(owners), (1, 5, 10), text_keys=keys)
    assert report["retrieval"] == pytest.approx(want, abs=1e-9)
    assert report["retrieval_set"] == {"n_images": 48, "skipped": 0}
    own = evaluate(encoder, spec_from_folder(str(labelled), str(labelled / "labels.csv"),
                                             conventions=BiasConventions(k=10)))
    # without the retrieval set, recall is the labelled split's own (60 images with world captions)
    assert own["retrieval"]["n_image_queries"] == 60 and report["retrieval"]["n_image_queries"] == 48
    with pytest.raises(DataError, match="pass one of them"):
        spec_from_folder(str(labelled), str(labelled / "labels.csv"), captions_path=str(labelled / "captions.csv"),
                         retrieval=ret)


def test_compare_of_a_text_only_edit_embeds_the_retrieval_images_once_with_the_same_recall(splits):
    from surgery.edit.bake import bake
    from surgery.edit.plan import BalanceEdit, SurgeryPlan

    labelled, ret_dir = splits
    spec = spec_from_folder(str(labelled), str(labelled / "labels.csv"), conventions=BiasConventions(k=10),
                            retrieval=load_retrieval_set(str(ret_dir / "captions.csv")))
    gen = torch.Generator().manual_seed(2)
    loaded = surgery.load("builtin:world")
    dim = loaded.model.text_projection.shape[1]
    bake(loaded.model, SurgeryPlan(balance=[BalanceEdit("text", (0.3 * torch.randn(dim, 2, generator=gen)).tolist(),
                                                        (torch.randn(dim, 2, generator=gen) / 6).tolist())]))
    before, after = TorchEncoder(surgery.load("builtin:world")), TorchEncoder(loaded)
    two_passes = compare(before, after, spec)
    calls = []
    original = after.encode_images
    after.encode_images = lambda x: calls.append(len(x)) or original(x)
    one_pass = compare(before, after, spec, same_images=True)
    assert calls == []
    assert one_pass["after"]["retrieval"] == pytest.approx(two_passes["after"]["retrieval"], abs=1e-9)
    assert one_pass["after"]["retrieval"] != one_pass["before"]["retrieval"]  # the text edit shows in recall


def test_captioned_images_pair_every_caption_with_its_image(splits, tmp_path):
    """Several captions per image: each caption's owner is its image's row, and the recalls equal
    caption_recalls with those owners."""
    ret = load_retrieval_set(str(_flat_set(tmp_path, splits, n=8, per_image=2) / "captions.csv"))
    loaded = surgery.load("builtin:world")
    images = captioned_images(ret, loaded.preprocess)
    assert len(images) == 8 and images.owners.tolist() == [i // 2 for i in range(16)]
    assert images.captions[5] == "caption 2 take 1"
    gen = torch.Generator().manual_seed(0)
    img, cap = F.normalize(torch.randn(8, 16, generator=gen), dim=-1), F.normalize(torch.randn(16, 16, generator=gen), dim=-1)
    both = caption_recalls(img, cap, images.captions, owners=images.owners)
    assert images.recalls(img, cap) == {"recall": both["t2i"], "recall_i2t": both["i2t"]}
    keys = [c.lower() for c in images.captions]
    plain = retrieval_recall(cap, img, torch.tensor([i // 2 for i in range(16)]), (5,), text_keys=keys)
    assert both["t2i"] == plain["t2i@5"] and both["i2t"] == plain["i2t@5"]


@pytest.mark.parametrize("same_images", [True, False])
def test_the_retrieval_sets_images_are_told_to_their_own_progress(splits, same_images, tmp_path):
    """A long report says which images it is embedding: the labelled ones (60) to ``progress``,
    the retrieval set's (48) to ``retrieval_progress``, with or without an embedding cache pass."""
    from surgery.eval.embedding import EmbedOptions

    labelled, ret_dir = splits
    spec = spec_from_folder(str(labelled), str(labelled / "labels.csv"), conventions=BiasConventions(k=10),
                            retrieval=load_retrieval_set(str(ret_dir / "captions.csv")))
    main, other = [], []
    encoder = TorchEncoder(surgery.load("builtin:world"))
    compare(encoder, encoder, spec, EmbedOptions(cache_dir=str(tmp_path / "cache")),
            progress=lambda done, total: main.append(total), same_images=same_images,
            retrieval_progress=lambda done, total: other.append(total))
    assert set(main) == {60} and set(other) == {48}
