"""ZODB storage for neo-rs clusters.

    import ZODB, neo_rs
    db = ZODB.DB(neo_rs.Storage(master_nodes="127.0.0.1:10000", name="cluster"))

The storage is a drop-in replacement for NEO's ``neo.client.Storage``: same constructor
arguments (``master_nodes``, ``name``, ``read_only``, ``compress``, ``cache_size``, ``ca``,
``cert``, ``key``), same ZConfig section (``%import neo_rs`` then ``<NEOStorage>``), same
zodburi scheme (``neo://name@host:port``).

Network work happens in Rust (``neo_rs._neo``) with the GIL released. Several transactions may
be in two-phase commit at once (one per ZODB connection/thread), as with NEO.
"""

import itertools
import logging
import threading
import time
from io import BytesIO

from persistent.TimeStamp import TimeStamp
from zope.interface import implementer

import ZODB.interfaces
from ZODB import POSException
from ZODB._compat import dumps, loads, _protocol
from ZODB.BaseStorage import BaseStorage, DataRecord as _DataRecord, TransactionRecord as _TransactionRecord
from ZODB.ConflictResolution import ConflictResolvingStorage
from ZODB.utils import p64, u64, z64

from . import _neo

__all__ = ["Storage", "NeoError"]

NeoError = _neo.NeoError

_MAX_TID = b"\x7f\xff\xff\xff\xff\xff\xff\xff"


def _raise(e, data=None):
    """Re-raise a NeoError as ZODB's exception."""
    kind, message, oid, serial, committed = e.args
    oid = None if oid is None else p64(oid)
    if kind == "conflict":
        raise POSException.ConflictError(
            oid=oid, serials=(p64(committed), p64(serial)), data=data) from None
    if kind == "read_conflict":
        raise POSException.ReadConflictError(
            oid=oid, serials=(p64(committed), p64(serial))) from None
    if kind == "not_found":
        raise POSException.POSKeyError(oid) from None
    if kind == "read_only":
        raise POSException.ReadOnlyError() from None
    if kind == "transaction":
        raise POSException.StorageTransactionError(message) from None
    if kind == "undo":
        raise POSException.UndoError(message, oid) from None
    raise POSException.StorageError(message) from None


def _extension_bytes(transaction):
    ext = getattr(transaction, "extension_bytes", None)
    if ext is not None:
        return ext
    ext = getattr(transaction, "extension", None) or getattr(transaction, "_extension", None)
    return dumps(ext, _protocol) if ext else b""


def _extension(ext_bytes):
    if not ext_bytes:
        return {}
    try:
        ext = loads(ext_bytes)
    except Exception:
        return {}
    return ext if isinstance(ext, dict) else {}


def _as_bytes(s):
    if isinstance(s, str):
        return s.encode("utf-8")
    return s or b""


def _tid_time(tid):
    return TimeStamp(tid).timeTime()


class _Context(object):
    """The state of one transaction in two-phase commit."""

    __slots__ = ("transaction", "txn", "stored", "data_serials", "resolved")

    def __init__(self, transaction):
        self.transaction = transaction  # keeps id(transaction) valid while in 2PC
        self.txn = None                 # the _neo.Txn
        self.stored = {}                # oid -> data stored in this transaction (None: deletion)
        self.data_serials = {}          # oid -> serial whose data an undo stored (back-pointer)
        self.resolved = set()           # oids whose conflicts were resolved


class TransactionRecord(_TransactionRecord):
    """A transaction from ``iterator()``: iterable (more than once) over its records."""

    def __init__(self, tid, status, user, description, extension, extension_bytes, records):
        _TransactionRecord.__init__(self, tid, status, user, description, extension)
        self.extension_bytes = extension_bytes
        self._records = records

    def __iter__(self):
        return iter(self._records)


class _Iterator(object):
    """One-shot iterator over transactions, as of its creation."""

    def __init__(self, it):
        self._it = it

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            raise StopIteration
        try:
            t = self._it.next()
        except NeoError as e:
            _raise(e)
        if t is None:
            self._it = None
            raise StopIteration
        tid, packed, user, description, ext, records = t
        recs = [_DataRecord(oid, tid, data, data_txn) for oid, data, data_txn in records]
        return TransactionRecord(tid, "p" if packed else " ", user, description,
                                 _extension(ext), ext, recs)

    next = __next__

    def close(self):
        self._it = None


@implementer(
    ZODB.interfaces.IStorage,
    ZODB.interfaces.IMultiCommitStorage,
    ZODB.interfaces.IStorageIteration,
    ZODB.interfaces.IStorageUndoable,
    ZODB.interfaces.IExternalGC,
    ZODB.interfaces.IPrefetchStorage,
    ZODB.interfaces.ReadVerifyingStorage,
)
class Storage(ConflictResolvingStorage):
    """A ZODB storage backed by a neo-rs cluster."""

    def __init__(self, master_nodes, name, read_only=False, compress=None, logfile=None,
                 cache_size=None, ca=None, cert=None, key=None, connect_timeout=60.0,
                 dynamic_master_list=None, ignore_wrong_checksum=False, **kw):
        if kw:
            raise TypeError("unexpected arguments: %s" % ", ".join(sorted(kw)))
        self._master_nodes = master_nodes
        self._name = name
        self._read_only = bool(read_only)
        self._lock = threading.Lock()
        self._contexts = {}
        # Invalidations and tpc_finish callbacks are queued by the client in commit order and
        # delivered by Python threads (_deliver), one at a time.
        self._deliver_lock = threading.RLock()
        self._finish_callbacks = {}  # token -> [f, exception raised by f]
        self._tokens = itertools.count(1)
        self._db = None
        self._client = _call(_neo.Client, master_nodes, name, read_only=self._read_only,
                             ca=ca, cert=cert, key=key,
                             cache_size=None if cache_size is None else int(cache_size),
                             compress=True if compress is None else bool(compress),
                             connect_timeout=float(connect_timeout), logfile=logfile)
        if self._read_only:
            for method in ("new_oid", "tpc_begin", "store", "undo", "deleteObject",
                           "checkCurrentSerialInTransaction", "pack"):
                setattr(self, method, self._raise_read_only)

    @staticmethod
    def _raise_read_only(*args, **kw):
        raise POSException.ReadOnlyError()

    # ------------------------------------------------------------------ misc

    def getName(self):
        return self._name

    def sortKey(self):
        return "neo-rs:%s:%s" % (self._name, self._master_nodes)

    def __repr__(self):
        return "<%s cluster=%r masters=%r>" % (self.__class__.__name__, self._name, self._master_nodes)

    def getSize(self):
        # As ZODB's BaseStorage estimates it (NEO keeps no size figure): about 300 bytes per
        # object.
        return len(self) * 300

    def __len__(self):
        # The greatest OID of a committed object: about the number of objects (NEO reports the
        # last OID this client allocated). Deleted objects and OIDs skipped by aborted
        # transactions still count; ZODB's root (OID 0) does not.
        return _call(self._client.max_stored_oid)

    def isReadOnly(self):
        return self._read_only

    def supportsUndo(self):
        return True

    def registerDB(self, db):
        self._db = db
        self._client.queue_invalidations()
        ConflictResolvingStorage.registerDB(self, db)

    def _deliver(self):
        """Deliver what the client queued, in commit order: other clients' invalidations to
        the registered DB, and this process's tpc_finish callbacks. One thread delivers at a
        time and the others wait for it, so that whoever got a tid from lastTransaction finds
        every invalidation up to it delivered (the ZODB >= 5.6 rule)."""
        with self._deliver_lock:
            while True:
                events = self._client.take_events()
                if not events:
                    return
                for kind, tid, arg in events:
                    if kind == "f":
                        entry = self._finish_callbacks.get(arg)
                        if entry is not None and entry[0] is not None:
                            f, entry[0] = entry[0], None
                            try:
                                f(tid)
                            except BaseException as e:
                                entry[1] = e  # raised by the committer's tpc_finish
                        continue
                    db = self._db
                    if db is None:
                        continue
                    try:
                        if kind == "i":
                            db.invalidate(tid, arg)
                        else:
                            db.invalidateCache()
                    except Exception:
                        logger.exception("invalidation of %r failed", tid)

    def close(self):
        client = getattr(self, "_client", None)
        if client is not None:
            client.close()

    def sync(self, force=True):
        _call(self._client.sync)

    def lastTransaction(self):
        # Read first: everything up to this tid is queued by now, and delivered below.
        tid = self._client.last_transaction()
        self._deliver()
        return tid

    def new_oid(self):
        return _call(self._client.new_oid)

    # ------------------------------------------------------------------ reads

    def load(self, oid, version=""):
        assert not version, "versions are not supported"
        r = _call(self._client.load_before, oid, _MAX_TID)
        if r is None:
            raise POSException.POSKeyError(oid)
        return r[0], r[1]

    def loadBefore(self, oid, tid):
        r = _call(self._client.load_before, oid, tid)
        if r is None:
            return None
        return r

    def prefetch(self, oids, tid):
        """Load these objects, as of before tid, into the client cache: many requests in
        flight instead of one round trip per object (ZODB's Connection.prefetch)."""
        _call(self._client.prefetch, list(oids), tid)

    def loadSerial(self, oid, serial):
        return _call(self._client.load_serial, oid, serial)

    def getTid(self, oid):
        return self.load(oid)[1]

    def history(self, oid, size=1, filter=None):
        result = []
        for serial, length, user, description, ext in _call(self._client.history, oid, max(int(size), 1)):
            d = {
                "tid": serial,
                "serial": serial,
                "time": _tid_time(serial),
                "user_name": user,
                "description": description,
                "size": length,
            }
            d.update(_extension(ext))
            if filter is None or filter(d):
                result.append(d)
        return result

    def iterator(self, start=None, stop=None):
        return _Iterator(self._client.iterator(start, stop))

    # ------------------------------------------------------------------ undo log

    def _undo_entries(self):
        """Undo log entries, newest first (a generator that pages)."""
        offset, page = 0, 100
        while True:
            tids = _call(self._client.undoable_tids, offset, page)
            for tid in tids:
                tid, user, description, ext, packed, oids = _call(self._client.transaction_info, tid)
                d = {"id": tid, "time": _tid_time(tid), "user_name": user, "description": description}
                d.update(_extension(ext))
                yield d
            if len(tids) < page:
                return
            offset += page
            page = min(page * 4, 10000)

    def undoLog(self, first=0, last=-20, filter=None):
        if last < 0:
            last = first - last
        result = []
        if last <= first:
            return result
        i = 0
        for d in self._undo_entries():
            if filter is not None and not filter(d):
                continue
            if i >= first:
                result.append(d)
            i += 1
            if i >= last:
                break
        return result

    def undoInfo(self, first=0, last=-20, specification=None):
        if specification:
            def filter(d):
                for k, v in specification.items():
                    if k not in d or d[k] != v:
                        return False
                return True
        else:
            filter = None
        return self.undoLog(first, last, filter)

    # ------------------------------------------------------------------ two-phase commit

    def _context(self, transaction):
        with self._lock:
            ctx = self._contexts.get(id(transaction))
        if ctx is None or ctx.txn is None:
            raise POSException.StorageTransactionError(self, transaction)
        return ctx

    def tpc_begin(self, transaction, tid=None, status=" "):
        if self._read_only:
            raise POSException.ReadOnlyError()
        key = id(transaction)
        with self._lock:
            if key in self._contexts:
                raise POSException.StorageTransactionError(
                    "Duplicate tpc_begin calls for same transaction")
            ctx = self._contexts[key] = _Context(transaction)
        try:
            ctx.txn = _call(self._client.tpc_begin, _as_bytes(transaction.user),
                            _as_bytes(transaction.description), _extension_bytes(transaction), tid)
        except BaseException:
            with self._lock:
                self._contexts.pop(key, None)
            raise

    def store(self, oid, serial, data, version, transaction):
        ctx = self._context(transaction)
        if version:
            raise POSException.Unsupported("versions are not supported")
        if serial is None:
            serial = z64
        try:
            self._client.store(ctx.txn, oid, serial, data)
        except NeoError as e:
            _raise(e, data)
        ctx.stored[oid] = data
        ctx.data_serials.pop(oid, None)
        return None

    def deleteObject(self, oid, serial, transaction):
        ctx = self._context(transaction)
        try:
            self._client.store(ctx.txn, oid, serial, None)
        except NeoError as e:
            _raise(e)
        ctx.stored[oid] = None

    def checkCurrentSerialInTransaction(self, oid, serial, transaction):
        ctx = self._context(transaction)
        try:
            self._client.check_current_serial(ctx.txn, oid, serial)
        except NeoError as e:
            _raise(e)

    def tpc_vote(self, transaction):
        ctx = self._context(transaction)
        while True:
            conflicts = _call(self._client.tpc_vote, ctx.txn)
            if not conflicts:
                break
            for oid, serial, committed, read, data in conflicts:
                if read:
                    raise POSException.ReadConflictError(oid=oid, serials=(committed, serial))
                if data is None:
                    raise POSException.ConflictError(oid=oid, serials=(committed, serial))
                # Raises ConflictError if it cannot resolve.
                data = self.tryToResolveConflict(oid, committed, serial, data)
                try:
                    self._client.store(ctx.txn, oid, committed, data)
                except NeoError as e:
                    _raise(e, data)
                ctx.stored[oid] = data
                ctx.resolved.add(oid)
        return list(ctx.resolved) or None

    def tpc_finish(self, transaction, f=None):
        with self._lock:
            ctx = self._contexts.get(id(transaction))
        if ctx is None or ctx.txn is None:
            raise POSException.StorageTransactionError(self, transaction)
        token = next(self._tokens)
        entry = self._finish_callbacks[token] = [f or _no_callback, None]
        try:
            tid = _call(self._client.tpc_finish, ctx.txn, token)
            # Runs f(tid) in order with the invalidations of other commits (unless another
            # thread delivering them got there first).
            self._deliver()
        finally:
            self._finish_callbacks.pop(token, None)
            with self._lock:
                self._contexts.pop(id(transaction), None)
        if entry[1] is not None:
            raise entry[1]
        return tid

    def tpc_abort(self, transaction):
        with self._lock:
            ctx = self._contexts.pop(id(transaction), None)
        if ctx is not None and ctx.txn is not None:
            try:
                self._client.tpc_abort(ctx.txn)
            except NeoError:
                pass

    def tpc_transaction(self):
        return None

    # ------------------------------------------------------------------ undo

    def undo(self, transaction_id, transaction):
        ctx = self._context(transaction)
        undone = transaction_id
        plan = _call(self._client.undo_plan, undone)
        oids = []
        for oid, current, undo_serial, is_current in plan:
            if oid in ctx.stored:
                # Already changed by this transaction (several undos at once): current if what
                # it stored is the data of the undone revision.
                is_current = ctx.data_serials.get(oid) == undone
            if is_current:
                # Back to the data of undo_serial, recorded as a back-pointer to it.
                data = None
                if undo_serial is not None:
                    rev = _call(self._client.load_revision, oid, undo_serial)
                    if rev is None:
                        raise POSException.UndoError("non-undoable transaction", oid)
                    data = rev[0]
                _call(self._client.store, ctx.txn, oid, current, data, undo_serial)
                ctx.stored[oid] = data
                ctx.data_serials[oid] = undo_serial
            else:
                # Changed since (or already in this transaction): resolve the "undone -> undo"
                # change on top of the current state.
                if undo_serial is None:
                    raise POSException.UndoError("object creation was undone after being modified", oid)
                rev = _call(self._client.load_revision, oid, undo_serial)
                undo_data = None if rev is None else rev[0]
                if undo_data is None:
                    raise POSException.UndoError("non-undoable transaction", oid)
                if oid in ctx.stored:
                    current_data = ctx.stored[oid]
                else:
                    rev = _call(self._client.load_revision, oid, current)
                    current_data = None if rev is None else rev[0]
                if current_data is None:
                    raise POSException.UndoError("some data were modified by a later transaction", oid)
                try:
                    data = self.tryToResolveConflict(oid, current, undone, undo_data, current_data)
                except POSException.ConflictError:
                    raise POSException.UndoError("some data were modified by a later transaction", oid)
                try:
                    self._client.store(ctx.txn, oid, current, data)
                except NeoError as e:
                    _raise(e, data)
                ctx.stored[oid] = data
                ctx.data_serials.pop(oid, None)
            oids.append(oid)
        return None, oids

    # ------------------------------------------------------------------ pack

    def pack(self, t, referencesf=None, gc=None):
        """Drop the revisions that were not current at time ``t``. Like NEO, no garbage
        collection: unreachable objects are kept (``referencesf`` is not used)."""
        if self._read_only:
            raise POSException.ReadOnlyError()
        tid = TimeStamp(*(time.gmtime(t)[:5] + (t % 60,))).raw()
        if tid <= z64:
            return
        _call(self._client.pack, tid)
        db = self._db
        if db is not None:
            # Old revisions may be gone: caches must not keep serving them.
            try:
                db.invalidateCache()
            except Exception:
                pass

    copyTransactionsFrom = BaseStorage.copyTransactionsFrom


logger = logging.getLogger(__name__)


def _no_callback(tid):
    pass


def _call(f, *args, **kw):
    try:
        return f(*args, **kw)
    except NeoError as e:
        _raise(e)
