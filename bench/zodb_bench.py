#!/usr/bin/env python3
"""ZODB on a neo-rs cluster: commits, updates and reads per second, with 1 and 4 client
processes, against a neosimple cluster of 2 SQLite storages with replicas 1.

    cargo build --release -p neosimple
    (cd neo-python && maturin develop --release)      # in a virtualenv with ZODB
    python bench/zodb_bench.py [--quick]

Figures (all processes together; commits and updates: every process connects, then all start
their loop at one agreed time, and the operations count over the time from it to the end of the
last loop; reads: over the time of the slowest process's loop):
- commit-1:   transactions creating 1 object (100-byte payload)
- commit-100: transactions creating 100 objects (objects/s = 100 x that)
- update:     transactions loading and modifying 1 existing object
- cold read:  object loads by a new DB with empty caches (each a storage round trip)
- warm read:  the same loads again after emptying ZODB's object cache (client cache hits)
- prefetched: cold reads by another new DB that calls Connection.prefetch on each batch of
              100 oids before reading them (many requests in flight instead of one at a time)
The same commit and read loops on an in-process FileStorage run first and last, to compare with
Python NEO's figures (taken with FileStorage on another machine) scaled to this one (by the mean
of the two FileStorage runs; far apart, they say the machine's speed drifted meanwhile).
"""

import argparse
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time

import transaction
import ZODB
from persistent import Persistent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Obj(Persistent):
    def __init__(self, payload):
        self.payload = payload


def start_cluster(tmp):
    exe = os.environ.get("NEO_SIMPLE") or os.path.join(ROOT, "target", "release", "neosimple")
    proc = subprocess.Popen([exe, "--storages", "2", "--replicas", "1", "--data", tmp, "--cluster", "bench"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    master = None
    for line in proc.stdout:
        if line.startswith("master:"):
            master = line.split(None, 1)[1].strip()
        if line.startswith("Press Ctrl-C"):
            break
    if master is None:
        proc.kill()
        sys.exit("neosimple did not start (build it: cargo build --release -p neosimple)")
    return proc, master


def open_db(target):
    """A DB on the cluster whose master is `target`, or on the FileStorage `file:PATH`."""
    if target.startswith("file:"):
        from ZODB.FileStorage import FileStorage
        return ZODB.DB(FileStorage(target[5:]), cache_size=1000000)
    import neo_rs
    return ZODB.DB(neo_rs.Storage(master_nodes=target, name="bench"), cache_size=1000000)


# The reference figures (one client), all taken on one machine: Python NEO and
# in-process FileStorage. Running FileStorage here too scales NEO's figures to this machine.
NEO_COMMITS, NEO_COLD = 225, 2000
# Seconds given to every process to start (the first one imports ZODB and the package) and
# connect before the loops start together; a process not ready by then only lowers the figure.
START_DELAY = 1.5
FS_COMMITS, FS_COLD = 5000, 36000


def filestorage_baseline(tmp, n1, nread, name):
    """commit-1/s and cold read/s of in-process FileStorage (a new file `name`), by the same loops."""
    target = "file:" + os.path.join(tmp, name)
    open_db(target).close()  # creates the root
    dt, oids, _ = w_commit((target, n1, 1, 0))
    cold, _, _ = w_read((target, oids[:nread]))
    return n1 / dt, len(oids[:nread]) / cold


def start_together(start_at):
    """Wait for the time all processes start their loop at (already connected)."""
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)


def w_commit(args):
    master, n, per_txn, start_at = args
    db = open_db(master)
    conn = db.open()
    oids = []
    payload = b"x" * 100
    start_together(start_at)
    t0 = time.perf_counter()
    for _ in range(n):
        objs = [Obj(payload) for _ in range(per_txn)]
        for o in objs:
            conn.add(o)
        transaction.commit()
        oids.extend(o._p_oid for o in objs)
    dt, end = time.perf_counter() - t0, time.time()
    conn.close()
    db.close()
    return dt, oids, end


def w_update(args):
    master, oids, start_at = args
    db = open_db(master)
    conn = db.open()
    start_together(start_at)
    t0 = time.perf_counter()
    for i, oid in enumerate(oids):
        o = conn.get(oid)
        o.payload = b"y%d" % i
        transaction.commit()
    dt, end = time.perf_counter() - t0, time.time()
    conn.close()
    db.close()
    return dt, None, end


def timed_reads(conn, oids, prefetch=False):
    """Seconds to read every object (in batches of 100 prefetched first if asked)."""
    t0 = time.perf_counter()
    for i in range(0, len(oids), 100):
        batch = oids[i:i + 100]
        if prefetch:
            conn.prefetch(batch)
        for oid in batch:
            conn.get(oid).payload
    return time.perf_counter() - t0


def w_read(args):
    master, oids = args
    db = open_db(master)
    conn = db.open()
    cold = timed_reads(conn, oids)
    conn.cacheMinimize()
    warm = timed_reads(conn, oids)
    conn.close()
    db.close()
    db = open_db(master)
    conn = db.open()
    prefetched = timed_reads(conn, oids, prefetch=True)
    conn.close()
    db.close()
    return cold, warm, prefetched


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer operations (a smoke run)")
    ns = ap.parse_args()
    scale = 10 if ns.quick else 1
    n1, n100, nread = 2000 // scale, 100 // scale, 10000 // scale
    with tempfile.TemporaryDirectory(prefix="neo-bench-") as tmp:
        # FileStorage before and after: the machine's speed drifts (by a quarter within an
        # hour was seen), and the scaling uses their mean.
        fs_before = filestorage_baseline(tmp, n1, nread, "before.fs")
        proc, master = start_cluster(tmp)
        try:
            db = open_db(master)  # creates the root
            db.close()
            from importlib.metadata import version
            print("neo-rs + ZODB %s, cluster: 2 SQLite storages, replicas 1 (%s)" % (version("ZODB"), master))
            print("%-8s %14s %16s %12s %14s %14s %14s" % ("clients", "commit-1/s", "commit-100/s", "update/s",
                                                          "cold read/s", "warm read/s", "prefetched/s"))
            results = {}
            for procs in (1, 4):
                with multiprocessing.get_context("spawn").Pool(procs) as pool:
                    start = time.time() + START_DELAY
                    res = pool.map(w_commit, [(master, n1 // procs, 1, start)] * procs)
                    c1 = n1 // procs * procs / (max(r[2] for r in res) - start)
                    oids = [r[1] for r in res]
                    start = time.time() + START_DELAY
                    res = pool.map(w_commit, [(master, n100 // procs, 100, start)] * procs)
                    c100 = n100 // procs * procs / (max(r[2] for r in res) - start)
                    start = time.time() + START_DELAY
                    res = pool.map(w_update, [(master, o, start) for o in oids])
                    upd = sum(len(o) for o in oids) / (max(r[2] for r in res) - start)
                    # Reads: each process reads its own share of the created objects.
                    allo = [o for os_ in oids for o in os_]
                    share = [allo[i::procs][: nread // procs] for i in range(procs)]
                    res = pool.map(w_read, [(master, s) for s in share])
                    total = sum(len(s) for s in share)
                    cold = total / max(r[0] for r in res)
                    warm = total / max(r[1] for r in res)
                    pref = total / max(r[2] for r in res)
                print("%-8d %14.0f %16.1f %12.0f %14.0f %14.0f %14.0f" % (procs, c1, c100, upd, cold, warm, pref))
                sys.stdout.flush()
                results[procs] = (c1, cold, pref)
            fs_after = filestorage_baseline(tmp, n1, nread, "after.fs")
            for when, (fs_c1, fs_cold) in (("FS first", fs_before), ("FS last", fs_after)):
                print("%-8s %14.0f %16s %12s %14.0f   (in-process FileStorage, same machine, 1 client)"
                      % (when, fs_c1, "-", "-", fs_cold))
            fs_c1, fs_cold = ((a + b) / 2 for a, b in zip(fs_before, fs_after))
            k_c, k_r = fs_c1 / FS_COMMITS, fs_cold / FS_COLD
            print("this machine runs FileStorage at %.2fx (commits) and %.2fx (reads) the machine of the NEO figures;"
                  % (k_c, k_r))
            for procs, (c1, cold, pref) in results.items():
                # NEO's figures are of one client: the 4-client line compares with them too.
                print("%d client%s vs NEO (1 client) scaled to it: commits %.1fx, cold reads %.1fx, prefetched reads %.1fx"
                      % (procs, "s" if procs > 1 else "", c1 / (NEO_COMMITS * k_c), cold / (NEO_COLD * k_r),
                         pref / (NEO_COLD * k_r)))
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)


if __name__ == "__main__":
    main()
