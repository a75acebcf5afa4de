"""Leader election through a lease row: one replica at a time drives rollouts.

A lease works on SQLite and PostgreSQL alike. The holder renews it every tick; when the
holder dies the lease runs out after ``ttl_s`` and another replica takes it. The
conditional UPDATE is atomic on both backends, so two replicas never both win. Expiry is
judged by each replica's wall clock, so replicas on different hosts need clocks that
agree (NTP) to well within ``ttl_s``.

Public API: :class:`Lease`.
"""

from __future__ import annotations

import time

from sqlalchemy import or_, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from . import db

__all__ = ["Lease"]


class Lease:
    def __init__(self, engine: Engine, name: str, holder: str, ttl_s: float) -> None:
        self._engine, self.name, self.holder, self.ttl_s = engine, name, holder, ttl_s
        self.held = False
        # Bumped whenever the lease is taken rather than renewed in time: someone else may have
        # held it in between, so what this holder remembers of the state it guards is stale.
        self.epoch = 0

    def acquire(self) -> bool:
        """Take or renew the lease; True while this holder has it."""
        now = time.time()
        t = db.leases
        with self._engine.begin() as conn:
            renewed = conn.execute(update(t).where(t.c.name == self.name, t.c.holder == self.holder, t.c.expires_at >= now)
                                   .values(expires_at=now + self.ttl_s)).rowcount
            n = renewed or conn.execute(update(t).where(t.c.name == self.name, or_(t.c.holder == self.holder, t.c.expires_at < now))
                                        .values(holder=self.holder, expires_at=now + self.ttl_s)).rowcount
        if not (renewed and self.held):
            self.epoch += 1
        if n == 0:
            try:
                with self._engine.begin() as conn:
                    conn.execute(t.insert().values(name=self.name, holder=self.holder, expires_at=now + self.ttl_s))
                n = 1
            except IntegrityError:
                n = 0
        self.held = n == 1
        return self.held

    def release(self) -> None:
        t = db.leases
        with self._engine.begin() as conn:
            conn.execute(update(t).where(t.c.name == self.name, t.c.holder == self.holder).values(holder=None, expires_at=0.0))
        self.held = False

    def current_holder(self) -> str | None:
        t = db.leases
        with self._engine.connect() as conn:
            row = conn.execute(t.select().where(t.c.name == self.name)).first()
        return row.holder if row is not None and row.expires_at >= time.time() else None
