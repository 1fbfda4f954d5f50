"""The memory meter: measured peak memory of a training step, by component.

This is the one place where memory is measured.  `MemoryMeter` is a TorchDispatchMode: it sees
every tensor an operator creates while it is active (forward, backward and optimizer step), and
holds a weak reference to each new storage so it also sees the storage being freed.  It keeps the
running total of live bytes on the compute device and the set of live storages at the peak.
At the end of the step it attributes the storages that were live at the peak:

  parameters       storages of the model's parameters (live before the step)
  gradients        storages that are some parameter's .grad after the step
  optimizer_state  storages in the optimizer's state (Adam moments, step counters)
  activations      everything else created during the step: saved activations, temporaries,
                   the gradients flowing backwards, optimizer temporaries

Tensors that already exist when the meter starts (parameters, earlier gradients, optimizer
state) are counted from the start; other pre-existing tensors (the input batch) are counted if
a step reads them.  On CUDA the allocator's own peak (`torch.cuda.max_memory_allocated`, reset at
the start) is reported beside the meter's figure; the allocator rounds blocks up, so it reads a
little higher.  The process's peak resident set size (RSS, whole lifetime) is reported as
well: it includes the Python interpreter, libraries and data, so it is an upper bound, not a
per-step figure.
"""

from __future__ import annotations

import itertools
import resource
import sys
import weakref
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

COMPONENTS = ("parameters", "gradients", "optimizer_state", "activations")


@dataclass
class MemoryReport:
    device: str                 # the compute device the figures are for
    peak_bytes: int             # peak live tensor bytes on that device during the step (meter)
    parameters: int             # … of which parameters, at the peak
    gradients: int
    optimizer_state: int
    activations: int            # saved activations and temporaries
    allocator_peak_bytes: int   # CUDA allocator's peak during the step; -1 on CPU
    rss_peak_bytes: int         # process peak RSS so far (whole process; upper bound)
    host_parked_bytes: int = 0  # offload: inactive blocks' weights and Adam state parked on the host
    # CUDA only (-1 on CPU), the figures torchtitan's DeviceMemoryMonitor records: the allocator's
    # reserved peak, and its cudaMalloc retries and OOMs during the step
    allocator_reserved_bytes: int = -1
    allocator_retries: int = -1
    allocator_ooms: int = -1

    @property
    def meter_to_allocator(self) -> float:
        """The meter's peak over the allocator's (CUDA; NaN on CPU): 1 when the meter sees every byte."""
        return self.peak_bytes / self.allocator_peak_bytes if self.allocator_peak_bytes > 0 else float("nan")

    def to_dict(self, prefix: str = "") -> dict:
        return {prefix + k: v for k, v in asdict(self).items()}


def _storage_of(t: torch.Tensor):
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, meta and similar tensors have none to count
        return None


def _key(storage) -> tuple:
    return (storage.device.type, storage.device.index, storage.data_ptr())


class MemoryMeter(TorchDispatchMode):
    """with MemoryMeter(model, optimizers, device) as meter: step(); report = meter.report()

    `optimizers`: the optimizers whose state is on the compute device (one, a list, or None)."""

    def __init__(self, model: torch.nn.Module, optimizers, device: torch.device | str):
        super().__init__()
        if isinstance(optimizers, torch.optim.Optimizer):
            optimizers = [optimizers]
        self.model, self.optimizers, self.device = model, list(optimizers or []), torch.device(device)
        self._ids = itertools.count()
        self._live: dict[int, int] = {}          # storage id → bytes (compute device only)
        self._by_ptr: dict[tuple, int] = {}      # (device, ptr) → storage id, for live storages
        self._refs: dict[int, weakref.ref] = {}
        self.current = self.peak = 0
        self._peak_ids: frozenset[int] = frozenset()

    # ---- tracking ---------------------------------------------------------------------------
    def _on_device(self, storage) -> bool:
        d = storage.device
        return d.type == self.device.type and (self.device.index is None or d.index in (None, self.device.index))

    def _track(self, t: torch.Tensor) -> None:
        storage = _storage_of(t)
        if storage is None or not self._on_device(storage) or storage.nbytes() == 0:
            return
        key = _key(storage)
        if key in self._by_ptr:  # a view of, or an in-place op on, a storage already counted
            return
        sid = next(self._ids)
        nbytes = storage.nbytes()
        self._by_ptr[key] = sid
        self._live[sid] = nbytes
        self._refs[sid] = weakref.ref(storage, lambda _, sid=sid, key=key: self._free(sid, key))
        self.current += nbytes
        if self.current > self.peak:
            self.peak, self._peak_ids = self.current, frozenset(self._live)

    def _free(self, sid: int, key: tuple) -> None:
        nbytes = self._live.pop(sid, 0)
        self._refs.pop(sid, None)
        if self._by_ptr.get(key) == sid:
            del self._by_ptr[key]
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._track, out)
        # inputs that existed before the meter started (the batch) still occupy memory
        tree_map_only(torch.Tensor, self._track, (args, kwargs))
        return out

    def _state_tensors(self):
        return [v for o in self.optimizers for s in o.state.values() for v in s.values() if isinstance(v, torch.Tensor)]

    def __enter__(self):
        for p in self.model.parameters():
            self._track(p.detach())
            if p.grad is not None:
                self._track(p.grad)
        for t in self._state_tensors():
            self._track(t)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            stats = torch.cuda.memory_stats(self.device)   # retries and OOMs are cumulative counters
            self._cuda_start = (int(stats.get("num_alloc_retries", 0)), int(stats.get("num_ooms", 0)))
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return out

    # ---- attribution ------------------------------------------------------------------------
    def _ids_of(self, tensors) -> set[int]:
        ids = set()
        for t in tensors:
            storage = _storage_of(t)
            if storage is not None and self._on_device(storage):
                sid = self._by_ptr.get(_key(storage))
                if sid is not None:
                    ids.add(sid)
        return ids

    def report(self) -> MemoryReport:
        params = self._ids_of(p.detach() for p in self.model.parameters())
        grads = self._ids_of(p.grad for p in self.model.parameters() if p.grad is not None)
        state = self._ids_of(self._state_tensors())
        # everything attributed here is still live, so its size is known
        parts = {
            "parameters": sum(self._live[s] for s in self._peak_ids & params),
            "gradients": sum(self._live[s] for s in self._peak_ids & (grads - params)),
            "optimizer_state": sum(self._live[s] for s in self._peak_ids & (state - params - grads)),
        }
        parts["activations"] = self.peak - sum(parts.values())
        cuda = {}
        if self.device.type == "cuda":
            stats = torch.cuda.memory_stats(self.device)
            cuda = {"allocator_peak_bytes": torch.cuda.max_memory_allocated(self.device),
                    "allocator_reserved_bytes": torch.cuda.max_memory_reserved(self.device),
                    "allocator_retries": int(stats.get("num_alloc_retries", 0)) - self._cuda_start[0],
                    "allocator_ooms": int(stats.get("num_ooms", 0)) - self._cuda_start[1]}
        return MemoryReport(str(self.device), self.peak, allocator_peak_bytes=cuda.pop("allocator_peak_bytes", -1),
                            rss_peak_bytes=peak_rss_bytes(), **cuda, **parts)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024
