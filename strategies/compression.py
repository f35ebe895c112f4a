"""Update compression: a site sends its update as an encoded difference from the global model, not its weights.

    site k:  x_k = w_k − w_t  (+ e_k: what top-k left out in earlier rounds, with error feedback)
             send C(x_k);   e_k ← x_k − D(C(x_k))
    server:  ŵ_k = w_t + D(C(x_k)), and the rule runs on the ŵ_k as if the sites had sent them

An update that already is a difference (DP-FedAvg's clipped Δ) is encoded as it is, and one that carries a norm
bound (DP-FedAvg's clip norm S, its sensitivity) keeps it: if decoding would exceed S, the encoded update is scaled
down, so the noise calibrated for S still covers it and the accountant is unchanged. Integer buffers
(``num_batches_tracked``) and buffers that are not parameters (BatchNorm's running statistics: small, and a top-k
residual added to a running variance could make it negative) travel as they are. Codecs, each parameter on its own:

    fp16   IEEE half precision                           2 bytes a value;       |error| ≤ 2⁻¹¹·|x| (+ 2⁻²⁵ near 0)
    int8   blocks of B values, s = max|x_block| / 127,
           q = round(x / s)                              1 byte a value + 4 a block;  |error| ≤ s / 2
    topk   the ⌈f·n⌉ largest |x| of each tensor           8 bytes a kept value (int32 index, float32 value);
           with error feedback by default                 what is left out is carried to the next round

Server half: :class:`Compressed` (wraps any rule); site half:
:class:`~lightning_fed.strategies.site.compression.CompressedSite`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Protocol, Union

import numpy as np

from lightning_fed.strategies.base import Aggregator, SiteUpdate, Weights, WrappedAggregator, is_averageable

if TYPE_CHECKING:
    from lightning_fed.strategies.site.compression import CompressedSite

FP16_MAX = float(np.finfo(np.float16).max)


class Encoded(Protocol):
    """One tensor as it travels."""

    def decode(self) -> np.ndarray:
        """The tensor (float64), as the coordinator sees it."""
        ...

    def scaled(self, factor: float) -> "Encoded":
        """The same encoding of ``factor`` times the tensor (``factor`` ≤ 1)."""
        ...


@dataclass(frozen=True)
class HalfTensor:
    values: np.ndarray  # float16, the tensor's shape

    def decode(self) -> np.ndarray:
        return self.values.astype(np.float64)

    def scaled(self, factor: float) -> "HalfTensor":
        return HalfTensor((self.values.astype(np.float32) * factor).astype(np.float16))


@dataclass(frozen=True)
class BlockInt8Tensor:
    codes: np.ndarray  # int8, flat
    scales: np.ndarray  # float32, one per block
    shape: tuple[int, ...]
    block: int

    def decode(self) -> np.ndarray:
        per_value = np.repeat(self.scales.astype(np.float64), self.block)[: self.codes.size]
        return (self.codes.astype(np.float64) * per_value).reshape(self.shape)

    def scaled(self, factor: float) -> "BlockInt8Tensor":
        return BlockInt8Tensor(
            self.codes, (self.scales * np.float32(factor)).astype(np.float32), self.shape, self.block
        )


@dataclass(frozen=True)
class SparseTensor:
    indices: np.ndarray  # int32 (int64 past 2³¹ values), into the flattened tensor
    values: np.ndarray  # float32
    shape: tuple[int, ...]

    def decode(self) -> np.ndarray:
        out = np.zeros(math.prod(self.shape), dtype=np.float64)
        out[self.indices] = self.values
        return out.reshape(self.shape)

    def scaled(self, factor: float) -> "SparseTensor":
        return SparseTensor(self.indices, (self.values * np.float32(factor)).astype(np.float32), self.shape)


class Codec:
    """How one floating tensor is encoded. ``error_feedback``: the site carries what decoding loses to its next
    update (kept in its checkpoints)."""

    name: ClassVar[str] = ""
    error_feedback: bool = False

    def encode(self, array: np.ndarray) -> Encoded:
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class Float16(Codec):
    """Half precision: half the bytes of float32."""

    name = "fp16"

    def __init__(self, error_feedback: bool = False) -> None:
        self.error_feedback = bool(error_feedback)

    def encode(self, array: np.ndarray) -> HalfTensor:
        peak = float(np.max(np.abs(array), initial=0.0))
        if peak > FP16_MAX:
            raise ValueError(
                f"compression='fp16': an update value of {peak:.3g} is beyond half precision's range "
                f"({FP16_MAX:g}): use compression='int8' (scaled per block) or lower the learning rate"
            )
        return HalfTensor(np.asarray(array).astype(np.float16))


class Int8Blocks(Codec):
    """8-bit integers with one float32 scale per ``block`` values (max-abs scaling, round to nearest)."""

    name = "int8"

    def __init__(self, block: int = 256, error_feedback: bool = False) -> None:
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"compression='int8': block must be an integer >= 1 (values per scale), got {block!r}")
        self.block, self.error_feedback = block, bool(error_feedback)

    def encode(self, array: np.ndarray) -> BlockInt8Tensor:
        flat = np.asarray(array, dtype=np.float64).reshape(-1)
        blocks = -(-flat.size // self.block)
        padded = np.zeros(blocks * self.block)
        padded[: flat.size] = flat
        peaks = np.abs(padded.reshape(blocks, self.block)).max(axis=1)
        scales = (peaks / 127.0).astype(np.float32)
        safe = np.where(scales > 0, scales, 1.0).astype(np.float64)
        codes = np.clip(np.rint(padded.reshape(blocks, self.block) / safe[:, None]), -127, 127).astype(np.int8)
        return BlockInt8Tensor(codes.reshape(-1)[: flat.size].copy(), scales, tuple(np.shape(array)), self.block)


class TopK(Codec):
    """The ``fraction`` of each tensor's values largest in magnitude (at least one), with error feedback."""

    name = "topk"

    def __init__(self, fraction: float = 0.01, error_feedback: bool = True) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(
                f"compression='topk': fraction must be in (0, 1] (the share of values sent), got {fraction!r}"
            )
        self.fraction, self.error_feedback = float(fraction), bool(error_feedback)

    def encode(self, array: np.ndarray) -> SparseTensor:
        flat = np.asarray(array).reshape(-1)
        k = max(1, math.ceil(self.fraction * flat.size))
        index = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :] if k < flat.size else np.arange(flat.size)
        index = np.sort(index).astype(np.int32 if flat.size < 2**31 else np.int64)
        return SparseTensor(index, flat[index].astype(np.float32), tuple(np.shape(array)))


CODECS: dict[str, type[Codec]] = {codec.name: codec for codec in (Float16, Int8Blocks, TopK)}


def get_codec(compression: Union[str, Codec], options: Optional[dict[str, Any]] = None) -> Codec:
    """The codec named ``compression`` (``"fp16"``, ``"int8"``, ``"topk"``) built with ``options``, or the instance."""
    if isinstance(compression, Codec):
        if options:
            raise ValueError("compression_kwargs only applies to a named codec; configure the instance directly")
        return compression
    cls = CODECS.get(str(compression).lower())
    if cls is None:
        raise ValueError(
            f"unknown compression {compression!r}: choose one of {', '.join(CODECS)} (or None for full updates)"
        )
    try:
        return cls(**(options or {}))
    except TypeError as err:
        raise ValueError(f"bad options for compression {cls.name!r}: {err}") from None


def l2_norm(arrays: Any) -> float:
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays))


def encode_update(
    codec: Codec, values: Weights, norm_bound: Optional[float] = None
) -> tuple[dict[str, Encoded], Weights]:
    """Each tensor encoded, and what the coordinator will decode; scaled down to ``norm_bound`` if decoding exceeds it."""
    encoded = {k: codec.encode(v) for k, v in values.items()}
    decoded = {k: e.decode() for k, e in encoded.items()}
    if norm_bound is not None:
        for attempt in range(4):  # one step suffices, unless re-rounding (fp16: 2⁻¹¹) eats the margin: then a wider one
            norm = l2_norm(decoded.values())
            if norm <= norm_bound:
                break
            if attempt == 3:
                raise ValueError(
                    f"compression {codec.name!r} could not keep the update within its norm bound {norm_bound:g}"
                )
            factor = norm_bound / norm * (1 - 1e-4 * 10**attempt)
            encoded = {k: e.scaled(factor) for k, e in encoded.items()}
            decoded = {k: e.decode() for k, e in encoded.items()}
    return encoded, decoded


class Compressed(WrappedAggregator):
    """Wraps any rule: decodes each site's compressed update (:meth:`receive`) before screening and the rule."""

    decodes_updates = True

    def __init__(self, inner: Aggregator, codec: Codec) -> None:
        super().__init__(inner, "compression")  # compression is transport: checkpoints stay the rule's
        self.codec = codec

    def site_algorithm(self) -> "CompressedSite":
        from lightning_fed.strategies.site.compression import CompressedSite

        return CompressedSite(self.inner.site_algorithm(), self.codec)

    def receive(self, update: SiteUpdate, current: Weights | None) -> SiteUpdate:
        encoded: Optional[dict[str, Encoded]] = update.extras.get("compressed")
        if encoded is None:
            raise ValueError("its update is not compressed, though the federation compresses updates")
        is_difference = bool(update.extras.get("compressed_difference"))
        if not is_difference and current is None:
            raise ValueError("a compressed update needs the round's starting global model")
        weights: Weights = {}
        for key, code in encoded.items():
            values = code.decode()
            reference = current[key] if current is not None and key in current else None
            dtype = reference.dtype if reference is not None else np.dtype(np.float32)
            if not is_difference:
                if reference is None:
                    raise ValueError(f"its compressed update has a tensor {key!r} the global model lacks")
                values = reference.astype(np.float64) + values
            weights[key] = values.astype(dtype)
        weights.update(update.weights)  # buffers (BatchNorm statistics, counters), sent as they are
        extras = {k: v for k, v in update.extras.items() if k not in ("compressed", "compressed_difference")}
        return self.inner.receive(SiteUpdate(update.site, weights, update.num_samples, extras), current)

    def __repr__(self) -> str:
        return f"{self.inner!r} compressed with {self.codec!r}"


def floating(weights: Weights) -> Weights:
    return {k: v for k, v in weights.items() if is_averageable(v)}
