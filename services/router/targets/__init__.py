"""Where the router sends: one class per target kind, found by the kind of its configuration.

Adding a kind is adding its configuration model to ``shared/config.py`` (``TargetConfig``), one file
here with its :class:`~.base.Target` subclass, and its line in ``KINDS``; a test checks that every
configurable kind has a class.
"""

from __future__ import annotations

from shared.config import Config, TargetConfig

from .base import Batch, SendError, Target
from .dicom import DicomTarget
from .dicomweb import DicomwebTarget

__all__ = ["KINDS", "Batch", "SendError", "Target", "TargetsUnusable", "target_for", "check_targets"]

KINDS: dict[str, type[Target]] = {cls.kind: cls for cls in (DicomTarget, DicomwebTarget)}


class TargetsUnusable(Exception):
    """Configured targets this process cannot send to at all; the message names each and why."""


def target_for(config: TargetConfig, calling_ae: str) -> Target:
    """The sender of one configured target."""
    return KINDS[config.kind](config, calling_ae)


def check_targets(config: Config) -> None:
    """Raise :class:`TargetsUnusable` if any configured target cannot be sent to from this process."""
    problems = []
    for name, tcfg in config.router.targets.items():
        problem = target_for(tcfg, config.router.forward.calling_ae).check()
        if problem:
            problems.append(f"target {name!r} ({tcfg.kind}) {problem}")
    if problems:
        raise TargetsUnusable("\n".join(problems))
