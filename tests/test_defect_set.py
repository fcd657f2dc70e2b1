"""The defect-set format: write -> read -> Hugging Face dataset, manifest safety, real MVTec folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from synth.core.defect_set import DefectSetWriter, read_defect_set
from synth.core.errors import InputError
from synth.toyset import make_texture_defect_set


def test_toyset_layout_and_roundtrip(brick_set):
    root = brick_set.root
    assert (root / "train/good").is_dir() and (root / "test/spot").is_dir()
    assert (root / "ground_truth/scratch").is_dir()
    assert len(list((root / "ground_truth/spot").glob("*_mask.png"))) == 8
    again = read_defect_set(root)
    assert [s.to_row() for s in again] == [s.to_row() for s in brick_set]
    assert again.defect_classes == ["scratch", "spot"]
    assert len(again.select(split="train")) == 16 and len(again.select(anomalous=True)) == 16
    info = json.loads((root / "dataset_info.json").read_text())
    assert info["counts"]["test/spot"] == 8


def test_planted_defects_match_their_masks(brick_set):
    for sample in brick_set.select(defect_class="spot")[:3]:
        image = brick_set.load_image(sample)
        mask = brick_set.load_mask(sample, image.shape[:2])
        assert 0.01 < mask.mean() < 0.5
        # Darkened to 45 %: defect pixels are darker on average than the rest.
        assert image[mask].mean() < 0.7 * image[~mask].mean()


def test_mvtec_scan_without_manifest_matches(brick_set, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(brick_set.root, copy)
    (copy / "manifest.jsonl").unlink()
    scanned = read_defect_set(copy)
    assert sorted((s.image, s.mask, s.defect_class) for s in scanned) == sorted(
        (s.image, s.mask, s.defect_class) for s in brick_set)


def test_hf_export(brick_set):
    hf = brick_set.to_hf_dataset()
    assert len(hf) == len(brick_set)
    assert hf.features["label"].names == ["good", "scratch", "spot"]
    row = hf[[s.defect_class for s in brick_set].index("spot")]
    assert row["defect_class"] == "spot" and row["label"] == 2
    image = np.asarray(row["image"])
    mask = np.asarray(row["mask"])
    assert image.shape[:2] == mask.shape[:2] == (64, 64)
    assert json.loads(row["params"])["procedure"] == "spot"
    assert hf[0]["mask"] is None  # normal samples have no mask


def test_determinism(tmp_path):
    a = make_texture_defect_set(tmp_path / "a", texture="grass", n_train=3, n_test_good=1, n_test_per_class=2)
    b = make_texture_defect_set(tmp_path / "b", texture="grass", n_train=3, n_test_good=1, n_test_per_class=2)
    for sa, sb in zip(a, b, strict=True):
        assert (a.root / sa.image).read_bytes() == (b.root / sb.image).read_bytes()


def test_manifest_paths_cannot_escape_root(tmp_path, brick_set):
    root = tmp_path / "evil"
    (root / "train/good").mkdir(parents=True)
    row = {"image": "../../etc/passwd", "split": "train", "defect_class": "good"}
    (root / "manifest.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(InputError, match="outside the dataset root"):
        read_defect_set(root)
    (root / "manifest.jsonl").write_text(json.dumps({**row, "image": "/etc/passwd"}) + "\n")
    with pytest.raises(InputError, match="outside the dataset root"):
        read_defect_set(root)


def test_truncated_manifest_line_is_dropped_and_writer_resumes(tmp_path):
    writer = DefectSetWriter(tmp_path / "set")
    image = np.zeros((8, 8, 3), np.uint8)
    writer.add(image, name="a", split="train")
    writer.add(image, name="b", split="train")
    manifest = tmp_path / "set/manifest.jsonl"
    text = manifest.read_text()
    manifest.write_text(text[:-10])  # a kill in the middle of the second row
    resumed = DefectSetWriter(tmp_path / "set")
    assert [s.name for s in resumed.samples] == ["a"]
    assert not resumed.has("b", split="train")
    resumed.add(image, name="b", split="train")
    assert manifest.read_text() == text


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_defect_set(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="MVTec AD layout"):
        read_defect_set(tmp_path / "empty")
    writer = DefectSetWriter(tmp_path / "w")
    with pytest.raises(InputError, match="needs a mask"):
        writer.add(np.zeros((8, 8, 3), np.uint8), name="x", split="test", defect_class="crack")
    with pytest.raises(InputError, match="mask"):
        writer.add(np.zeros((8, 8, 3), np.uint8), name="x", split="test", defect_class="crack",
                   mask=np.zeros((4, 4), bool))
    with pytest.raises(InputError, match="invalid sample name"):
        writer.add(np.zeros((8, 8, 3), np.uint8), name="../x", split="train")


def test_defect_without_mask_is_a_clear_error(brick_set, tmp_path):
    import shutil

    copy = tmp_path / "nomask"
    shutil.copytree(brick_set.root, copy)
    (copy / "manifest.jsonl").unlink()
    shutil.rmtree(copy / "ground_truth/spot")
    dataset = read_defect_set(copy)
    sample = dataset.select(defect_class="spot")[0]
    with pytest.raises(InputError, match="has no mask"):
        dataset.load_mask(sample)


@pytest.mark.real_data
def test_real_magnetic_tile_folder(magnetic_tile):
    dataset = read_defect_set(magnetic_tile)
    assert dataset.defect_classes == ["blowhole", "break", "crack", "fray", "uneven"]
    assert len(dataset.select(split="train")) == 752
    assert len(dataset.select(split="test", defect_class="good")) == 200
    assert len(dataset.select(anomalous=True)) == 392
    for defect_class in dataset.defect_classes:
        sample = dataset.select(defect_class=defect_class)[0]
        image = dataset.load_image(sample)  # grayscale JPEG -> RGB
        mask = dataset.load_mask(sample, image.shape[:2])
        assert image.ndim == 3 and image.shape[2] == 3 and mask.any()
