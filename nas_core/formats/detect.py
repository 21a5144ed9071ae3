"""Which converter a decoded request file needs: the layout is told by its first record's keys."""

from __future__ import annotations

from typing import Any

from nas_core.formats.counterfact import from_counterfact_easyedit, from_counterfact_rome
from nas_core.formats.facts import from_fact_records
from nas_core.formats.report import ConversionReport
from nas_core.formats.zsre import from_zsre_mend


def from_any_layout(data: Any) -> ConversionReport:
    """Requests from decoded JSON in any layout the product converts.

    CounterFact in the ROME layout (``requested_rewrite``) or the EasyEdit one
    (``ground_truth``), zsRE as MEND ships it (``alt`` and ``src``), else fact-schema records.
    """
    first = data[0] if isinstance(data, list) and data else {}
    if "requested_rewrite" in first:
        return from_counterfact_rome(data)
    if "ground_truth" in first:
        return from_counterfact_easyedit(data)
    if "alt" in first and "src" in first:
        return from_zsre_mend(data)
    return from_fact_records(data)
