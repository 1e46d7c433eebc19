"""What an application stores is what it reads back, through the Python package: random
sequences of records of every size and shape, compression on and off, committed through one
thread and read back by fresh clients (issue 18: a record committed after a large
incompressible one was stored as an invalid zlib stream, and acknowledged)."""

import os
import random
import unittest

import ZODB
from persistent.mapping import PersistentMapping
from ZODB.Connection import TransactionMetaData
from ZODB.utils import p64, u64, z64

from test_zodb import SharedClusterTests

MiB = 1 << 20


def _record(rng, n):
    shape = rng.randrange(5)
    if shape == 0:
        return os.urandom(n)
    if shape == 1:
        return b"\0" * n
    if shape == 2:
        return (b"ab" * (n // 2 + 1))[:n]
    if shape == 3:
        return (b"(dp0\nS'title'\np1\nVpersistent mapping\np2\n" * (n // 40 + 1))[:n]
    parts, size = [], 0
    while size < n:
        k = min(rng.randint(1, 8192), n - size)
        parts.append(os.urandom(k) if rng.random() < 0.5 else bytes([rng.randrange(256)]) * k)
        size += k
    return b"".join(parts)


def _size(rng):
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randint(0, 300)
    if kind == 1:
        return rng.randint(0, 70000)
    if kind == 2:
        return max(0, (1 << rng.randint(7, 24)) + rng.randint(0, 2) - 1)
    return rng.randint(0, 4 * MiB)


class RecordTests(SharedClusterTests):

    def test_a_record_after_a_large_incompressible_one_reads_back(self):
        # The report, as a user made it: a mapping holding 3 MiB of random bytes, then one
        # holding b"ab" * 4096, each in its own transaction; a new DB reads the second.
        db = ZODB.DB(self.cluster.storage())
        try:
            with db.transaction() as conn:
                conn.root()["big"] = PersistentMapping(data=os.urandom(3 * MiB))
            with db.transaction() as conn:
                conn.root()["small"] = PersistentMapping(data=b"ab" * 4096)
        finally:
            db.close()
        db = ZODB.DB(self.cluster.storage())
        try:
            with db.transaction() as conn:
                self.assertEqual(conn.root()["small"]["data"], b"ab" * 4096)
                self.assertEqual(len(conn.root()["big"]["data"]), 3 * MiB)
        finally:
            db.close()

    def test_random_sequences_of_records_read_back(self):
        # One thread commits through a compressing and a non-compressing storage alternately:
        # records of 0 B to 64 MiB of every shape, one to three per transaction. Fresh storages
        # read every revision back (load on read connections, loadSerial, loadBefore).
        rng = random.Random(18)
        writers = [self.cluster.storage(), self.cluster.storage(compress=False)]
        sequence = [os.urandom(3 * MiB), b"ab" * 4096, b"", b"x", os.urandom(64 * MiB), b"\0" * (64 * MiB)]
        sequence += [_record(rng, _size(rng)) for _ in range(30)]
        committed = []
        try:
            i = 0
            while i < len(sequence):
                storage = writers[rng.randrange(2)] if i > 1 else writers[0]
                batch = sequence[i:i + (1 if i < 2 else rng.randint(1, 3))]
                i += len(batch)
                t = TransactionMetaData()
                storage.tpc_begin(t)
                oids = []
                for data in batch:
                    oid = storage.new_oid()
                    storage.store(oid, z64, data, "", t)
                    oids.append(oid)
                storage.tpc_vote(t)
                tid = storage.tpc_finish(t)
                committed += [(oid, tid, data) for oid, data in zip(oids, batch)]
        finally:
            for s in writers:
                s.close()
        reader = self.cluster.storage()
        try:
            rng.shuffle(committed)
            for oid, tid, data in committed:
                got, serial = reader.load(oid)
                self.assertTrue(got == data and serial == tid,
                                "%d bytes back for a record of %d" % (len(got), len(data)))
                self.assertTrue(reader.loadSerial(oid, tid) == data)
                got, serial, _ = reader.loadBefore(oid, p64(u64(tid) + 1))
                self.assertTrue(got == data and serial == tid)
        finally:
            reader.close()


if __name__ == "__main__":
    unittest.main()
