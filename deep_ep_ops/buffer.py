"""``Buffer``: a drop-in for DeepEP's V1 ``deep_ep.Buffer``, thin over the ``deep_ep`` ops.

Same constructor, methods, argument names and return structures as DeepEP, so code written for
DeepEP runs after ``import deep_ep_ops as deep_ep``. Differences, all documented in the README:

- Ops run on the current stream. ``previous_event`` makes the current stream wait for it,
  ``async_finish`` returns an ``EventOverlap`` recorded after the op, and
  ``allocate_on_comm_stream`` has nothing to do. On CPU tensors events are ``None`` and waiting
  is a no-op: the reference backend finishes before it returns.
- Handles are named tuples (``DispatchHandle``, ``LowLatencyHandle``) that also index like
  DeepEP's tuples.
- In capacity mode (``num_worst_tokens > 0``) ``num_recv_tokens_per_expert_list`` is empty, as
  in DeepEP; the counts are in ``handle``-independent device tensors of the op layer.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist

from . import _build, _registry, ops
from .config import (
    Config, default_config_list, get_combine_config, get_dispatch_config,
    get_low_latency_rdma_size_hint,
)

Tensors = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]

# "1": the low-latency kernels reach every peer through NVSHMEM puts, even where NVLink loads
# and stores would do (exercises the path taken between hosts).
FORCE_PUT_ENV = "DEEP_EP_OPS_LL_FORCE_NVSHMEM_PUT"
# The device a Buffer on a group other than NCCL serves when its ``device`` argument is not
# given: "cpu" (the default) or "cuda" (the current CUDA device; "cuda:N" names one).
DEVICE_ENV = "DEEP_EP_OPS_DEVICE"
# Global ranks of the NVSHMEM job of this process (set when the first low-latency Buffer starts
# it; NVSHMEM runs once per process).
_NVSHMEM_MEMBERS: list[int] = []


class EventOverlap:
    """A CUDA event (or ``None`` on CPU) to wait on; usable as a context manager like DeepEP's."""

    def __init__(self, event: Optional[torch.cuda.Event] = None, extra_tensors=None) -> None:
        self.event = event
        # Tensors kept alive until the event is waited on (DeepEP's lifetime contract).
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.current_stream_wait()


_NO_EVENT = EventOverlap(None)  # what a call without async_finish returns


def _record_event(device: torch.device) -> Optional[torch.cuda.Event]:
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def _wait_previous(previous_event: Optional[EventOverlap]) -> None:
    if previous_event is not None:
        previous_event.current_stream_wait()


def _buffer_device(device, backend: str) -> torch.device:
    """The device a Buffer serves (see ``Buffer``'s docstring)."""
    where = "device"
    if device is None:
        if backend == dist.Backend.NCCL:
            return torch.device("cuda", torch.cuda.current_device())
        device, where = os.environ.get(DEVICE_ENV, "cpu").strip() or "cpu", DEVICE_ENV
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{where} must name a device ('cpu', 'cuda', 'cuda:N'), got {device!r}") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{where}={device} but CUDA is not available")
        return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    if device.type != "cpu":
        raise ValueError(f"{where} must be 'cpu' or a CUDA device, got {device}")
    if backend == dist.Backend.NCCL:
        raise ValueError(f"{where}=cpu needs a group whose collectives run on the host (gloo), "
                         "not NCCL")
    return device


class Buffer:
    """Communication buffer over a process group; DeepEP V1 API (see the module docstring).

    ``num_nvl_bytes`` bounds normal-mode calls (``Config.get_nvl_buffer_size_hint``);
    ``num_rdma_bytes`` bounds low-latency calls (``get_low_latency_rdma_size_hint``) when
    ``low_latency_mode``. Creation is collective and registers the buffer under ``self.name``,
    the string the ops take. ``destroy()`` is collective; without it, the buffer is dropped from
    the registry (without any communication) when garbage collected or at interpreter exit.

    ``device`` (not in DeepEP) says which device the buffer serves. Default, as DeepEP: an NCCL
    group serves the current CUDA device; any other group (gloo) serves the CPU reference, or
    the device named by ``DEEP_EP_OPS_DEVICE``. A gloo group may drive the CUDA kernels
    (``device="cuda"``): the group only bootstraps them (IPC handles, the NVSHMEM unique id),
    and the reference path stages CUDA tensors through the host. That is how several ranks
    share one GPU (NCCL refuses two ranks on one GPU).
    """

    num_sms: int = 20

    def __init__(
        self,
        group: dist.ProcessGroup,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        use_fabric: bool = False,
        explicitly_destroy: bool = False,
        enable_shrink: bool = False,
        comm=None,
        *,
        device: Union[str, torch.device, None] = None,
        num_ranks_per_node: Optional[int] = None,
    ) -> None:
        if group is None or not dist.is_initialized():
            raise ValueError("group must be an initialised torch.distributed process group")
        for name, value in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if enable_shrink:
            raise NotImplementedError("enable_shrink (elastic EP masks) is not supported")
        self.group = group
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.num_qps_per_rank = num_qps_per_rank
        self.explicitly_destroy = explicitly_destroy
        self.device = _buffer_device(device, dist.get_backend(group))
        self._nvl_memory: Optional[torch.Tensor] = None
        self._comm = _registry.create(
            group, num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes,
            low_latency_mode=low_latency_mode, device=self.device,
            workspace=torch.empty(0, dtype=torch.uint8, device=self.device),
            ranks_per_node=num_ranks_per_node,
        )
        self.name = self._comm.name
        # Topology (deep_ep_ops.topology): nodes of consecutive ranks.
        self.num_nvl_ranks = self._comm.num_nvl_ranks
        self.num_rdma_ranks = self._comm.num_rdma_ranks
        self.nvl_rank, self.rdma_rank = self.rank % self.num_nvl_ranks, self.rank // self.num_nvl_ranks
        self._destroyed = False
        self._has_nvl_runtime = self._has_ll_runtime = self._has_internode_runtime = False
        if self._wants_nvl_runtime():
            self._create_nvl_runtime()
        if self._wants_ll_runtime():
            self._create_ll_runtime()
        if self._wants_internode_runtime():
            self._create_internode_runtime()
        if low_latency_mode and not self._has_ll_runtime:
            # The low-latency workspace doubles as the zero-copy combine buffer. Its contents
            # mean nothing until written (clean_low_latency_buffer zeroes it): skip the fill.
            self._comm.workspace = torch.empty(
                num_rdma_bytes, dtype=torch.uint8, device=self.device
            )

    def _wants_nvl_runtime(self) -> bool:
        """Normal-mode CUDA kernels need the extension, ranks on one NVLink domain (one node)
        and bytes."""
        return (
            _build.HAS_CUDA_KERNELS and self.device.type == "cuda" and self.num_nvl_bytes > 0
            and not self._is_internode()
        )

    def _create_nvl_runtime(self) -> None:
        """Collective: allocate the NVLink buffer and map every peer's through CUDA IPC handles."""
        timeout_s = self._comm.timeout.total_seconds()
        handle = _build._C.intranode_create(
            self.name, self.device.index, self.rank, self.group_size, self.num_nvl_bytes, timeout_s
        )
        handles: list = [None] * self.group_size
        dist.all_gather_object(handles, handle, group=self.group)
        _build._C.intranode_open(self.name, handles)
        self._has_nvl_runtime = True
        dist.barrier(group=self.group)

    def _wants_ll_runtime(self) -> bool:
        """Low-latency kernels need the NVSHMEM extension, NCCL ranks and bytes."""
        return (
            _build.HAS_LOW_LATENCY_KERNELS and self.device.type == "cuda"
            and self.low_latency_mode and self.num_rdma_bytes > 0
        )

    def _wants_internode_runtime(self) -> bool:
        """The internode kernels (docs/DESIGN.md section 5) need the NVSHMEM extension with
        them, several nodes, NVLink and RDMA bytes, and the RDMA memory to themselves (a buffer
        in low-latency mode keeps the reference for its internode ops)."""
        return (
            _build.HAS_LOW_LATENCY_KERNELS
            and hasattr(_build._C_nvshmem, "internode_forward") and _build.HAS_CUDA_KERNELS
            and self.device.type == "cuda" and self._is_internode() and not self.low_latency_mode
            and self.num_rdma_bytes > 0 and self.num_nvl_bytes > 0
        )

    def _create_internode_runtime(self) -> None:
        """Collective: the RDMA memory over every rank (NVSHMEM) and an NVLink buffer over the
        ranks of this rank's node (CUDA IPC among them), for the staged internode kernels."""
        if not self._create_ll_runtime(internode=True):
            return
        timeout_s = self._comm.timeout.total_seconds()
        node_name = f"{self.name}/node"
        handle = _build._C.intranode_create(
            node_name, self.device.index, self.nvl_rank, self.num_nvl_ranks, self.num_nvl_bytes,
            timeout_s,
        )
        handles: list = [None] * self.group_size
        dist.all_gather_object(handles, handle, group=self.group)
        first = self.rdma_rank * self.num_nvl_ranks
        _build._C.intranode_open(node_name, handles[first:first + self.num_nvl_ranks])
        dist.barrier(group=self.group)
        from . import internode_staged

        internode_staged.attach(self.name, internode_staged.State(
            node_name, self.rank, self.num_nvl_ranks, self.num_rdma_ranks,
            internode_staged.forward_by_kernel(self._comm.workspace, self.num_nvl_ranks,
                                               self.num_rdma_ranks),
            internode_staged.give_back_by_kernel(self._comm.workspace, self.num_nvl_ranks,
                                                 self.num_rdma_ranks, self.rank)))
        self._has_internode_runtime = True

    def _create_ll_runtime(self, internode: bool = False) -> bool:
        """Collective: join NVSHMEM (once per process, the PEs being this group's ranks) and
        allocate the symmetric buffer. A group other than the one NVSHMEM was started on keeps
        the NCCL reference (with a warning). ``internode``: the memory of the internode
        kernels instead of the low-latency ones. Returns whether the runtime exists."""
        nvshmem = _build._C_nvshmem
        members = dist.get_process_group_ranks(self.group)
        # Every rank says which NVSHMEM job it is in, so that all take the same branch (a rank
        # joining alone would wait for the others forever).
        jobs: list = [None] * self.group_size
        dist.all_gather_object(jobs, list(_NVSHMEM_MEMBERS), group=self.group)
        if not any(jobs):
            # The symmetric heap is sized at start-up: room for this buffer twice and more.
            os.environ.setdefault(
                "NVSHMEM_SYMMETRIC_SIZE", str(max(2 << 30, 2 * self.num_rdma_bytes + (256 << 20)))
            )
            unique_id = [nvshmem.unique_id() if self.rank == 0 else None]
            dist.broadcast_object_list(unique_id, src=members[0], group=self.group)
            nvshmem.join(unique_id[0], self.rank, self.group_size, self.device.index)
            _NVSHMEM_MEMBERS.extend(members)
        elif any(job != members for job in jobs):
            warnings.warn(
                f"Buffer {self.name}: NVSHMEM runs on ranks {_NVSHMEM_MEMBERS or 'none'} here, "
                f"this group has {members}; its {'internode' if internode else 'low-latency'} "
                "ops use the reference",
                stacklevel=3,
            )
            return False
        force_put = os.environ.get(FORCE_PUT_ENV, "0") == "1"
        timeout_s = self._comm.timeout.total_seconds()
        self._comm.workspace = nvshmem.create(
            self.name, self.device.index, self.num_rdma_bytes, timeout_s, force_put
        )
        self._has_ll_runtime = True
        dist.barrier(group=self.group)
        return True

    def low_latency_peers_mapped(self) -> int:
        """Ranks the low-latency kernels reach with NVLink loads/stores (the others through
        NVSHMEM puts); 0 without the low-latency kernels."""
        return _build._C_nvshmem.mapped_peers(self.name) if self._has_ll_runtime else 0

    # --- life cycle ---------------------------------------------------------------------

    def destroy(self) -> None:
        """Collectively release the buffer; later calls on it raise. Calling it twice is a no-op.

        Bounded: the ranks meet within ``DEEP_EP_OPS_TIMEOUT_S``; a buffer broken by a timeout
        or a failed exchange is released at once, without meeting. When the peers do not all
        come, the buffer is released here (its memory left to the process exit, as a peer may
        still use it) and a ``TimeoutError`` names the ranks that did not come."""
        if self._destroyed:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no kernel of ours still uses the memory
        comm, error = self._comm, None
        if not comm.broken:
            comm.enter("destroy")
            try:
                comm.wait("destroy", comm.pg.barrier())
            except (TimeoutError, RuntimeError) as failed:  # release first, then raise
                error = failed
        self._release(free_memory=error is None and not comm.broken)
        if error is not None:
            raise error

    def _release(self, free_memory: bool = False) -> None:
        self._destroyed = True
        if self._has_nvl_runtime:
            # Without the collective destroy a peer may still write here: only forget the name
            # and leave the memory to the process exit.
            _build._C.intranode_destroy(self.name, free_memory)
            self._has_nvl_runtime = False
        if self._has_internode_runtime:
            from . import internode_staged

            internode_staged.detach(self.name)
            _build._C.intranode_destroy(f"{self.name}/node", free_memory)
            self._has_internode_runtime = False
        if self._has_ll_runtime:
            _build._C_nvshmem.destroy(self.name, free_memory)
            self._has_ll_runtime = False
        _registry.remove(self.name)
        self._comm.workspace = torch.empty(0, dtype=torch.uint8)
        self._nvl_memory = None

    def __del__(self) -> None:
        if not getattr(self, "_destroyed", True):
            self._release()  # local only: no collectives at garbage collection or exit

    # --- static helpers -----------------------------------------------------------------

    @staticmethod
    def is_sm90_compiled() -> bool:
        return _build.HAS_CUDA_KERNELS

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        if not isinstance(new_num_sms, int) or new_num_sms < 2 or new_num_sms % 2:
            raise ValueError(f"new_num_sms must be an even int >= 2, got {new_num_sms!r}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An event at the current point of the current CUDA stream (``None`` event on CPU)."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return EventOverlap(_record_event(torch.device("cuda", torch.cuda.current_device())))
        return EventOverlap()

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        return get_low_latency_rdma_size_hint(
            num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts
        )

    @staticmethod
    def get_internode_rdma_size_hint(
        num_max_tokens_per_rank: int, hidden: int, num_ranks: int, num_ranks_per_node: int = 8,
        num_topk: int = 8, num_experts: int = 256,
    ) -> int:
        """``num_rdma_bytes`` for the staged internode kernels (not in DeepEP): calls of up to
        ``num_max_tokens_per_rank`` BF16 (or FP8) tokens of ``hidden`` on ``num_ranks`` ranks
        in nodes of ``num_ranks_per_node``. ``Config.get_rdma_buffer_size_hint`` sizes DeepEP's
        chunked ring buffers, which need no token count; the staged path holds a whole call's
        tokens per node (docs/DESIGN.md section 5) and says so when the buffer is too small."""
        from .internode_staged import rdma_size_hint

        num_nodes = max(-(-num_ranks // num_ranks_per_node), 1)
        return rdma_size_hint(num_max_tokens_per_rank, 2 * hidden, num_nodes, num_topk,
                              num_experts)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        return get_dispatch_config(num_ranks, Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return get_combine_config(num_ranks, Buffer.num_sms)

    def get_comm_stream(self) -> Optional[torch.cuda.Stream]:
        """Ops run on the current stream, so that is the communication stream (CPU: ``None``)."""
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def get_local_buffer_tensor(
        self, dtype: torch.dtype, size: Optional[torch.Size] = None, offset: int = 0,
        use_rdma_buffer: bool = False,
    ) -> torch.Tensor:
        """A typed view of this rank's NVLink (or RDMA/low-latency) buffer memory."""
        if use_rdma_buffer:
            memory = self._live().workspace
            if memory.numel() != self.num_rdma_bytes:  # not a low-latency buffer: allocate now
                memory = self._comm.workspace = torch.zeros(
                    self.num_rdma_bytes, dtype=torch.uint8, device=self.device
                )
        else:
            self._live()
            if self._nvl_memory is None:
                self._nvl_memory = torch.zeros(
                    self.num_nvl_bytes, dtype=torch.uint8, device=self.device
                )
            memory = self._nvl_memory
        element = torch.empty((), dtype=dtype).element_size()
        if offset < 0 or offset % element:
            raise ValueError(f"offset must be a non-negative multiple of {element}, got {offset}")
        typed = memory[offset : offset + (memory.numel() - offset) // element * element].view(dtype)
        if size is None:
            return typed
        count = 1
        for dim in size:
            count *= dim
        if count > typed.numel():
            raise ValueError(
                f"size {tuple(size)} needs {count * element} bytes past offset {offset}, but the "
                f"buffer has {memory.numel() - offset}"
            )
        return typed[:count].view(size)

    def _live(self) -> _registry.Communicator:
        if self._destroyed:
            raise RuntimeError(f"Buffer {self.name!r} was destroyed")
        return self._comm

    # --- normal mode --------------------------------------------------------------------

    def get_dispatch_layout(
        self, topk_idx: torch.Tensor, num_experts: int,
        previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """``(num_tokens_per_rank, num_tokens_per_rdma_rank | None, num_tokens_per_expert,
        is_token_in_rank, event)`` for ``topk_idx [num_tokens, num_topk]`` int64."""
        _wait_previous(previous_event)
        layout = ops.get_dispatch_layout(topk_idx, num_experts, self.group_size,
                                         self.num_rdma_ranks)
        per_rdma_rank = layout.num_tokens_per_rdma_rank if self._is_internode() else None
        return (
            layout.num_tokens_per_rank, per_rdma_rank, layout.num_tokens_per_expert,
            layout.is_token_in_rank, self._event(async_finish),
        )

    def dispatch(
        self,
        x: Tensors,
        handle: Optional[ops.DispatchHandle] = None,
        num_tokens_per_rank: Optional[torch.Tensor] = None,
        num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
        is_token_in_rank: Optional[torch.Tensor] = None,
        num_tokens_per_expert: Optional[torch.Tensor] = None,
        topk_idx: Optional[torch.Tensor] = None,
        topk_weights: Optional[torch.Tensor] = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Normal-mode dispatch; returns ``(recv_x, recv_topk_idx, recv_topk_weights,
        num_recv_tokens_per_expert_list, handle, event)``.

        ``x`` is ``[num_tokens, hidden]`` bfloat16 or ``(x_fp8, x_scales [num_tokens, hidden/128])``;
        ``recv_x`` has the same form. With ``handle``, dispatches along its routes (cached).
        """
        # Every eager call runs this Python: the checks and helpers are inline.
        if self._destroyed:
            self._live()  # raises
        if previous_event is not None:
            previous_event.current_stream_wait()
        x, x_scales = (x if isinstance(x, tuple) else (x, None))
        config = config or default_config_list("dispatch", self.group_size, Buffer.num_sms)
        internode = self.num_rdma_ranks > 1
        if handle is not None:
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("cached dispatch (handle given) takes no topk_idx/topk_weights")
            cached = ops.internode_cached_dispatch if internode else ops.cached_dispatch
            recv_x, recv_x_scales, _ = cached(self.name, x, handle, x_scales=x_scales,
                                              config=config)
            recv = (recv_x, recv_x_scales) if x_scales is not None else recv_x
            return recv, None, None, None, None, self._event(async_finish)
        if num_tokens_per_rank is None or is_token_in_rank is None:
            raise ValueError(
                "dispatch needs num_tokens_per_rank and is_token_in_rank (from "
                "get_dispatch_layout) unless a handle is given"
            )
        if topk_idx is not None and num_tokens_per_expert is None:
            raise ValueError("num_tokens_per_expert is needed with topk_idx")
        if internode and num_tokens_per_rdma_rank is None:
            raise ValueError(f"dispatch on buffer {self.name!r} ({self.num_rdma_ranks} nodes) "
                             "needs num_tokens_per_rdma_rank (from get_dispatch_layout)")
        if internode:  # the reference until the internode kernels exist: no host counts
            layout = ops.DispatchLayout(num_tokens_per_rank, num_tokens_per_rdma_rank,
                                        num_tokens_per_expert, is_token_in_rank)
            out, host_counts = ops.internode_dispatch(
                self.name, x, layout, topk_idx, topk_weights, x_scales=x_scales,
                expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens,
                config=config), None
        else:
            out, host_counts = ops._dispatch(
                self.name, x, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert,
                topk_idx, topk_weights, x_scales, expert_alignment, num_worst_tokens, config,
                True,
            )
        recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, per_expert, out_handle = out
        # DeepEP returns host counts except in capacity mode, where the list is empty; with or
        # without top-k, from num_tokens_per_expert (empty without it). The kernels hand them
        # over with the row count (no copy, no wait for the data kernel); else a copy.
        if num_worst_tokens:
            per_expert = []
        elif host_counts is not None:
            per_expert = host_counts
        else:
            per_expert = per_expert.tolist()
        if topk_idx is None:
            recv_topk_idx = recv_topk_weights = None
        return (
            (recv_x, recv_x_scales) if x_scales is not None else recv_x, recv_topk_idx,
            recv_topk_weights, per_expert, out_handle,
            EventOverlap(_record_event(self.device)) if async_finish else _NO_EVENT,
        )

    def combine(
        self,
        x: torch.Tensor,
        handle: ops.DispatchHandle,
        topk_weights: Optional[torch.Tensor] = None,
        bias=None,
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Normal-mode combine; returns ``(combined_x, combined_topk_weights | None, event)``."""
        self._live()
        _wait_previous(previous_event)
        combine = ops.internode_combine if self._is_internode() else ops.combine
        out = combine(
            self.name, x, handle, topk_weights=topk_weights, bias=bias,
            config=config or default_config_list("combine", self.group_size, Buffer.num_sms),
        )
        weights = out.combined_topk_weights if topk_weights is not None else None
        return out.combined_x, weights, self._event(async_finish)

    def internode_dispatch(self, x: Tensors, handle=None, num_tokens_per_rank=None,
                           num_tokens_per_rdma_rank=None, is_token_in_rank=None,
                           num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                           expert_alignment: int = 1, num_worst_tokens: int = 0,
                           config: Optional[Config] = None,
                           previous_event: Optional[EventOverlap] = None,
                           async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """DeepEP's internode entry point: the same as ``dispatch``, which takes the internode
        ops (and returns an ``InternodeHandle``) on a buffer of several nodes."""
        return self.dispatch(
            x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
            num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens,
            config, previous_event, async_finish, allocate_on_comm_stream,
        )

    def internode_combine(self, x: torch.Tensor, handle: ops.InternodeHandle,
                          topk_weights: Optional[torch.Tensor] = None, bias=None,
                          config: Optional[Config] = None,
                          previous_event: Optional[EventOverlap] = None,
                          async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """DeepEP's internode entry point: the same as ``combine``."""
        return self.combine(x, handle, topk_weights, bias, config, previous_event, async_finish,
                            allocate_on_comm_stream)

    # DeepEP's shrink mode (masking failed ranks) needs enable_shrink=True, which this package
    # refuses at construction; its mask-buffer methods say so.
    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        raise NotImplementedError("low_latency_update_mask_buffer needs enable_shrink, which is not supported")

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        raise NotImplementedError("low_latency_query_mask_buffer needs enable_shrink, which is not supported")

    def low_latency_clean_mask_buffer(self) -> None:
        raise NotImplementedError("low_latency_clean_mask_buffer needs enable_shrink, which is not supported")

    # --- low-latency mode ---------------------------------------------------------------

    def clean_low_latency_buffer(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
    ) -> None:
        self._live()
        ops.clean_low_latency_buffer(self.name, num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
        dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ):
        """Decode dispatch; returns ``(recv_x, recv_count, handle, event, hook)``.

        ``recv_x`` is ``(fp8 [L, R*M, hidden], scales)`` with ``use_fp8`` else bfloat16
        ``[L, R*M, hidden]``. With ``return_recv_hook`` only the send half runs now and
        ``hook()`` completes the receive; otherwise ``hook`` is ``None``.
        ``dispatch_wait_recv_cost_stats`` (a timing statistic) is left unchanged.

        Differentiable in ``x`` with ``use_fp8=False``, in both forms (the send half carries
        the backward; the hook completes its outputs in place). With ``use_fp8=True`` an ``x``
        that requires grad (grad mode on) raises at the call: float8 output has no gradient.
        """
        self._live()
        hook: Optional[Callable[[], None]] = None
        if return_recv_hook:
            out = ops.low_latency_dispatch_send(
                self.name, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0,
            )

            def receive() -> None:
                ops.low_latency_dispatch_recv(self.name, out, cumulative_local_expert_recv_stats)

            hook = receive
        else:
            out = ops.low_latency_dispatch(
                self.name, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0,
                cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats,
            )
        recv = (out.recv_x, out.recv_x_scales) if use_fp8 else out.recv_x
        return recv, out.recv_count, out.handle, self._event(async_finish), hook

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: ops.LowLatencyHandle,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: Optional[torch.Tensor] = None,
        combine_wait_recv_cost_stats: Optional[torch.Tensor] = None,
    ):
        """Weighted decode combine; returns ``(combined_x [num_tokens, hidden], event, hook)``.

        Differentiable in ``x`` and ``topk_weights`` in every form. With ``out`` and a gradient
        needed (grad mode on, ``x``, ``topk_weights`` or ``out`` requiring grad) the functional
        combine runs and its result is copied into ``out`` (autograd records the copy, at the
        call or, with ``return_recv_hook``, in ``hook()`` under the grad mode of the call);
        without gradients ``out`` is written by the op itself.
        """
        self._live()
        if use_logfmt:
            raise NotImplementedError("use_logfmt (LogFMT-compressed combine) is not supported")
        grad_mode = torch.is_grad_enabled()
        copy_into_out = out is not None and grad_mode and any(
            t.requires_grad for t in (x, topk_weights, out)
        )
        if copy_into_out:
            from . import meta

            meta.check_low_latency_out(out, x, topk_idx)  # the op's own check, before sending
        hook: Optional[Callable[[], None]] = None
        if return_recv_hook:
            pending = ops.low_latency_combine_send(
                self.name, x, topk_idx, topk_weights, handle, zero_copy=zero_copy
            )

            def receive() -> None:
                ops.low_latency_combine_recv(self.name, pending, topk_idx, topk_weights)
                if out is not None:
                    with torch.set_grad_enabled(grad_mode):
                        out.copy_(pending)

            hook = receive
            combined = pending if out is None else out
        elif copy_into_out:
            combined = out.copy_(ops.low_latency_combine(
                self.name, x, topk_idx, topk_weights, handle, zero_copy=zero_copy
            ))
        else:
            combined = ops.low_latency_combine(
                self.name, x, topk_idx, topk_weights, handle, zero_copy=zero_copy, out=out
            )
        return combined, self._event(async_finish), hook

    def get_next_low_latency_combine_buffer(self, handle: ops.LowLatencyHandle) -> torch.Tensor:
        """``[L, R*M, hidden]`` bfloat16 view of the workspace to fill for ``zero_copy`` combine."""
        src_info, _, num_max, hidden, num_experts = handle
        num_local = num_experts // self.group_size
        count = num_local * self.group_size * num_max * hidden
        workspace = self._live().workspace
        if workspace.numel() < 2 * count:
            raise ValueError(
                f"the low-latency buffer has {workspace.numel()} bytes but the combine buffer "
                f"needs {2 * count}; create the Buffer with low_latency_mode=True and "
                "num_rdma_bytes >= get_low_latency_rdma_size_hint(...)"
            )
        return workspace[: 2 * count].view(torch.bfloat16).view(
            num_local, self.group_size * num_max, hidden
        )

    # --- helpers --------------------------------------------------------------------------

    def _is_internode(self) -> bool:
        return self.num_rdma_ranks > 1

    def _event(self, async_finish: bool) -> EventOverlap:
        # Without async_finish one shared EventOverlap(None) (nothing to wait on; a new object
        # per call was a measurable part of an eager call's Python time).
        return EventOverlap(_record_event(self.device)) if async_finish else _NO_EVENT
