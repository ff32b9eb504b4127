"""OmniMedVQA and MedVLM-R1 data: native layouts (built here in tmp dirs) to records, selection, errors."""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import datasets
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from conftest import CONF, compose_cfg
from medvr.data import LETTERS, MedVLMR1Test, OmniMedVQA, RecordError

MRI, CT, XRAY, US = "MR (Mag-netic Resonance Imaging)", "CT(Computed Tomography)", "X-Ray", "ultrasound"
# dataset -> (QA_information subfolder, native modality, items, options per question)
DATASETS = {
    "MR Knee": ("Open-access", MRI, 14, 4),
    "Chest CT Scan": ("Open-access", CT, 8, 3),
    "Chest X-Ray": ("Restricted-access", XRAY, 8, 2),
    "Thyroid US": ("Open-access", US, 2, 4),
}
SHORT = {MRI: "MRI", CT: "CT", XRAY: "X-ray", US: "Ultrasound"}
TYPES = ("Disease Diagnosis", "Modality Recognition")


def _row(dataset: str, i: int) -> dict:
    """Native row i of `dataset`: its key is option i % n; absent options are missing (CT) or null (X-ray)."""
    _, modality, _, n = DATASETS[dataset]
    options = [f"{dataset} finding {k}" for k in range(n)]
    row = {"question_id": f"{dataset}_{i:04d}", "question": f"What does this {dataset} image show? ({i})",
           "gt_answer": f" {options[i % n]} " if i == 1 else options[i % n],  # padded text still matches
           "image_path": f"Images/{dataset}/test/case {i} (a).png", "modality_type": modality,
           "question_type": TYPES[i % 2], "dataset": dataset}
    row.update({f"option_{LETTERS[k]}": option for k, option in enumerate(options)})
    if modality == XRAY:
        row.update(option_C=None, option_D=None)
    if dataset == "Chest CT Scan" and i == 0:  # one row of the real file names its modality `modality`
        row["modality"] = row.pop("modality_type")
    return row


def _expected(root: Path, dataset: str, i: int) -> dict:
    _, modality, _, n = DATASETS[dataset]
    return {"id": f"{dataset}/{dataset}_{i:04d}", "image": str(root / f"Images/{dataset}/test/case {i} (a).png"),
            "question": f"What does this {dataset} image show? ({i})",
            "options": [f"{dataset} finding {k}" for k in range(n)], "answer": LETTERS[i % n],
            "modality": SHORT[modality], "bbox": None, "question_type": TYPES[i % 2], "answer_type": "choice",
            "extra_images": None, "boxes": None, "dataset": dataset}


def _write_tree(root: Path, with_images: bool = True) -> Path:
    for dataset, (access, _, count, _) in DATASETS.items():
        rows = [_row(dataset, i) for i in range(count)]
        folder = root / "QA_information" / access
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{dataset}.json").write_text(json.dumps(rows, indent=1))
        for row in rows if with_images else []:
            image = root / row["image_path"]
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.new("L", (32, 32), color=7 * len(row["question_id"])).save(image)
    return root


@pytest.fixture(scope="module")
def omni(tmp_path_factory) -> Path:
    return _write_tree(tmp_path_factory.mktemp("OmniMedVQA"))


def _source(cls, yaml: str, **overrides):
    """The source built from its conf/data YAML defaults, as Hydra would, with `overrides`."""
    settings = OmegaConf.to_container(OmegaConf.load(Path(CONF) / "data" / yaml).source)
    settings.pop("_target_")
    return cls(**{**settings, **overrides})


def _omni_source(root: Path, **overrides) -> OmniMedVQA:
    return _source(OmniMedVQA, "omnimedvqa.yaml", path=str(root), **overrides)


def _rows(split: datasets.Dataset) -> list[dict]:
    """A split's records with the image as its file path."""
    rows = split.cast_column("image", datasets.Image(decode=False)).to_list()
    return [{**row, "image": row["image"]["path"]} for row in rows]


def _ids(split: datasets.Dataset) -> list[str]:
    return list(split["id"])


def _medvlm_r1_cfg(root: Path, tmp_path: Path, *more: str):
    """experiment=medvlm_r1 on the fixture, with counts small enough for it."""
    return compose_cfg(["experiment=medvlm_r1", f"data.path={root}", "data.source.sizes.train={MRI:4}",
                        "data.source.sizes.val={MRI:2}", "data.source.sizes.test={MRI:3,CT:3,X-ray:3}", *more],
                       tmp_path, tmp_path / "cache")


def _medvlm_r1_selection(root: Path, tmp_path: Path, *more: str) -> OmniMedVQA:
    return instantiate(_medvlm_r1_cfg(root, tmp_path, *more).data.source)


def test_native_rows_become_exactly_the_expected_records(omni):
    splits = _omni_source(omni, sizes={"train": None, "val": 3, "test": 4}).load()
    got = sorted((row for split in splits.values() for row in _rows(split)), key=lambda row: row["id"])
    want = sorted((_expected(omni, d, i) for d, (_, _, count, _) in DATASETS.items() for i in range(count)),
                  key=lambda row: row["id"])
    assert got == want
    assert [len(splits[s]) for s in ("train", "val", "test")] == [32 - 7, 3, 4]


def test_filters_keep_only_the_selected_items(omni):
    source = _omni_source(omni, modalities=["CT", XRAY], question_types=["Disease Diagnosis"],
                          sizes={"train": None, "val": 1, "test": 1})
    rows = [row for split in source.load().values() for row in _rows(split)]
    assert sorted(row["id"] for row in rows) == sorted(
        f"{d}/{d}_{i:04d}" for d in ("Chest CT Scan", "Chest X-Ray") for i in range(0, 8, 2))
    only_knee = _omni_source(omni, datasets=["MR Knee"], sizes={"train": None, "val": 2, "test": 2}).load()
    assert {row["modality"] for split in only_knee.values() for row in _rows(split)} == {"MRI"}
    native = _omni_source(omni, modality_names={}, sizes={"train": None, "val": 2, "test": 2}).load()
    assert {modality for split in native.values() for modality in split["modality"]} == {MRI, CT, XRAY, US}


def test_medvlm_r1_selection_counts_disjointness_and_seeded_order(omni, tmp_path):
    splits = _medvlm_r1_selection(omni, tmp_path).load()
    modalities = {split: collections.Counter(rows["modality"]) for split, rows in splits.items()}
    assert modalities == {"train": {"MRI": 4}, "val": {"MRI": 2}, "test": {"MRI": 3, "CT": 3, "X-ray": 3}}
    ids = {split: _ids(rows) for split, rows in splits.items()}
    assert len({i for split in ids.values() for i in split}) == 4 + 2 + 9  # disjoint
    again = _medvlm_r1_selection(omni, tmp_path).load()
    assert {split: _ids(rows) for split, rows in again.items()} == ids  # same seed, same items in the same order
    other = _medvlm_r1_selection(omni, tmp_path, "data.source.seed=7").load()
    assert _ids(other["train"]) != ids["train"]
    # train is "the first 4 of the MRI items shuffled with the seed", whatever else is in the pool
    mri_only = _medvlm_r1_selection(omni, tmp_path, "data.source.modalities=[MRI]",
                                    "data.source.sizes.test=null").load()
    assert _ids(mri_only["train"]) == ids["train"] and _ids(mri_only["val"]) == ids["val"]


def _write_test_file(folder: Path, omni: Path) -> Path:
    """A MedVLM-R1-style test JSON: list-valued images, prefixed options, wrapped solutions."""
    images = folder / "huatuo" / "images"
    images.mkdir(parents=True)
    for name in ("brain002206.png", "chest 01.png"):
        Image.new("L", (32, 32)).save(images / name)
    shutil.copy(omni / "Images/MR Knee/test/case 5 (a).png", images / "case 5 (a).png")
    rows = [
        {"image": ["images/brain002206.png"], "question": "What is apparent in this image?",
         "options": ["A. Hemorrhage", "B. Acute infarct", "C. Abscess", "D. Chronic infarct"],
         "solution": "<answer> D </answer>", "subset": MRI, "dataset": "OmniMedVQA"},
        {"image": ["images/chest 01.png"], "question": "Which organ is shown?",
         "options": ["A) Lung", "B) Liver", "C) Heart"], "solution": "b", "subset": CT},
        # the same item as MR Knee row 5 of the release: it must stay out of train and val
        {"image": ["images/case 5 (a).png"], "question": "What does this MR Knee image show? (5)",
         "options": [f"MR Knee finding {k}" for k in range(4)], "solution": "B", "subset": XRAY},
    ]
    path = folder / "MRI_CT_XRAY_300each_dataset.json"
    path.write_text(json.dumps(rows))
    return path


def test_medvlm_r1_test_file_rows_become_records(omni, tmp_path):
    DS = "OmniMedVQA"  # noqa: N806 (the file's `dataset` column)
    path = _write_test_file(tmp_path, omni)
    splits = _source(MedVLMR1Test, "medvlm_r1_test.yaml", path=str(path), image_root=str(tmp_path / "huatuo")).load()
    assert sorted(splits) == ["test", "val"] and _rows(splits["val"]) == _rows(splits["test"])
    root = tmp_path / "huatuo"
    assert _rows(splits["test"]) == [
        {"id": "MRI_CT_XRAY_300each_dataset/0000", "image": str(root / "images/brain002206.png"),
         "question": "What is apparent in this image?",
         "options": ["Hemorrhage", "Acute infarct", "Abscess", "Chronic infarct"], "answer": "D",
         "modality": "MRI", "bbox": None, "question_type": None, "answer_type": "choice", "extra_images": None, "boxes": None, "dataset": DS},
        {"id": "MRI_CT_XRAY_300each_dataset/0001", "image": str(root / "images/chest 01.png"),
         "question": "Which organ is shown?", "options": ["Lung", "Liver", "Heart"], "answer": "B",
         "modality": "CT", "bbox": None, "question_type": None, "answer_type": "choice", "extra_images": None, "boxes": None, "dataset": None},
        {"id": "MRI_CT_XRAY_300each_dataset/0002", "image": str(root / "images/case 5 (a).png"),
         "question": "What does this MR Knee image show? (5)", "options": [f"MR Knee finding {k}" for k in range(4)],
         "answer": "B", "modality": "X-ray", "bbox": None, "question_type": None, "answer_type": "choice", "extra_images": None, "boxes": None, "dataset": None},
    ]
    # with no image_root, paths are relative to the JSON's folder
    default = _source(MedVLMR1Test, "medvlm_r1_test.yaml", path=str(path)).load()
    assert _rows(default["test"])[0]["image"] == str(tmp_path / "images/brain002206.png")


def test_test_file_replaces_the_test_split_and_its_items_leave_train_and_val(omni, tmp_path):
    path = _write_test_file(tmp_path, omni)
    splits = _medvlm_r1_selection(omni, tmp_path, "data.source.sizes.train={MRI:11}", "data.source.sizes.val={MRI:2}",
                                  f"data.source.test_file={path}",
                                  f"data.source.test_image_root={tmp_path / 'huatuo'}").load()
    assert _ids(splits["test"]) == [f"MRI_CT_XRAY_300each_dataset/{i:04d}" for i in range(3)]
    # 14 MRI items less the one in the test file fill train and val exactly
    assert "MR Knee/MR Knee_0005" not in {*_ids(splits["train"]), *_ids(splits["val"])}
    assert len(splits["train"]) + len(splits["val"]) == 13


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"modalities": ["MRT"]}, r"data.source.modalities: \['MRT'\] occur in no QA row.*present: \['CT'"),
        ({"sizes": {"train": {"CT": 100}, "val": 1, "test": 1}},
         r"sizes.train asks for 100 items of modality 'CT', but only 8 are left.*selection: .*data.source.sizes="),
        ({"datasets": ["Thyroid US"], "sizes": {"train": None, "val": 1, "test": 1}},
         r"split 'train' is empty .*data.source.datasets=\['Thyroid US'\]"),
        ({"sizes": {"train": None, "val": None, "test": 1}}, r"at most one split may be null"),
        ({"sizes": {"train": 0, "val": 1, "test": 1}}, r"data.source.sizes.train=0: expected an int >= 1"),
    ],
)
def test_a_bad_selection_names_the_selection(omni, setting, message):
    with pytest.raises(ValueError, match=message):
        _omni_source(omni, **setting).load()


def test_gt_answer_matching_no_option_names_file_row_and_fix(tmp_path):
    root = _write_tree(tmp_path / "OmniMedVQA", with_images=False)
    file = root / "QA_information" / "Open-access" / "Chest CT Scan.json"
    rows = json.loads(file.read_text())
    rows[3]["gt_answer"] = "Pneumonia"
    file.write_text(json.dumps(rows))
    (root / "Images").mkdir()
    with pytest.raises(RecordError) as info:
        _omni_source(root).load()
    assert str(info.value).startswith(f"{file} row 3 (question_id=Chest CT Scan_0003): gt_answer 'Pneumonia' "
                                      "matches no option")
    assert "fix gt_answer" in str(info.value) and "data.source.datasets" in str(info.value)


def test_missing_folders_and_images_name_the_path_and_the_layout(tmp_path):
    root = _write_tree(tmp_path / "OmniMedVQA", with_images=False)
    with pytest.raises(FileNotFoundError, match=rf"'{root / 'Images'}' does not exist.*QA_information/"):
        _omni_source(root).load()
    with pytest.raises(FileNotFoundError, match=r"QA_information' does not exist.*DIR/Images"):
        _omni_source(tmp_path / "elsewhere").load()
    (root / "Images").mkdir()  # the folder, but no Restricted-access images: name the row and the way out
    with pytest.raises(FileNotFoundError, match=r"Chest X-Ray.json row \d+ .*does not exist.*access=\[Open-access\]"):
        _omni_source(root, datasets=["Chest X-Ray"], sizes={"train": 2, "val": 1, "test": 1}).load()


def test_every_option_composes_and_the_datamodule_serves_the_splits(omni, tmp_path):
    cfg = compose_cfg(["data=omnimedvqa", f"data.path={omni}", "data.source.sizes.val=3",
                       "data.source.sizes.test=5"], tmp_path, tmp_path / "cache")
    data = instantiate(cfg.data)
    data.setup("fit")
    assert {split: len(rows) for split, rows in data.splits.items()} == {"train": 24, "val": 3, "test": 5}

    data = instantiate(_medvlm_r1_cfg(omni, tmp_path).data)
    data.setup("fit")
    assert {split: len(rows) for split, rows in data.splits.items()} == {"train": 4, "val": 2, "test": 9}
    assert data.modalities() == ["MRI"] and next(iter(data.train_dataloader()))[0]["modality"] == "MRI"

    path = _write_test_file(tmp_path, omni)
    cfg = compose_cfg(["data=medvlm_r1_test", f"data.path={path}",
                       f"data.source.image_root={tmp_path / 'huatuo'}"], tmp_path, tmp_path / "cache")
    data = instantiate(cfg.data)
    data.setup("validate")
    assert data.modalities() == ["CT", "MRI", "X-ray"] and len(data.splits["test"]) == 3

