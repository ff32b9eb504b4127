"""Data: the VQA record schema, the synthetic generator, real-dataset sources and the DataModule."""

from medvr.data.datamodule import VQADataModule, collate_records
from medvr.data.schema import (
    FEATURES,
    LETTERS,
    RecordError,
    VQASource,
    validate_dataset,
    validate_record,
)
from medvr.data.medvlm_r1 import MedVLMR1Test
from medvr.data.omnimedvqa import OmniMedVQA
from medvr.data.sources import HFVQASource
from medvr.data.synthetic import SyntheticItem, SyntheticVQA, corpus_texts, generate

__all__ = [
    "FEATURES",
    "LETTERS",
    "HFVQASource",
    "MedVLMR1Test",
    "OmniMedVQA",
    "RecordError",
    "SyntheticItem",
    "SyntheticVQA",
    "VQADataModule",
    "VQASource",
    "collate_records",
    "corpus_texts",
    "generate",
    "validate_dataset",
    "validate_record",
]
