"""Label, caption and image-folder formats, and their bad-input errors."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from surgery.errors import DataError
from surgery.io.captions import caption_pairs, load_captions
from surgery.io.images import ImageFolderDataset
from surgery.io.labels import age_band, load_labels, parse_utkface_name


def _png_bytes(seed: int, size: int = 8) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _image_folder(root, n_good: int, n_corrupt: int = 0, n_truncated: int = 0) -> list[str]:
    root.mkdir(exist_ok=True)
    names = []
    for i in range(n_good):
        (root / f"good{i:02d}.png").write_bytes(_png_bytes(i))
        names.append(f"good{i:02d}.png")
    for i in range(n_corrupt):
        (root / f"corrupt{i}.png").write_bytes(b"not an image at all")
        names.append(f"corrupt{i}.png")
    for i in range(n_truncated):
        data = _png_bytes(100 + i, size=32)
        (root / f"trunc{i}.png").write_bytes(data[: len(data) // 2])  # header intact, pixels cut
        names.append(f"trunc{i}.png")
    return names


# ----------------------------------------------------------------------------------------- labels
def test_fairface_csv_keeps_every_column(tmp_path):
    path = tmp_path / "fairface_label_val.csv"
    path.write_text(
        "file,age,gender,race,service_test\n"
        "val/1.jpg,3-9,Male,East Asian,False\n"
        "val/2.jpg,50-59,Female,Indian,True\n"
    )
    table = load_labels(path, required=("gender", "race"), allowed={"gender": ("Male", "Female")})
    assert table.files == ["val/1.jpg", "val/2.jpg"]
    assert table.attributes["race"] == ["East Asian", "Indian"]
    assert table.attributes["service_test"] == ["False", "True"]
    codes, values = table.codes("gender", ["Male", "Female"])
    assert codes.tolist() == [0, 1] and values == ["Male", "Female"]


def test_generic_csv_with_filename_alias_and_bom(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes("\ufefffilename,skin\n a.png , dark\nb.png,light\n".encode("utf-8"))
    table = load_labels(path)
    assert table.files == ["a.png", "b.png"] and table.attributes == {"skin": ["dark", "light"]}
    codes, values = table.codes("skin")  # default order: sorted distinct values
    assert codes.tolist() == [0, 1] and values == ["dark", "light"]
    with pytest.raises(DataError, match="unknown values 'light'"):
        table.codes("skin", ["dark"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("file,gender\n", "no rows"),
        ("image_id,gender\n1,Male\n", "no 'file' column; columns that exist: 'image_id', 'gender'"),
        ("file,gender\na.png,Male\na.png,Female\n", "lists 'a.png' twice"),
        ("file,gender\na.png\n", "line 2 has 1 cells"),
        ("file,gender\n,Male\n", "empty file name"),
    ],
)
def test_bad_label_csv(tmp_path, text, message):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        load_labels(path)


def test_required_and_allowed_attributes(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("file,age,gender\na.png,20-29,Male\nb.png,30-39,Femal\n")
    with pytest.raises(DataError, match="no column 'race'; columns that exist: 'age', 'gender'"):
        load_labels(path, required=("race",))
    with pytest.raises(DataError, match="column 'gender' has unknown values 'Femal'; allowed: 'Female', 'Male'"):
        load_labels(path, allowed={"gender": {"Male", "Female"}})
    with pytest.raises(DataError, match="does not exist"):
        load_labels(tmp_path / "nope.csv")


def test_utkface_file_names(tmp_path):
    folder = tmp_path / "UTKFace"
    folder.mkdir()
    names = [
        "25_0_2_20170116174525125.jpg.chip.jpg",  # 25 y, male, Asian
        "3_1_0_20170109150557335.jpg",  # 3 y, female, White
        "75_1_4_20170110.jpg",  # 75 y, female, Others
        "39_1_20170116174525125.jpg.chip.jpg",  # a known malformed name (race missing)
        "notes.jpg",
    ]
    for name in names:
        (folder / name).write_bytes(b"")
    table = load_labels(folder)  # a folder -> UTKFace names
    assert table.files == names[:3]  # sorted order happens to be the listed order
    assert table.attributes["age"] == ["20-29", "3-9", "more than 70"]
    assert table.attributes["age_years"] == ["25", "3", "75"]
    assert table.attributes["gender"] == ["Male", "Female", "Female"]
    assert table.attributes["race"] == ["Asian", "White", "Others"]
    assert sorted(table.skipped) == ["39_1_20170116174525125.jpg.chip.jpg", "notes.jpg"]
    assert parse_utkface_name("20_2_0_1.jpg") is None  # gender id out of range


def test_utkface_folder_without_utk_names(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="named like UTKFace"):
        load_labels(tmp_path, format="utkface")


@pytest.mark.parametrize(
    ("years", "band"),
    [(0, "0-2"), (2, "0-2"), (3, "3-9"), (19, "10-19"), (69, "60-69"), (70, "more than 70"), (116, "more than 70")],
)
def test_age_bands(years, band):
    assert age_band(years) == band


# --------------------------------------------------------------------------------------- captions
def test_caption_csv_several_rows_per_file(tmp_path):
    path = tmp_path / "captions.csv"
    path.write_text('file,caption\na.png,a red circle\nb.png,"a square, blue"\na.png,a circle\n')
    caps = load_captions(path)
    assert caps == {"a.png": ["a red circle", "a circle"], "b.png": ["a square, blue"]}
    texts, owner = caption_pairs(caps, ["b.png", "a.png", "c.png"])
    assert texts == ["a square, blue", "a red circle", "a circle"] and owner.tolist() == [0, 1, 1]
    path.write_text("file,text\na.png,x\n")
    with pytest.raises(DataError, match="no 'caption' column; columns that exist: 'file', 'text'"):
        load_captions(path)


def test_karpathy_json_with_split_filter(tmp_path):
    data = {"images": [
        {"filepath": "val2014", "filename": "COCO_1.jpg", "split": "test",
         "sentences": [{"raw": "A dog."}, {"raw": "A brown dog. "}]},
        {"filepath": "val2014", "filename": "COCO_2.jpg", "split": "restval", "sentences": [{"raw": "A cat."}]},
        {"filename": "flickr_3.jpg", "split": "train", "sentences": [{"raw": "People."}]},
    ]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(data))
    assert load_captions(path, split="test") == {"val2014/COCO_1.jpg": ["A dog.", "A brown dog."]}
    assert list(load_captions(path, split=("test", "restval"), join_filepath=False)) == ["COCO_1.jpg", "COCO_2.jpg"]
    assert len(load_captions(path)) == 3
    with pytest.raises(DataError, match="no images in split val; splits present: restval, test, train"):
        load_captions(path, split="val")
    path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_captions(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(DataError, match="not a Karpathy-split file"):
        load_captions(path)


# ----------------------------------------------------------------------------------------- images
def test_image_folder_loads_and_skips_corrupt(tmp_path):
    names = _image_folder(tmp_path / "img", n_good=19, n_corrupt=1)
    ds = ImageFolderDataset(tmp_path / "img", names, max_skipped_fraction=0.1)
    assert len(ds) == 19 and len(ds.skipped) == 1
    assert ds.skipped[0].file == "corrupt0.png" and "UnidentifiedImageError" in ds.skipped[0].reason
    image, index = ds[3]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and index == 3
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0


def test_image_folder_index_refers_to_given_files(tmp_path):
    _image_folder(tmp_path, n_good=3)
    files = ["good00.png", "missing.png", "good02.png"]
    ds = ImageFolderDataset(tmp_path, files, transform=lambda im: torch.tensor(im.size), max_skipped_fraction=0.5)
    assert [ds[j][1] for j in range(len(ds))] == [0, 2]
    assert ds[1][0].tolist() == [8, 8]  # the transform is applied
    assert ds.skipped[0].file == "missing.png" and ds.skipped[0].reason == "file not found"


def test_too_many_corrupt_images_abort(tmp_path):
    names = _image_folder(tmp_path, n_good=9, n_corrupt=1)  # 10% skipped > default 5%
    with pytest.raises(DataError, match=r"1 of 10 images are unreadable \(10.0% > 5.0%\), e.g. 'corrupt0.png'"):
        ImageFolderDataset(tmp_path, names)


def test_truncated_image_is_skipped_lazily(tmp_path):
    names = _image_folder(tmp_path, n_good=4, n_truncated=1)
    ds = ImageFolderDataset(tmp_path, names, max_skipped_fraction=0.25)  # header scan passes it
    assert len(ds) == 5 and not ds.skipped
    seen = [int(i) for _, indices in ds.batches(batch_size=2) for i in indices]
    assert seen == [0, 1, 2, 3] and [s.file for s in ds.skipped] == ["trunc0.png"]
    full = ImageFolderDataset(tmp_path, names, max_skipped_fraction=0.25, prescan="full")  # found up front
    assert len(full) == 4 and [s.file for s in full.skipped] == ["trunc0.png"]
    strict = ImageFolderDataset(tmp_path, names, max_skipped_fraction=0.1)
    with pytest.raises(DataError, match="unreadable"):
        list(strict.batches(batch_size=2))


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(DataError, match="holds no images"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope")
    with pytest.raises(DataError, match="file list is empty"):
        ImageFolderDataset(tmp_path, [])
    with pytest.raises(DataError, match="allowed: none, header, full"):
        _image_folder(tmp_path, n_good=1)
        ImageFolderDataset(tmp_path, prescan="lazy")


def test_split_label_table_is_disjoint_stratified_and_reads_back(tmp_path):
    from surgery.io.labels import LabelTable, load_labels, split_label_table, write_labels_csv

    files = [f"{i:03d}.png" for i in range(40)]
    groups = ["a"] * 30 + ["b"] * 10
    table = LabelTable(files=files, attributes={"group": groups, "concept": [str(i % 3) for i in range(40)]})
    keep, held = split_label_table(table, 0.5, "group", seed=0)
    assert sorted(keep.files + held.files) == files and not set(keep.files) & set(held.files)
    assert held.attributes["group"].count("a") == 15 and held.attributes["group"].count("b") == 5
    assert keep.files == sorted(keep.files)  # table order kept
    again, _ = split_label_table(table, 0.5, "group", seed=0)
    assert again.files == keep.files and split_label_table(table, 0.5, "group", seed=1)[0].files != keep.files
    for row, name in enumerate(held.files):  # attributes stay with their files
        assert held.attributes["group"][row] == groups[files.index(name)]
    write_labels_csv(held, tmp_path / "held.csv")
    back = load_labels(tmp_path / "held.csv")
    assert back.files == held.files and back.attributes == held.attributes
    with pytest.raises(DataError, match="between 0 and 1"):
        split_label_table(table, 1.0)


def test_split_keeps_every_group_on_both_sides_and_refuses_what_it_cannot_split(tmp_path):
    from surgery.io.labels import LabelTable, split_label_table, write_labels_csv

    table = LabelTable(files=[f"{i}.png" for i in range(8)], attributes={"group": ["a"] * 2 + ["b"] * 6})
    for holdout in (0.1, 0.5, 0.8, 0.9):  # rounding would empty group a on one side at 0.1 / 0.8 / 0.9
        keep, held = split_label_table(table, holdout, "group")
        assert set(keep.attributes["group"]) == set(held.attributes["group"]) == {"a", "b"}
    lonely = LabelTable(files=["0.png", "1.png", "2.png"], attributes={"group": ["a", "b", "b"]})
    with pytest.raises(DataError, match="group 'a' has 1 labelled image"):
        split_label_table(lonely, 0.5, "group")
    clash = LabelTable(files=["0.png"], attributes={"File": ["x"]})
    with pytest.raises(DataError, match="named 'file'"):
        write_labels_csv(clash, tmp_path / "x.csv")
