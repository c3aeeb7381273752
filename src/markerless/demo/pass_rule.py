"""The demo's pass rule: enough queries accurate, and every image of another place refused.

Imported by the command line's help text, so it imports nothing heavy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from markerless.pipeline.evaluation import ACCURATE_DEGREES, ACCURATE_METRES

if TYPE_CHECKING:
    from markerless.pipeline.evaluation import QueryOutcome

PASS_METRES, PASS_DEGREES = ACCURATE_METRES, ACCURATE_DEGREES  # a query counts as accurate within these
PASS_FRACTION = 0.8  # the demo passes when at least this share of the queries is accurate ...
# ... and every foreign image (another room, next to queries.json in foreign/) is refused.


def pass_verdict(outcomes: list[QueryOutcome]) -> tuple[bool, float]:
    """(passed, share of ground-truth queries within PASS_METRES and PASS_DEGREES); see PASS_FRACTION."""
    from markerless.pipeline.evaluation import Summary

    summary = Summary.of(outcomes)
    return summary.passes(PASS_FRACTION), summary.within[0]
