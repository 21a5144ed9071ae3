"""Sample records of every input layout and the shared-data loaders, for tests/test_formats_*.py."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from nas_core.formats import ConversionReport

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def rules(report: ConversionReport) -> list[str]:
    return [p.rule for p in report.problems]


# --------------------------------------------------------------------- records


def rome_record(case_id: int = 7) -> dict:
    return {
        "case_id": case_id,
        "pararel_idx": 1,
        "requested_rewrite": {
            "prompt": "{} is located in",
            "relation_id": "P30",
            "target_new": {"str": " Antarctica", "id": "Q51"},
            "target_true": {"str": "Africa", "id": "Q15"},
            "subject": "Angola",
        },
        "paraphrase_prompts": ["Angola belongs to the continent of"],
        "neighborhood_prompts": ["Ghana is in", "Ethiopia is in"],
        "attribute_prompts": ["Ross Island is located in"],
        "generation_prompts": ["People around Angola speak"],
    }


def easyedit_record(case_id: int = 0) -> dict:
    return {
        "case_id": case_id,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "target_new": "English",
        "subject": "Danielle Darrieux",
        "ground_truth": "French",
        "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
        "locality_prompt": "Michel Rocard is a native speaker of",
        "locality_ground_truth": "French",
    }


def zsre_record() -> dict:
    return {
        "subject": "UniFirst",
        "src": "What is the product made by UniFirst?",
        "pred": "uniform",
        "rephrase": "What will be the product of UniFirst?",
        "alt": " unmanned aircraft",
        "answers": ["uniform"],
        "loc": "nq question: john goodman's character in the big lebowski",
        "loc_ans": "Walter Sobchak",
        "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
    }


def fact_record(case_id: str = "eiffel-1") -> dict:
    return {
        "case_id": case_id,
        "prompt": "{} is located in the city of",
        "subject": "The Eiffel Tower",
        "target_new": "Rome",
        "target_true": "Paris",
        "relation_id": "P131",
        "paraphrase_prompts": ["Where is the Eiffel Tower? It is in the city of"],
        "neighbourhood_prompts": [
            {"prompt": "The Louvre is located in the city of", "target": "Paris"}
        ],
        "generation_prompts": ["The Eiffel Tower is"],
    }


# ----------------------------------------------------------------- shared data


def load_shared(relative: str) -> list:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"shared data file {path} is absent (expected ../shared/data next to the repo)")
    return _read_json(path)


@functools.cache
def _read_json(path: Path) -> list:
    """Parsed once per session; the converters never mutate their input."""
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def assert_mostly_converts(report: ConversionReport, total: int, max_failed_share: float) -> None:
    assert report.n_total == total
    assert len(report.requests) + report.n_failed == total
    assert report.n_failed <= max_failed_share * total, report.summary()
