"""Edge-chunked convolutions: a step's memory no longer grows with edges × convolution weights.

In each MACE interaction the radial MLP turns every edge's radial features into that
edge's tensor-product weights (1 280 floats an edge in MACE-OFF24(M)'s second interaction),
which the backward pass keeps twice (for the product with the cutoff and for the
convolution): most of the ~1.45 MB an atom of peak memory of water at fp32.

:func:`defer_convolution_weights` changes each interaction of a block class whose forward
hands ``conv_tp_weights``' output, times the cutoff, to ``conv_tp`` and nowhere else
(:data:`mace_lpcalc.compat.WEIGHTS_TO_CONVOLUTION_BLOCKS`, checked against mace's source):

* ``conv_tp_weights`` becomes :class:`DeferredRadialWeights`: it keeps the radial features
  for the convolution and returns ones (edges, 1), so the block's ``* cutoff`` yields the
  cutoff factor itself;
* ``conv_tp`` becomes :class:`ChunkedConvolution`: it computes the weights (MLP, times the
  factor, as the block would) and the convolution, in chunks of edges within
  :func:`convolution_chunks`, keeping for the backward pass only each chunk's inputs and
  recomputing the chunk (:class:`_RecomputedChunk`); around cuEquivariance's fused kernel
  it can recompute just the weights instead (:class:`_RecomputedWeights`, off by default).

Outside :func:`convolution_chunks` the pair computes what mace's block computes, in one
piece and with the same operations. Chunks change only the order in which messages are
summed. :class:`EdgeChunking` decides when a call chunks (the engine asks at every capacity).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings

from mace_lpcalc import compat
import torch
from torch.autograd.function import once_differentiable

from mace_lpcalc.fastpath.compiled import DEVICE_WORK_LOCK
from mace_lpcalc.precision.backends import inner_convolution
from mace_lpcalc.precision.casting import AutocastRegion

_CHUNK_EDGES = contextvars.ContextVar("mace_lpcalc_convolution_chunk_edges", default=None)
#: (DeferredRadialWeights, its radial features, the ones it returned), from the weights
#: call to the convolution that follows it in the same block (and thread).
_PENDING = contextvars.ContextVar("mace_lpcalc_pending_radial_features", default=None)

#: ``"auto"`` chunks only where the unchunked convolutions would keep more than this
#: fraction of the device's memory for the backward pass: chunking costs time (1.6x per
#: step at 41 472 water atoms on an H100, bench/results/h100_scaling_water.json), so it is
#: for boxes that would not fit otherwise ...
AUTO_CHUNKING_ABOVE = 0.7
#: ... in chunks as large as memory allows, since every chunk of a fused convolution
#: reads and writes node-sized messages and gradients (that traffic grows as atoms x
#: chunks: 10.9 -> 17.9 us an atom-step from 15 to 115 chunks of 247 097 edges,
#: h100_scaling_water.json): the chunks' weights may take this share of the memory left
#: beside the rest of the call ...
AUTO_CHUNK_SHARE = 0.4
#: ... whose bytes an edge slot are about this fraction of the unchunked weights' (chunked
#: fp32 peaks less one chunk's weights: 0.085-0.098 of them, 41 472-331 776 atoms) ...
REST_PER_KEPT_BYTE = 0.1
#: ... and chunks are never smaller than this fraction of the memory, nor this many edges.
AUTO_CHUNK_FRACTION, MIN_CHUNK_EDGES = 1 / 24, 16_384
#: Copies of each edge's weights the unchunked backward pass keeps (for the product with
#: the cutoff and for the convolution): 14.3 kB an edge slot for MACE-OFF24(M) at fp32,
#: where unchunked peaks measured 15.2-16.3 kB (h100_scaling_water.json, 5 184 and 41 472
#: atoms).
KEPT_WEIGHT_COPIES = 2
#: The rule ``"auto"`` follows, as benchmarks record it beside what they measured.
AUTO_RULE = {"above": AUTO_CHUNKING_ABOVE, "chunk_share": AUTO_CHUNK_SHARE,
             "rest_per_kept_byte": REST_PER_KEPT_BYTE, "chunk_fraction": AUTO_CHUNK_FRACTION,
             "kept_weight_copies": KEPT_WEIGHT_COPIES}


@contextlib.contextmanager
def convolution_chunks(chunk_edges: int | None):
    """Within this block, this thread's :class:`ChunkedConvolution` calls process at most
    ``chunk_edges`` edges at a time (None: all at once, as mace does)."""
    if chunk_edges is not None and not (isinstance(chunk_edges, int) and chunk_edges >= 1):
        raise ValueError(f"chunk_edges must be a positive integer or None, got {chunk_edges!r}")
    token = _CHUNK_EDGES.set(chunk_edges)
    try:
        yield
    finally:
        _CHUNK_EDGES.reset(token)


class DeferredRadialWeights(torch.nn.Module):
    """Stands in for an interaction's ``conv_tp_weights``; the weights are computed by the
    :class:`ChunkedConvolution` that the block calls next."""

    def __init__(self, radial_mlp: torch.nn.Module):
        super().__init__()
        self.radial_mlp = radial_mlp

    def forward(self, radial_features: torch.Tensor) -> torch.Tensor:
        ones = radial_features.new_ones(radial_features.shape[0], 1)
        _PENDING.set((self, radial_features, ones))
        return ones


class ChunkedConvolution(torch.nn.Module):
    """An interaction's ``conv_tp`` that computes its own weights, chunk by chunk.

    Called as the block calls its convolution: fused ``(node_feats, edge_attrs, factor,
    edge_index)`` returns node messages (summed over chunks); unfused ``(sender_feats,
    edge_attrs, factor)`` returns edge messages (chunks concatenated). ``factor`` is what
    the block made of the ones :class:`DeferredRadialWeights` returned: the cutoff, or
    those ones themselves where the block has no cutoff.
    """

    #: Around the fused kernel, recompute only the weights: right on the GPU, 372 against 430
    #: ms a step at 41 472 atoms on an H100, but 20.1 GiB against 7.6 (a leak in _recompute,
    #: since fixed: h100_weights_only_recompute.json, README): off until a GPU confirms.
    weights_only_where_fused = False

    def __init__(self, convolution: torch.nn.Module, partner: DeferredRadialWeights):
        super().__init__()
        self.convolution = convolution
        # Not a submodule (its parameters belong to the block's conv_tp_weights); deepcopy
        # maps it to the copied partner.
        object.__setattr__(self, "partner", partner)
        #: How the backward pass gets a chunk back: the fused kernel saves only its inputs,
        #: so its weights alone can be (other convolutions save per-edge intermediates).
        self.recompute_weights_only = (self.weights_only_where_fused
                                       and hasattr(convolution, compat.CUEQ_FUSION_MARKER))

    def forward(self, node_feats, edge_attrs, factor, edge_index=None):
        pending = _PENDING.get()
        _PENDING.set(None)
        if (pending is None or pending[0] is not self.partner
                or pending[1].shape[0] != edge_attrs.shape[0]):
            raise RuntimeError("ChunkedConvolution must be called right after its block's "
                               "DeferredRadialWeights, on the same edges")
        deferred, radial_features, ones = pending
        scale = None if factor is ones else factor
        n_edges, chunk_edges = edge_attrs.shape[0], _CHUNK_EDGES.get()
        if chunk_edges is None or n_edges <= chunk_edges or self._trains(deferred):
            return self._convolve(deferred.radial_mlp, node_feats, edge_attrs,
                                  radial_features, scale, edge_index)
        n_chunks = -(-n_edges // chunk_edges)
        size = -(-n_edges // n_chunks)  # equal chunks
        fused = edge_index is not None
        parts = []
        convolve = functools.partial(self._convolve, deferred.radial_mlp)
        messages = None
        for start in range(0, n_edges, size):
            edges = slice(start, start + size)
            inputs = (node_feats if fused else node_feats[edges], edge_attrs[edges],
                      radial_features[edges], None if scale is None else scale[edges],
                      edge_index[:, edges] if fused else None)
            if self.recompute_weights_only:
                recipe = _RecomputedWeights(deferred.radial_mlp, *inputs[2:4])
                with recipe.hooks():
                    part = self._convolve_weights(inputs[0], inputs[1], recipe.compute(),
                                                  inputs[4])
            else:
                part = _RecomputedChunk.apply(convolve, *inputs)
            if not fused:
                parts.append(part)
            else:  # summed as they come: each chunk's node messages are as large as all's
                messages = part if messages is None else messages + part
        return torch.cat(parts) if not fused else messages

    def _trains(self, deferred: DeferredRadialWeights) -> bool:
        """Whether parameter gradients are wanted, which chunks do not compute (they run whole)."""
        return torch.is_grad_enabled() and any(
            parameter.requires_grad
            for parameter in (*self.parameters(), *deferred.parameters()))

    def _convolve(self, radial_mlp, node_feats, edge_attrs, radial_features, scale, edge_index):
        return self._convolve_weights(node_feats, edge_attrs,
                                      radial_weights(radial_mlp, radial_features, scale), edge_index)

    def _convolve_weights(self, node_feats, edge_attrs, weights, edge_index):
        if edge_index is None:
            return self.convolution(node_feats, edge_attrs, weights)
        return self.convolution(node_feats, edge_attrs, weights, edge_index)


def radial_weights(radial_mlp, radial_features, scale):
    """An edge's convolution weights, as mace's block makes them: the MLP, times the factor."""
    weights = radial_mlp(radial_features)
    return weights if scale is None else weights * scale


def _autocast_state(tensor: torch.Tensor) -> tuple:
    device_type = tensor.device.type
    return (device_type, torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type))


def _autocast_as(state: tuple):
    """The autocast state :func:`_autocast_state` recorded, for a recomputation."""
    device_type, enabled, dtype = state
    return torch.autocast(device_type, dtype, enabled=enabled)


class _RecomputedChunk(torch.autograd.Function):
    """One chunk's convolution; its backward recomputes the chunk from its inputs.

    First derivatives only (forces, stress), with respect to the tensor inputs: a second
    raises. The forward's autocast state is restored for the recomputation.
    """

    @staticmethod
    def forward(ctx, convolve, node_feats, edge_attrs, radial_features, scale, edge_index):
        ctx.convolve, ctx.autocast = convolve, _autocast_state(node_feats)
        ctx.save_for_backward(node_feats, edge_attrs, radial_features, scale, edge_index)
        return convolve(node_feats, edge_attrs, radial_features, scale, edge_index)

    @staticmethod
    @once_differentiable  # a second derivative through a chunk would silently be wrong
    def backward(ctx, grad_messages):
        inputs = list(ctx.saved_tensors)
        wanted = [index for index in range(4)
                  if inputs[index] is not None and ctx.needs_input_grad[index + 1]]
        with torch.enable_grad(), _autocast_as(ctx.autocast):
            for index in wanted:
                inputs[index] = inputs[index].detach().requires_grad_()
            messages = ctx.convolve(*inputs)
            grads = torch.autograd.grad(messages, [inputs[index] for index in wanted],
                                        grad_messages, allow_unused=True)
        result = [None] * 6
        for index, grad in zip(wanted, grads):
            result[index + 1] = grad
        return tuple(result)


class _RecomputedWeights:
    """Saved-tensor hooks that keep one chunk's convolution weights as a recipe.

    While :meth:`compute` runs the radial MLP (times the factor), each tensor an operation
    saves for the backward pass is kept as its place in that sequence; then, while the
    convolution runs, each view of the weights it saves is kept as the view's geometry.
    The first of them the backward pass unpacks recomputes the weights and the sequence (the
    MLP, not the convolution), attached to the graph where one of the gradient is being
    built (second derivatives); it is dropped once every one has been unpacked.
    Everything else saved (parameters, the chunk's inputs, node features, indices) is kept
    as it is: it outlives the chunk anyway.
    """

    def __init__(self, radial_mlp, radial_features, scale):
        self.radial_mlp, self.inputs = radial_mlp, (radial_features, scale)
        self.kept = {tensor.untyped_storage().data_ptr() for tensor in (
            *radial_mlp.parameters(), radial_features, scale) if tensor is not None}
        self.autocast = _autocast_state(radial_features)
        self.saved_while_computing, self.tokens, self.unpacked = 0, 0, set()
        self.weights_storage = self.weights_offset = self.recomputed = None

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def compute(self) -> torch.Tensor:
        weights = radial_weights(self.radial_mlp, *self.inputs)
        self.weights_storage = weights.untyped_storage().data_ptr()
        self.weights_offset = weights.storage_offset()
        return weights

    def _pack(self, tensor):
        storage = tensor.untyped_storage().data_ptr()
        if self.weights_storage is None:  # computing the weights
            place, self.saved_while_computing = (self.saved_while_computing,
                                                 self.saved_while_computing + 1)
            if storage in self.kept:
                return tensor
            self.tokens += 1
            return self.tokens, place
        if storage != self.weights_storage:
            return tensor
        self.tokens += 1
        return self.tokens, (tensor.size(), tensor.stride(),
                             tensor.storage_offset() - self.weights_offset)

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        token, place = packed
        attached = torch.is_grad_enabled()  # a graph of the gradient is being built
        if self.recomputed is None or self.recomputed[0] != attached:
            self.recomputed = (attached, *self._recompute(attached))
        _, saved, weights = self.recomputed
        value = saved[place] if isinstance(place, int) else weights.as_strided(
            place[0], place[1], weights.storage_offset() + place[2])
        self.unpacked.add(token)
        if len(self.unpacked) == self.tokens:  # all used: free the chunk's weights again
            self.recomputed, self.unpacked = None, set()
        return value

    def _recompute(self, attached: bool):
        saved = []

        def collect(tensor):  # detached as in torch.utils.checkpoint: see test_edge_chunks.py
            saved.append(tensor.detach())
            return tensor

        inputs = self.inputs if attached else [
            None if tensor is None else tensor.detach().requires_grad_(tensor.requires_grad)
            for tensor in self.inputs]
        with torch.enable_grad(), _autocast_as(self.autocast), \
                torch.autograd.graph.saved_tensors_hooks(collect, lambda tensor: tensor):
            weights = radial_weights(self.radial_mlp, *inputs)
        if len(saved) != self.saved_while_computing:
            raise RuntimeError("recomputing a chunk's convolution weights saved "
                               f"{len(saved)} tensors where computing them saved "
                               f"{self.saved_while_computing}")
        return saved, weights if attached else weights.detach()


def _chunkable_interactions(model: torch.nn.Module):
    """Interactions of the block classes whose forward the pair relies on (inside the
    ``bf16`` policy's autocast wrappers too)."""
    for interaction in getattr(model, "interactions", ()):
        if isinstance(interaction, AutocastRegion):
            interaction = interaction.module
        kind = type(interaction)
        if (kind.__module__ == compat.MACE_BLOCKS_MODULE
                and kind.__name__ in compat.WEIGHTS_TO_CONVOLUTION_BLOCKS):
            yield interaction


def defer_convolution_weights(model: torch.nn.Module) -> list[ChunkedConvolution]:
    """Give every interaction of a known block class a :class:`DeferredRadialWeights` and
    :class:`ChunkedConvolution` pair, in place; returns the convolutions (already converted
    ones included). Other interactions are left as they are (they never chunk), and so is
    every one, with a warning, where the installed mace's block source no longer reads as
    the pair expects (:func:`mace_lpcalc.compat.weights_reach_only_the_convolution`)."""
    if not compat.weights_reach_only_the_convolution():
        warnings.warn("mace's interaction blocks no longer hand conv_tp_weights to conv_tp "
                      "alone as this version of mace_lpcalc expects: convolutions are not "
                      "chunked", RuntimeWarning, stacklevel=2)
        return []
    convolutions = []
    for interaction in _chunkable_interactions(model):
        if not isinstance(interaction.conv_tp, ChunkedConvolution):
            deferred = DeferredRadialWeights(interaction.conv_tp_weights)
            interaction.conv_tp_weights = deferred
            interaction.conv_tp = ChunkedConvolution(interaction.conv_tp, deferred)
        convolutions.append(interaction.conv_tp)
    return convolutions


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of a CUDA device, or of the host for a CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def available_bytes(device: torch.device) -> float:
    """Memory a CUDA device can still give this process: free on the device plus what
    torch's cache holds unused (inf for a CPU, whose total is the limit that counts)."""
    if device.type != "cuda":
        return float("inf")
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def check_edge_chunk_size(setting) -> None:
    """Raise ValueError unless ``setting`` is ``"auto"``, None or a positive int."""
    if not (setting is None or setting == "auto" or (
            isinstance(setting, int) and not isinstance(setting, bool) and setting >= 1)):
        raise ValueError(f"edge_chunk_size must be 'auto', None or a positive number of "
                         f"edges, got {setting!r}")


class EdgeChunking:
    """When a model's calls chunk their convolutions, and in how many edges.

    Args:
        model: converted in place by :func:`defer_convolution_weights` when a call first
            needs chunks (a model that never does stays exactly as it was).
        setting: None: never chunk; a positive int: chunks of at most that many edges;
            ``"auto"``: chunk only where the unchunked convolutions would keep more than
            :data:`AUTO_CHUNKING_ABOVE` of the device's memory (of its total, or of what
            is still available when a size is first met), then in chunks whose weights
            take :data:`AUTO_CHUNK_SHARE` of what the rest of the call leaves of it (at
            least :data:`AUTO_CHUNK_FRACTION` of the total).
        device: whose memory ``"auto"`` reads.
    """

    def __init__(self, model: torch.nn.Module, setting="auto", device="cpu"):
        check_edge_chunk_size(setting)
        self.model, self.setting, self.converted = model, setting, False
        self._decided: dict[int, int | None] = {}
        #: The chunk size of the last call asked about (None: it ran unchunked).
        self.last_chunk_edges = None
        convolutions = [inner_convolution(block) for block in _chunkable_interactions(model)]
        self.chunkable = bool(convolutions) and setting is not None
        itemsize = next(model.parameters()).element_size()
        self.kept_bytes_per_edge = KEPT_WEIGHT_COPIES * itemsize * sum(
            int(getattr(conv, "weight_numel", 0)) for conv in convolutions)
        self.device = torch.device(device)
        self.memory_bytes = device_memory_bytes(self.device) if setting == "auto" else 0

    def chunk_edges(self, n_edges: int) -> int | None:
        """The chunk size for calls with ``n_edges`` edge slots (None: do not chunk),
        converting the model the first time one is needed."""
        if n_edges not in self._decided:  # once per capacity: free memory varies
            self._decided[n_edges] = self._chunk_edges(n_edges)
        chunk_edges = self._decided[n_edges]
        if chunk_edges is not None and self.chunkable and not self.converted:
            with DEVICE_WORK_LOCK:  # a background compilation may be tracing the model
                # A mace whose blocks fail the source check is tried (and warned of) once.
                self.converted = self.chunkable = bool(defer_convolution_weights(self.model))
        self.last_chunk_edges = chunk_edges if self.chunkable else None
        return self.last_chunk_edges

    def _chunk_edges(self, n_edges: int) -> int | None:
        if not self.chunkable:
            return None
        if self.setting != "auto":
            return self.setting if n_edges > self.setting else None
        kept_bytes = self.kept_bytes_per_edge * n_edges
        memory = min(self.memory_bytes, available_bytes(self.device))
        if kept_bytes <= AUTO_CHUNKING_ABOVE * memory:
            return None
        chunk_bytes = max(AUTO_CHUNK_SHARE * (memory - REST_PER_KEPT_BYTE * kept_bytes),
                          AUTO_CHUNK_FRACTION * self.memory_bytes)
        return max(MIN_CHUNK_EDGES, int(chunk_bytes) // self.kept_bytes_per_edge)
