"""PMC-VQA and MedXpertQA MM: native layouts (built here in tmp dirs) to records, multi-image rows, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from conftest import CONF, compose_cfg
from medvr.data import PMCVQA, MedXpertQAMM, RecordError, validate_record

HEADER = ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]
# train.csv rows: the cells as the release writes them ("A:" prefixes, some padded, some absent)
PMC_TRAIN = [
    ["PMC1_F1.jpg", "What organ is shown?", "Lung", "A:Lung", "B:Liver", "C:Heart", "D:Kidney", "A"],
    ["PMC2_F2.jpg", "What uptake pattern?", "Diffuse", " A: Focal", " B: Diffuse", " C: None", "", "B"],
    # not every option carries its letter: "A. baumannii" keeps its text
    ["PMC3_F1.jpg", "Which pathogen?", "Viral", "A. baumannii", "Viral", "Fungal", "Parasitic", "B"],
    # an empty middle choice is dropped last: the key C becomes B among the options left
    ["PMC4_F3.jpg", "Is it benign?", "No", "A:Yes", "", "C:No", "D:Unclear", "C"],
    *[[f"PMC{i}_F1.jpg", f"Question {i}?", "x", "A:x", "B:y", "C:z", "D:w", "ABCD"[i % 4]] for i in range(5, 11)],
]
PMC_TEST = [
    ["PMC20_F1.jpg", "Which modality?", "CT", "A:CT", "B:MRI", "nan", "nan", "A"],
    ["PMC21_F1.jpg", "Which side?", "Left", "A:Right", "B:Left", "C:Both", "D:Neither", "b"],
]


def _pmc_expected(root: Path, split: str, index: int) -> dict:
    options = {
        ("train", 0): (["Lung", "Liver", "Heart", "Kidney"], "A"),
        ("train", 1): (["Focal", "Diffuse", "None"], "B"),
        ("train", 2): (["A. baumannii", "Viral", "Fungal", "Parasitic"], "B"),
        ("train", 3): (["Yes", "No", "Unclear"], "B"),
        ("test", 0): (["CT", "MRI"], "A"),
        ("test", 1): (["Right", "Left", "Both", "Neither"], "B"),
    }
    row = (PMC_TRAIN if split == "train" else PMC_TEST)[index]
    choices, answer = options.get((split, index), (["x", "y", "z", "w"], row[7]))
    return {"id": f"{split}/{index:06d}", "image": str(root / "images" / row[0]), "question": row[1],
            "options": choices, "answer": answer, "modality": "mixed", "bbox": None, "question_type": None,
            "answer_type": "choice", "extra_images": None, "boxes": None, "dataset": "PMC-VQA"}


def _write_csv(file: Path, rows: list[list[str]], extra: str | None = None) -> None:
    """A PMC-VQA CSV; `extra` adds a column some copies carry: a pandas index ("") or `split`."""
    with open(file, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if extra == "index":
            writer.writerow(["", *HEADER])
            writer.writerows([str(i), *row] for i, row in enumerate(rows))
        else:
            writer.writerow([*HEADER, "split"] if extra else HEADER)
            writer.writerows([*row, extra] if extra else row for row in rows)


def _pmc_tree(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    _write_csv(root / "train.csv", PMC_TRAIN, extra="index")
    _write_csv(root / "test.csv", PMC_TEST, extra="split")
    for k, row in enumerate(PMC_TRAIN + PMC_TEST):
        Image.new("RGB", (16, 16), color=(10 * k, 0, 0)).save(root / "images" / row[0])
    return root


@pytest.fixture()
def pmc(tmp_path) -> Path:
    return _pmc_tree(tmp_path / "PMC-VQA")


def _source(cls, yaml: str, **overrides):
    """The source built from its conf/data YAML defaults, as Hydra would, with `overrides`."""
    settings = OmegaConf.to_container(OmegaConf.load(Path(CONF) / "data" / yaml).source)
    settings.pop("_target_")
    return cls(**{**settings, **overrides})


def _pmc(root: Path, **overrides) -> PMCVQA:
    return _source(PMCVQA, "pmc_vqa.yaml", path=str(root), **{"val_size": 3, **overrides})


def _rows(split: datasets.Dataset) -> list[dict]:
    """A split's records with images as their file paths."""
    split = split.cast_column("image", datasets.Image(decode=False))
    split = split.cast_column("extra_images", datasets.List(datasets.Image(decode=False)))
    return [{**row, "image": row["image"]["path"],
             "extra_images": None if row["extra_images"] is None else [i["path"] for i in row["extra_images"]]}
            for row in split.to_list()]


def test_pmc_vqa_rows_become_exactly_the_expected_records(pmc):
    splits = _pmc(pmc).load()
    assert sorted(splits) == ["test", "train", "val"]
    carved = sorted(_rows(splits["train"]) + _rows(splits["val"]), key=lambda row: row["id"])
    assert carved == [_pmc_expected(pmc, "train", i) for i in range(len(PMC_TRAIN))]
    assert _rows(splits["test"]) == [_pmc_expected(pmc, "test", i) for i in range(len(PMC_TEST))]


def test_pmc_vqa_val_is_carved_from_train_with_the_data_seed(pmc):
    splits = _pmc(pmc).load()
    order = np.random.default_rng(0).permutation(len(PMC_TRAIN))  # the documented draw
    assert list(splits["val"]["id"]) == [f"train/{i:06d}" for i in order[:3]]
    assert list(splits["train"]["id"]) == [f"train/{i:06d}" for i in order[3:]]
    again = _pmc(pmc).load()
    assert list(again["val"]["id"]) == list(splits["val"]["id"])
    other = _pmc(pmc, seed=7).load()
    assert list(other["val"]["id"]) != list(splits["val"]["id"])
    assert len(_pmc(pmc, val_size=1).load()["train"]) == len(PMC_TRAIN) - 1


def test_pmc_vqa_reads_the_config_named_files_and_image_folder(pmc):
    (pmc / "images").rename(pmc / "figures")
    _write_csv(pmc / "test_clean.csv", PMC_TEST[1:])
    splits = _pmc(pmc, files={"train": "train.csv", "test": "test_clean.csv"}, image_dir="figures").load()
    assert _rows(splits["test"]) == [{**_pmc_expected(pmc, "test", 1), "id": "test_clean/000000",
                                      "image": str(pmc / "figures" / PMC_TEST[1][0])}]


@pytest.mark.parametrize(
    ("label", "choice_d", "shown"),
    [("E", "D:Kidney", "'E'"), ("D", "", "'D'"), ("D", "D:", "'D'"), ("", "D:Kidney", "''")],
    ids=["outside", "key-on-empty", "key-on-bare-letter", "no-label"],
)
def test_pmc_vqa_answer_label_outside_the_options_names_file_row_and_figure(pmc, label, choice_d, shown):
    rows = [list(row) for row in PMC_TRAIN]
    rows[0][6:8] = [choice_d, label]
    _write_csv(pmc / "train.csv", rows)
    with pytest.raises(RecordError) as info:
        _pmc(pmc).load()
    assert str(info.value).startswith(f"{pmc / 'train.csv'} row 0 (Figure_path=PMC1_F1.jpg): Answer_label {shown} "
                                      "is not the letter of a non-empty choice")
    assert "fix that row's Answer_label" in str(info.value)


def test_pmc_vqa_bad_layouts_name_the_path_and_what_to_do(pmc):
    (pmc / "images" / "PMC21_F1.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"test.csv row 1 \(Figure_path=PMC21_F1.jpg\): image '.*' does not "
                                                r"exist; unzip the image archive into data.source.image_dir"):
        _pmc(pmc).load()
    Image.new("RGB", (16, 16)).save(pmc / "images" / "PMC21_F1.jpg")
    with pytest.raises(FileNotFoundError, match=r"image folder '.*figures' does not exist \(folders in .*: "
                                                r"\['images'\]\).*data.source.image_dir"):
        _pmc(pmc, image_dir="figures").load()
    with pytest.raises(FileNotFoundError, match=r"test_2.csv' does not exist.*data.source.files.<split>"):
        _pmc(pmc, files={"train": "train.csv", "test": "test_2.csv"}).load()
    with pytest.raises(ValueError, match=r"val_size=10 takes all 10 rows .*train.csv, leaving split 'train' empty"):
        _pmc(pmc, val_size=10).load()
    _write_csv(pmc / "test.csv", [])
    with pytest.raises(ValueError, match=r"test.csv has no data rows, so split 'test' would be empty"):
        _pmc(pmc).load()
    (pmc / "test.csv").write_text("Figure_path,Question,Choice A\n")
    with pytest.raises(RecordError, match=r"test.csv: missing column\(s\) \['Answer_label', 'Choice B'\]"):
        _pmc(pmc).load()
    with pytest.raises(ValueError, match=r"data.source.val_size=0: expected an int >= 1"):
        _pmc(pmc, val_size=0)


# MedXpertQA MM rows: 1, 2 and 3 images; the release's questions end in an "Answer Choices:" block
def _mx_row(n: int, images: int, question_type: str, label: str = "C", block: bool = True) -> dict:
    options = {letter: f"Finding {letter}{n}" for letter in "ABCDE"}
    stem = f"A patient, case {n}, shows what is seen in the figures. What is the most likely diagnosis?"
    choices = " ".join(f"({k}) {v}" for k, v in options.items())
    return {"id": f"MM-{n}", "question": f"{stem}\nAnswer Choices: {choices}" if block else stem,
            "options": options, "label": label, "images": [f"MM-{n}-{'abc'[k]}.jpeg" for k in range(images)],
            "medical_task": "Diagnosis", "body_system": "Respiratory", "question_type": question_type}


MX_TEST = [_mx_row(1, 1, "Reasoning"), _mx_row(2, 2, "Understanding", label="E"),
           _mx_row(3, 3, "Reasoning", label="A", block=False), _mx_row(4, 1, "Understanding", label="B")]
MX_DEV = [_mx_row(900, 2, "Reasoning", label="D")]


def _mx_expected(root: Path, row: dict) -> dict:
    images = [str(root / "images" / name) for name in row["images"]]
    return {"id": row["id"], "image": images[0], "question": row["question"].split("\nAnswer Choices:")[0],
            "options": list(row["options"].values()), "answer": row["label"], "modality": "mixed", "bbox": None,
            "question_type": row["question_type"], "answer_type": "choice", "extra_images": images[1:],
            "boxes": None, "dataset": "MedXpertQA-MM"}


def _write_jsonl(file: Path, rows: list[dict]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _mx_tree(root: Path, dev: bool = True) -> Path:
    _write_jsonl(root / "MM" / "test.jsonl", MX_TEST)
    if dev:
        _write_jsonl(root / "MM" / "dev.jsonl", MX_DEV)
    (root / "images").mkdir(parents=True)
    for row in MX_TEST + MX_DEV:
        for k, name in enumerate(row["images"]):  # sizes tell the images of a row apart
            Image.new("RGB", (16 + 4 * k, 12), color=(0, 20 * k, 0)).save(root / "images" / name)
    return root


@pytest.fixture()
def mx(tmp_path) -> Path:
    return _mx_tree(tmp_path / "MedXpertQA")


def _mx(root: Path, **overrides) -> MedXpertQAMM:
    return _source(MedXpertQAMM, "medxpertqa_mm.yaml", path=str(root), **overrides)


def test_medxpertqa_rows_become_exactly_the_expected_records_with_every_image_in_order(mx):
    splits = _mx(mx).load()
    assert sorted(splits) == ["test", "val"]  # evaluation only: no train split
    assert _rows(splits["test"]) == [_mx_expected(mx, row) for row in MX_TEST]
    assert _rows(splits["val"]) == [_mx_expected(mx, row) for row in MX_DEV]
    three = _rows(splits["test"])[2]
    assert [three["image"], *three["extra_images"]] == [str(mx / "images" / f"MM-3-{x}.jpeg") for x in "abc"]
    assert _rows(splits["test"])[0]["question"] == ("A patient, case 1, shows what is seen in the figures. "
                                                    "What is the most likely diagnosis?")
    kept = _mx(mx, strip_choices_from_question=False).load()
    assert list(kept["test"]["question"]) == [row["question"] for row in MX_TEST]


def test_medxpertqa_without_dev_draws_val_from_test_with_the_data_seed(tmp_path):
    root = _mx_tree(tmp_path / "MedXpertQA", dev=False)
    splits = _mx(root, val_size=2).load()
    order = np.random.default_rng(0).permutation(len(MX_TEST))
    assert list(splits["val"]["id"]) == [MX_TEST[i]["id"] for i in order[:2]]
    assert list(splits["test"]["id"]) == [row["id"] for row in MX_TEST]  # the benchmark stays whole
    assert list(_mx(root, val_size=2).load()["val"]["id"]) == list(splits["val"]["id"])
    with pytest.raises(ValueError, match=r"no .*dev.jsonl, and data.source.val_size=5 exceeds the 4 selected"):
        _mx(root, val_size=5).load()


def test_medxpertqa_question_types_select_count_and_name_what_is_present(mx, caplog):
    with caplog.at_level("INFO", logger="medvr.data.medxpertqa"):
        splits = _mx(mx, question_types=["Reasoning"]).load()
    assert list(splits["test"]["id"]) == ["MM-1", "MM-3"] and list(splits["val"]["id"]) == ["MM-900"]
    assert "test.jsonl: 4 rows, 2 left out by data.source.question_types=['Reasoning']; 1 of 2 questions had " \
           "their trailing 'Answer Choices:' block stripped" in caplog.text
    with pytest.raises(ValueError, match=r"question_types: \['Reasonin'\] occur in no row .*present: "
                                         r"\['Reasoning', 'Understanding'\]"):
        _mx(mx, question_types=["Reasonin"]).load()
    with pytest.raises(ValueError, match=r"split 'val' is empty: no row of .*dev.jsonl is left after the selection "
                                         r"data.source.question_types=\['Understanding'\]; widen it"):
        _mx(mx, question_types=["Understanding"]).load()


def test_medxpertqa_bad_rows_and_layouts_name_file_row_id_and_what_to_do(mx):
    file = mx / "MM" / "test.jsonl"
    _write_jsonl(file, [*MX_TEST[:2], {**MX_TEST[2], "label": "F"}])
    with pytest.raises(RecordError) as info:
        _mx(mx).load()
    assert str(info.value) == (f"{file} row 2 (id=MM-3): label 'F' is not one of the option letters "
                               "['A', 'B', 'C', 'D', 'E']; fix that row's label")
    _write_jsonl(file, [{**MX_TEST[0], "options": {k: "x" for k in "ABCDEFGHIJ"}}])
    with pytest.raises(RecordError, match=r"row 0 \(id=MM-1\): options .* MedXpertQA Text \(10 options\)"):
        _mx(mx).load()
    _write_jsonl(file, MX_TEST)
    (mx / "images" / "MM-3-b.jpeg").unlink()
    with pytest.raises(FileNotFoundError, match=r"test.jsonl row 2 \(id=MM-3\): image '.*MM-3-b.jpeg' does not "
                                                r"exist; unzip images.zip"):
        _mx(mx).load()
    with pytest.raises(FileNotFoundError, match=r"'.*MedXpertQA/pictures' does not exist.*data.source.image_dir"):
        _mx(mx, image_dir="pictures").load()
    with pytest.raises(FileNotFoundError, match=r"'.*elsewhere/MM/test.jsonl' does not exist; data.path must be"):
        _mx(mx.parent / "elsewhere").load()


def test_both_configs_compose_and_every_row_passes_validation(pmc, mx, tmp_path):
    cfg = compose_cfg(["data=pmc_vqa", f"data.path={pmc}", "data.source.val_size=2"], tmp_path, tmp_path / "cache")
    data = instantiate(cfg.data)
    data.setup("fit")
    assert {split: len(rows) for split, rows in data.splits.items()} == {"train": 8, "val": 2, "test": 2}

    cfg = compose_cfg(["data=medxpertqa_mm", f"data.path={mx}"], tmp_path, tmp_path / "cache")
    data = instantiate(cfg.data)
    data.setup("validate")  # decodes every image of every row, extra images included
    assert {split: len(rows) for split, rows in data.splits.items()} == {"val": 1, "test": 4}
    record = validate_record(data.splits["test"][2], "medxpertqa_mm/test row 2")
    assert record["image"].size == (16, 12) and [i.size for i in record["extra_images"]] == [(20, 12), (24, 12)]
    assert record["options"] == [f"Finding {x}3" for x in "ABCDE"] and record["answer"] == "A"
