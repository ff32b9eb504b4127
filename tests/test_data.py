"""Data package: synthetic generator, record schema checks, sources and the DataModule."""

import collections
import json
import time

import datasets
import numpy as np
import pytest
from PIL import Image

from medvr.data import (
    FEATURES,
    LETTERS,
    HFVQASource,
    RecordError,
    SyntheticVQA,
    VQADataModule,
    corpus_texts,
    generate,
    records_dataset,
    synthetic,
    validate_record,
)
from medvr.data.schema import FIELDS


@pytest.fixture(scope="module")
def items():
    return generate(120, seed=1, split="train")


def _kind(question):
    return next(kind for kind, texts in synthetic.QUESTIONS.items() if question in texts)


def _valid_record(**overrides):
    record = {
        "id": "row-7",
        "image": Image.new("L", (64, 48)),
        "question": "Which side?",
        "options": ["left", "right"],
        "answer": "B",
        "modality": "CT",
        "bbox": [4, 4, 20, 20],
    }
    return {**record, **overrides}


class _InMemorySource:
    name = "in-memory"

    def __init__(self, splits):
        self.splits = datasets.DatasetDict(splits)

    def load(self):
        return self.splits


def test_generate_is_deterministic_per_seed_and_split():
    first, again = generate(12, seed=0, split="train"), generate(12, seed=0, split="train")
    for a, b in zip(first, again):
        assert np.array_equal(np.asarray(a.record["image"]), np.asarray(b.record["image"]))
        assert {k: v for k, v in a.record.items() if k != "image"} == {
            k: v for k, v in b.record.items() if k != "image"
        }
        assert a.rationale == b.rationale
    assert [it.record["id"] for it in first] == [f"syn-train-{i:05d}" for i in range(12)]
    for other in (generate(12, seed=0, split="val"), generate(12, seed=1, split="train")):
        for a, b in zip(first, other):
            pixels_a, pixels_b = np.asarray(a.record["image"]), np.asarray(b.record["image"])
            assert pixels_a.shape != pixels_b.shape or not np.array_equal(pixels_a, pixels_b)


def test_generate_in_worker_processes_draws_the_same_items():
    serial, parallel = generate(200, seed=3, split="train"), generate(200, seed=3, split="train", workers=2)
    assert len(parallel) == 200
    for a, b in zip(serial, parallel):
        assert np.array_equal(np.asarray(a.record["image"]), np.asarray(b.record["image"]))
        assert {k: v for k, v in a.record.items() if k != "image"} == {k: v for k, v in b.record.items() if k != "image"}
        assert (a.rationale, a.facts) == (b.rationale, b.facts)


def test_question_mix_answers_and_rationales(items):
    kinds = collections.Counter(_kind(it.record["question"]) for it in items)
    assert set(kinds) == set(synthetic.QUESTION_TYPES)
    assert min(kinds.values()) == len(items) // len(synthetic.QUESTION_TYPES)  # balanced by design
    assert {it.record["modality"] for it in items} == set(synthetic.MODALITIES)
    assert {it.record["image"].size for it in items} == set(synthetic.SIZES)

    letters, facts = collections.Counter(), collections.defaultdict(collections.Counter)
    for it in items:
        record = validate_record(it.record, it.record["id"])
        options, index = record["options"], LETTERS.index(record["answer"])
        assert len(options) == (2 if record["question_type"] == "side" else 4) and len(set(options)) == len(options)
        assert options[index] in it.rationale  # the rationale states the answering fact
        assert "<" not in it.rationale and record["answer"] not in it.rationale.split()
        letters[record["answer"]] += 1
        for name in ("quadrant", "shape", "texture", "count"):
            facts[name][it.facts[name]] += 1
    # every type lists the same options in the same order: the letter is a function of the fact
    by_type = collections.defaultdict(set)
    for it in items:
        by_type[it.record["question_type"]].add(tuple(it.record["options"]))
    assert all(len(orders) == 1 for orders in by_type.values())
    # facts cycle through their values, so no letter is a good blind guess
    for counts in facts.values():
        assert max(counts.values()) - min(counts.values()) <= len(items) // 10
    assert max(letters.values()) / len(items) < 0.36 and set(letters) == set("ABCD")


def test_lesion_lies_in_bbox_and_answers_match_its_position(items):
    for it in items:
        record = it.record
        pixels = np.asarray(record["image"], dtype=np.float32)
        height, width = pixels.shape
        x1, y1, x2, y2 = record["bbox"]
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        # the lesion's side, plus the dots (3 px away, 3 px wide) on one side and a 2 px margin around
        low, high = synthetic._LESION_SIDES
        assert low + 4 <= min(x2 - x1, y2 - y1) and max(x2 - x1, y2 - y1) <= high - 1 + 4 + 6
        frame = np.zeros(pixels.shape, bool)
        frame[max(0, y1 - 6) : y2 + 6, max(0, x1 - 6) : x2 + 6] = True
        frame[y1:y2, x1:x2] = False
        assert (pixels[y1:y2, x1:x2] >= 215).sum() >= 20, record["id"]  # bright lesion and dots
        assert (pixels[frame] >= 215).mean() < 0.1, record["id"]  # on darker tissue
        answer = record["options"][LETTERS.index(record["answer"])]
        side = "left" if x2 <= width / 2 else "right"
        if _kind(record["question"]) == "side":
            assert answer == side
        if _kind(record["question"]) == "quadrant":
            assert answer == f"{'upper' if y2 <= height / 2 else 'lower'} {side}"


def test_generation_is_fast_and_corpus_covers_the_vocabulary():
    start = time.perf_counter()
    generate(60, seed=5, split="test")
    assert time.perf_counter() - start < 3.0  # ~5 ms per record on one core
    texts = corpus_texts(60, seed=0)
    assert len(texts) == 60 and texts == corpus_texts(60, seed=0)
    words = " ".join(texts)
    for word in (*synthetic.SHAPES, *synthetic.TEXTURES, *synthetic.MODALITIES, "quadrant"):
        assert word in words


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"image": "/no/such/scan.png"}, "does not exist"),
        ({"answer": "C"}, "not one of the option letters"),
        ({"answer": "left"}, "not one of the option letters"),
        ({"options": ["a", "b", "c", "d", "e", "f"]}, "6 options"),
        ({"options": ["only"], "answer": "A"}, "1 options"),
        ({"bbox": [4, 4, 90, 20]}, "outside the 64x48 image"),
        ({"bbox": [4, 4, 4, 20]}, "zero area"),
        ({"bbox": [4, 4, 20]}, "4 integers"),
        ({"bbox": [4.5, 4, 20, 20]}, "4 integers"),
        ({"question": ""}, "'question'"),
    ],
)
def test_validate_record_names_the_row_and_the_problem(overrides, message):
    with pytest.raises(RecordError, match=message) as error:
        validate_record(_valid_record(**overrides), "demo/train row 3 (id=row-7)")
    assert "demo/train row 3 (id=row-7)" in str(error.value)


def test_validate_record_reports_missing_fields_and_normalises(tmp_path):
    record = _valid_record()
    del record["answer"]
    with pytest.raises(RecordError, match=r"id=row-7.*missing field\(s\) \['answer'\]"):
        validate_record(record, "demo/train row 0 (id=row-7)")

    Image.fromarray(np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 8).save(tmp_path / "deep.png")
    clean = validate_record(_valid_record(image=str(tmp_path / "deep.png"), answer=" b ", id=7), "here")
    assert clean["image"].mode == "L" and clean["image"].size == (64, 48)
    assert np.asarray(clean["image"]).max() == 255  # 16-bit range stretched, not clipped
    assert clean["answer"] == "B" and clean["id"] == "7"
    assert validate_record(_valid_record(bbox=None), "here")["bbox"] is None


def test_synthetic_cache_round_trip_and_rebuild(tmp_path, monkeypatch):
    source = SyntheticVQA(n_train=12, n_val=6, n_test=6, seed=0, cache_dir=str(tmp_path))
    first = source.load()
    assert {split: len(rows) for split, rows in first.items()} == {"train": 12, "val": 6, "test": 6}
    assert first["train"].features == FEATURES
    assert source.cache_path.parent == tmp_path and (source.cache_path / "COMPLETE").is_file()

    calls = []
    real_generate = synthetic.generate
    monkeypatch.setattr(synthetic, "generate", lambda *a, **k: calls.append(a) or real_generate(*a, **k))
    second = source.load()
    assert calls == []  # read back from disk
    assert second["val"]["id"] == first["val"]["id"]
    assert np.array_equal(np.asarray(second["val"][0]["image"]), np.asarray(first["val"][0]["image"]))

    (source.cache_path / "COMPLETE").unlink()  # a write that crashed midway
    (source.cache_path / "train" / "state.json").write_text("{not json")
    rebuilt = source.load()
    assert len(calls) == 3 and rebuilt["train"]["id"] == first["train"]["id"]
    assert [p.name for p in tmp_path.iterdir()] == [source.cache_path.name]  # no temp dirs left
    other = SyntheticVQA(n_train=12, n_val=6, n_test=6, seed=1, cache_dir=str(tmp_path))
    assert other.cache_path != source.cache_path


def _write_foreign_dataset(tmp_path):
    """A dataset in someone else's column names, with 'validation' instead of 'val'."""
    images = [Image.new("RGB", (40, 30), (i * 40, 0, 0)) for i in range(4)]
    rows = {
        "uid": [10, 11, 12, 13],
        "img": images,
        "q": ["What is shown?"] * 4,
        "choices": [["a", "b"], ["a", "b", "c"], ["x", "y"], ["x", "y"]],
        "label": ["A", "C", "B", "A"],
        "imaging": ["CT", "MRI", "CT", "X-ray"],
        "extra": [0, 1, 2, 3],
    }
    full = datasets.Dataset.from_dict(rows)
    datasets.DatasetDict({"train": full.select(range(3)), "validation": full.select([3])}).save_to_disk(
        str(tmp_path / "foreign")
    )
    return tmp_path / "foreign"


COLUMNS = {"id": "uid", "image": "img", "question": "q", "options": "choices", "answer": "label",
           "modality": "imaging"}


def test_hf_source_loads_local_dir_and_maps_columns(tmp_path):
    path = _write_foreign_dataset(tmp_path)
    loaded = HFVQASource(str(path), splits={"train": "train", "val": "validation"}, columns=COLUMNS).load()
    assert sorted(loaded) == ["train", "val"]
    assert loaded["train"].column_names == list(FIELDS)
    row = validate_record(loaded["train"][1], "test")
    assert row["id"] == "11" and row["options"] == ["a", "b", "c"] and row["answer"] == "C"
    assert row["modality"] == "MRI" and row["bbox"] is None and row["image"].size == (40, 30)

    with pytest.raises(ValueError, match="no split 'test'.*data.source.splits.val"):
        HFVQASource(str(path), splits={"val": "test"}, columns=COLUMNS).load()
    with pytest.raises(ValueError, match=r"no column for schema field\(s\) \['id', 'image'"):
        HFVQASource(str(path), splits={"train": "train"}).load()


def test_hf_source_resolves_json_image_paths_and_reports_bad_rows(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "data").mkdir()
    Image.new("L", (50, 40), 128).save(tmp_path / "images" / "a.png")
    rows = [
        {"id": "j0", "image": "../images/a.png", "question": "Q?", "options": ["u", "v"], "answer": "A",
         "modality": "CT", "bbox": [1, 2, 30, 20]},
        {"id": "j1", "image": "../images/missing.png", "question": "Q?", "options": ["u", "v"], "answer": "B",
         "modality": "CT", "bbox": None},
    ]
    data_file = tmp_path / "data" / "train.jsonl"
    data_file.write_text(json.dumps(rows[0]) + "\n")
    source = HFVQASource(str(tmp_path / "data"), {"train": "train"}, cache_dir=str(tmp_path / "hf"))
    row = validate_record(source.load()["train"][0], "test")
    assert row["image"].size == (50, 40) and row["bbox"] == [1, 2, 30, 20]

    data_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    broken = HFVQASource(str(data_file), {"train": "train"}, cache_dir=str(tmp_path / "hf"))
    with pytest.raises(RecordError, match=r"train row 1 \(id=j1\).*missing.png' does not exist"):
        VQADataModule(broken, batch_size=2, eval_batch_size=2).setup("fit")


def test_hf_source_offline_hub_id_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="made-up-org/no-such-vqa.*data.path=/local/dir"):
        HFVQASource("made-up-org/no-such-vqa", {"train": "train"}).load()


def test_datamodule_batches_lists_of_validated_records(tmp_path):
    source = SyntheticVQA(n_train=10, n_val=6, n_test=6, seed=0, cache_dir=str(tmp_path))
    module = VQADataModule(source, batch_size=4, eval_batch_size=3, seed=0)
    module.setup("fit")
    batches = list(module.train_dataloader())
    assert [len(b) for b in batches] == [4, 4, 2]
    assert all(isinstance(r, dict) and set(r) == set(FIELDS) for b in batches for r in b)
    assert isinstance(batches[0][0]["image"], Image.Image) and batches[0][0]["image"].mode == "L"
    order = [r["id"] for b in batches for r in b]
    assert sorted(order) == [f"syn-train-{i:05d}" for i in range(10)] and order != sorted(order)
    same_seed = VQADataModule(source, batch_size=4, eval_batch_size=3, seed=0)
    assert [r["id"] for b in same_seed.train_dataloader() for r in b] == order
    other_seed = VQADataModule(source, batch_size=4, eval_batch_size=3, seed=1)
    assert [r["id"] for b in other_seed.train_dataloader() for r in b] != order

    val = list(module.val_dataloader())
    assert [len(b) for b in val] == [3, 3] and [r["id"] for r in val[0]] == [f"syn-val-{i:05d}" for i in range(3)]
    assert [len(b) for b in module.test_dataloader()] == [3, 3]
    assert module.modalities() == sorted(set(source.load()["val"]["modality"])) == ["CT", "MRI", "X-ray"]


def test_datamodule_fails_at_setup_on_a_bad_row():
    records = [it.record for it in generate(3, seed=0, split="test")]
    records[2]["options"], records[2]["answer"] = records[2]["options"][:2], "E"
    broken = _InMemorySource({"test": records_dataset(records)})
    with pytest.raises(RecordError, match=r"in-memory/test row 2 \(id=syn-test-00002\)"):
        VQADataModule(broken, batch_size=2, eval_batch_size=2).setup("test")

    test_only = _InMemorySource({"test": records_dataset(records[:2])})
    with pytest.raises(ValueError, match="no 'train' split.*data.source.splits.train"):
        VQADataModule(test_only, batch_size=2, eval_batch_size=2).train_dataloader()



def test_question_types_ask_only_those_in_turns_and_a_bad_one_is_named(tmp_path):
    items = generate(12, seed=0, split="train", question_types=["modality", "side"])
    assert collections.Counter(it.record["question_type"] for it in items) == {"modality": 6, "side": 6}
    full = generate(12, seed=0, split="train")
    assert len({it.record["question_type"] for it in full}) == 6
    with pytest.raises(ValueError, match=r"question_types=\['colour'\].*quadrant"):
        SyntheticVQA(4, 4, 4, seed=0, cache_dir=str(tmp_path), question_types=["colour"])
    one = SyntheticVQA(4, 4, 4, seed=0, cache_dir=str(tmp_path), question_types=["count"])
    assert one.cache_path != SyntheticVQA(4, 4, 4, seed=0, cache_dir=str(tmp_path)).cache_path
    assert set(one.load()["test"]["question_type"]) == {"count"}


def test_train_question_types_narrow_the_train_split_only(tmp_path):
    both = SyntheticVQA(12, 6, 12, seed=0, cache_dir=str(tmp_path), train_question_types=["side", "quadrant"])
    splits = both.load()
    assert collections.Counter(splits["train"]["question_type"]) == {"side": 6, "quadrant": 6}
    assert len(set(splits["test"]["question_type"])) == 6 and len(set(splits["val"]["question_type"])) == 6
    # the test split is the one a run without the option sees: runs are measured on the same items
    plain = SyntheticVQA(12, 6, 12, seed=0, cache_dir=str(tmp_path / "plain"))
    assert both.cache_path.name != plain.cache_path.name
    assert splits["test"]["id"] == plain.load()["test"]["id"]
    assert splits["test"]["answer"] == plain.load()["test"]["answer"]
    with pytest.raises(ValueError, match=r"train_question_types=\['count'\]: \['count'\] not in question_types"):
        SyntheticVQA(4, 4, 4, seed=0, cache_dir=str(tmp_path), question_types=["side"], train_question_types=["count"])
