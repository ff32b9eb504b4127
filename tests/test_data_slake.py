"""SLAKE: the native layout (built here in tmp dirs) to records, organ boxes, selection, errors, config."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from conftest import CONF, compose_cfg
from medvr.data import RecordError, Slake
from medvr.data.slake import named_box

# image folder -> (mode, size, detection.json content; None: no file)
IMAGES = {
    # Spleen runs past the right edge (clipped), Kidney lies wholly outside (dropped)
    "xmlab0": ("RGB", (64, 48), [{"Liver": [10, 5, 20, 15]}, {"Spleen": [40.4, 10.6, 30, 20]},
                                 {"Kidney": [70, 0, 5, 5]}]),
    # Liver runs past the bottom edge
    "xmlab1": ("L", (40, 40), [{"Heart": [12, 20, 16, 14]}, {"Left Lung": [22, 4, 16, 26]}, {"Lung": [2, 4, 36, 26]},
                               {"Liver": [3, 30, 18, 12]}]),
    "xmlab2": ("RGB", (32, 24), None),
    "xmlab3": ("L", (24, 32), []),
}
BOXES = {
    "xmlab0": [{"name": "Liver", "bbox": [10, 5, 30, 20]}, {"name": "Spleen", "bbox": [40, 11, 64, 31]}],
    "xmlab1": [{"name": "Heart", "bbox": [12, 20, 28, 34]}, {"name": "Left Lung", "bbox": [22, 4, 38, 30]},
               {"name": "Lung", "bbox": [2, 4, 38, 30]}, {"name": "Liver", "bbox": [3, 30, 21, 40]}],
    "xmlab2": [],
    "xmlab3": [],
}
# split file -> rows (qid, folder, question, answer, q_lang, modality, answer_type, content_type)
ROWS = {
    "train.json": [
        (0, "xmlab0", "Where is the liver?", "Left", "en", "CT", "OPEN", "Position"),
        (1, "xmlab0", "肝脏在哪里？", "左", "zh", "CT", "OPEN", "Position"),
        (2, "xmlab1", "Where is the left lung?", " Right ", "en", "X-Ray", "OPEN", "Position"),
        (3, "xmlab1", "How many lungs are there?", 2, "en", "X-Ray", "OPEN", "Quantity"),
        (4, "xmlab1", "Is the Liver bigger than the heart?", "No", "en", "X-Ray", "CLOSED", "Size"),
        (5, "xmlab2", "Does this image show the brain?", "Yes", "en", "MRI", "CLOSED", "Organ"),
    ],
    "validation.json": [
        (10, "xmlab3", "What modality is used?", "MRI", "en", "MRI", "OPEN", "Modality"),
        (11, "xmlab0", "Is the spleen abnormal?", "No", "en", "CT", "CLOSED", "Abnormality"),
    ],
    "test.json": [
        (20, "xmlab2", "Which plane is this image taken?", "Transverse Plane", "en", "MRI", "OPEN", "Plane"),
        (21, "xmlab0", "这是什么模态？", "CT", "zh", "CT", "OPEN", "Modality"),
        (22, "xmlab1", "Is the heart enlarged?", "No", "en", "X-Ray", "CLOSED", "Abnormality"),
    ],
}


def _native(qid, folder, question, answer, lang, modality, answer_type, content_type) -> dict:
    return {"img_id": int(folder[5:]), "img_name": f"{folder}/source.jpg", "question": question, "answer": answer,
            "q_lang": lang, "location": "Abdomen", "modality": modality, "answer_type": answer_type,
            "base_type": "vqa", "content_type": content_type, "triple": ["vhead", "_", "_"], "qid": qid}


def _write_tree(root: Path) -> Path:
    for folder, (mode, size, detection) in IMAGES.items():
        (root / "imgs" / folder).mkdir(parents=True)
        Image.new(mode, size, color=90 if mode == "L" else (90, 40, 10)).save(root / "imgs" / folder / "source.jpg")
        if detection is not None:
            (root / "imgs" / folder / "detection.json").write_text(json.dumps(detection))
    for file, rows in ROWS.items():
        (root / file).write_text(json.dumps([_native(*row) for row in rows], ensure_ascii=False, indent=1))
    return root


@pytest.fixture(scope="module")
def slake(tmp_path_factory) -> Path:
    return _write_tree(tmp_path_factory.mktemp("Slake1.0"))


def _source(root: Path, **overrides) -> Slake:
    """The source built from conf/data/slake.yaml's defaults, as Hydra would, with `overrides`."""
    settings = OmegaConf.to_container(OmegaConf.load(Path(CONF) / "data" / "slake.yaml").source)
    settings.pop("_target_")
    return Slake(**{**settings, "path": str(root), **overrides})


def _rows(split: datasets.Dataset) -> list[dict]:
    """A split's records with the image as its file path."""
    rows = split.cast_column("image", datasets.Image(decode=False)).to_list()
    return [{**row, "image": row["image"]["path"]} for row in rows]


def _record(root: Path, qid, folder, question, answer, modality, answer_type, content_type, bbox) -> dict:
    return {"id": f"slake/{qid}", "image": str(root / "imgs" / folder / "source.jpg"), "question": question,
            "options": [], "answer": answer, "modality": modality, "bbox": bbox, "question_type": content_type,
            "answer_type": answer_type, "extra_images": None, "boxes": BOXES[folder], "dataset": "SLAKE"}


def test_native_rows_become_exactly_the_expected_records(slake, caplog):
    caplog.set_level(logging.INFO, logger="medvr.data.slake")
    splits = _source(slake).load()
    liver, spleen = BOXES["xmlab0"][0]["bbox"], BOXES["xmlab0"][1]["bbox"]
    heart, left_lung = BOXES["xmlab1"][0]["bbox"], BOXES["xmlab1"][1]["bbox"]
    assert {split: _rows(rows) for split, rows in splits.items()} == {
        "train": [
            _record(slake, 0, "xmlab0", "Where is the liver?", "Left", "CT", "open", "Position", liver),
            # "left lung" names Left Lung and Lung: the longer name wins
            _record(slake, 2, "xmlab1", "Where is the left lung?", "Right", "X-ray", "open", "Position", left_lung),
            # "lungs" is not the whole word "Lung"; the JSON number 2 becomes the text "2"
            _record(slake, 3, "xmlab1", "How many lungs are there?", "2", "X-ray", "open", "Quantity", None),
            # Liver and Heart tie in length: the first in detection.json (Heart) wins
            _record(slake, 4, "xmlab1", "Is the Liver bigger than the heart?", "No", "X-ray", "closed", "Size", heart),
            # no detection.json: no boxes
            _record(slake, 5, "xmlab2", "Does this image show the brain?", "Yes", "MRI", "closed", "Organ", None),
        ],
        "val": [
            _record(slake, 10, "xmlab3", "What modality is used?", "MRI", "MRI", "open", "Modality", None),
            _record(slake, 11, "xmlab0", "Is the spleen abnormal?", "No", "CT", "closed", "Abnormality", spleen),
        ],
        "test": [
            _record(slake, 20, "xmlab2", "Which plane is this image taken?", "Transverse Plane", "MRI", "open",
                    "Plane", None),
            _record(slake, 22, "xmlab1", "Is the heart enlarged?", "No", "X-ray", "closed", "Abnormality", heart),
        ],
    }
    logged = [record.getMessage() for record in caplog.records]
    assert logged == [
        "slake/train: 5 of 6 rows kept; left out: languages not in ['en']: 1",
        "slake/val: 2 of 2 rows kept; left out: none",
        "slake/test: 2 of 3 rows kept; left out: languages not in ['en']: 1",
        "slake: 1 organ box(es) left no area inside their image after clipping and were dropped",
    ]


@pytest.mark.parametrize(
    ("question", "organ"),
    [
        ("Where is the left lung?", "Left Lung"),  # longest name
        ("Is the liver or the heart larger?", "Heart"),  # same length: first in the file
        ("WHERE IS THE LIVER?", "Liver"),  # any case
        ("Does the lung-shaped region look normal?", "Lung"),  # punctuation ends a word
        ("How many lungs are there?", None),  # not the whole word
        ("What is the largest organ?", None),
    ],
)
def test_the_question_names_its_organ_box(question, organ):
    boxes = [{"name": name, "bbox": [k, k, k + 1, k + 1]} for k, name in enumerate(["Heart", "Left Lung", "Lung",
                                                                                     "Liver"])]
    assert named_box(question, boxes) == next((b["bbox"] for b in boxes if b["name"] == organ), None)


def test_filters_sizes_and_their_counts(slake, caplog):
    caplog.set_level(logging.INFO, logger="medvr.data.slake")
    both = _source(slake, languages=["en", "zh"]).load()
    assert list(both["train"]["id"]) == [f"slake/{qid}" for qid in range(6)]
    assert _rows(both["test"])[1]["question"] == "这是什么模态？" and _rows(both["test"])[1]["bbox"] is None

    caplog.clear()
    closed = _source(slake, answer_types=["closed"], content_types=["Size", "Organ", "Abnormality"]).load()
    assert {split: list(rows["id"]) for split, rows in closed.items()} == {
        "train": ["slake/4", "slake/5"], "val": ["slake/11"], "test": ["slake/22"]}
    assert caplog.records[0].getMessage() == (
        "slake/train: 2 of 6 rows kept; left out: answer_types not in ['closed']: 3, languages not in ['en']: 1")

    sized = {"train": 3, "val": None, "test": 1}
    first = _source(slake, sizes=sized).load()
    assert len(first["train"]) == 3 and len(first["val"]) == 2 and len(first["test"]) == 1
    assert caplog.records[-4].getMessage() == ("slake/train: 3 of 6 rows kept; left out: languages not in ['en']: 1, "
                                               "not drawn for data.source.sizes.train=3: 2")
    ids = list(first["train"]["id"])
    assert ids == sorted(ids, key=lambda i: int(i.split("/")[1]))  # a drawn subset keeps file order
    assert list(_source(slake, sizes=sized).load()["train"]["id"]) == ids  # same seed, same rows
    assert {tuple(_source(slake, sizes=sized, seed=s).load()["train"]["id"]) for s in range(6)} != {tuple(ids)}


def test_validate_json_is_read_where_validation_json_is_absent(tmp_path):
    root = _write_tree(tmp_path / "Slake1.0")
    (root / "validation.json").rename(root / "validate.json")
    assert list(_source(root).load()["val"]["id"]) == ["slake/10", "slake/11"]


def _edit_rows(root: Path, file: str, index: int, **changes) -> Path:
    rows = json.loads((root / file).read_text())
    rows[index].update(changes)
    (root / file).write_text(json.dumps(rows))
    return root / file


def test_bad_input_names_the_file_the_row_and_the_fix(tmp_path):
    root = _write_tree(tmp_path / "Slake1.0")
    with pytest.raises(FileNotFoundError, match=r"'.*elsewhere/imgs' does not exist; data.path must be .*train.json"):
        _source(tmp_path / "elsewhere").load()

    file = _edit_rows(root, "test.json", 2, answer_type="FREE")
    with pytest.raises(RecordError) as info:
        _source(root).load()
    assert str(info.value) == (f"{file} row 2 (qid=22): answer_type 'FREE' is unknown; SLAKE rows are one of "
                               "['CLOSED', 'OPEN']: fix the row or remove it from the file")
    _edit_rows(root, "test.json", 2, answer_type="CLOSED", answer=None)
    with pytest.raises(RecordError, match=rf"^{file} row 2 \(qid=22\): the answer is empty; fix the row"):
        _source(root).load()
    _edit_rows(root, "test.json", 2, answer="No")

    (root / "imgs/xmlab2/source.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=rf"^{root / 'train.json'} row 5 \(qid=5\): image "
                                                rf"'{root / 'imgs/xmlab2/source.jpg'}' does not exist; .*imgs folder"):
        _source(root).load()
    assert len(_source(root, content_types=["Position", "Modality", "Abnormality"]).load()["test"]) == 1

    detection = root / "imgs/xmlab1/detection.json"
    for content, problem in [("[{\"Heart\": [1, 2, 3", "not valid JSON"),
                             ("{\"Heart\": [1, 2, 3, 4]}", "is not a list of {organ: box} objects"),
                             ("[{\"Heart\": [1, 2, 3]}]", "box 0 'Heart': [1, 2, 3] is not [x, y, w, h]")]:
        detection.write_text(content)
        with pytest.raises(RecordError) as info:
            _source(root, content_types=["Position"]).load()
        assert str(info.value).startswith(f"{detection}: ") and problem in str(info.value)
        assert f"(first used by {root / 'train.json'} row 2 (qid=2))" in str(info.value)
        assert str(info.value).endswith("fix or delete it")


def test_an_empty_split_or_a_typo_names_the_selection(slake):
    with pytest.raises(ValueError, match=r"split 'val' is empty: none of the 2 rows of .*validation.json passes the "
                                         r"filters \(left out: content_types not in \['Size'\]: 2\); widen the "
                                         r"selection: .*data.source.content_types=\['Size'\]"):
        _source(slake, content_types=["Size"]).load()
    with pytest.raises(ValueError, match=r"content_types: \['Colour'\] occur in no SLAKE row .*present: \['Abn"):
        _source(slake, content_types=["Colour"]).load()
    with pytest.raises(ValueError, match=r"sizes.val=3, but only 2 rows of .*validation.json pass the filters"):
        _source(slake, sizes={"train": None, "val": 3, "test": None}).load()
    with pytest.raises(ValueError, match=r"answer_types: \['yes/no'\] are unknown"):
        _source(slake, answer_types=["yes/no"])


def test_the_config_composes_and_every_record_passes_the_schema_checks(slake, tmp_path):
    cfg = compose_cfg(["data=slake", f"data.path={slake}"], tmp_path, tmp_path / "cache")
    data = instantiate(cfg.data)
    data.setup("fit")  # decodes every image and checks every box lies inside it
    assert {split: len(rows) for split, rows in data.splits.items()} == {"train": 5, "val": 2, "test": 2}
    assert data.modalities() == ["CT", "MRI"]
    spleen = data.val_dataloader().dataset[1]
    assert spleen["image"].size == (64, 48) and spleen["bbox"] == [40, 11, 64, 31]
    assert spleen["boxes"] == BOXES["xmlab0"] and spleen["answer_type"] == "closed"
