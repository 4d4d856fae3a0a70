"""Tensor parallelism: a 1-D device mesh and the Megatron-style placement of every weight.

Column-parallel (output dim split over `tp`): wq, wk, wv and their biases (whole heads per
device), w_gate and w_up. Row-parallel (input dim split): wo and w_down, whose matmuls end in
a partial sum that XLA (GSPMD) all-reduces. The paged KV cache is split on its KV-head axis
(wherever the backend's `KVLayout` puts it), so each device holds its heads' pages for every
page id and the page tables stay global.
The gpu and tpu attention kernels run per device inside `shard_map` over this axis
(`models.attention.Backend.attend`), on the same head split.
The embedding is replicated (a gather by token id); an untied lm_head is split on the vocab
(XLA gathers the logits for sampling). Norm scales are replicated.

Everything is expressed as `NamedSharding`s handed to `jax.device_put` / jit inputs, so the
model code is unchanged and the collectives are XLA's. Loading puts each weight straight into
its sharding: no device ever holds the whole model.

Multi-host (`tfjax.distributed`): after `jax.distributed.initialize()` the mesh spans every
process's devices, in `jax.devices()` order, and must use all of them. From a checkpoint
directory every process reads only the slices its own devices hold
(`models.loaders.safetensors.load_sharded`); a GGUF file is read whole by every process and
`device_put` keeps its shards. A host KV tier per process is not built yet.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from models.attention import MESH_AXIS, KVLayout, backend_for
from models.config import ModelConfig
from models.errors import UserError
from models.weights import Layer, Weights, abstract

AXIS = MESH_AXIS  # named beside the attention kernels, which shard_map over it


def make_mesh(num_devices: int, cfg: ModelConfig) -> Mesh:
    """A `tp` mesh over the first `num_devices` local devices, or over every process's devices
    once `jax.distributed` runs several processes; UserError if it cannot work."""
    if jax.process_count() > 1:
        devices = jax.devices()
        if num_devices != len(devices):
            raise UserError(
                f"--tensor-parallel {num_devices} must equal the {len(devices)} devices of all "
                f"{jax.process_count()} processes: the model is split over every process"
            )
    else:
        devices = jax.local_devices()
        if num_devices > len(devices):
            raise UserError(
                f"--tensor-parallel {num_devices} exceeds the {len(devices)} local devices"
            )
    for name in ("num_heads", "num_kv_heads", "intermediate_size"):
        if getattr(cfg, name) % num_devices:
            raise UserError(
                f"--tensor-parallel {num_devices} does not divide {name}={getattr(cfg, name)}"
            )
    return Mesh(np.array(devices[:num_devices]), (AXIS,))


def weight_shardings(cfg: ModelConfig, mesh: Mesh) -> Weights:
    """A `Weights` tree of NamedShardings matching `abstract(cfg)` (None leaves stay None)."""

    def spec(*axes: str | None) -> NamedSharding:
        return NamedSharding(mesh, P(*axes))

    column, row, replicated = spec(None, AXIS), spec(AXIS, None), spec()
    bias = spec(AXIS) if cfg.attention_bias else None
    layer = Layer(
        attn_norm=replicated,
        wq=column,
        wk=column,
        wv=column,
        bq=bias,
        bk=bias,
        bv=bias,
        wo=row,
        mlp_norm=replicated,
        w_gate=column,
        w_up=column,
        w_down=row,
    )
    shapes = abstract(cfg)
    return Weights(
        embed=replicated,
        layers=[layer] * cfg.num_layers,
        final_norm=replicated,
        lm_head=None if shapes.lm_head is None else column,
    )


def placement(cfg: ModelConfig, tensor_parallel: int) -> Weights:
    """Where each weight lives: its sharding over a `tensor_parallel`-device mesh (one device
    means no parallelism). Always committed, so converted and restored weights (and the
    runner's KV, sharded over the same mesh) share compiled steps."""
    return weight_shardings(cfg, make_mesh(tensor_parallel, cfg))


def kv_sharding(mesh: Mesh, layout: KVLayout | None = None) -> NamedSharding:
    """Per-layer KV pages in `layout` (default: this platform's backend): split on K."""
    layout = layout or backend_for().layout
    return NamedSharding(mesh, _split_at(layout.head_axis, len(layout.shape(1, 1, 1, 1))))


def gathered_pages_sharding(
    mesh: Mesh, layout: KVLayout | None = None, memory_kind: str | None = None
) -> NamedSharding:
    """Gathered pages [L, A, N, ...] (the host tier's unit of transfer): split on K."""
    layout = layout or backend_for().layout
    rank = len(layout.shape(1, 1, 1, 1))
    head = 3 + layout.head_axis - (layout.head_axis > layout.page_axis)
    return NamedSharding(mesh, _split_at(head, rank + 2), memory_kind=memory_kind)


def _split_at(axis: int, rank: int) -> P:
    return P(*(AXIS if i == axis else None for i in range(rank)))
