"""Converters into :class:`~nas_core.requests.EditRequest`: benchmarks and the fact schema.

Layouts: CounterFact (ROME and EasyEdit, :mod:`.counterfact`), zsRE (MEND, :mod:`.zsre`)
and the project's JSONL fact-batch schema (:mod:`.facts`). They are pure: they take already
parsed Python objects (dicts, lists) or decoded text, never paths.

Every converter returns a :class:`ConversionReport` (:mod:`.report`): the requests that
converted and one :class:`RecordProblem` per thing wrong with the records that did not. All
bad records are reported, not just the first; a record with any problem yields no request.
Problem ``position`` is the record's 0-based index in the input list (the 0-based line index
for :func:`parse_fact_jsonl`). Rule names are short and stable; :data:`RULES` lists them and
``docs/FACT_SCHEMA.md`` explains them to users.

Normalisation shared by all converters: every text is stripped of surrounding whitespace
(targets are stored without a leading space; the tokenisation code adds it), case ids
become strings. The benchmark converters accept newlines inside prompts (CounterFact
paraphrases contain them); the fact-batch schema, written by people, does not.
"""

from nas_core.formats.counterfact import from_counterfact_easyedit, from_counterfact_rome
from nas_core.formats.detect import from_any_layout
from nas_core.formats.facts import (
    CASE_ID_PATTERN,
    check_request,
    from_fact_records,
    parse_fact_jsonl,
    to_fact_record,
)
from nas_core.formats.report import (
    MAX_TEXT_CHARS,
    RULE_SEVERITY,
    RULES,
    SEVERITIES,
    ConversionReport,
    RecordProblem,
    RequestError,
    SchemaPolicy,
)
from nas_core.formats.templates import template_from_filled
from nas_core.formats.zsre import from_zsre_mend

__all__ = [
    "CASE_ID_PATTERN",
    "MAX_TEXT_CHARS",
    "RULES",
    "RULE_SEVERITY",
    "SEVERITIES",
    "ConversionReport",
    "RecordProblem",
    "RequestError",
    "SchemaPolicy",
    "check_request",
    "from_any_layout",
    "from_counterfact_easyedit",
    "from_counterfact_rome",
    "from_fact_records",
    "from_zsre_mend",
    "parse_fact_jsonl",
    "template_from_filled",
    "to_fact_record",
]
