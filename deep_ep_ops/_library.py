"""The ``deep_ep`` op library, defined from the one op table (``deep_ep_ops/_schemas.py``).

Schemas live in Python so that a CPU-only install needs no compiler. Kernels register per
dispatch key elsewhere: the reference backend from ``deep_ep_ops.reference`` and, when built,
the CUDA kernels from ``csrc/`` via ``TORCH_LIBRARY_IMPL(deep_ep, CUDA, m)``. Fakes live in the
top-level ``meta/`` folder (installed as ``deep_ep_ops.meta``).

The library is a fragment and defines only the ops not defined yet: a process that loaded the
C++ definition first (``csrc/ops.h``, ``deep_ep_ops::define_ops``, the same schemas from the
same table) keeps it.
"""

import torch

from ._schemas import (  # noqa: F401  (re-exported: the op table's users import it from here)
    _NVLINK, _NVSHMEM, INTERNODE_HANDLE_FIELDS, OPS, Op,
)

LIB = torch.library.Library("deep_ep", "FRAGMENT")

SCHEMAS = {name: op.schema for name, op in OPS.items()}
OP_NAMES = tuple(OPS)
OPS_INDEX = {name: i for i, name in enumerate(OP_NAMES)}


def kernel_ops(extension: str) -> tuple[str, ...]:
    """The ops ``extension`` (``"_C"`` or ``"_C_nvshmem"``) implements for the CUDA key."""
    return tuple(name for name, op in OPS.items() if op.kernel == extension)


def takes_buffer(name: str) -> bool:
    """Whether the op talks to other ranks through a named buffer (``str buffer``)."""
    return ", str buffer" in OPS[name].schema

# Ops that talk to other ranks are registered as ordered effects, so that the compiler neither
# drops them when an output is unused nor reorders them against each other (every rank must
# issue the same collectives in the same order). The data-dependent dispatches are the
# exception: Inductor (torch 2.13) cannot lower an effectful op with unbacked output sizes;
# their outputs are always consumed by the expert computation, which keeps them alive and
# ordered by data dependencies.
DATA_DEPENDENT_OPS = ("dispatch", "internode_dispatch")
COMMUNICATION_OPS = tuple(name for name in OPS if takes_buffer(name))
EFFECTFUL_OPS = tuple(name for name in COMMUNICATION_OPS if name not in DATA_DEPENDENT_OPS)


def _register_effect(name: str) -> None:
    register = getattr(torch.library, "_register_effectful_op", None)
    if register is not None:
        register(f"deep_ep::{name}", torch.library.EffectType.ORDERED)
        return
    from torch._higher_order_ops import effects  # torch < 2.10 keeps it here

    effects._register_effectful_op(
        getattr(torch.ops.deep_ep, name).default, effects._EffectType.ORDERED
    )


def _defined(name: str) -> bool:
    """Whether ``deep_ep::name`` has a schema already (the C++ definition loaded first)."""
    return bool(torch._C._jit_get_schemas_for_operator(f"deep_ep::{name}"))


for _name, _schema in SCHEMAS.items():
    if not _defined(_name):
        LIB.define(_schema, tags=())
for _name in EFFECTFUL_OPS:
    _register_effect(_name)
