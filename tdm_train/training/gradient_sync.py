"""Data-parallel gradient averaging that overlaps with backward, as DDP does, for LoRA adapters
that live inside one shared base module.

Why not DDP itself: one module carries two adapters that are trained in alternation, so DDP would
need find_unused_parameters and still trips over the alternating updates (see the trainer). What
DDP gets right, and this keeps: gradients are packed into buckets of about ``bucket_cap_mb`` and
each bucket's all-reduce is launched (asynchronously) as soon as the last of its gradients is
accumulated, while backward keeps running on the earlier layers; buckets are launched strictly in
index order so every process issues the same collectives in the same order whatever order its
hooks fire in; the optimizer waits for all of them only when it needs the gradients.

Usage, for one adapter's update (gradient accumulation: arm only the last micro-batch's backward,
as DDP's ``no_sync`` leaves the earlier ones local):

    reducer = BucketedGradientAverager(world_size, bucket_cap_mb=25)
    for i, micro_batch in enumerate(micro_batches):
        loss = ...
        with reducer.averaging(params) if i == last else contextlib.nullcontext():
            loss.backward()
    # every p.grad is now the mean over processes; clip, step
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


@dataclass
class _Bucket:
    params: list[torch.nn.Parameter]
    offsets: list[int]
    buffer: torch.Tensor
    ready: set[int] = field(default_factory=set)  # indices into params whose gradient is in the buffer
    work: object | None = None  # the in-flight all-reduce


class BucketedGradientAverager:
    """Averages ``p.grad`` over the default process group with bucketed, asynchronous all-reduces
    launched from post-accumulate-grad hooks during backward."""

    def __init__(self, world_size: int, bucket_cap_mb: float = 25.0, process_group=None):
        if bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
        self.world_size = world_size
        self.bucket_cap_bytes = int(bucket_cap_mb * 2**20)
        self.process_group = process_group
        self._layouts: dict[tuple[int, ...], list[_Bucket]] = {}
        self._buckets: list[_Bucket] = []
        self._where: dict[int, tuple[int, int]] = {}  # id(param) -> (bucket index, index in bucket)
        self._next_to_launch = 0
        self.buckets_launched_during_backward = 0  # diagnostics (and a test): overlap really happens

    @property
    def num_buckets(self) -> int:
        """Buckets of the last synchronised backward."""
        return len(self._buckets)

    # -------------------------------------------------------------- layout
    def _layout(self, params: list[torch.nn.Parameter]) -> list[_Bucket]:
        """Buckets for this parameter list, built once: in reverse order, because backward produces
        the gradients of the last layers first; split by dtype/device; at most bucket_cap_bytes each
        (a single larger parameter gets a bucket of its own)."""
        key = tuple(id(p) for p in params)
        if key in self._layouts:
            return self._layouts[key]
        buckets: list[_Bucket] = []
        groups: dict[tuple, list[torch.nn.Parameter]] = {}
        for p in reversed(params):
            groups.setdefault((p.dtype, p.device), []).append(p)
        for (dtype, device), members in groups.items():
            current: list[torch.nn.Parameter] = []
            size = 0
            for p in members:
                nbytes = p.numel() * p.element_size()
                if current and size + nbytes > self.bucket_cap_bytes:
                    buckets.append(self._new_bucket(current, dtype, device))
                    current, size = [], 0
                current.append(p)
                size += nbytes
            if current:
                buckets.append(self._new_bucket(current, dtype, device))
        self._layouts[key] = buckets
        return buckets

    @staticmethod
    def _new_bucket(params, dtype, device) -> _Bucket:
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += p.numel()
        return _Bucket(params, offsets, torch.empty(total, dtype=dtype, device=device))

    # -------------------------------------------------------------- one synchronised backward
    @contextlib.contextmanager
    def averaging(self, params: list[torch.nn.Parameter]):
        """Around one ``backward()``: when the block ends, every ``p.grad`` of ``params`` holds the
        mean over all processes of what each process accumulated (earlier local micro-batches
        included). Parameters that got no gradient anywhere contribute zeros, as in DDP."""
        if self.world_size == 1:
            yield
            return
        params = [p for p in params if p.requires_grad]
        self._buckets = self._layout(params)
        self._where = {id(p): (b, i) for b, bucket in enumerate(self._buckets) for i, p in enumerate(bucket.params)}
        for bucket in self._buckets:
            bucket.ready.clear()
            bucket.work = None
        self._next_to_launch = 0
        self.buckets_launched_during_backward = 0
        hooks = [p.register_post_accumulate_grad_hook(self._gradient_ready) for p in params]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
        self._finish()

    def _gradient_ready(self, param: torch.Tensor) -> None:
        """Post-accumulate-grad hook: copy the finished gradient into its bucket; launch every bucket
        that is now complete, in index order."""
        b, i = self._where[id(param)]
        bucket = self._buckets[b]
        if i in bucket.ready:
            raise RuntimeError("a LoRA parameter's gradient was accumulated twice in one backward (reentrant "
                               "checkpointing around a parameter used twice?): cannot average it in flight")
        n = param.numel()
        bucket.buffer[bucket.offsets[i]: bucket.offsets[i] + n].copy_(param.grad.reshape(-1))
        bucket.ready.add(i)
        before = self._next_to_launch
        self._launch_ready_buckets()
        self.buckets_launched_during_backward += self._next_to_launch - before

    def _launch_ready_buckets(self) -> None:
        import torch.distributed as dist

        while self._next_to_launch < len(self._buckets):
            bucket = self._buckets[self._next_to_launch]
            if len(bucket.ready) < len(bucket.params):
                return
            bucket.work = dist.all_reduce(bucket.buffer, group=self.process_group, async_op=True)
            self._next_to_launch += 1

    def _finish(self) -> None:
        """After backward: fill in gradients no hook delivered (a parameter this micro-batch did not
        use keeps what earlier micro-batches accumulated, or zeros), launch what is left (in order),
        wait for everything, divide by the world size and hand the averages back as ``p.grad``."""
        for bucket in self._buckets[self._next_to_launch:]:
            for i, p in enumerate(bucket.params):
                if i not in bucket.ready:
                    view = bucket.buffer[bucket.offsets[i]: bucket.offsets[i] + p.numel()]
                    if p.grad is None:
                        view.zero_()
                    else:
                        view.copy_(p.grad.reshape(-1))
                    bucket.ready.add(i)
        self._launch_ready_buckets()
        for bucket in self._buckets:
            bucket.work.wait()
            bucket.buffer.div_(self.world_size)
            for p, offset in zip(bucket.params, bucket.offsets):
                # a view, no copy: the optimizer reads it, zero_grad(set_to_none=True) lets go of it
                # before the next synchronised backward refills the buffer
                p.grad = bucket.buffer[offset: offset + p.numel()].view_as(p)
