"""VQA-RAD and PathVQA: native layouts (hub parquet, OSF JSON; built here in tmp dirs) to records, selection, errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from conftest import CONF, compose_cfg
from medvr.data import VQARAD, PathVQA, RecordError

# the hub copies' answers and their answer types: padded and capitalised yes/no are closed, numbers and words open
ANSWERS = [("yes", "closed"), (" No ", "closed"), ("left lung", "open"), ("YES", "closed"), ("2", "open"),
           ("no", "closed"), ("pneumothorax ", "open")]
# the OSF release: (qid, phrase_type, answer_type, answer, question_type)
JSON_ROWS = [
    (1, "freeform", "CLOSED", "Yes", "PRES"),
    (2, "para", "OPEN", "right kidney", "POS"),
    (3, "test_freeform", "CLOSED", "left", "POS"),  # CLOSED although not yes/no: the release's label wins
    (4, "freeform", "OPEN", 2, "COUNT"),  # a JSON number
    (5, "test_para", "OPEN", " CT ", "MODALITY"),
    (6, "para", "CLOSED", "no", "ABN"),
    (7, "freeform", "open", "brain", "ORGAN"),  # lower case
]


def _png(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 6), color=shade).save(buffer, format="PNG")
    return buffer.getvalue()


def _hub_rows(split: str, count: int) -> list[dict]:
    """The native rows of a hub split: image as {bytes, path}, question, answer."""
    return [{"image": {"bytes": _png(10 * i), "path": f"{split}_{i}.png"}, "question": f"{split} question {i}?",
             "answer": ANSWERS[i % len(ANSWERS)][0]} for i in range(count)]


def _write_parquet(folder: Path, name: str, rows: list[dict]) -> None:
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    (folder / "data").mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(folder / "data" / name)


def _write_hub(root: Path, counts: dict[str, int]) -> Path:
    """The hub layout; a split of more than 4 rows is written as two files, as big splits are shipped."""
    for split, count in counts.items():
        rows = _hub_rows(split, count)
        parts = [rows[:4], rows[4:]] if count > 4 else [rows]
        for k, part in enumerate(parts):
            _write_parquet(root, f"{split}-{k:05d}-of-{len(parts):05d}-0a1b2c.parquet", part)
    return root


def _hub_expected(prefix: str, split: str, i: int, modality: str, dataset: str) -> dict:
    answer, answer_type = ANSWERS[i % len(ANSWERS)]
    return {"id": f"{prefix}/{split}/{i:05d}", "image": {"bytes": _png(10 * i), "path": f"{split}_{i}.png"},
            "question": f"{split} question {i}?", "options": [], "answer": answer.strip(), "modality": modality,
            "bbox": None, "question_type": None, "answer_type": answer_type,
            "extra_images": None, "boxes": None, "dataset": dataset}


def _write_osf(root: Path, rows=JSON_ROWS, with_images: bool = True) -> Path:
    native = [{"qid": qid, "phrase_type": phrase, "qid_linked_id": f"link-{qid}", "image_case_url": "https://x",
               "image_name": f"synpic{qid % 3}.jpg", "image_organ": "CHEST", "evaluation": "given",
               "question": f"Question {qid}?", "question_rephrase": "NULL", "question_relation": "NULL",
               "question_frame": "NULL", "question_type": qtype, "answer": answer, "answer_type": atype}
              for qid, phrase, atype, answer, qtype in rows]
    root.mkdir(parents=True, exist_ok=True)
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(native, indent=1))
    if with_images:
        (root / "VQA_RAD Image Folder").mkdir()
        for k in range(3):
            Image.new("RGB", (8, 8), color=(40 * k, 0, 0)).save(root / "VQA_RAD Image Folder" / f"synpic{k}.jpg")
    return root


def _osf_expected(root: Path, qid: int, atype: str, answer, qtype: str) -> dict:
    image = root / "VQA_RAD Image Folder" / f"synpic{qid % 3}.jpg"
    return {"id": f"vqa_rad/{qid}", "image": {"bytes": None, "path": str(image)},
            "question": f"Question {qid}?", "options": [], "answer": str(answer).strip(), "modality": "radiology",
            "bbox": None, "question_type": qtype, "answer_type": atype.lower(), "extra_images": None, "boxes": None,
            "dataset": "VQA-RAD"}


@pytest.fixture(scope="module")
def rad_hub(tmp_path_factory) -> Path:
    return _write_hub(tmp_path_factory.mktemp("vqa-rad"), {"train": 9, "test": 3})


@pytest.fixture(scope="module")
def rad_osf(tmp_path_factory) -> Path:
    return _write_osf(tmp_path_factory.mktemp("osf") / "VQA_RAD")


@pytest.fixture(scope="module")
def path_hub(tmp_path_factory) -> Path:
    return _write_hub(tmp_path_factory.mktemp("path-vqa"), {"train": 7, "validation": 2, "test": 3})


def _source(cls, yaml: str, root: Path, **overrides):
    """The source built from its conf/data YAML defaults, as Hydra would, with `overrides`."""
    settings = OmegaConf.to_container(OmegaConf.load(Path(CONF) / "data" / yaml).source)
    settings.pop("_target_")
    return cls(**{**settings, "path": str(root), **overrides})


def _rows(split: datasets.Dataset) -> list[dict]:
    """A split's records with the image undecoded: {bytes, path}."""
    return split.cast_column("image", datasets.Image(decode=False)).to_list()


def _ids(split: datasets.Dataset) -> list[str]:
    return list(split["id"])


def test_vqa_rad_hub_rows_become_exactly_the_expected_records(rad_hub):
    splits = _source(VQARAD, "vqa_rad.yaml", rad_hub, val_size=3).load()
    expected = {split: [_hub_expected("vqa_rad", split, i, "radiology", "VQA-RAD") for i in range(n)]
                for split, n in (("train", 9), ("test", 3))}
    assert _rows(splits["test"]) == expected["test"]
    # val is carved from train: together they are train's rows, each kept in native order
    train, val = _rows(splits["train"]), _rows(splits["val"])
    assert len(val) == 3 and sorted(train + val, key=lambda r: r["id"]) == expected["train"]
    assert train == sorted(train, key=lambda r: r["id"]) and val == sorted(val, key=lambda r: r["id"])


def test_vqa_rad_json_rows_become_exactly_the_expected_records(rad_osf):
    splits = _source(VQARAD, "vqa_rad.yaml", rad_osf, val_size=1).load()
    expected = {qid: _osf_expected(rad_osf, qid, atype, answer, qtype) for qid, _, atype, answer, qtype in JSON_ROWS}
    assert _rows(splits["test"]) == [expected[3], expected[5]]  # phrase_type test_freeform, test_para
    train, val = _rows(splits["train"]), _rows(splits["val"])
    assert len(val) == 1 and sorted(train + val, key=lambda r: r["id"]) == [expected[q] for q in (1, 2, 4, 6, 7)]
    assert (expected[3]["answer_type"], expected[4]["answer"], expected[4]["answer_type"]) == ("closed", "2", "open")


def test_path_vqa_rows_become_exactly_the_expected_records_and_keep_the_shipped_val(path_hub):
    splits = _source(PathVQA, "path_vqa.yaml", path_hub, val_size=1).load()
    for split, native, n in (("train", "train", 7), ("val", "validation", 2), ("test", "test", 3)):
        assert _rows(splits[split]) == [_hub_expected("path_vqa", native, i, "pathology", "PathVQA") for i in range(n)]


def test_the_carved_val_is_seeded_disjoint_and_independent_of_the_answer_filter(rad_hub):
    def load(**overrides):
        return _source(VQARAD, "vqa_rad.yaml", rad_hub, val_size=4, **overrides).load()

    first, again = load(), load()
    assert _ids(first["val"]) == _ids(again["val"]) and _ids(first["train"]) == _ids(again["train"])
    assert not set(_ids(first["train"])) & set(_ids(first["val"]))
    assert {*_ids(first["train"]), *_ids(first["val"])} == {f"vqa_rad/train/{i:05d}" for i in range(9)}
    assert any(_ids(load(seed=s)["val"]) != _ids(first["val"]) for s in (1, 2, 3))
    closed = load(answer_types=["closed"])
    assert set(closed["val"]["answer_type"]) == {"closed"} and set(_ids(closed["val"])) <= set(_ids(first["val"]))
    assert set(_ids(closed["train"])) <= set(_ids(first["train"]))


def test_answer_types_and_limits_select_a_seeded_sample(rad_hub, caplog):
    with caplog.at_level("INFO", logger="medvr.data.hub_parquet"):
        opened = _source(VQARAD, "vqa_rad.yaml", rad_hub, val_size=1, answer_types=["open"]).load()
    assert {t for split in opened.values() for t in split["answer_type"]} == {"open"}
    assert "vqa_rad/test: 2 item(s) left out by data.source.answer_types=['open']: {'closed': 2}" in caplog.text
    limits = {"train": 3, "val": None, "test": 5}
    small = _source(VQARAD, "vqa_rad.yaml", rad_hub, val_size=1, limits=limits).load()
    assert [len(small[s]) for s in ("train", "val", "test")] == [3, 1, 3]  # test has only 3
    same = _source(VQARAD, "vqa_rad.yaml", rad_hub, val_size=1, limits=limits).load()
    assert _ids(same["train"]) == _ids(small["train"]) == sorted(_ids(small["train"]))


def test_layout_detection_and_missing_layouts_name_both(rad_hub, rad_osf, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"holds neither layout.*data/train-\*.parquet.*VQA_RAD Dataset Public"
                                                r".json and DIR/VQA_RAD Image Folder/"):
        _source(VQARAD, "vqa_rad.yaml", tmp_path / "empty").load()
    both = _write_osf(_write_hub(tmp_path / "both", {"train": 2, "test": 1}), rows=JSON_ROWS[:3])
    with pytest.raises(ValueError, match=r"holds both .*data.source.layout=parquet or data.source.layout=json"):
        _source(VQARAD, "vqa_rad.yaml", both).load()
    assert _ids(_source(VQARAD, "vqa_rad.yaml", both, layout="json", val_size=1).load()["test"]) == ["vqa_rad/3"]
    with pytest.raises(FileNotFoundError, match=r"no \['test'\] parquet files"):
        _source(VQARAD, "vqa_rad.yaml", _write_hub(tmp_path / "train-only", {"train": 2}), val_size=1).load()
    with pytest.raises(FileNotFoundError, match=r"PathVQA: '.*empty/data' does not exist.*validation-\*.parquet"):
        _source(PathVQA, "path_vqa.yaml", tmp_path / "empty").load()


def test_bad_json_input_names_file_row_and_qid(tmp_path):
    root = _write_osf(tmp_path / "no-images", with_images=False)
    with pytest.raises(FileNotFoundError, match=r"'.*VQA_RAD Image Folder' does not exist; data.path must be"):
        _source(VQARAD, "vqa_rad.yaml", root).load()
    root = _write_osf(tmp_path / "one-missing")
    (root / "VQA_RAD Image Folder" / "synpic2.jpg").unlink()  # qid 2 and 5
    with pytest.raises(FileNotFoundError) as info:
        _source(VQARAD, "vqa_rad.yaml", root, val_size=1, limits={"train": None, "val": None, "test": None}).load()
    assert str(info.value).startswith(f"{root / 'VQA_RAD Dataset Public.json'} row ")
    assert "synpic2.jpg' does not exist; restore it" in str(info.value)
    rows = [*JSON_ROWS[:3], (8, "freeform", "MAYBE", "yes", "PRES")]
    root = _write_osf(tmp_path / "bad-type", rows=rows)
    with pytest.raises(RecordError, match=r"Public.json row 3 \(qid=8\): answer_type 'MAYBE' is neither CLOSED nor"
                                          r" OPEN; fix it"):
        _source(VQARAD, "vqa_rad.yaml", root).load()


def test_bad_hub_input_and_selection_name_the_file_or_key(rad_hub, path_hub, tmp_path):
    with pytest.raises(ValueError, match=r"split 'val' is empty after selection \(2 items before it\).*answer_types="
                                         r"\['open'\]"):
        _source(PathVQA, "path_vqa.yaml", path_hub, answer_types=["open"]).load()  # val: yes, No
    with pytest.raises(ValueError, match=r"val_size=9 leaves nothing of the 9 train items"):
        _source(VQARAD, "vqa_rad.yaml", rad_hub, val_size=9).load()
    for bad, message in [({"answer_types": ["yes"]}, r"answer_types=\['yes'\]: give a non-empty subset"),
                         ({"limits": {"train": 0, "val": None, "test": None}}, r"limits.train=0: expected an int >= 1"),
                         ({"val_size": None}, r"val_size=None: expected an int >= 1"),
                         ({"layout": "xlsx"}, r"layout='xlsx': use one of \['parquet', 'json'\]")]:
        with pytest.raises(ValueError, match=message):
            _source(VQARAD, "vqa_rad.yaml", rad_hub, **bad)
    root = tmp_path / "renamed"
    _write_parquet(root, "train-00000-of-00001.parquet", _hub_rows("train", 2))
    datasets.Dataset.from_dict({"question": ["q"], "answers": ["a"]}).to_parquet(root / "data" / "test-0.parquet")
    with pytest.raises(ValueError, match=r"test-0.parquet: no column\(s\) \['answer', 'image'\]"):
        _source(VQARAD, "vqa_rad.yaml", root, val_size=1).load()


@pytest.mark.parametrize(("option", "fixture", "sizes"), [
    ("vqa_rad", "rad_hub", {"train": 7, "val": 2, "test": 3}),
    ("vqa_rad", "rad_osf", {"train": 3, "val": 2, "test": 2}),
    ("path_vqa", "path_hub", {"train": 7, "val": 2, "test": 3}),
])
def test_the_config_composes_and_every_row_passes_validation(option, fixture, sizes, request, tmp_path):
    root = request.getfixturevalue(fixture)
    cfg = compose_cfg([f"data={option}", f"data.path={root}", "data.source.val_size=2", "data.verdict_cache=null"],
                      tmp_path, tmp_path / "cache")
    data = instantiate(cfg.data)
    data.setup("fit")  # decodes and validates every row
    assert {split: len(rows) for split, rows in data.splits.items()} == sizes
    records = [record for loader in (data.train_dataloader(), data.val_dataloader(), data.test_dataloader())
               for batch in loader for record in batch]
    assert len(records) == sum(sizes.values())
    assert {r["answer_type"] for r in records} == {"closed", "open"} and all(r["options"] == [] for r in records)
    assert {r["modality"] for r in records} == {"pathology" if option == "path_vqa" else "radiology"}
    assert all(isinstance(r["image"], Image.Image) and r["image"].mode in ("L", "RGB") for r in records)
