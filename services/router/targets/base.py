"""What every target kind provides: send a batch, say where to probe, check it can run at all.

A target gets its kind's configuration and a list of (job, Part 10 file) and either returns (every
instance accepted) or raises :class:`SendError`; a batch is retried whole, which receivers absorb
(re-storing the same SOP instance overwrites it). Each file is the instance as it goes on the wire
(preamble, file meta, the data set as received), already verified against its digest, and of any
size: a target streams it from the file and never holds it whole in memory. The files are the
forwarder's (removed after the send). Blocking: the forwarder runs ``send`` in a thread.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

from pydantic import BaseModel

from shared.contract.events import ForwardJob

# (job, its Part 10 file), in the order the instances are to arrive
Batch = list[tuple[ForwardJob, Path]]

C = TypeVar("C", bound=BaseModel)


class SendError(Exception):
    """The target did not accept the batch (connection refused, rejected, failure status, timeout, no sender)."""


class Target(ABC, Generic[C]):
    """One configured destination of one kind; a subclass that leaves out a method cannot be made at all."""

    kind: ClassVar[str]

    def __init__(self, config: C, calling_ae: str):
        self.config = config
        self.calling_ae = calling_ae

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if not getattr(cls, "kind", ""):
            raise TypeError(f"{cls.__name__} must set the kind it sends to")

    @abstractmethod
    def send(self, batch: Batch) -> None:
        """Deliver every instance of ``batch``, or raise :class:`SendError`."""

    @abstractmethod
    def probe_address(self) -> tuple[str, int]:
        """Host and port whose accepting connections counts as the target being up."""

    @abstractmethod
    def check(self) -> str | None:
        """Why this process cannot send to the target at all (a program missing, ...), or None if it can."""
