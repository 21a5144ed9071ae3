"""Long work in a flow's log: logged_progress logs the first unit and every tenth, once each."""

import logging

from flows.engine.loading import logged_progress


def test_the_first_unit_and_every_tenth_once(caplog):
    logger = logging.getLogger("test.logged_progress")
    tick = logged_progress(logger, "memit+nas: NAS anchor pilots")
    with caplog.at_level(logging.INFO, logger=logger.name):
        for done in [*range(1, 1001), 1000]:
            tick(done, 1000)
    assert [r.getMessage() for r in caplog.records] == [
        f"memit+nas: NAS anchor pilots: {n}/1000" for n in [1, *range(100, 1001, 100)]]
