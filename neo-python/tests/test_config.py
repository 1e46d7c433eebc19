"""The Python package's entry points: the storage class, ZConfig (%import neo_rs +
<NEOStorage>), the zodburi resolver, errors as ZODB's exceptions; against a real cluster."""

import os
import tempfile
import threading
import time
import unittest

import transaction
import ZODB
import ZODB.config
from persistent.mapping import PersistentMapping
from ZODB import POSException

import neo_rs
from neo_rs import zodburi

from test_zodb import Cluster, SharedClusterTests


class ConfigTests(SharedClusterTests):

    def roundtrip(self, db, key):
        with db.transaction() as conn:
            conn.root()[key] = PersistentMapping(value=key)
        with db.transaction() as conn:
            self.assertEqual(conn.root()[key]["value"], key)

    def test_zconfig_section(self):
        c = self.cluster
        db = ZODB.config.databaseFromString("""
            %%import neo_rs
            <zodb>
              <NEOStorage>
                master_nodes %s
                name %s
                cache-size 5MB
                compress false
              </NEOStorage>
            </zodb>
            """ % (c.master, c.name))
        try:
            self.assertIsInstance(db.storage, neo_rs.Storage)
            self.roundtrip(db, "zconfig")
        finally:
            db.close()

    def test_logfile(self):
        # NEO's logfile key: the client appends its log there (one per process; this is the
        # only test that sets it).
        c = self.cluster
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "client.log")
            db = ZODB.config.databaseFromString("""
                %%import neo_rs
                <zodb>
                  <NEOStorage>
                    master_nodes %s
                    name %s
                    logfile %s
                  </NEOStorage>
                </zodb>
                """ % (c.master, c.name, path))
            try:
                self.roundtrip(db, "logfile")
            finally:
                db.close()
            with open(path) as f:
                log = f.read()
            self.assertIn("connected to the primary master", log)
            with self.assertRaises(OSError):
                neo_rs.Storage(master_nodes=c.master, name=c.name, logfile=os.path.join(tmp, "no", "such.log"))

    def test_zconfig_read_only(self):
        c = self.cluster
        storage = ZODB.config.storageFromString("""
            %%import neo_rs
            <NEOStorage>
              master_nodes %s
              name %s
              read-only true
            </NEOStorage>
            """ % (c.master, c.name))
        try:
            self.assertTrue(storage.isReadOnly())
            self.assertRaises(POSException.ReadOnlyError, storage.new_oid)
        finally:
            storage.close()

    def test_zconfig_rejects_unknown_key(self):
        import ZConfig
        self.assertRaises(ZConfig.ConfigurationError, ZODB.config.storageFromString, """
            %import neo_rs
            <NEOStorage>
              master_nodes 127.0.0.1:1
              name x
              no-such-key 1
            </NEOStorage>
            """)

    def test_zodburi(self):
        c = self.cluster
        uri = "neo://%s@%s?read_only=false&cache-size=1MB&database_name=main&compress=true" % (c.name, c.master)
        factory, dbkw = zodburi.resolve_uri(uri)
        self.assertEqual(dbkw, {"database_name": "main"})
        db = ZODB.DB(factory(), **dbkw)
        try:
            self.roundtrip(db, "zodburi")
        finally:
            db.close()

    def test_zodburi_entry_point(self):
        from importlib.metadata import entry_points
        eps = {e.name: e for e in entry_points(group="zodburi.resolvers")}
        self.assertIs(eps["neo"].load(), zodburi.resolve_uri)

    def test_zodburi_bad_uris(self):
        for uri in ("zeo://x@h:1", "neo://h:1", "neo://x@h:1/path", "neo://x@h:1?name=y"):
            self.assertRaises(ValueError, zodburi.parse_uri, uri)
        zconf, _ = zodburi.parse_uri("neo://n@a:1,b:2?read-only=true")
        self.assertIn("master_nodes a:1 b:2", zconf)
        self.assertIn("read-only true", zconf)

    def test_unknown_cluster_is_a_clear_error(self):
        with self.assertRaises(POSException.StorageError) as e:
            neo_rs.Storage(master_nodes=self.cluster.master, name="other", connect_timeout=1)
        self.assertIn("other", str(e.exception))

    def test_bad_arguments(self):
        self.assertRaises(ValueError, neo_rs.Storage, master_nodes="", name="x")
        s = self.cluster.storage()
        try:
            self.assertRaises(ValueError, s.loadBefore, b"123", b"\0" * 8)
            self.assertRaises(KeyError, s.load, b"\x7f" * 8)
        finally:
            s.close()

    def test_gil_released_while_waiting(self):
        # A second transaction stores an object that a first one holds locked (voted): its
        # vote waits on the storage until the first one finishes, and the first one finishes
        # only when this thread gets to run tpc_finish. That completes only if the waiting
        # thread released the GIL.
        from ZODB.Connection import TransactionMetaData
        s1, s2 = self.cluster.storage(), self.cluster.storage()
        try:
            t0 = TransactionMetaData()
            s1.tpc_begin(t0)
            oid = s1.new_oid()
            s1.store(oid, b"\0" * 8, b"v0", "", t0)
            s1.tpc_vote(t0)
            serial = s1.tpc_finish(t0)
            t1 = TransactionMetaData()
            s1.tpc_begin(t1)
            s1.store(oid, serial, b"v1", "", t1)
            s1.tpc_vote(t1)
            waiting = threading.Event()
            outcome = []

            def second():
                t2 = TransactionMetaData()
                s2.tpc_begin(t2)
                s2.store(oid, serial, b"v2", "", t2)
                waiting.set()
                try:
                    s2.tpc_vote(t2)
                    outcome.append("voted")
                except POSException.ConflictError:
                    outcome.append("conflict")
                finally:
                    s2.tpc_abort(t2)
            worker = threading.Thread(target=second)
            worker.start()
            waiting.wait(30)
            time.sleep(0.3)  # the worker waits in tpc_vote
            tid = s1.tpc_finish(t1)
            worker.join(60)
            self.assertEqual(outcome, ["conflict"])
            self.assertEqual(s1.lastTransaction(), tid)
        finally:
            s1.close()
            s2.close()

    def test_finish_callback_in_order_with_invalidations(self):
        # tpc_finish calls f(tid) before it returns, after the invalidations of the commits
        # before tid were delivered, and lastTransaction never reports a tid whose
        # invalidations were not delivered.
        from ZODB.Connection import TransactionMetaData
        s1, s2 = self.cluster.storage(), self.cluster.storage()
        seen = []

        class FakeDB:
            transform_record_data = untransform_record_data = staticmethod(lambda data: data)

            def invalidate(self, tid, oids):
                seen.append(("invalidate", tid))

            def invalidateCache(self):
                seen.append(("all", None))
        try:
            s1.registerDB(FakeDB())
            tids = []
            for storage, data in ((s2, b"other"), (s1, b"mine")):
                t = TransactionMetaData()
                storage.tpc_begin(t)
                storage.store(storage.new_oid(), b"\0" * 8, data, "", t)
                storage.tpc_vote(t)
                if storage is s1:
                    tids.append(storage.tpc_finish(t, lambda tid: seen.append(("finish", tid))))
                else:
                    tids.append(storage.tpc_finish(t))
                    s1.sync()
            self.assertEqual(seen, [("invalidate", tids[0]), ("finish", tids[1])])
            self.assertEqual(s1.lastTransaction(), tids[1])
        finally:
            s1.close()
            s2.close()


class PrefetchTests(unittest.TestCase):

    def test_prefetch_fills_the_cache(self):
        # Connection.prefetch loads the objects with many requests in flight; the loads that
        # follow are all client cache hits, with the right data. Oids that do not exist are
        # ignored (prefetch is a hint).
        cluster = Cluster()
        try:
            db = ZODB.DB(cluster.storage())
            with db.transaction() as conn:
                objs = [PersistentMapping(i=i) for i in range(300)]
                for o in objs:
                    conn.add(o)
            oids = [o._p_oid for o in objs]
            db.close()
            storage = cluster.storage()
            db = ZODB.DB(storage)
            try:
                conn = db.open()
                conn.prefetch(oids + [b"\x7f" * 8], objs[:0])
                hits, misses, _ = storage._client.cache_stats()
                for i, oid in enumerate(oids):
                    self.assertEqual(conn.get(oid)["i"], i)
                hits2, misses2, _ = storage._client.cache_stats()
                self.assertEqual(misses2, misses)
                self.assertGreaterEqual(hits2 - hits, len(oids))
                conn.close()
            finally:
                db.close()
        finally:
            cluster.stop()

    def test_len_and_size_count_objects(self):
        # len(storage) is the greatest committed OID: about the number of objects, the root not
        # counted; OIDs handed out to a transaction that aborted do not count. getSize estimates
        # 300 bytes per object, as ZODB's BaseStorage does.
        cluster = Cluster()
        try:
            storage = cluster.storage()
            self.assertEqual((len(storage), storage.getSize()), (0, 0))
            db = ZODB.DB(storage)
            try:
                with db.transaction() as conn:
                    conn.root()["objs"] = [PersistentMapping(i=i) for i in range(3)]
                self.assertEqual(len(storage), 3)
                self.assertEqual(db.objectCount(), 3)
                self.assertEqual(storage.getSize(), 900)
                tm = transaction.TransactionManager()
                conn = db.open(tm)
                conn.root()["more"] = PersistentMapping()
                conn.add(conn.root()["more"])
                tm.abort()
                conn.close()
                self.assertEqual(len(storage), 3)
            finally:
                db.close()
        finally:
            cluster.stop()
