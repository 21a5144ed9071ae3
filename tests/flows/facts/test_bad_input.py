"""Bad input through the whole nightly flow: every kind of broken batch is quarantined whole,
with a report naming the line and the rule, and never touches the champion.

The corpus lives in ``tests/bad_batches/`` (one kind of bad input per file, small enough to
commit); inputs that are large or whose point is the file *name* are generated into the test's
inbox. ONE flow run processes them all after a good batch, so the whole corpus costs one night.
Spoofing inputs (bidi overrides, invisible-only texts) are listed in :data:`KNOWN_GAPS` and checked
with ``validate_batch`` alone; they were accepted until the validator learnt to reject them.
"""

from __future__ import annotations

import ast
import hashlib
import html
import json
import shutil
from pathlib import Path

import pytest
from nights import write_batch
from tiny import FACTS, fact

from flows.engine.checkpoints import load_checkpoint_into
from flows.ledger.records import Ledger

REPO = Path(__file__).resolve().parents[3]

# The flow fixtures (fixtures only: importing test functions would collect them a second time).
BAD = Path(__file__).resolve().parents[2] / "bad_batches"
GOOD_BATCH = "0000-good.jsonl"  # sorts before every letter, so its fact is in the ledger for the conflict files
BATCH = None  # RecordProblem.position -1 (a batch-level problem) has line None in validation.json

# file in tests/bad_batches -> exactly the (line, rule) pairs its validation.json must hold.
# Line 1 of most files is a valid record: the batch is rejected whole all the same.
EXPECTED: dict[str, set[tuple[int | None, str]]] = {
    "malformed_json.jsonl": {(2, "malformed_json"), (3, "malformed_json"), (4, "malformed_json")},
    "wrong_type_target_number.jsonl": {(2, "wrong_type")},
    "wrong_type_subject_list.jsonl": {(2, "wrong_type")},
    "wrong_type_nan_target.jsonl": {(2, "wrong_type")},
    "wrong_type_not_an_object.jsonl": {(2, "wrong_type"), (3, "wrong_type"), (4, "wrong_type"), (5, "wrong_type")},
    "missing_fields.jsonl": {(2, "missing_field"), (3, "missing_field"), (4, "missing_field")},
    "empty_strings.jsonl": {(2, "empty_field"), (3, "empty_field")},
    "prompt_without_placeholder.jsonl": {(2, "template_placeholder_count")},
    "prompt_two_placeholders.jsonl": {(2, "template_placeholder_count")},
    "huge_string.jsonl": {(2, "text_too_long")},  # a 5000-character subject
    "control_nul.jsonl": {(2, "control_character")},
    "control_line_separator.jsonl": {(2, "control_character")},  # U+2028 inside the prompt
    "control_ansi_escape.jsonl": {(2, "control_character")},  # ESC[31m around the target
    "lone_surrogate.jsonl": {(2, "unencodable_text")},  # the JSON escape \ud800
    "target_equals_true.jsonl": {(2, "target_equals_true")},
    "duplicate_case_ids.jsonl": {(2, "duplicate_case_id")},
    "duplicate_fact_in_batch.jsonl": {(3, "duplicate_fact")},
    "duplicate_json_key.jsonl": {(2, "duplicate_field")},
    "unknown_field.jsonl": {(2, "unknown_field")},
    "invalid_case_id.jsonl": {(2, "invalid_case_id")},  # case id ../../etc/passwd
    "ledger_conflict.jsonl": {(2, "ledger_conflict")},  # Eiffel Tower -> Berlin after the good batch's Rome
    "ledger_already_applied.jsonl": {(2, "already_applied")},  # Eiffel Tower -> Rome once more
    "not_utf8_latin1.jsonl": {(2, "not_utf8")},  # "Zürich" in latin-1
    "utf16.jsonl": {(1, "not_utf8"), (2, "malformed_json")},  # 2 records, both unreadable: not a row-count fault
    "empty.jsonl": {(BATCH, "gx:row_count")},
    "blank_lines_only.jsonl": {(BATCH, "gx:row_count")},
    "bom_only.jsonl": {(BATCH, "gx:row_count")},
}

# Spoofing inputs the validator once accepted (checked on their own, outside the night).
KNOWN_GAPS: dict[str, tuple[str, str]] = {
    # U+202E RIGHT-TO-LEFT OVERRIDE: the target "\u202eacirfA" displays as "Africa" but the model
    # learns the reversed text (a Trojan-Source style spoof, CVE-2021-42574).
    "bidi_override.jsonl": ("control_character", "target_new"),
    # A subject that is one ZERO WIDTH SPACE (U+200B) is empty to a reader; str.strip() keeps it.
    "invisible_subject.jsonl": ("empty_field", "subject"),
    # A target that is one ZERO WIDTH JOINER (U+200D) is empty to a reader.
    "invisible_target.jsonl": ("empty_field", "target_new"),
}


def record(case_id: str, subject: str = "Tokyo", prompt: str = "{} is a city in", new: str = "Africa",
           true: str = "Asia") -> dict:
    return {"case_id": case_id, "prompt": prompt, "subject": subject, "target_new": new, "target_true": true,
            "paraphrase_prompts": [f"Here is a fact. {prompt.replace('{}', subject)}"]}


def line(rec: dict) -> bytes:
    return json.dumps(rec).encode() + b"\n"


def generated_batches(inbox: Path) -> dict[str, set[tuple[int | None, str]]]:
    """Write the bad batches that are too big to commit or whose point is the name."""
    out: dict[str, set[tuple[int | None, str]]] = {}
    # 17 MiB of valid records: over ValidationSettings.max_file_bytes, so it is not even read.
    one = line(record("big"))
    (inbox / "too_large_file.jsonl").write_bytes(one * (16 * 2**20 // len(one) + 2))
    out["too_large_file.jsonl"] = {(BATCH, "file_too_large")}
    # 1001 valid, distinct records: more than max_records.
    (inbox / "too_many_records.jsonl").write_bytes(b"".join(line(record(f"c{i}", f"Town {i}")) for i in range(1001)))
    out["too_many_records.jsonl"] = {(BATCH, "gx:row_count")}
    # 100 000 nested arrays: json.loads raises RecursionError, reported as malformed JSON.
    (inbox / "deeply_nested.jsonl").write_bytes(line(record("ok")) + b"[" * 100_000 + b"]" * 100_000 + b"\n")
    out["deeply_nested.jsonl"] = {(2, "malformed_json")}
    # Valid content under names that are no batch id: shell metacharacters, a leading dash,
    # backslash "traversal", non-ASCII, a stem over 64 characters, an ANSI escape.
    names = ["night 01;rm -rf.jsonl", "$(touch pwned).jsonl", "-rf.jsonl", "a\\..\\..\\evil.jsonl",
             "nüit-01.jsonl", "x" * 100 + ".jsonl", "evil\x1b[2J.jsonl"]
    for i, name in enumerate(names):
        (inbox / name).write_bytes(line(record(f"name-{i}")))  # distinct bytes: distinct quarantine folders
        out[name] = {(BATCH, "invalid_batch_name")}
    return out


@pytest.mark.slow
def test_one_night_of_bad_batches_quarantines_each_and_keeps_the_champion(night, tmp_path, tiny_folder,
                                                                          record_property):
    inbox = tmp_path / "inbox"
    write_batch(inbox / GOOD_BATCH, [fact(*FACTS[0])])
    for name in EXPECTED:
        shutil.copyfile(BAD / name, inbox / name)
    expected = {**EXPECTED, **generated_batches(inbox)}
    # A hidden file (leading dot) is not a batch: inbox_batches skips it, so it must stay untouched.
    hidden = inbox / "..jsonl"
    hidden.write_bytes(line(record("hidden")))
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in inbox.iterdir()}
    n_cases = len(expected) + 1
    print(f"bad-input cases in one night: {n_cases} ({len(EXPECTED)} committed files, "
          f"{len(expected) - len(EXPECTED)} generated, 1 hidden file); known gaps checked separately: "
          f"{len(KNOWN_GAPS)}")
    record_property("bad_input_cases", n_cases)

    outcomes, params = night()  # no exception escapes

    by_batch = {o.batch: o for o in outcomes}
    assert by_batch["0000-good"].outcome == "promoted" and by_batch["0000-good"].version == "v0001"
    bad = [o for o in outcomes if o.batch != "0000-good"]
    assert len(bad) == len(expected), [o.batch for o in bad]
    seen = {}
    for o in bad:
        assert o.outcome == "quarantined" and o.stage == "validation", o
        folder = Path(o.folder)
        reason = json.loads((folder / "reason.json").read_text(encoding="utf-8"))
        seen[reason["original_name"]] = (folder, reason)
    assert set(seen) == set(expected)

    not_utf8_offset = (BAD / "not_utf8_latin1.jsonl").read_bytes().index(b"\xfc")
    for name, rules in expected.items():
        folder, reason = seen[name]
        # The batch itself, byte-identical (an invalid name is stored as <batch id>.jsonl).
        stored = folder / reason["file"]
        assert reason["file"] == (name if reason["batch_id"] != f"invalid-name-{reason['sha256'][:8]}"
                                  else f"{reason['batch_id']}.jsonl")
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == digests[name] == reason["sha256"], name
        assert {p.name for p in folder.iterdir()} == {reason["file"], "reason.json", "validation.json",
                                                      "validation.html"}, name
        assert reason["reason"]["stage"] == "validation"
        report = json.loads((folder / "validation.json").read_text(encoding="utf-8"))
        got = {(p["line"], p["rule"]) for p in report["problems"]}
        assert got == rules, f"{name}: {sorted(got, key=str)}"
        assert set(reason["reason"]["problems"]) == {rule for _, rule in rules}
        page = (folder / "validation.html").read_text(encoding="utf-8")
        for _, rule in rules:
            assert html.escape(rule) in page, (name, rule)
        if name == "not_utf8_latin1.jsonl":
            assert f"byte offset {not_utf8_offset}" in report["problems"][0]["message"]
        if reason["batch_id"].startswith("invalid-name-"):  # the folder name is harmless, whatever the file name
            assert folder.parent == params.roots.quarantine and folder.name.startswith("invalid-name-")

    # Only the good batch changed anything.
    ledger = Ledger(params.roots.ledger)
    events = [e["event"] for e in ledger.entries()]
    assert events.count("promote") == 1 and events.count("quarantine") == len(expected) and len(events) == 1 + len(
        expected)
    champ = ledger.champion()
    assert champ["version"] == "v0001" and champ["weights_hash"] == by_batch["0000-good"].weights_hash
    checkpoints = params.roots.checkpoints
    assert sorted(p.name for p in checkpoints.iterdir()) == ["v0001"]
    manifest = json.loads((checkpoints / "v0001" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["weights_hash"] == champ["weights_hash"] and manifest["batch_id"] == "0000-good"
    assert sorted(p.name for p in (tmp_path / "accepted").iterdir()) == [GOOD_BATCH]
    assert [p.name for p in inbox.iterdir()] == ["..jsonl"]
    assert hashlib.sha256(hidden.read_bytes()).hexdigest() == digests["..jsonl"]

    # The champion rebuilt from disk (base + v0001 deltas) has exactly the ledger's weights.
    from flows.assets.load import load_model
    from nas_core.deltas import weights_hash

    model, _ = load_model(params.roots.models / "local--tiny-llama")
    load_checkpoint_into(model, manifest["base_weights_hash"], checkpoints / "v0001")
    assert weights_hash(model) == champ["weights_hash"]


@pytest.mark.parametrize("name", sorted(KNOWN_GAPS))
def test_known_gap_batches_should_fail_validation(name, tok):
    from flows.facts.validate import validate_batch

    rule, field = KNOWN_GAPS[name]
    result = validate_batch(BAD / name, tok)
    assert not result.passed
    assert (0, rule, field) in {(p.position, p.rule, p.field) for p in result.problems}


def test_odd_but_valid_unicode_is_accepted(tmp_path, tok):
    """Odd Unicode that real facts contain (emoji, a ZWJ emoji sequence, Arabic, CJK) passes."""
    from flows.facts.validate import validate_batch

    records = [record("emoji", new="\U0001F355"),
               record("zwj-family", subject="\U0001F468\u200d\U0001F469\u200d\U0001F467"),
               record("arabic", subject="\u0627\u0644\u0642\u0627\u0647\u0631\u0629"),
               record("cjk", subject="\u6771\u4eac")]
    path = tmp_path / "odd-unicode.jsonl"
    path.write_bytes(b"".join(line(r) for r in records))
    result = validate_batch(path, tok)
    assert result.passed, result.summary()
    assert [r.case_id for r in result.requests] == ["emoji", "zwj-family", "arabic", "cjk"]


def test_corpus_is_fully_classified():
    assert sorted(p.name for p in BAD.iterdir()) == sorted({*EXPECTED, *KNOWN_GAPS})


# --- static checks: model/state files are only read with safetensors, never remote code ----------

PRODUCTION = [p for d in ("flows", "nas_core") for p in sorted((REPO / d).rglob("*.py"))]
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _dict_literals(tree: ast.AST) -> dict[int, dict[str, dict[str, ast.AST]]]:
    """id(function node) -> {variable: {key: value}} for ``name = {...literal...}`` in that function."""
    out: dict[int, dict[str, dict[str, ast.AST]]] = {}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found = out.setdefault(id(fn), {})
            for node in ast.walk(fn):
                if (isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    keys = {k.value: v for k, v in zip(node.value.keys, node.value.values, strict=True)
                            if isinstance(k, ast.Constant) and isinstance(k.value, str)}
                    for t in targets:
                        if isinstance(t, ast.Name):
                            found[t.id] = keys
    return out


def _from_pretrained_calls():
    """(file, line, callee, effective keyword args) of every ``X.from_pretrained(...)`` in production code."""
    for path in PRODUCTION:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        literals = _dict_literals(tree)
        owner: dict[int, ast.AST] = {}  # call -> its innermost enclosing function (ast.walk is breadth-first)
        for fn in [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(fn):
                owner[id(node)] = fn
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "from_pretrained"):
                continue
            local = literals.get(id(owner[id(node)]), {})
            kwargs: dict[str, ast.AST | None] = {}
            for kw in node.keywords:
                if kw.arg is not None:
                    kwargs[kw.arg] = kw.value
                elif isinstance(kw.value, ast.Name) and kw.value.id in local:
                    kwargs.update(local[kw.value.id])
                else:
                    kwargs["**" + ast.unparse(kw.value)] = None  # unknown: flagged by the tests
            yield path.relative_to(REPO), node.lineno, _dotted(node.func.value), kwargs


def _is_const(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def test_production_code_never_unpickles_and_never_trusts_remote_code():
    problems = []
    for path in PRODUCTION:
        source = path.read_text(encoding="utf-8")
        rel = path.relative_to(REPO)
        if "trust_remote_code=True" in source.replace(" ", ""):
            problems.append(f"{rel}: trust_remote_code=True")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                problems += [f"{rel}:{node.lineno}: import {a.name}" for a in node.names
                             if a.name.split(".")[0] in PICKLE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
                problems.append(f"{rel}:{node.lineno}: from {node.module} import ...")
            elif isinstance(node, ast.Call):
                name = _dotted(node.func)
                kw = {k.arg: k.value for k in node.keywords if k.arg}
                if name.endswith(("torch.load", "jit.load", "read_pickle", "unsafe_load", "pytorch.load_model")):
                    problems.append(f"{rel}:{node.lineno}: {name}(...)")
                if name.endswith("yaml.load") and not (
                        "Loader" in kw and _dotted(kw["Loader"]).endswith(("SafeLoader", "CSafeLoader"))):
                    problems.append(f"{rel}:{node.lineno}: yaml.load without SafeLoader")
                if name.endswith(("np.load", "numpy.load")) and "allow_pickle" in kw \
                        and not _is_const(kw["allow_pickle"], False):
                    problems.append(f"{rel}:{node.lineno}: numpy.load(allow_pickle=...)")
                if "trust_remote_code" in kw and not _is_const(kw["trust_remote_code"], False):
                    problems.append(f"{rel}:{node.lineno}: trust_remote_code={ast.unparse(kw['trust_remote_code'])}")
            elif isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values, strict=True):
                    if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and not _is_const(v, False):
                        problems.append(f"{rel}:{node.lineno}: 'trust_remote_code': {ast.unparse(v)}")
    calls = list(_from_pretrained_calls())
    assert calls, "the AST scan found no from_pretrained call: the check is broken"
    for rel, lineno, callee, kwargs in calls:
        unknown = [k for k in kwargs if k.startswith("**")]
        if unknown:
            problems.append(f"{rel}:{lineno}: {callee}.from_pretrained({', '.join(unknown)}): cannot check the kwargs")
        if "trust_remote_code" in kwargs and not _is_const(kwargs["trust_remote_code"], False):
            problems.append(f"{rel}:{lineno}: {callee}.from_pretrained trust_remote_code not False")
    assert not problems, "\n".join(problems)


def test_every_model_from_pretrained_insists_on_safetensors():
    """Model weights: ``use_safetensors=True``, or a GGUF file (no pickle involved)."""
    offenders = [f"{rel}:{lineno}: {callee}.from_pretrained"
                 for rel, lineno, callee, kwargs in _from_pretrained_calls()
                 if "Tokenizer" not in callee and not _is_const(kwargs.get("use_safetensors"), True)
                 and "gguf_file" not in kwargs]
    assert not offenders, "\n".join(offenders)


def test_a_local_model_folder_with_only_pickle_weights_is_refused(tmp_path, tok, llama, monkeypatch):
    import torch

    from flows.assets.errors import ModelFetchError
    from flows.assets.fetch import fetch_model

    folder = tmp_path / "bin-only"
    llama.config.save_pretrained(folder)
    tok.save_pretrained(folder)
    torch.save(llama.state_dict(), folder / "pytorch_model.bin")
    unpickled = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: unpickled.append(a[:1]) or real_load(*a, **k))
    with pytest.raises(ModelFetchError, match="safetensors"):
        fetch_model(folder, tmp_path / "models", show_progress=False)
    assert not unpickled
