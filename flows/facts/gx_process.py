"""The ``fact_batch`` GX suite in a child process, so the night's process never imports GX.

Great Expectations and what it pulls in hold about 140 MB of a process's resident memory
from the first validation on (measured in docs/integrity.md), and a night validates before it
loads the edit's working set: in-process, that memory would sit under the night's peak. Here
one spawned child imports GX and keeps its context for every batch it is given; the results
(outcomes and problems) come back as the same dataclasses :class:`FactBatchSuite` returns.

:func:`shared_suite` is the process's one child (``nas validate`` and tests reuse it across
files); the night calls :meth:`GXProcess.close` after each batch's validation so the child's
memory is returned before the edit, and the next validation starts a new child.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from flows.child import SpawnedChild
from flows.config.validation import ValidationSettings
from flows.facts.gx_suite import ExpectationOutcome, FactBatchSuite
from nas_core.formats import RecordProblem
from nas_core.requests import EditRequest

_CHILD_SUITE: FactBatchSuite | None = None  # in the child only: its GX context, built once


def _run_in_child(
    positions: Sequence[int], accepted: Mapping[int, EditRequest], settings: ValidationSettings
) -> tuple[tuple[ExpectationOutcome, ...], list[RecordProblem]]:
    """The child's side: the in-process suite on its own GX context."""
    global _CHILD_SUITE
    if _CHILD_SUITE is None:
        _CHILD_SUITE = FactBatchSuite()
    return _CHILD_SUITE.run(positions, accepted, settings)


class GXProcess:
    """The ``fact_batch`` suite run by one spawned child (:class:`flows.child.SpawnedChild`),
    started on first use. Same :meth:`run` as :class:`FactBatchSuite`."""

    def __init__(self) -> None:
        self._child = SpawnedChild()

    def run(
        self, positions: Sequence[int], accepted: Mapping[int, EditRequest], settings: ValidationSettings
    ) -> tuple[tuple[ExpectationOutcome, ...], list[RecordProblem]]:
        """Run the suite in the child (see :meth:`FactBatchSuite.run`)."""
        return self._child.call(_run_in_child, list(positions), dict(accepted), settings)

    def close(self) -> None:
        """Stop the child and wait for it (its memory is returned); the next :meth:`run` starts one."""
        self._child.close()

    @property
    def running(self) -> bool:
        """Whether a child is started."""
        return self._child.running


_SHARED = GXProcess()


def shared_suite() -> GXProcess:
    """The process's GX child (started on first use, restarted after :meth:`GXProcess.close`)."""
    return _SHARED


__all__ = ["GXProcess", "shared_suite"]
