"""Events and the per-mode sequence rules of PROTOCOL.md §6.5 and §6.8.

:class:`ModeStream` is sans-IO: it takes SUBSCRIBE ACKs and batches and says
what the application sees, so the gap, replay and reset rules are tested
without a network.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from .errors import ProtocolError


class Mode(enum.IntEnum):
    """``stream.Mode``."""

    SECOND = 0
    MINUTE = 1


class Tick(NamedTuple):
    mode: Mode
    seq: int
    epoch_ms: int


@dataclass(slots=True)
class Batch:
    """A DATA_BATCH, in sequence order, already-delivered ticks removed.

    ``epoch_ms[i]`` is the tick with sequence number ``first_seq + i``.
    ``publish_time_us`` is when the server encoded the batch; batches
    replayed on resume keep their original time (§6.4).
    """

    mode: Mode
    first_seq: int
    epoch_ms: list[int]
    publish_time_us: int

    def __len__(self) -> int:
        return len(self.epoch_ms)

    @property
    def end_seq(self) -> int:
        """One past the last tick's sequence number."""
        return self.first_seq + len(self.epoch_ms)

    def ticks(self) -> Iterator[Tick]:
        mode = self.mode
        for i, ms in enumerate(self.epoch_ms):
            yield Tick(mode, self.first_seq + i, ms)


@dataclass(frozen=True, slots=True)
class Gap:
    """Ticks ``[expected, got)`` of ``mode`` were lost. Never hidden."""

    mode: Mode
    expected: int
    got: int

    @property
    def lost(self) -> int:
        return self.got - self.expected


@dataclass(frozen=True, slots=True)
class Reset:
    """The numbering of ``mode`` changed between two connections, so the
    positions cannot be compared: an instance with another numbering
    (``Ack.numbering``), or a restart of a server that numbers per process.
    The client expected ``expected``; the stream now continues at ``got``.
    How many ticks were lost cannot be told."""

    mode: Mode
    expected: int
    got: int


@dataclass(frozen=True, slots=True)
class Reconnected:
    """A new connection to ``address`` replaced a dropped one after
    ``attempts`` tries; every mode was resubscribed with resume."""

    address: str
    attempts: int
    cause: str


Event = Batch | Gap | Reset | Reconnected


@dataclass(slots=True)
class ModeStream:
    """One mode's position: ``expected`` is the next sequence number to
    deliver, which is also the ``resume_from_seq`` after a break.

    Two kinds of server number ticks differently, and the SUBSCRIBE ACK says
    which (``Ack.numbering``, PROTOCOL.md §4.2):

    - **Clock numbering** (``numbering`` set, e.g. ``"clock"``): a tick's
      number follows from its time, the same on every instance with the same
      numbering. Whatever happened between two connections (another
      instance, a restart), ticks below ``expected`` were delivered already
      and are dropped, and a batch starting above it shows the exact loss.
    - **Process numbering** (field absent, older servers): numbers count from
      0 in each server process; a resume ACK below the resume point is a
      replay or a restart, and the first batch tells which (§6.8).

    A change of numbering between two connections makes the numbers
    incomparable: a :class:`Reset`.
    """

    mode: Mode
    expected: int | None = None
    awaiting_ack: bool = False
    #: ``Ack.numbering`` of the stream ``expected`` counts in (None: process).
    numbering: str | None = None
    #: ``Ack.instance_id`` of the current subscription, when the server says.
    instance_id: str | None = None
    #: Process numbering: set between a resume ACK whose ``next_seq`` is below
    #: the resume point and the first batch, which tells a replay from a restart.
    resume_floor: int | None = None

    def subscribing(self) -> int | None:
        """Call when sending SUBSCRIBE; returns its ``resume_from_seq``."""
        self.awaiting_ack = True
        return self.expected

    def on_ack(self, next_seq: int, numbering: str | None = None, instance_id: str | None = None) -> list[Event]:
        """A SUBSCRIBE ACK for this mode."""
        if not self.awaiting_ack:
            # A repeated SUBSCRIBE's ACK changes nothing (idempotent, §6.3).
            return []
        self.awaiting_ack = False
        self.instance_id = instance_id
        self.resume_floor = None
        same_numbering = self.numbering == numbering
        self.numbering = numbering
        resume = self.expected
        if resume is None:
            self.expected = next_seq
            return []
        if not same_numbering:
            self.expected = next_seq
            return [Reset(self.mode, resume, next_seq)]
        if next_seq > resume:
            self.expected = next_seq
            return [Gap(self.mode, resume, next_seq)]
        if next_seq < resume and numbering is None:
            self.expected = next_seq
            self.resume_floor = resume
        # Clock numbering with next_seq below the resume point: a replay, or
        # an instance whose clock is a little behind; on_batch drops the
        # ticks already delivered.
        return []

    def on_batch(self, batch: Batch) -> list[Event]:
        """A DATA_BATCH of this mode; trims ticks already delivered in place
        and returns the events to deliver, ``batch`` last (nothing when all
        of it was delivered before)."""
        expected = self.expected
        if expected is None or self.awaiting_ack:
            raise ProtocolError(f"{self.mode.name} DATA_BATCH before its SUBSCRIBE ACK")
        if self.numbering is not None:
            return self._on_clock_numbered(batch, expected)
        events: list[Event] = []
        floor = self.resume_floor
        if floor is not None:
            self.resume_floor = None
            if batch.first_seq == expected and batch.first_seq <= floor < batch.end_seq:
                # Case A: the ring replays from an older batch.
                _drop_before(batch, floor)
            else:
                events.append(Reset(self.mode, floor, batch.first_seq))
        elif batch.first_seq > expected:
            events.append(Gap(self.mode, expected, batch.first_seq))
        elif batch.first_seq < expected:
            raise ProtocolError(f"{self.mode.name} first_seq {batch.first_seq} went back from {expected}")
        self.expected = batch.end_seq
        events.append(batch)
        return events

    def _on_clock_numbered(self, batch: Batch, expected: int) -> list[Event]:
        end = batch.end_seq
        if end <= expected:
            return []
        events: list[Event] = []
        if batch.first_seq < expected:
            _drop_before(batch, expected)
        elif batch.first_seq > expected:
            events.append(Gap(self.mode, expected, batch.first_seq))
        self.expected = end
        events.append(batch)
        return events


def _drop_before(batch: Batch, seq: int) -> None:
    """Drops the ticks of ``batch`` numbered below ``seq`` (which it holds)."""
    del batch.epoch_ms[: seq - batch.first_seq]
    batch.first_seq = seq
