"""Data: the VQA record schema, the synthetic generator, real-dataset sources and the DataModule."""

from medvr.data.datamodule import VQADataModule, collate_records
from medvr.data.medvlm_r1 import MedVLMR1Test
from medvr.data.medxpertqa import MedXpertQAMM
from medvr.data.omnimedvqa import OmniMedVQA
from medvr.data.path_vqa import PathVQA
from medvr.data.pmc_vqa import PMCVQA
from medvr.data.schema import (
    ANSWER_TYPES,
    FEATURES,
    LETTERS,
    RecordError,
    VQASource,
    records_dataset,
    validate_dataset,
    validate_record,
)
from medvr.data.slake import Slake
from medvr.data.sources import HFVQASource
from medvr.data.synthetic import SyntheticItem, SyntheticVQA, corpus_texts, generate
from medvr.data.vqa_rad import VQARAD

__all__ = [
    "ANSWER_TYPES",
    "FEATURES",
    "LETTERS",
    "PMCVQA",
    "VQARAD",
    "HFVQASource",
    "MedVLMR1Test",
    "MedXpertQAMM",
    "OmniMedVQA",
    "PathVQA",
    "RecordError",
    "Slake",
    "SyntheticItem",
    "SyntheticVQA",
    "VQADataModule",
    "VQASource",
    "collate_records",
    "corpus_texts",
    "generate",
    "records_dataset",
    "validate_dataset",
    "validate_record",
]
