"""The layout of a decoded request file, told by its first record's keys."""

from __future__ import annotations

import pytest
from format_records import easyedit_record, fact_record, rome_record, rules, zsre_record

from nas_core.formats import (
    from_any_layout,
    from_counterfact_easyedit,
    from_counterfact_rome,
    from_fact_records,
    from_zsre_mend,
)
from nas_core.formats.report import RequestError


@pytest.mark.parametrize("record, converter", [
    (rome_record(), from_counterfact_rome),
    (easyedit_record(), from_counterfact_easyedit),
    (zsre_record(), from_zsre_mend),
    (fact_record(), from_fact_records),
], ids=["rome", "easyedit", "zsre", "facts"])
def test_each_layout_goes_to_its_converter(record, converter) -> None:
    report = from_any_layout([record, record])
    assert rules(report) == rules(converter([record, record]))
    assert report.requests == converter([record, record]).requests and report.requests


def test_an_empty_or_non_list_file_is_read_as_fact_records() -> None:
    assert from_any_layout([]).requests == ()
    with pytest.raises(RequestError, match="expected a list of records"):
        from_any_layout({"requested_rewrite": {}})
