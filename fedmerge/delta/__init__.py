"""Task vectors, sparse deltas and (in :mod:`fedmerge.delta.lora`) LoRA factors."""

from fedmerge.delta.sparse import SparseTensor
from fedmerge.delta.state_dict import (
    StateDict,
    TaskVector,
    add_deltas,
    apply,
    check_compatible,
    check_shapes,
    floating_names,
    global_norm,
    shapes_of,
    task_vector,
)

__all__ = [
    "SparseTensor",
    "StateDict",
    "TaskVector",
    "add_deltas",
    "apply",
    "check_compatible",
    "check_shapes",
    "floating_names",
    "global_norm",
    "shapes_of",
    "task_vector",
]
