"""The cyclic garbage collector held off while a command imports its libraries.

Importing torch, timm and Lightning makes about a million objects that live as long as the
process, and the collector, started every few hundred allocations, walks them over and over:
a second of `vittune finetune`'s start-up on 2 cores (torch, timm and Lightning: 4.5 s with
the collector, 3.5 s without, measured), and every full collection later, during training,
walks them once more (about 0.25 s each). Between `pause` and `resume` nothing is collected;
`resume` then freezes what exists (`gc.freeze`: out of the collector's reach for good) and
turns collection back on for everything made after it. The cycles the imports left behind
(about 9 MB) stay until exit. No library does this for an application's start-up, so it is
done here by hand.

Only the command line pauses, and only while Lightning is still to be imported. A library
user's collector is never touched (`resume` without a `pause` does nothing), and a caller who
turned collection off keeps it off.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_paused = False


def pause() -> None:
    """Hold off collection until `resume`, where the heavy imports are still to come.

    Nothing where Lightning is imported already (a second command in one process, a test
    session: freezing then would keep the garbage that exists for good, and there is nothing
    left to gain) or where collection is off (leave it to whoever turned it off)."""
    global _paused
    if gc.isenabled() and "lightning" not in sys.modules:
        gc.disable()
        _paused = True


def resume() -> None:
    """Freeze every object that exists now and collect again; nothing if `pause` did nothing.

    Call it once the imports are done and before the work starts: objects made before it are
    never collected (a model built before it, then dropped, would stay in memory)."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()


@contextmanager
def paused() -> Iterator[None]:
    """`pause` for the block, `resume` at its end, also when it raises."""
    pause()
    try:
        yield
    finally:
        resume()
