"""ONNX Runtime shards: the Jetson path (TensorRT / CUDA execution providers), and the fastest
CPU backend here. The graph is built straight from the model's tensors (``onnx_graph``):
quantized GGUF blocks become ``MatMulNBits`` weights as they are, attention is
``GroupQueryAttention`` over one KV buffer per layer that is past and present at once. Caches
stay in ONNX Runtime as OrtValues bound with IO binding; a decode step writes its one new
position in place.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import threading
import time
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from mesh.backends import onnx_graph
from mesh.backends.base import SETTLE, Shard, ShardCache, StepItem
from mesh.errors import BackendUnavailable, InvalidRequest
from mesh.heap import drop_mapped, release_free, trim as trim_heap
from mesh.layers import LayerRange

log = logging.getLogger(__name__)

# --dtype -> what the graph holds: "auto" is the file's own blocks (fp32 for float files)
PRECISIONS = {"auto": "auto", "gguf": "auto", "float32": "float32", "int8": "int8",
              "int4": "int4"}
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
FIRST_CAPACITY = 256  # KV positions allocated for a new request; doubled as it grows


def choose_providers(available: list[str], requested: str | None = None) -> list[str]:
    """TensorRT, then CUDA, then CPU, among what this onnxruntime build has; ``requested``
    (a provider name, or 'tensorrt' / 'cuda' / 'cpu') overrides the order."""
    aliases = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider",
               "cpu": "CPUExecutionProvider"}
    if requested:
        name = aliases.get(requested.lower(), requested)
        if name not in available:
            raise BackendUnavailable(f"execution provider {name} is not available here "
                                     f"(have: {', '.join(available)})")
        return [name] + (["CPUExecutionProvider"] if name != "CPUExecutionProvider" else [])
    chosen = [p for p in PROVIDER_ORDER if p in available]
    return chosen or list(available)


_SERIALS = itertools.count()


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class KVPool:
    """Every request's KV cache on one shard, as slots of one buffer per layer:
    (slots, kv_heads, capacity, head_dim). A request's cache is a slot; a batch of decode
    steps runs over the slot range [0, n) in one call (GroupQueryAttention takes a length per
    row), and one request alone runs on the view [s, s + 1). Slots and capacity grow by
    doubling (one copy) and shrink again (to a quarter or less in use) once requests end and
    it has not grown for SETTLE seconds, so memory follows the requests actually open
    without a copy of every cache at each burst."""

    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, max_positions: int,
                 device: str):
        self.n_layers, self.kv_heads, self.head_dim = n_layers, kv_heads, head_dim
        self.max_positions, self.device = max_positions, device
        self.slots, self.capacity = 0, 0
        self.k: list[np.ndarray] = []
        self.v: list[np.ndarray] = []
        self.used = weakref.WeakValueDictionary()  # slot -> ORTCache
        # caches come and go on other threads (a node's gRPC workers) than the one that runs
        # the graph: resizing must never happen under a running step. Re-entrant, since a
        # cache's finalizer can run inside a step on the compute thread; ``held`` counts who
        # holds it, and the pool shrinks only when nobody does.
        self.lock = threading.RLock()
        self._holders = 0
        self._slack = False  # caches ended while the pool was held: shrink when it is not
        self._grown_at = float("-inf")  # time.monotonic() of the last growth

    @contextmanager
    def held(self):
        """Hold the pool for a step (or a copy): no resize but the holder's own."""
        with self.lock:
            if self._slack and not self._holders:
                self._shrink()
            self._holders += 1
            try:
                yield
            finally:
                self._holders -= 1

    def allocate(self, cache: "ORTCache") -> int:
        with self.held():
            slot = next(i for i in range(len(self.used) + 1) if i not in self.used)
            self.used[slot] = cache
            if slot >= self.slots:
                self._resize(max(1, 2 * self.slots), self.capacity or FIRST_CAPACITY)
            return slot

    def free(self, slot: int, serial: int) -> None:
        """Cache ``serial`` gives up ``slot`` (released, or collected: its finalizer can
        run after the dictionary forgot it and another cache took the slot, which keeps
        it)."""
        with self.lock:
            cur = self.used.get(slot)
            if cur is not None and cur.serial != serial:
                return
            self.used.pop(slot, None)
            if self._holders:  # inside a step on this thread: later
                self._slack = True
            else:
                self._shrink()

    def compact(self) -> None:
        """Cut the pool to what the open caches need now, quarter rule or not (an engine
        calls this when it goes idle: what is left open then are kept caches)."""
        with self.lock:
            if not self._holders:
                self._shrink(full=True)

    def _shrink(self, full: bool = False) -> None:
        """Give memory back once a quarter or less of the slots, or of the positions, is
        in use: the caches still open move to the first slots and the buffers are cut to
        the next power of two that holds them (a copy; the doubling on the way up, the
        quarter on the way down and SETTLE seconds since the last growth keep copies rare).
        ``full``: to what the open caches need, at once. Hold ``lock``, nobody in ``held``."""
        if not full and time.monotonic() - self._grown_at < SETTLE:
            self._slack = True  # looked at again by the next step, or by ``compact``
            return
        self._slack = False
        self._holders += 1  # a cache collected meanwhile (its finalizer frees it) waits
        try:
            self._shrink_now(list(self.used.values()), 1 if full else 4)
        finally:
            self._holders -= 1

    def _shrink_now(self, caches: list, quarter: int) -> None:
        if not caches:
            self.k, self.v = [], []
            self.slots = self.capacity = 0
            release_free()
            return
        slots, capacity = self.slots, self.capacity
        if quarter * len(caches) <= self.slots:
            slots = min(self.slots, max(2, _pow2(len(caches))))
        longest = max(c.offset for c in caches) + 1  # a step writes one position past it
        if quarter * longest <= self.capacity and self.capacity > FIRST_CAPACITY:
            capacity = min(self.capacity, max(FIRST_CAPACITY, _pow2(longest)))
        if (slots, capacity) == (self.slots, self.capacity):
            return
        free = [s for s in range(slots) if s not in self.used]
        for c in caches:
            if c.slot >= slots:
                self._move(c, free.pop())
        self._resize(slots, capacity)
        release_free()

    def ensure(self, total: int) -> None:
        """Hold ``lock`` around this and the run that needs it."""
        if total > self.capacity:
            cap = min(max(total, 2 * self.capacity), max(total, self.max_positions))
            self._resize(self.slots, cap)

    def _resize(self, slots: int, capacity: int) -> None:
        shape = (slots, self.kv_heads, capacity, self.head_dim)
        s, c = min(slots, self.slots), min(capacity, self.capacity)
        for bufs in (self.k, self.v):
            old = list(bufs)
            bufs.clear()
            for i in range(self.n_layers):
                new = np.zeros(shape, dtype=np.float32)
                if old:
                    new[:s, :, :c] = old[i][:s, :, :c]
                bufs.append(new)
        if slots > self.slots or capacity > self.capacity:
            self._grown_at = time.monotonic()
        self.slots, self.capacity = slots, capacity

    def window(self, caches: list) -> tuple[int, int]:
        """A slot range [lo, hi) holding exactly ``caches`` (or, for one cache, it and one
        neighbour): caches are moved between slots so that a micro-batch computes its own
        rows only. Groups are stable from step to step, so moves are rare. Hold ``lock``."""
        k = max(len(caches), 2)
        if k > self.slots:
            self._resize(k, self.capacity or FIRST_CAPACITY)
        lo = min(min(c.slot for c in caches), self.slots - k)
        hi = lo + k
        mine = {c.slot for c in caches}
        free = [s for s in range(lo, hi) if s not in mine]
        for c in [c for c in caches if not lo <= c.slot < hi]:
            self._move(c, free.pop())
        return lo, hi

    def _move(self, cache: "ORTCache", slot: int) -> None:
        """Put ``cache`` in ``slot``, swapping with the cache there (if any)."""
        old, other = cache.slot, self.used.get(slot)
        for bufs in (self.k, self.v):
            for b in bufs:
                b[[old, slot]] = b[[slot, old]]
        self.used.pop(old, None)
        if other is not None:
            other._rebind(old)
            self.used[old] = other
        cache._rebind(slot)
        self.used[slot] = cache

    def values(self, lo: int, hi: int) -> tuple[list, list]:
        """OrtValues over slots [lo, hi): views of the pool, no copy."""
        ov = ort.OrtValue.ortvalue_from_numpy
        return ([ov(k[lo:hi]) for k in self.k], [ov(v[lo:hi]) for v in self.v])

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.k) + sum(b.nbytes for b in self.v)


class ORTCache(ShardCache):
    """One request's slot in the shard's ``KVPool``; positions past ``offset`` are garbage
    the next step overwrites, so trimming is free. The slot is freed by ``release`` (or when
    the cache is garbage-collected)."""

    rewinds = True

    def __init__(self, pool: KVPool):
        self.pool = pool
        self.serial = next(_SERIALS)  # before the pool holds it: ``free`` reads it
        self.slot = pool.allocate(self)
        self._offset = 0
        self._finalizer = weakref.finalize(self, pool.free, self.slot, self.serial)

    @property
    def offset(self) -> int:
        return self._offset

    def trim(self, n: int) -> int:
        n = min(n, self._offset)
        self._offset -= n
        return n

    def _rebind(self, slot: int) -> None:
        """Moved to another slot by the pool (which holds its lock)."""
        self._finalizer.detach()
        self.slot = slot
        self._finalizer = weakref.finalize(self, self.pool.free, slot, self.serial)

    def release(self) -> None:
        self._finalizer()

    def fork(self) -> "ORTCache":
        with self.pool.held():  # allocating may grow the pool: copy after it
            new = ORTCache(self.pool)
            n = self._offset
            for bufs in (self.pool.k, self.pool.v):
                for b in bufs:
                    b[new.slot, :, :n] = b[self.slot, :, :n]
            new._offset = n
        return new

    @property
    def nbytes(self) -> int:
        p = self.pool
        return 2 * p.n_layers * p.kv_heads * p.capacity * p.head_dim * 4


class ORTShard(Shard):
    def __init__(self, source, layers: LayerRange, dtype: str = "auto",
                 provider: str | None = None, cache_dir: Path | None = None,
                 max_positions: int = onnx_graph.MAX_POSITIONS,
                 session_options: ort.SessionOptions | None = None,
                 spin: bool | None = None, threads: int | None = None):
        if dtype not in PRECISIONS:
            raise InvalidRequest(f"the onnxruntime backend takes dtype "
                                 f"{', '.join(PRECISIONS)}; got {dtype!r}", param="dtype")
        cfg = source.config
        self.layers = layers
        self.cfg = cfg
        self.hidden_size = source.hidden_size
        self.vocab_size = source.vocab_size
        self.precision = PRECISIONS[dtype]
        self.n_layers = len(layers)
        self.kv_heads = onnx_graph.kv_heads(cfg)
        self.head_dim = onnx_graph.head_dim(cfg)
        self.max_positions = min(max_positions, source.context_length)
        # every decode step on the batch path, alone or not: a request's numbers then never
        # depend on its company (the same greedy text under any load), at the cost of a
        # lone step's speed (~1.5x its time on this CPU; docs/pipeline.md)
        self.batch_invariant = os.environ.get("MESH_BATCH_INVARIANT", "0") == "1"
        t0 = time.perf_counter()
        opts = session_options or ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = os.environ.get("MESH_ORT_THREADS") or threads  # the variable wins
        if threads:
            opts.intra_op_num_threads = int(threads)
        if spin is None:
            spin = os.environ.get("MESH_ORT_SPIN", "1") != "0"
        if not spin:
            # ONNX Runtime's threads spin between ops and after a run. Alone on its cores
            # that is ~30% of a decode step saved; beside another process's or session's
            # compute it steals their cores (a 2-stage pipeline on one 2-core box: one stream
            # 46 -> 58 tok/s, 8 streams 94 -> 110 with spinning off; docs/pipeline.md)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.providers = choose_providers(ort.get_available_providers(),
                                          provider or os.environ.get("MESH_ORT_PROVIDER"))
        # Through a file with the weights beside it, never from bytes: from bytes ONNX
        # Runtime keeps a second copy of every weight (Gemma 3: 715 vs 350 MB resident
        # after load), and protobuf caps bytes at 2 GB. The weights stream into the file as
        # the graph is built. The file goes once the session holds what it needs (prepacked
        # weights are copied; the few others stay mapped).
        import onnx

        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            path = Path(tmp) / "shard.onnx"
            with open(Path(tmp) / "shard.onnx.data", "wb") as data:
                model, self.requantized = onnx_graph.build(source, layers, self.precision,
                                                           self.max_positions, data)
                weight_bytes = data.tell()
            weight_bytes += sum(len(t.raw_data) for t in model.graph.initializer)
            release = getattr(getattr(source, "reader", None), "release_pages", None)
            if release is not None:  # the build read the file's pages: not needed now
                release()
            onnx.save_model(model, str(path))
            del model
            trim_heap()
            self.session = ort.InferenceSession(str(path), opts, providers=self.providers)
        drop_mapped(tmp)  # the session keeps the file mapped; its pages read at load go
        self.embed = (onnx_graph.QuantizedEmbedding(source, self.precision)
                      if layers.is_first else None)
        self.device = "cuda" if self.providers[0] != "CPUExecutionProvider" else "cpu"
        # measured on the CPU (tests/test_prefix_reuse.py): MatMulNBits computes each row of
        # a many-row product alike whatever the others, attention each row over its own keys
        self.split_invariant = self.device == "cpu"
        self.pool = KVPool(self.n_layers, self.kv_heads, self.head_dim, self.max_positions,
                           self.device)
        log.info("onnxruntime shard %s built in %.1fs (%s, %.0f MB of weights)", layers,
                 time.perf_counter() - t0, self.precision, weight_bytes / 1e6)

    def new_cache(self) -> ORTCache:
        return ORTCache(self.pool)

    def compact(self) -> None:
        self.pool.compact()

    def kv_layout(self) -> dict:
        """The pool: every slot is as long as the longest cache, and both grow by
        doubling (``kv_layout_bytes``)."""
        p = self.pool
        return {"kind": "pool", "first": FIRST_CAPACITY, "most": p.max_positions,
                "position_bytes": 2 * p.n_layers * p.kv_heads * p.head_dim * 4}

    def _embed(self, data: np.ndarray) -> np.ndarray:
        if self.embed is not None:
            return self.embed(np.asarray(data, dtype=np.int64))
        return np.asarray(data, dtype=np.float32)

    def stoppable(self):
        return ort.RunOptions()

    def stop(self, handle) -> None:
        handle.terminate = True  # ONNX Runtime checks it between operators

    def _bind_run(self, hidden, seqlens, total, out_index, lo, hi, stop=None) -> np.ndarray:
        b = self.session.io_binding()
        b.bind_cpu_input("hidden", np.ascontiguousarray(hidden, dtype=np.float32))
        b.bind_cpu_input("seqlens_k", np.asarray(seqlens, dtype=np.int32))
        b.bind_cpu_input("total_len", np.array(total, dtype=np.int32))
        if self.layers.is_last:
            b.bind_cpu_input("out_index", out_index)
        b.bind_output("out")  # first: get_outputs() follows the binding order
        ks, vs = self.pool.values(lo, hi)
        for j, i in enumerate(self.layers):
            b.bind_ortvalue_input(f"past_k_{i}", ks[j])
            b.bind_ortvalue_input(f"past_v_{i}", vs[j])
            b.bind_ortvalue_output(f"present_k_{i}", ks[j])  # the same buffer: in place
            b.bind_ortvalue_output(f"present_v_{i}", vs[j])
        self.session.run_with_iobinding(b, stop)
        return b.get_outputs()[0].numpy()

    def _check(self, total: int) -> None:
        if total > self.max_positions:
            raise InvalidRequest(f"position {total} is past this shard's limit of "
                                 f"{self.max_positions}")

    def _run(self, item: StepItem, stop=None) -> np.ndarray:
        with self.pool.held():
            return self._run_locked(item, stop)

    def _run_locked(self, item: StepItem, stop=None) -> np.ndarray:
        cache: ORTCache = item.cache
        t = item.data.shape[0]
        total = cache.offset + t
        self._check(total)
        self.pool.ensure(total)
        out_index = (np.arange(t, dtype=np.int64) if item.all_logits
                     else np.array([t - 1], dtype=np.int64))
        res = self._bind_run(self._embed(item.data)[None], [total - 1], total, out_index,
                             cache.slot, cache.slot + 1, stop)[0]
        cache._offset = total
        if self.layers.is_last and not item.all_logits:
            return res[-1]
        return res

    def _run_batch(self, items: list[StepItem], stop=None) -> list[np.ndarray]:
        with self.pool.held():
            return self._run_batch_locked(items, stop)

    def _run_batch_locked(self, items: list[StepItem], stop=None) -> list[np.ndarray]:
        """One token for each of several requests, in one call over a slot window of at
        least 2 rows: MatMulNBits with int8 activations rounds a one-row product differently
        from a many-row one, and every row of a many-row product the same whatever the other
        rows (measured), so a decode step's numbers depend only on it running batched."""
        lo, hi = self.pool.window([it.cache for it in items])
        totals = [it.cache.offset + 1 for it in items]
        for t in totals:
            self._check(t)
        seqlens = np.zeros(hi - lo, dtype=np.int32)
        for slot, cache in list(self.pool.used.items()):  # a row outside the batch (the
            if lo <= slot < hi:  # second row of a lone step) computes a throwaway step at
                seqlens[slot - lo] = cache.offset  # its next position, overwritten later
        self.pool.ensure(int(seqlens.max()) + 1)
        hidden = np.zeros((hi - lo, 1, self.hidden_size), dtype=np.float32)
        for it, t in zip(items, totals):
            seqlens[it.cache.slot - lo] = t - 1
            hidden[it.cache.slot - lo, 0] = self._embed(it.data)[0]
        out = self._bind_run(hidden, seqlens, int(seqlens.max()) + 1,
                             np.array([0], dtype=np.int64), lo, hi, stop)
        res = []
        for it, t in zip(items, totals):
            it.cache._offset = t
            row = out[it.cache.slot - lo]
            res.append(row[-1] if self.layers.is_last else row)
        return res

    def forward(self, items: Sequence[StepItem], stop=None) -> list[np.ndarray]:
        decode = [i for i, it in enumerate(items) if it.data.shape[0] == 1
                  and not it.all_logits]
        out: list = [None] * len(items)
        if len(decode) > 1 or (decode and (items[decode[0]].batched or self.batch_invariant)):
            for i, r in zip(decode, self._run_batch([items[i] for i in decode], stop)):
                out[i] = r
        for i, it in enumerate(items):
            if out[i] is None:
                out[i] = self._run(it, stop)
        return out
