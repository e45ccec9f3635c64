"""``Config``: DeepEP's per-call tuning knobs and the buffer-size hints derived from them."""

from __future__ import annotations

import dataclasses

import torch

NUM_MAX_NVL_PEERS = 8  # ranks of one NVLink domain
NUM_MAX_TOPK = 16
_ALIGN = 128


def _align(num_bytes: int) -> int:
    return -(-num_bytes // _ALIGN) * _ALIGN


def _token_bytes(hidden_bytes: int) -> int:
    """One token slot: payload, FP8 scales, top-k indices and weights, source index."""
    return _align(hidden_bytes + 4 * (-(-hidden_bytes // 128)) + NUM_MAX_TOPK * (8 + 4) + 4)


@dataclasses.dataclass
class Config:
    """Normal-mode settings, positional like DeepEP's ``deep_ep.Config``.

    ``num_sms`` SMs run a normal-mode kernel, two per channel. The chunk sizes are the token
    counts a channel moves at a time (send) and holds in its ring buffer (recv) over NVLink and
    RDMA. The op layer receives them as ``config.to_list()``.
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Config.{field.name} must be a positive int, got {value!r}")
        if self.num_sms % 2:
            raise ValueError(f"Config.num_sms must be even (two SMs per channel), got {self.num_sms}")
        if self.num_max_nvl_chunked_send_tokens > self.num_max_nvl_chunked_recv_tokens:
            raise ValueError(
                "Config.num_max_nvl_chunked_send_tokens "
                f"({self.num_max_nvl_chunked_send_tokens}) must not exceed "
                f"num_max_nvl_chunked_recv_tokens ({self.num_max_nvl_chunked_recv_tokens})"
            )

    @property
    def num_channels(self) -> int:
        return self.num_sms // 2

    def to_list(self) -> list[int]:
        return [self.num_sms, self.num_max_nvl_chunked_send_tokens,
                self.num_max_nvl_chunked_recv_tokens, self.num_max_rdma_chunked_send_tokens,
                self.num_max_rdma_chunked_recv_tokens]

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of NVLink buffer a normal-mode call needs for ``hidden_bytes`` per token."""
        num_nvl_ranks = min(num_ranks, NUM_MAX_NVL_PEERS)
        ring = self.num_max_nvl_chunked_recv_tokens * _token_bytes(hidden_bytes)
        queue_heads = 2 * 4  # head and tail counters of one ring
        per_channel = num_nvl_ranks * (ring + queue_heads)
        prefix_matrices = 4 * num_nvl_ranks * (num_nvl_ranks + 2 * self.num_channels)
        return _align(self.num_channels * per_channel + prefix_matrices)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of RDMA buffer a normal-mode call needs (0 within one NVLink domain)."""
        if num_ranks <= NUM_MAX_NVL_PEERS:
            return 0
        num_rdma_ranks = -(-num_ranks // NUM_MAX_NVL_PEERS)
        ring = self.num_max_rdma_chunked_recv_tokens * _token_bytes(hidden_bytes)
        return _align(2 * self.num_channels * num_rdma_ranks * (ring + 2 * 8))


# Defaults by rank count: fewer peers get larger send chunks.
_NVL_SEND_CHUNK = {1: 24, 2: 24, 4: 6, 8: 6}


def get_dispatch_config(num_ranks: int, num_sms: int = 20) -> Config:
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    send = _NVL_SEND_CHUNK.get(num_ranks, 6)
    return Config(num_sms, send, 256, 6, 128)


def get_combine_config(num_ranks: int, num_sms: int = 20) -> Config:
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    send = {1: 10, 2: 10, 4: 9, 8: 4}.get(num_ranks, 4)
    return Config(num_sms, send, 256, 6, 128)


# The default configs as the op layer takes them (Config.to_list()), made once per (op kind,
# ranks, SMs): an eager call without a config then builds no Config (host time, issue 11). The
# lists are shared; nothing may mutate them.
_DEFAULT_LISTS: dict[tuple[str, int, int], list[int]] = {}


def default_config_list(kind: str, num_ranks: int, num_sms: int = 20) -> list[int]:
    """``get_<kind>_config(num_ranks, num_sms).to_list()`` (kind: "dispatch" or "combine").

    While ``torch.compile`` traces, the list is made afresh: a traced read of the cache would
    guard on its contents, and the next new entry would recompile the caller."""
    make = get_dispatch_config if kind == "dispatch" else get_combine_config
    if torch.compiler.is_compiling():
        return make(num_ranks, num_sms).to_list()
    key = (kind, num_ranks, num_sms)
    cached = _DEFAULT_LISTS.get(key)
    if cached is None:
        cached = _DEFAULT_LISTS[key] = make(num_ranks, num_sms).to_list()
    return cached


def _low_latency_kernel_bytes(num_max: int, hidden: int, num_ranks: int) -> int:
    """Bytes of the low-latency kernels' region; mirrors ``low_latency_layout`` in
    csrc/nvshmem/low_latency.cu (keep the two in step).

    Double-buffered (two halves): a dispatch message per (source rank, token) of 64 bytes of
    top-k and a BF16-sized payload, a combine partial row and a route (top-k and weights) per
    (rank, token), 8-byte flags for each, count words and acks per rank; then the staging
    copies that NVSHMEM puts send from, and the counters.
    """
    slots, row = 2 * num_ranks * num_max, 2 * hidden
    message = 4 * NUM_MAX_TOPK + row
    regions = (
        slots * message, slots * row, slots * 8 * NUM_MAX_TOPK, slots * 8, slots * 8, slots * 8,
        2 * num_ranks * 8, 2 * num_ranks * 8, num_ranks * 8, num_ranks * 8, num_ranks * 8,
        num_max * message, num_max * 8 * NUM_MAX_TOPK, num_ranks * num_max * row, 64,
    )
    return sum(_align(size) for size in regions)


def get_low_latency_rdma_size_hint(
    num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
) -> int:
    """Bytes of symmetric buffer the low-latency ops need.

    The zero-copy combine area (``[E/R, R·M, hidden]`` BF16 rows,
    ``Buffer.get_next_low_latency_combine_buffer``) followed by the kernels' region.
    """
    num_max = num_max_dispatch_tokens_per_rank
    for name, value in (
        ("num_max_dispatch_tokens_per_rank", num_max), ("hidden", hidden),
        ("num_ranks", num_ranks), ("num_experts", num_experts),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    zero_copy = _align(num_experts * num_max * 2 * hidden)
    return zero_copy + _low_latency_kernel_bytes(num_max, hidden, num_ranks)
