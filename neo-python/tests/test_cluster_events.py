"""ZODB applications through cluster events: a master restart while other clients commit, a
cluster stopped under a commit loop. Nodes run as processes of their own, so that the test can
kill and restart one of them."""

import os
import re
import shutil
import signal
import subprocess
import threading
import time
import unittest

import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZODB import POSException

import neo_rs

from test_zodb import NEO_SIMPLE, ROOT, Cluster

NEO_CTL = os.environ.get("NEO_CTL") or os.path.join(ROOT, "target", "debug", "neoctl")


class Nodes(object):
    """A cluster made by neosimple (its neo.conf and databases), stopped, then run again with a
    process per node started here."""

    def __init__(self):
        made = Cluster()
        self.name, self.master, self.admin = made.name, made.master, made.admin
        self.dir = made.dir
        made.proc.send_signal(signal.SIGINT)
        made.proc.wait(60)
        made.proc.stdout.close()
        made.log.close()
        self.conf = os.path.join(self.dir, "data", "neo.conf")
        with open(self.conf) as f:
            self.storages = re.findall(r"^\[(storage\d+)\]", f.read(), re.M)
        self.procs = {}
        for section in ["master"] + self.storages + ["admin"]:
            self.start(section)

    def start(self, section):
        kind = "storage" if section.startswith("storage") else section
        err = open(os.path.join(self.dir, section + ".stderr"), "a")
        self.procs[section] = subprocess.Popen(
            [NEO_SIMPLE, "__node", kind, "-f", self.conf, "-s", section],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        err.close()

    def kill(self, section):
        p = self.procs.pop(section)
        p.kill()
        p.wait()

    def storage(self, **kw):
        return neo_rs.Storage(master_nodes=self.master, name=self.name, **kw)

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class MasterRestartTests(unittest.TestCase):

    def test_connection_caches_are_invalidated_after_a_master_restart(self):
        # Two ZODB connections of one client hold an object across a master restart (kill -9)
        # while another client commits a change to it; the first client, idle meanwhile,
        # missed that invalidation. Afterwards a new transaction of one connection sees the
        # new state, and a transaction that the other began before, based on the old state,
        # gets a conflict.
        nodes = Nodes()
        self.addCleanup(nodes.stop)
        db = ZODB.DB(nodes.storage())
        self.addCleanup(db.close)
        with db.transaction() as conn:
            conn.root()["obj"] = PersistentMapping(value="old")
        tm_a, tm_b = transaction.TransactionManager(), transaction.TransactionManager()
        conn_a, conn_b = db.open(tm_a), db.open(tm_b)
        self.assertEqual(conn_a.root()["obj"]["value"], "old")
        tm_a.commit()
        conn_b.root()["obj"]["value"] = "changed on the old state"

        nodes.kill("master")
        nodes.start("master")
        other = ZODB.DB(nodes.storage())
        try:
            with other.transaction() as conn:
                conn.root()["obj"]["value"] = "new"
        finally:
            other.close()

        tm_a.begin()
        self.assertEqual(conn_a.root()["obj"]["value"], "new")
        with self.assertRaises(POSException.ConflictError):
            tm_b.commit()
        tm_b.abort()
        self.assertEqual(conn_b.root()["obj"]["value"], "new")
        # And the client goes on committing.
        conn_a.root()["obj"]["value"] = "after"
        tm_a.commit()


class StopTests(unittest.TestCase):

    def test_a_commit_loop_gets_a_clear_error_within_seconds_of_a_stop(self):
        # neoctl set cluster STOPPING while a thread commits in a loop: the loop ends with a
        # StorageError that says the cluster is stopped, within seconds (not after the
        # client's connect timeout), and so do later transactions.
        cluster = Cluster()
        self.addCleanup(cluster.stop)
        db = ZODB.DB(cluster.storage())
        self.addCleanup(db.close)
        commits, failures = [0], []

        def loop():
            tm = transaction.TransactionManager()
            conn = db.open(tm)
            try:
                while True:
                    conn.root()["n"] = commits[0]
                    tm.commit()
                    commits[0] += 1
            except Exception as e:
                failures.append((time.time(), e))
                tm.abort()
            finally:
                conn.close()

        worker = threading.Thread(target=loop)
        worker.start()
        deadline = time.time() + 30
        while commits[0] < 5 and time.time() < deadline and worker.is_alive():
            time.sleep(0.05)
        self.assertGreaterEqual(commits[0], 5)
        stop = time.time()
        subprocess.run([NEO_CTL, "-a", cluster.admin, "set", "cluster", "STOPPING"], check=True)
        worker.join(30)
        self.assertFalse(worker.is_alive(), "the commit loop still runs")
        when, e = failures[0]
        self.assertLess(when - stop, 5)
        self.assertIsInstance(e, POSException.StorageError)
        self.assertIn("stopped", str(e))
        start = time.time()
        with self.assertRaises(POSException.StorageError) as caught:
            with db.transaction() as conn:
                conn.root()["n"] = -1
        self.assertIn("stopped", str(caught.exception))
        self.assertLess(time.time() - start, 5)


if __name__ == "__main__":
    unittest.main()
