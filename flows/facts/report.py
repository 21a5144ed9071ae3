"""A validation's reports: ``validation.json`` and a self-contained ``validation.html``.

Both are written atomically next to wherever the batch ends up (the night's report folder,
its quarantine folder). The page has no script and escapes every user string, since a
batch is untrusted input.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flows.facts.batch import BatchValidation
from flows.facts.gx_suite import SUITE_NAME
from flows.io import atomic_write_bytes
from nas_core.formats import RecordProblem

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } code { font-size: .95em; }
.passed { color: #106b21; font-weight: bold; } .failed { color: #b00020; font-weight: bold; }
td.msg { white-space: pre-wrap; word-break: break-word; max-width: 60em; }
"""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (``flows.io``)."""
    # backslashreplace: a lone surrogate from a JSON escape cannot be written as UTF-8.
    atomic_write_bytes(path, text.encode("utf-8", errors="backslashreplace"))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], classes: Sequence[str] = ()) -> str:
    def cell(i: int, value: Any) -> str:
        cls = f' class="{classes[i]}"' if i < len(classes) and classes[i] else ""
        return f"<td{cls}>{html.escape('' if value is None else str(value))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    thead = f"<thead><tr>{head}</tr></thead>\n" if headers else ""
    body = "\n".join("<tr>" + "".join(cell(i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table>\n{thead}<tbody>\n{body}\n</tbody>\n</table>"


def _problem_table(items: Sequence[RecordProblem]) -> str:
    return _table(
        ("line", "case id", "rule", "severity", "field", "message"),
        [("batch" if p.position < 0 else p.position + 1, p.case_id or "", p.rule, p.severity, p.field, p.message)
         for p in items],
        ("", "", "", "", "", "msg"),
    )


def _expectation_table(v: BatchValidation) -> str:
    return _table(
        ("expectation", "GX type", "checks", "result", "unexpected", "examples / observed"),
        [(x.name, x.expectation_type, x.description, "ok" if x.success else "FAILED", x.unexpected_count,
          ", ".join(x.unexpected_examples) or x.observed) for x in v.expectations],
        ("", "", "", "", "", "msg"),
    )


def _facts_table(v: BatchValidation) -> str:
    return _table(
        (),
        [
            ("file", str(v.path)),
            ("sha256", v.sha256),
            ("records", v.n_records),
            ("symlink target", v.link_target or "(not a symlink)"),
            ("accepted edit requests", len(v.requests)),
            ("problems", sum(v.problems_by_rule().values())),
            ("warnings", sum(v.warnings_by_rule().values())),
        ],
    )


def render_html(validation: BatchValidation) -> str:
    """A self-contained HTML page for ``validation``; every user string is escaped."""
    v, e = validation, html.escape
    verdict = "passed" if v.passed else "failed"
    omitted = "".join(f"<p>{n} more <code>{e(rule)}</code> not listed (at most "
                      f"{v.settings.max_problems_per_rule} per rule).</p>" for rule, n in v.omitted.items())
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Fact batch {e(v.batch_id)}: {verdict}</title>",
        f"<style>{_CSS}</style></head><body>",
        f'<h1>Fact batch <code>{e(v.batch_id)}</code>: <span class="{verdict}">{verdict.upper()}</span></h1>',
        _facts_table(v),
        f"<p>{e(v.summary())}</p>",
        f"<h2>Problems ({sum(v.problems_by_rule().values())})</h2>",
        _problem_table(v.problems) if v.problems else "<p>None.</p>",
        f"<h2>Warnings ({sum(v.warnings_by_rule().values())}; the records are kept)</h2>",
        _problem_table(v.warnings) if v.warnings else "<p>None.</p>",
        omitted,
        f"<h2>Great Expectations suite <code>{e(SUITE_NAME)}</code></h2>",
        _expectation_table(v) if v.expectations else "<p>Not run (the file could not be read).</p>",
    ]
    if v.superseded:
        superseded = _table(("subject", "relation", "old target", "case id", "batch"),
                            [(f.subject, f.relation, f.target_new, f.case_id, f.batch_id) for f in v.superseded])
        parts += [f"<h2>Superseded ledger facts ({len(v.superseded)})</h2>", superseded]
    settings = _table(("setting", "value"), list(asdict(v.settings).items()))
    parts += ["<h2>Settings</h2>", settings, "</body></html>", ""]
    return "\n".join(parts)


def write_report(validation: BatchValidation, out_dir: Path) -> dict[str, Path]:
    """Write ``validation.json`` and ``validation.html`` into ``out_dir`` (created), atomically.

    Returns ``{"json": path, "html": path}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "validation.json", "html": out_dir / "validation.html"}
    # ensure_ascii: lone surrogates become \\udXXX escapes, which stay valid JSON.
    atomic_write_text(paths["json"], json.dumps(validation.to_dict(), indent=2, ensure_ascii=True) + "\n")
    atomic_write_text(paths["html"], render_html(validation))
    return paths


__all__ = ["atomic_write_text", "render_html", "write_report"]
