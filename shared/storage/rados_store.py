"""Ceph (RADOS) object store through librados: one pool (and optional namespace) per backend.

Writes are asynchronous (``aio``) with a window of at most ``aio_window`` operations in flight per backend,
shared by every thread of the process; a put returns only when every write is acknowledged by the OSDs
(durable on all replicas of the pool). Each head object carries the digest, size, layout and the caller's
UIDs as xattrs, written in the same atomic operation as the data. Large objects are chunked (see
:mod:`shared.storage.rados_layout`). ``rados_osd_op_timeout`` is always set, so a write to a placement group without
active OSDs fails after ``op_timeout_s`` (TimeoutError) instead of hanging; a user without caps on the pool
gets a PermissionError naming the user and the pool.

The ``rados`` module is Debian's python3-rados (not on PyPI); ``make rados-link`` links it into the venv.
"""

from __future__ import annotations

import contextlib
import errno
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import blake3

from shared.config import RadosBackendConfig
from shared.storage.objectstore import (
    BufferedWriter,
    Capability,
    CorruptObject,
    ObjectMissing,
    StoredObject,
    Write,
    check_digest,
    check_expected,
    content_digest,
)
from shared.storage.rados_layout import (
    LAYOUT_CHUNKED,
    LAYOUT_WHOLE,
    XATTR_PREFIX,
    Chunk,
    chunk_name,
    decode_manifest,
    encode_manifest,
    plan_chunks,
    xattrs_for,
)

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
# A streamed object's writes: pieces of a chunk, a few in flight (each is also copied by librados).
PIECE = 4 * 1024 * 1024
PIECES_IN_FLIGHT = 2


def chunk_xattrs(chunk_digest: str, digest: str) -> dict[str, bytes]:
    """A chunk object's xattrs: its own digest, and the object it is a chunk of."""
    return {f"{XATTR_PREFIX}digest": chunk_digest.encode(), f"{XATTR_PREFIX}chunk_of": digest.encode()}


def _epoch(mtime: time.struct_time | float) -> float:
    """An object's mtime as epoch seconds: python-rados gives a struct_time in local time (``localtime``), whole
    seconds only, so it is rounded up: an object must never look older than it is to the staging releaser."""
    return float(mtime) if isinstance(mtime, int | float) else time.mktime(mtime) + 1.0


def import_rados():
    """The librados binding, or an ImportError that says how to get it."""
    try:
        import rados
    except ImportError as exc:
        raise ImportError("the 'rados' module (Debian package python3-rados) is not importable: install it and "
                          "run `make rados-link` to link it into the virtual environment") from exc
    return rados


def connect_cluster(cfg: RadosBackendConfig):
    """A connected ``rados.Rados`` for a backend's cluster and user, with op timeouts set."""
    rados = import_rados()
    conf = {"keyring": cfg.keyring} if cfg.keyring else {}
    cluster = rados.Rados(conffile=cfg.ceph_conf, rados_id=cfg.ceph_user, conf=conf)
    timeout = str(max(1, round(cfg.op_timeout_s)))  # whole seconds: the options are integers
    # Without these an op on a placement group with no active OSD blocks forever.
    for key in ("rados_osd_op_timeout", "rados_mon_op_timeout", "client_mount_timeout"):
        cluster.conf_set(key, timeout)
    try:
        cluster.connect(timeout=int(max(1, cfg.op_timeout_s)))
    except rados.Error as exc:
        cluster.shutdown()
        raise ConnectionError(f"cannot connect to the Ceph cluster of {cfg.ceph_conf or 'the default ceph.conf'} "
                              f"as client.{cfg.ceph_user}: {exc}") from exc
    return cluster


class _Pending:
    """One in-flight aio operation: its completion, the op it keeps alive, and its outcome."""

    __slots__ = ("done", "ret", "data", "op", "what", "completion", "finished", "size")

    def __init__(self, what: str, size: int = 0):
        self.done = threading.Event()
        self.ret = 0
        self.data = b""
        self.op = None
        self.what = what
        self.completion = None  # writes: waited on without a callback
        self.finished = False
        self.size = size  # bytes counted against aio_window_bytes until finished


class RadosObjectStore:
    """Content-addressed objects in one RADOS pool/namespace."""

    # The study index lives in the omap of one object per study (services/store/study_index.py).
    capabilities: frozenset[Capability] = frozenset({Capability.STUDY_INDEX})

    def __init__(self, name: str, cfg: RadosBackendConfig, data_dir: Path | None = None):
        if not cfg.pool:
            raise ValueError(f"backend {name!r}: kind rados needs a pool")
        self.name = name
        self.cfg = cfg
        self._layouts: OrderedDict[str, tuple[int, list | None]] = OrderedDict()  # digest -> (size, chunks)
        self._layouts_lock = threading.Lock()
        self.rados = import_rados()
        self.cluster = connect_cluster(cfg)
        try:
            if not self.cluster.pool_exists(cfg.pool):
                raise LookupError(f"backend {name!r}: pool {cfg.pool!r} does not exist")
            self.io = self.cluster.open_ioctx(cfg.pool)
        except Exception:
            self.cluster.shutdown()
            raise
        if cfg.namespace:
            self.io.set_namespace(cfg.namespace)
        self._window = threading.BoundedSemaphore(cfg.aio_window)
        self._bytes = threading.Condition()
        self._bytes_in_flight = 0
        self.bytes_in_flight_peak = 0  # observed maximum, for tests and diagnostics

    # ------------------------------------------------------------------ errors
    def _where(self) -> str:
        ns = f" namespace {self.cfg.namespace!r}" if self.cfg.namespace else ""
        return f"pool {self.cfg.pool!r}{ns}"

    def _error(self, exc: Exception, action: str, oid: str) -> Exception:
        """A builtin exception with a message an operator can act on, for a librados error."""
        r = self.rados
        head = f"rados backend {self.name!r}: {action} {oid} in {self._where()}"
        if isinstance(exc, r.PermissionError):
            return PermissionError(f"{head}: permission denied: cephx user client.{self.cfg.ceph_user} has no "
                                   f"osd caps for {self._where()}")
        if isinstance(exc, r.TimedOut):
            return TimeoutError(f"{head}: timed out after {self.cfg.op_timeout_s:g}s (rados_osd_op_timeout): "
                                f"its placement group has no active OSD (OSDs down?)")
        if isinstance(exc, r.ObjectNotFound):
            return ObjectMissing(f"{head}: no such object")
        return OSError(f"{head}: {exc}")

    def _check(self, ret: int, action: str, oid: str) -> None:
        if ret >= 0:
            return
        r = self.rados
        by_errno = {1: r.PermissionError, 13: r.PermissionError, 110: r.TimedOut, 2: r.ObjectNotFound}
        cls = by_errno.get(-ret, r.Error)
        raise self._error(cls(f"errno {-ret}"), action, oid)

    # ------------------------------------------------------------------ aio with a bounded window
    # Writes carry no Python completion callback: a callback makes librados' finisher thread take the GIL
    # once per object (measured: a fifth of the client's CPU at 512 KiB). The submitter waits on its own
    # completions instead (without the GIL), oldest first, and frees a window slot once it has seen one end.
    def _submit(self, what: str, start: Callable[[_Pending, Callable], None]) -> _Pending:
        """Start one callback-driven aio op (reads) once a window slot is free; its completion frees the slot."""
        self._window.acquire()
        pend = _Pending(what)
        try:
            start(pend, self._completer(pend))
        except BaseException:
            self._window.release()
            raise
        return pend

    def _completer(self, pend: _Pending):
        def done(completion, data=None):
            pend.ret = completion.get_return_value()
            if data is not None:
                pend.data = data
            self._window.release()
            pend.done.set()
        return done

    def _take_slot(self, mine: deque[_Pending], size: int) -> None:
        """A window slot and ``size`` bytes of the byte budget for one write.

        While either is short, the caller finishes its own oldest write; with none of its own in flight
        it waits for the other callers' writes, which finish theirs the same way, so no two callers
        wait on each other. A write larger than the whole budget goes alone.
        """
        while not self._window.acquire(blocking=False):
            unfinished = next((p for p in mine if not p.finished), None)
            if unfinished is None:
                self._window.acquire()
                break
            self._finish(unfinished)
        try:
            while True:
                with self._bytes:
                    if not self._bytes_in_flight or self._bytes_in_flight + size <= self.cfg.aio_window_bytes:
                        self._bytes_in_flight += size
                        self.bytes_in_flight_peak = max(self.bytes_in_flight_peak, self._bytes_in_flight)
                        return
                    unfinished = next((p for p in mine if not p.finished), None)
                    if unfinished is None:
                        self._bytes.wait(0.05)
                        continue
                self._finish(unfinished)
        except BaseException:
            self._window.release()
            raise

    def _finish(self, pend: _Pending) -> None:
        """Wait for a write (librados enforces op_timeout) and free its op, window slot and bytes; idempotent."""
        if pend.finished:
            return
        try:
            pend.completion.wait_for_complete()
            pend.ret = pend.completion.get_return_value()
        finally:
            pend.finished = True
            pend.completion = None
            if pend.op is not None:
                pend.op.release()
                pend.op = None
            self._window.release()
            with self._bytes:
                self._bytes_in_flight -= pend.size
                self._bytes.notify_all()

    def _wait(self, pending: list[_Pending], action: str) -> None:
        """Wait for every op; raise the first failure (all of them have finished by then)."""
        first = None
        for p in pending:
            if p.completion is not None or p.finished:
                self._finish(p)
            # librados enforces op_timeout; the margin only guards against a lost callback.
            elif not p.done.wait(self.cfg.op_timeout_s * 2 + 30):
                first = first or TimeoutError(f"rados backend {self.name!r}: {action} {p.what}: no completion")
                continue
            if p.ret < 0 and first is None:
                try:
                    self._check(p.ret, action, p.what)
                except Exception as exc:
                    first = exc
        if first is not None:
            raise first

    def _aio_write(self, oid: str, data: bytes | memoryview, xattrs: dict[str, bytes],
                   mine: deque[_Pending]) -> _Pending:
        """Start replacing ``oid`` with ``data`` and its xattrs in one atomic write op; appended to ``mine``."""
        def fill(op) -> None:
            op.write_full(data if isinstance(data, bytes) else bytes(data))
            for k, v in xattrs.items():
                op.set_xattr(k, v)
        return self._aio_operate(oid, fill, mine, len(data))

    def _aio_operate(self, oid: str, fill: Callable[[object], None], mine: deque[_Pending], size: int = 0
                     ) -> _Pending:
        """Start one write op of ``size`` bytes on ``oid`` (``fill`` adds its steps) once the window has room;
        appended to ``mine``."""
        self._take_slot(mine, size)
        pend = _Pending(oid, size)
        try:
            op = pend.op = self.io.create_write_op()
            fill(op)
            # python-rados hands librados a pointer to ``mtime`` whatever its value, and 0 is taken as the epoch:
            # the object's mtime must be now, since the staging releaser's grace runs from it.
            pend.completion = self.io.operate_aio_write_op(op, oid, mtime=int(time.time()))
        except BaseException:
            if pend.op is not None:
                pend.op.release()
            self._window.release()
            with self._bytes:
                self._bytes_in_flight -= size
                self._bytes.notify_all()
            raise
        mine.append(pend)
        return pend

    def _aio_read(self, oid: str, length: int, offset: int = 0) -> _Pending:
        def start(pend: _Pending, cb) -> None:
            self.io.aio_read(oid, length, offset, oncomplete=cb)
        return self._submit(oid, start)

    # ------------------------------------------------------------------ the ObjectStore interface
    def put(self, digest: str, data: bytes | bytearray | memoryview, meta: dict[str, str] | None = None) -> None:
        """Store ``data`` under ``digest`` (chunked above ``chunk_bytes``); durable on every replica when it returns."""
        check_digest(digest)
        view = memoryview(data).cast("B")
        size = len(view)
        chunks = plan_chunks(digest, size, self.cfg.chunk_bytes)
        # Rewriting a whole object is idempotent (same key, same bytes, one atomic op) and cheaper than a stat
        # first; chunked objects are worth the check.
        if chunks and self.exists(digest):
            self._touch(digest)
            return
        mine: deque[_Pending] = deque()
        if not chunks:
            whole = data if isinstance(data, bytes) else view
            self._wait([self._aio_write(digest, whole, xattrs_for(digest, size, LAYOUT_WHOLE, meta), mine)], "write")
            return
        described = []
        try:
            for c in chunks:
                part = view[c.offset:c.offset + c.size]
                cdig = content_digest(part)
                described.append(type(c)(c.name, c.offset, c.size, cdig))
                self._aio_write(c.name, part, chunk_xattrs(cdig, digest), mine)
        finally:
            self._wait(list(mine), "write chunk")
        self._write_manifest(digest, size, described, meta)

    def _touch(self, digest: str) -> None:
        """An object stored again: bump the head's version and mtime, so a releaser judging it keeps it."""
        self.io.set_xattr(digest, f"{XATTR_PREFIX}touched", b"")

    def _write_manifest(self, digest: str, size: int, chunks: list[Chunk], meta: dict[str, str] | None) -> None:
        """A chunked object's head, written last: it appears only once every chunk is durable."""
        manifest = encode_manifest(digest, size, chunks)
        self._wait([self._aio_write(digest, manifest, xattrs_for(digest, size, LAYOUT_CHUNKED, meta), deque())],
                   "write")

    def put_many(self, items: Iterable[Write]) -> list[Exception | None]:
        """:meth:`put` for several objects with their writes in flight together (within the aio window).

        ``items`` may be a generator: each write is submitted as soon as it is produced. Returns one
        outcome per item: None when that object is durable on every replica, else the error.
        """
        errors: list[Exception | None] = []
        # Ops are reaped as soon as they have completed: a finished op still holds librados' copy of its
        # bytes, and holding a whole batch's copies made the allocator hand out fresh (page-faulting) memory.
        mine: deque[_Pending] = deque()
        positions: deque[int] = deque()  # the item of each write in ``mine``, in the same order

        def reap(block: bool) -> None:
            while mine and (block or mine[0].finished or mine[0].completion.is_complete()):
                pend, i = mine.popleft(), positions.popleft()
                try:
                    self._wait([pend], "write")
                except Exception as exc:
                    errors[i] = exc

        try:
            for i, (digest, data, meta) in enumerate(items):
                errors.append(None)
                try:
                    check_digest(digest)
                    view = memoryview(data).cast("B")
                    if plan_chunks(digest, len(view), self.cfg.chunk_bytes):
                        self.put(digest, data, meta)  # large: its chunks already go out together
                        continue
                    whole = data if isinstance(data, bytes) else view
                    self._aio_write(digest, whole, xattrs_for(digest, len(view), LAYOUT_WHOLE, meta), mine)
                    positions.append(i)
                except Exception as exc:
                    errors[i] = exc
                finally:
                    data = view = whole = None
                reap(block=False)
        finally:
            reap(block=True)
        return errors

    def _stat(self, oid: str) -> int:
        try:
            size, _ = self.io.stat(oid)
        except self.rados.Error as exc:
            raise self._error(exc, "stat", oid) from None
        return size

    def get(self, digest: str) -> bytes:
        """The object's bytes, reassembled from chunks when needed and verified against the digest."""
        check_digest(digest)
        size = self._stat(digest)
        try:
            layout = self.io.get_xattr(digest, f"{XATTR_PREFIX}layout").decode()
        except self.rados.Error:
            layout = LAYOUT_WHOLE
        if layout == LAYOUT_CHUNKED:
            data = self._read_chunked(digest, self._read_whole(digest, size))
        else:
            data = self._read_whole(digest, size)
        if content_digest(data) != digest:
            raise CorruptObject(f"rados backend {self.name!r}: object {digest} in {self._where()} "
                                f"does not match its digest")
        return data

    def _read_whole(self, oid: str, size: int) -> bytes:
        try:
            data = self.io.read(oid, length=size) if size else b""
        except self.rados.Error as exc:
            raise self._error(exc, "read", oid) from None
        if len(data) != size:
            raise CorruptObject(f"rados backend {self.name!r}: {oid}: read {len(data)} of {size} bytes")
        return data

    def _read_chunked(self, digest: str, raw_manifest: bytes) -> bytes:
        try:
            size, chunks = decode_manifest(raw_manifest, digest)
        except ValueError as exc:
            raise CorruptObject(f"rados backend {self.name!r}: {exc}") from None
        out = bytearray(size)
        pending = [(c, self._aio_read(c.name, c.size)) for c in chunks]
        self._wait([p for _, p in pending], "read chunk")
        for c, p in pending:
            if len(p.data) != c.size:
                raise CorruptObject(f"rados backend {self.name!r}: chunk {c.name}: {len(p.data)} of {c.size} bytes")
            if c.digest and content_digest(p.data) != c.digest:
                raise CorruptObject(f"rados backend {self.name!r}: chunk {c.name} of {digest} in {self._where()} "
                                    f"does not match its digest")
            out[c.offset:c.offset + c.size] = p.data
        return bytes(out)

    def _layout(self, digest: str) -> tuple[int, list | None]:
        """(size, chunks or None for a whole object) of an object, remembered: an object's bytes never change
        under its digest, and a ranged read (a retrieve streams 1 MiB at a time) would otherwise repeat a stat,
        an xattr read and, for a chunked object, its manifest's read on every call."""
        with self._layouts_lock:
            known = self._layouts.get(digest)
            if known is not None:
                self._layouts.move_to_end(digest)
                return known
        size = self._stat(digest)
        try:
            layout = self.io.get_xattr(digest, f"{XATTR_PREFIX}layout").decode()
        except self.rados.Error:
            layout = LAYOUT_WHOLE
        if layout == LAYOUT_CHUNKED:
            try:
                known = decode_manifest(self._read_whole(digest, size), digest)
            except ValueError as exc:
                raise CorruptObject(f"rados backend {self.name!r}: {exc}") from None
        else:
            known = (size, None)
        with self._layouts_lock:
            self._layouts[digest] = known
            while len(self._layouts) > 1024:
                self._layouts.popitem(last=False)
        return known

    def read_range(self, digest: str, offset: int, length: int) -> tuple[bytes, int]:
        check_digest(digest)
        total, chunks = self._layout(digest)
        try:
            if chunks is None:
                try:
                    return (self.io.read(digest, length=length, offset=offset) if length else b""), total
                except self.rados.Error as exc:
                    raise self._error(exc, "read", digest) from None
            end = min(offset + length, total)
            # only the overlapping slice of each chunk: a 1 MiB range of a 2 GiB object reads 1 MiB, not a chunk
            wanted = [(c, max(offset, c.offset) - c.offset, min(end, c.offset + c.size) - c.offset)
                      for c in chunks if c.offset < end and c.offset + c.size > offset]
            pending = [self._aio_read(c.name, hi - lo, lo) for c, lo, hi in wanted]
            self._wait(pending, "read chunk")
        except Exception:  # removed meanwhile, or unreadable: ask the cluster again next time
            with self._layouts_lock:
                self._layouts.pop(digest, None)
            raise
        return b"".join(p.data for p in pending), total

    def exists(self, digest: str) -> bool:
        """Whether the (complete) object is stored."""
        check_digest(digest)
        try:
            self.io.stat(digest)
        except self.rados.ObjectNotFound:
            return False
        except self.rados.Error as exc:
            raise self._error(exc, "stat", digest) from None
        return True

    def xattrs(self, digest: str) -> dict[str, str]:
        """The head object's dicomflow xattrs (digest, size, layout, UIDs), without the prefix."""
        try:
            attrs = dict(self.io.get_xattrs(check_digest(digest)))
        except self.rados.Error as exc:
            raise self._error(exc, "get xattrs of", digest) from None
        return {k[len(XATTR_PREFIX):]: v.decode() for k, v in attrs.items() if k.startswith(XATTR_PREFIX)}

    def location(self, digest: str) -> str:
        ns = f"{self.cfg.namespace}/" if self.cfg.namespace else ""
        return f"rados://{self.cfg.pool}/{ns}{check_digest(digest)}"

    # ------------------------------------------------------------------ omap (the per-study index objects)
    def omap_set_many(self, writes: list[tuple[str, dict[str, bytes]]]) -> list[Exception | None]:
        """Set omap keys of several objects (creating them), their write ops in flight together; one outcome per object.

        Under load an omap write queues behind the object writes on its OSD (tens of milliseconds
        measured), so a batch's study index objects are not written one after the other.
        """
        mine: deque[_Pending] = deque()
        pending: list[_Pending | Exception] = []
        try:
            for oid, entries in writes:
                keys, values = tuple(entries), tuple(entries.values())
                try:
                    pending.append(self._aio_operate(oid, lambda op, k=keys, v=values: self.io.set_omap(op, k, v),
                                                     mine))
                except self.rados.Error as exc:
                    pending.append(self._error(exc, "write omap of", oid))
        finally:
            errors: list[Exception | None] = []
            for pend in pending:
                if isinstance(pend, Exception):
                    errors.append(pend)
                    continue
                try:
                    self._wait([pend], "write omap of")
                    errors.append(None)
                except Exception as exc:
                    errors.append(exc)
        return errors

    def omap_get(self, oid: str, page: int = 1000) -> dict[str, bytes]:
        """Every omap key/value of ``oid`` (empty when it does not exist)."""
        rados = self.rados
        out: dict[str, bytes] = {}
        after = ""
        while True:
            try:
                with rados.ReadOpCtx() as op:
                    it, _ = self.io.get_omap_vals(op, after, "", page)
                    self.io.operate_read_op(op, oid)
                    batch = dict(it)
            except rados.ObjectNotFound:
                return out
            except rados.Error as exc:
                raise self._error(exc, "read omap of", oid) from None
            out.update(batch)
            if len(batch) < page:
                return out
            after = max(batch)

    def object_names(self, prefix: str = "") -> Iterator[str]:
        """Names of the objects in this pool/namespace that start with ``prefix`` (a full listing: slow on big pools)."""
        try:
            for obj in self.io.list_objects():
                if obj.key.startswith(prefix):
                    yield obj.key
        except self.rados.Error as exc:
            raise self._error(exc, "list", "objects") from None

    def remove(self, digest: str) -> None:
        """Remove an object and its chunks (tests and tools; the store never deletes)."""
        check_digest(digest)
        with self._layouts_lock:
            self._layouts.pop(digest, None)
        try:
            layout = self.io.get_xattr(digest, f"{XATTR_PREFIX}layout").decode()
            if layout == LAYOUT_CHUNKED:
                _, chunks = decode_manifest(self._read_whole(digest, self._stat(digest)), digest)
                for c in chunks:
                    self.io.remove_object(c.name)
            self.io.remove_object(digest)
        except self.rados.ObjectNotFound:
            pass
        except self.rados.Error as exc:
            raise self._error(exc, "remove", digest) from None

    def objects(self) -> Iterator[StoredObject]:
        """Every head object (64 hex digits: not chunks, not study index objects) with its size and mtime."""
        for name in self.object_names():
            if not _DIGEST.match(name):
                continue
            try:
                size, mtime = self.io.stat(name)
            except self.rados.ObjectNotFound:
                continue
            except self.rados.Error as exc:
                raise self._error(exc, "stat", name) from None
            yield StoredObject(name, size, _epoch(mtime))

    def remove_unless_touched(self, digest: str, not_after: float) -> bool:
        """Remove the head only if its version is still the one whose mtime was judged (a guarded write op:
        a put or touch in between changes the version and the removal fails), then its chunks."""
        check_digest(digest)
        rados = self.rados
        try:
            _, mtime = self.io.stat(digest)
            version = self.io.get_last_version()
            if _epoch(mtime) > not_after:
                return False
            chunks = []
            if self.io.get_xattr(digest, f"{XATTR_PREFIX}layout").decode() == LAYOUT_CHUNKED:
                _, chunks = decode_manifest(self._read_whole(digest, self._stat(digest)), digest)
            with rados.WriteOpCtx() as op:
                op.assert_version(version)
                op.remove()
                self.io.operate_write_op(op, digest)
        except rados.ObjectNotFound:
            return False
        except rados.Error as exc:
            if getattr(exc, "errno", None) in (errno.ERANGE, errno.EOVERFLOW):
                return False  # written since it was judged
            raise self._error(exc, "remove", digest) from None
        with self._layouts_lock:
            self._layouts.pop(digest, None)
        for c in chunks:
            with contextlib.suppress(rados.ObjectNotFound):
                self.io.remove_object(c.name)
        return True

    def pool_info(self) -> dict:
        """Pool name, namespace and the librados pool stats (for checks and benchmarks)."""
        return {"pool": self.cfg.pool, "namespace": self.cfg.namespace, **self.io.get_stats()}

    def prepare_writer(self) -> None:
        """Nothing to prepare: the cluster connection is made when the backend opens."""

    def writer(self, limit: int, digest: str | None = None) -> BufferedWriter | RadosWriter:
        """With the digest known (a copy), a :class:`RadosWriter` that writes chunks as they fill; without it the
        chunks cannot be named yet (``<digest>.<n>``), so the bytes are kept in memory until commit."""
        if digest is None:
            return BufferedWriter(self, limit)
        return RadosWriter(self, limit, digest)

    def close(self) -> None:
        try:
            self.io.close()
        finally:
            self.cluster.shutdown()


class RadosWriter:
    """An object of known digest streamed into RADOS (a placement copy), written as its bytes arrive.

    The layout is :meth:`RadosObjectStore.put`'s: an object of up to ``chunk_bytes`` is held and written
    whole at commit (the one-write path); once it outgrows a chunk, its chunks ``<digest>.<n>`` are
    written in pieces of :data:`PIECE` bytes as they arrive (a chunk's first piece replaces whatever a
    killed writer left there, its last one sets its digest xattrs), and the manifest goes under the
    digest at commit, once every chunk is durable and the bytes matched the digest. So nothing is
    visible before commit, and a writer killed before it leaves chunks no reader looks for, overwritten
    by the retry, as a killed put does. Memory: the first chunk while it is not known to be the only
    one, then at most :data:`PIECES_IN_FLIGHT` pieces (and librados' copies of them).
    """

    def __init__(self, store: RadosObjectStore, limit: int, digest: str):
        self._store = store
        self._limit = limit
        self._expected = check_digest(digest)
        self._chunk = store.cfg.chunk_bytes
        self._held: deque[bytes] = deque()  # bytes not sent yet, as they came (a bytearray grown to a chunk
        self._held_bytes = 0  # was copied whole at each reallocation: twice a chunk for a moment)
        self._hash = blake3.blake3()
        self._streaming = False  # larger than a chunk: its chunks are being written
        self._present = False  # the object was already stored when streaming began: only touched at commit
        self._chunks: list[Chunk] = []  # chunks complete, with their digests
        self._in_chunk = 0  # bytes of the current chunk sent
        self._chunk_hash = blake3.blake3()
        self._mine: deque[_Pending] = deque()
        self._closed = False
        self._committed = False
        self.size = 0
        self.failure: Exception | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.size += len(data)
        if self._closed or self.failure is not None:
            return
        if self.size > self._limit:
            self.close()
            return
        self._hash.update(data)
        self._held.append(bytes(data))  # the caller may reuse its buffer
        self._held_bytes += len(data)
        try:
            if not self._streaming:
                if self._held_bytes <= self._chunk:
                    return  # may still be an object of one chunk, written whole
                self._streaming = True
                self._present = self._store.exists(self._expected)  # as put: a stored object is only touched
            self._send(final=False)
        except Exception as exc:
            self.failure = exc
            self._held.clear()

    def _take(self, n: int) -> bytes:
        """The first ``n`` bytes held, no longer held."""
        parts = []
        while n:
            head = self._held.popleft()
            if len(head) > n:
                self._held.appendleft(head[n:])
                head = head[:n]
            parts.append(head)
            n -= len(head)
            self._held_bytes -= len(head)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _send(self, final: bool) -> None:
        """Write the held bytes as pieces (each within one chunk); all of them when ``final``."""
        while self._held_bytes:
            n = min(self._held_bytes, PIECE, self._chunk - self._in_chunk)
            if not final and n < PIECE and self._in_chunk + n < self._chunk:
                return  # too little for a piece: wait for more
            piece = self._take(n)
            self._piece(piece, ends_chunk=self._in_chunk + n == self._chunk)
        if final and self._in_chunk:
            self._piece(b"", ends_chunk=True)  # the last chunk, shorter than the others

    def _piece(self, piece: bytes, ends_chunk: bool) -> None:
        """Write ``piece`` at the current chunk's end; set the chunk's xattrs with its last piece."""
        n = len(self._chunks)
        name = chunk_name(self._expected, n)
        offset, first = self._in_chunk, self._in_chunk == 0
        self._chunk_hash.update(piece)
        self._in_chunk += len(piece)
        xattrs = {}
        if ends_chunk:
            chunk = Chunk(name, n * self._chunk, self._in_chunk, self._chunk_hash.hexdigest())
            self._chunks.append(chunk)
            self._in_chunk, self._chunk_hash = 0, blake3.blake3()
            xattrs = chunk_xattrs(chunk.digest, self._expected)
        if self._present:
            return
        while len(self._mine) >= PIECES_IN_FLIGHT:
            self._store._wait([self._mine.popleft()], "write chunk")

        def fill(op) -> None:
            if first:
                op.write_full(piece)  # replaces a killed writer's leftover of this chunk
            elif piece:
                op.write(piece, offset)
            for k, v in xattrs.items():
                op.set_xattr(k, v)
        # A client's ops on one object are applied in the order they were sent: pieces may be in flight together.
        self._store._aio_operate(name, fill, self._mine, len(piece))

    def contents(self) -> bytes | bytearray | memoryview:
        if self._streaming:
            raise ValueError("a streamed object's bytes went to RADOS: only an object of one chunk is held")
        return b"".join(self._held)

    def digest(self) -> str:
        return self._hash.hexdigest()

    def commit(self, meta: dict[str, str] | None = None) -> str:
        """Durable under its digest when this returns, as put makes it; CorruptObject (nothing committed)
        when the bytes do not match the digest the writer was opened with."""
        try:
            if self.failure is not None:
                raise self.failure
            if self.size > self._limit:
                raise ValueError(f"{self.size} bytes exceed the writer's limit of {self._limit}")
            if self._closed:
                raise ValueError("the writer is closed")
            check_expected(self._store.name, self.digest(), self._expected, self.size)
            store = self._store
            if not self._streaming:
                store.put(self._expected, self._take(self._held_bytes), meta)
            else:
                self._send(final=True)
                mine, self._mine = list(self._mine), deque()
                store._wait(mine, "write chunk")
                if self._present:
                    store._touch(self._expected)
                else:
                    store._write_manifest(self._expected, self.size, self._chunks, meta)
            self._committed = True
            return self._expected
        finally:
            self.close()

    def close(self) -> None:
        """Discard an object not committed: wait for its writes in flight, then remove the chunks begun."""
        if self._closed:
            return
        self._closed = True
        self._held.clear()
        mine, self._mine = list(self._mine), deque()
        with contextlib.suppress(Exception):
            self._store._wait(mine, "write chunk")
        begun = len(self._chunks) + (1 if self._in_chunk else 0)
        if self._committed or self._present or not self._streaming or not begun:
            return
        with contextlib.suppress(Exception):
            # Not when another writer of the same digest committed it meanwhile: the chunks are its chunks.
            if self._store.exists(self._expected):
                return
            for n in range(begun):
                with contextlib.suppress(self._store.rados.ObjectNotFound):
                    self._store.io.remove_object(chunk_name(self._expected, n))
