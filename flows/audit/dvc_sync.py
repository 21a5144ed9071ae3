"""The DVC half of :func:`flows.audit.record.record_promotion`, run as a child process in the project.

DVC resolves targets against the working directory and keeps state in its process, so the
night runs this in a child: ``python -m flows.audit.dvc_sync`` reads ``{"add": [...],
"push": bool, "stages": [...], "publish": [...]}`` on stdin and writes ``{"problems": [...]}`` as its last line.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence

log = logging.getLogger(__name__)


#: The remote that publishes the lineage's facts (ledger, accepted batches) to every clone: a
#: folder inside the repository, committed to git (``.dvc/config``).
LINEAGE_REMOTE = "lineage"


def sync(add: Sequence[str], push: bool, stages: Sequence[str], publish: Sequence[str] = ()) -> list[str]:
    """In the repository's folder (DVC resolves targets against the working directory): dvc add
    ``add``, dvc commit -f every stage, dvc push to the default remote, and ``publish`` (the
    ledger and the accepted batches) also to the ``lineage`` remote where one is configured.
    Returns the problems met."""
    from dvc.repo import Repo

    problems: list[str] = []
    with Repo(".") as dvc:
        if add:
            try:
                dvc.add(list(add))
            except Exception as err:  # every DVC failure is reported, none is fatal
                problems.append(f"dvc add {' '.join(add)}: {err}")
        present = {getattr(s, "name", None) for s in dvc.index.stages}
        for stage in stages:
            if stage not in present:
                problems.append(f"note: dvc.yaml has no stage {stage}")
                continue
            try:
                dvc.commit(f"dvc.yaml:{stage}", force=True)
            except Exception as err:
                problems.append(f"dvc commit {stage}: {err}")
        if push:
            remote = dvc.config.get("core", {}).get("remote")
            if not remote:
                log.warning("no default DVC remote: not pushing (dvc remote add -d local ../nas-dvc-remote)")
            else:
                try:
                    dvc.push()
                except Exception as err:
                    problems.append(f"dvc push to {remote}: {err}")
            if publish and LINEAGE_REMOTE in dvc.config.get("remote", {}):
                try:
                    dvc.push(list(publish), remote=LINEAGE_REMOTE)
                except Exception as err:
                    problems.append(f"dvc push {' '.join(publish)} to {LINEAGE_REMOTE}: {err}")
    return problems


def main() -> int:
    request = json.loads(sys.stdin.read())
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    problems = sync(request["add"], request["push"], request["stages"], request.get("publish", ()))
    sys.stdout.write(json.dumps({"problems": problems}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
