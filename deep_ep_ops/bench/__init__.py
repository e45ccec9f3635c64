"""Benchmark of the ``deep_ep`` ops: ``python -m deep_ep_ops.bench``.

Follows docs/DESIGN.md §11 (DeepEP's methodology). The command spawns one process per rank (gloo on
CPU, NCCL with one GPU per rank on CUDA), builds a ``deep_ep_ops.Buffer``, routes random tokens
(top-k of random scores) and times, per tokens-per-rank value:

- normal mode: ``get_dispatch_layout``, dispatch BF16, dispatch FP8 (``x`` and scales from
  ``per_token_cast_to_fp8``), combine BF16; dispatch and combine once per SM count of
  ``--num-sms`` (``Config(num_sms=n)`` from ``get_dispatch_config`` / ``get_combine_config``;
  default 8 16 20 24 32 on GPUs, the default config on CPU);
- low-latency mode: dispatch FP8, combine BF16, and the send/recv split (send, then receive)
  of both; each as eager calls and, on CUDA (unless ``--no-graph``), as replays of CUDA graphs
  (rows ``<op> [graph]``): every phase (the op, or the send and the receive half) is captured
  into a graph of its own after warm-up, and the replays are timed like the eager calls;
- internode mode (``--mode internode``, only when asked for: ``all`` is normal + low-latency):
  dispatch BF16, dispatch FP8 and combine BF16 through the internode ops, once per SM count as
  normal mode, on a buffer of ``num_ranks / L`` nodes of ``L`` ranks (``--ranks-per-node L``,
  default two nodes). Every rank runs on this host, so the nodes are emulated
  (``num_ranks_per_node``), and every internode line and title says so.

Every rank also times the host time per eager call of every op (the ``host`` table, see
``HOST_HELP``): ``get_dispatch_layout``, dispatch, capacity dispatch, cached dispatch, combine,
``low_latency_dispatch`` (FP8 and BF16), ``low_latency_combine`` and the send/receive-hook halves
of both, through ``deep_ep_ops.Buffer``, each with inputs that do not and that do require grad
(normal and low-latency modes: an internode run has no host table, and its summary says so).

Times are medians over ``--num-iters`` iterations after ``--num-warmup`` warm-up calls.
Bandwidth counts the payload a rank receives, its own share included: ``2·hidden`` bytes per
BF16 row and ``hidden + 4·hidden/128`` per FP8 row; normal dispatch and combine count the rank's
received rows, low-latency ops the received ``(token, expert)`` rows (``sum(recv_count)``).
Internode rows give DeepEP's two conventions: that one (its NVL bandwidth, ``GB/s``) and the
RDMA (bottleneck) one (``RDMA GB/s``): the rank's ``(token, destination node)`` pairs, its own
node included, times the row bytes, over the same time (``rdma_token_pairs``; combine counts the
pairs of its dispatch).

On CUDA every op is also timed on the reference backend (``deep_ep_ops.reference``, or
``reference_internode`` for the internode ops, called directly on the same CUDA tensors over
NCCL) for a side-by-side ratio; the reference does not
depend on the SM count, so it is timed once per op and shown beside every SM row. A graph row
sits beside the reference's graph replays; a backend whose calls do not capture (on any rank)
gets ``n/a (not capturable)`` and the reason under the table, and the run goes on. On CPU both
are the same code, the ratio columns show ``-`` and there are no graph rows.

The last thing written to stdout is the report: the full table (one row per op, tokens, SM
count and eager/graph), then a summary with one line per op with a target, eager and graph
apart (the best SM count within docs/DESIGN.md §11's 24-SM budget, its time and GB/s against the
target, and the speedup over the reference; internode ops have no target, their cluster goals
cannot be measured on one host), then the host table. A CPU (gloo) run times the reference
backend only: its summary and host table show no GPU targets and no ratios to them.
``--out DIR`` also writes it as ``DIR/table.txt`` with ``DIR/results.json``, and
``--plot FILE.png`` draws bandwidth against tokens per rank.

The package: ``settings`` (command line, constants), ``cases`` (backends, cases, timing, one
rank), ``host`` (the host table), ``report`` (tables, summary, plot), ``cli`` (spawning the
ranks, ``main``). The names below are re-exported for scripts and tests.
"""

from .settings import (  # noqa: F401
    CPU_DEFAULTS, GPU_DEFAULTS, GPU_ENV_DEFAULTS, HOST_MAX_SLEEP_US, HOST_TARGET_US, INTERNODE,
    INTERNODE_GOALS_GBPS, LOW_LATENCY, MODES, NORMAL, NOT_PERFORMANCE, SHARED_GPU_BACKEND,
    Settings, build_parser, parse_args, rdma_token_pairs,
)
from .cases import (  # noqa: F401
    CASES, RankSample, _capture_cause, _create_buffer, _with_reference, buffer_sizes,
    describe_error, first_capture_failure, make_inputs, not_capturable_row, run_cases, summarize,
)
from .host import (  # noqa: F401
    HOST_CASES, SLEEPING_GPU, WALL_MINUS_GPU, _GpuSleep, _host_setup, _run_host_phases,
    host_modes, measure_host, measure_host_case,
)
from .report import (  # noqa: F401
    CPU_HOST_COLUMNS, CPU_INTERNODE_SUMMARY_COLUMNS, CPU_SUMMARY_COLUMNS, HOST_COLUMNS,
    INTERNODE_SUMMARY_COLUMNS, INTERNODE_TABLE_COLUMNS, SUMMARY_COLUMNS, TABLE_COLUMNS,
    best_rows, format_report, format_summary, format_table,
)
from .cli import launch, main  # noqa: F401
