"""The CPU kernels for packed low-bit weights (`csrc/qkernels.c`), compiled once per machine and loaded.

`cpu_kernels()` builds the C file with the system compiler the first time it is needed (about a second; no
torch headers, no build step at install), caches the shared library under the cache root keyed by the
source, compiler and CPU, and returns typed wrappers: the fused dequantize-and-multiply for several experts
at once, the HQQ quantizer run group by group, and the bit packing. Without a C compiler it returns None
once, with a warning naming the fix; every caller then has a pure-torch path (`pack`, `unpack`, `widen3`
here; dequantize-then-multiply in `quant.py`), which is also the oracle the tests hold the kernels to.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from .settings import cache_root_from_env, compiler_from_env

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "qkernels.c"
_ABI = 10  # ms_version() of the source this module speaks to
CHUNK = 16  # bytes per chunk of packed codes (see the C file's header)

# S = token rows of a call, K = input features, N = output features, G = groups of a tensor

_c_int, _c_i64, _c_ptr, _c_float = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
_c_i64p = ctypes.POINTER(ctypes.c_int64)
_SIGNATURES = {
    "ms_version": ([], _c_int),
    "ms_has_avx2": ([], _c_int),
    "ms_packed_bytes": ([_c_i64, _c_int], _c_i64),
    "ms_pack": ([_c_ptr, _c_i64, _c_int, _c_ptr], None),
    "ms_unpack": ([_c_ptr, _c_i64, _c_int, _c_ptr], None),
    "ms_widen3": ([_c_ptr, _c_ptr, _c_i64, _c_ptr], None),
    "ms_order": ([_c_ptr, _c_i64, _c_i64, _c_i64, _c_ptr], None),
    "ms_fast_path": ([_c_int, _c_i64, _c_i64], _c_int),
    "ms_qmm_grouped": ([_c_int, _c_i64, _c_i64, _c_i64, _c_ptr, _c_ptr, _c_ptr, _c_i64, _c_i64, _c_i64, _c_i64,
                        _c_i64p, _c_i64p, _c_i64, _c_i64, _c_ptr, _c_int], _c_int),
    "ms_quantize": ([_c_ptr, _c_i64, _c_i64, _c_int, _c_int, _c_float, _c_float, _c_ptr, _c_ptr, _c_ptr], None),
}
ROW_BLOCK = 128  # output rows per work item of a multiply (measured: 64-128 best on the real shape)


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes of `numel` codes packed at `bits` (1, 2, 4 or 8), in whole 16-byte chunks."""
    per_chunk = 128 // bits
    return -(-numel // per_chunk) * CHUNK


def kernel_ordered(in_features: int, group: int) -> bool:
    """Whether a tensor's codes are stored in the kernel's order (groups of 8 interleaved in each row; see the C
    file's header): a property of the shape alone, so every machine packs the same bytes."""
    return group % 16 == 0 and in_features % group == 0


def fast_path_shape(bits: int, in_features: int, group: int) -> bool:
    """Whether the kernel's integer path covers a tensor with `in_features` inputs (it also needs AVX2); the
    mirror of `ms_fast_path`, for planning without the library."""
    maxq = (1 << bits) - 1
    return (bits in (2, 4, 8) and kernel_ordered(in_features, group) and in_features % (128 // bits) == 0
            and (group // 2) * 2 * maxq * 32767 < 2**31 - 1)


@functools.lru_cache(maxsize=256)
def kernel_positions(in_features: int, group: int) -> torch.Tensor:
    """[K] int64: where the weight at natural position k of a row sits in kernel order (`kernel_pos` in C)."""
    K, g = in_features, group
    G = K // g
    full = G // 8 * 8
    first, size = torch.empty(G, dtype=torch.int64), torch.empty(G, dtype=torch.int64)
    groups = torch.arange(full)
    first[:full], size[:full] = groups - groups % 8, 8
    start = full
    for m in (4, 2, 1):
        if (G - full) & m:
            first[start:start + m], size[start:start + m] = start, m
            start += m
    k = torch.arange(K)
    ga = k // g
    gb, m = first[ga], size[ga]
    width = g * m // 8  # a slice of a group
    off = k - ga * g
    w, p = off % width, (off // width) * m + (ga - gb)
    return gb * g + (w // 2) * 16 + 2 * p + (w & 1)


def to_kernel_order(codes: torch.Tensor, in_features: int, group: int) -> torch.Tensor:
    """Codes (flat, natural [N, K] order) -> flat, in kernel order where the shape is ordered."""
    if not kernel_ordered(in_features, group):
        return codes.reshape(-1)
    rows = codes.reshape(-1, in_features)
    out = torch.empty_like(rows)
    out[:, kernel_positions(in_features, group)] = rows
    return out.reshape(-1)


def from_kernel_order(codes: torch.Tensor, in_features: int, group: int) -> torch.Tensor:
    """The inverse of `to_kernel_order`."""
    if not kernel_ordered(in_features, group):
        return codes.reshape(-1)
    return codes.reshape(-1, in_features)[:, kernel_positions(in_features, group)].reshape(-1)


class CpuKernels:
    """Typed wrappers over the loaded library; every tensor argument is a contiguous CPU tensor."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.lib, self.path = lib, path
        for name, (args, result) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, result
        self.avx2 = bool(lib.ms_has_avx2())
        self._local = threading.local()  # per-thread scratch for quantized activations

    def describe(self) -> dict:
        return {"library": str(self.path), "avx2": self.avx2}

    # -- packing -------------------------------------------------------------------------------
    def pack(self, codes: torch.Tensor, bits: int) -> torch.Tensor:
        codes = _contiguous(codes, torch.uint8).reshape(-1)
        out = torch.empty(packed_bytes(codes.numel(), bits), dtype=torch.uint8)
        self.lib.ms_pack(codes.data_ptr(), codes.numel(), bits, out.data_ptr())
        return out

    def unpack(self, packed: torch.Tensor, numel: int, bits: int) -> torch.Tensor:
        packed = _contiguous(packed, torch.uint8)
        _check_packed(packed, numel, bits)
        out = torch.empty(numel, dtype=torch.uint8)
        self.lib.ms_unpack(packed.data_ptr(), numel, bits, out.data_ptr())
        return out

    def widen3(self, lo2: torch.Tensor, hi1: torch.Tensor, numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
        lo2, hi1 = _contiguous(lo2, torch.uint8), _contiguous(hi1, torch.uint8)
        _check_packed(lo2, numel, 2)
        _check_packed(hi1, numel, 1)
        out = torch.empty(packed_bytes(numel, 4), dtype=torch.uint8) if out is None else out
        if out.numel() != packed_bytes(numel, 4) or not out.is_contiguous():
            raise ValueError(f"widen3 needs a contiguous output of {packed_bytes(numel, 4)} bytes")
        self.lib.ms_widen3(lo2.data_ptr(), hi1.data_ptr(), numel, out.data_ptr())
        return out

    def order(self, codes: torch.Tensor, in_features: int, group: int) -> torch.Tensor:
        """`to_kernel_order` in C (the quantizer's output for a whole layer goes through it)."""
        codes = _contiguous(codes, torch.uint8).reshape(-1)
        if not kernel_ordered(in_features, group):
            return codes
        out = torch.empty_like(codes)
        self.lib.ms_order(codes.data_ptr(), codes.numel() // in_features, in_features, group, out.data_ptr())
        return out

    # -- quantizing ----------------------------------------------------------------------------
    def quantize(self, weights: torch.Tensor, bits: int, group: int, iters: int = 20, lp_norm: float = 0.7,
                 beta: float = 10.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat weights (any shape, numel a multiple of `group`) -> codes uint8 [numel], scale and zero float32
        [numel / group]: hqq's proximal optimiser with its defaults, each group in registers."""
        w = _contiguous(weights, torch.float32).reshape(-1)
        groups = w.numel() // group
        codes = torch.empty(w.numel(), dtype=torch.uint8)
        scale, zero = torch.empty(groups), torch.empty(groups)
        self.lib.ms_quantize(w.data_ptr(), groups, group, bits, iters, lp_norm, beta, codes.data_ptr(),
                             scale.data_ptr(), zero.data_ptr())
        return codes, scale, zero

    # -- multiplying ---------------------------------------------------------------------------
    def qmm_grouped(self, bits: int, out_features: int, in_features: int, group: int, x: torch.Tensor,
                    base: torch.Tensor, stride: int, offsets: tuple[int, int, int], slots: list[int],
                    counts: list[int]) -> torch.Tensor:
        """x [S, K] (rows grouped by expert, `counts[i]` rows for the expert in `slots[i]`) -> y [S, N] float32.
        Expert i's codes, scales and zeros lie at `base` + slots[i] * stride + offsets (codes, scale, zero).
        Called a dozen times per token: kept to a few microseconds of Python."""
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = _contiguous(x, torch.float32)
        S, n = x.shape[0], len(slots)
        if x.dim() != 2 or x.shape[1] != in_features or len(counts) != n or sum(counts) != S or x.device.type != "cpu":
            raise ValueError(f"qmm_grouped: x {list(x.shape)} on {x.device} for {n} experts of {sum(counts)} rows "
                             f"and {in_features} inputs")
        if not self.fast(bits, in_features, group):
            raise ValueError(f"qmm_grouped: no packed kernel for {bits}-bit [{out_features}, {in_features}] g{group} "
                             f"on this CPU (AVX2: {self.avx2}); dequantize it instead")
        y = torch.empty(S, out_features, dtype=torch.float32)
        if S == 0:
            return y
        threads = torch.get_num_threads()
        padded_groups = -(-(in_features // group) // 8) * 8
        scratch = self._scratch(S * in_features * 2 + 2 * S * padded_groups * 4 + threads * in_features * 2)
        starts = (ctypes.c_int64 * (n + 1))(0, *itertools.accumulate(counts))
        self.lib.ms_qmm_grouped(bits, out_features, in_features, group, x.data_ptr(), y.data_ptr(), base.data_ptr(),
                                stride, offsets[0], offsets[1], offsets[2], (ctypes.c_int64 * n)(*slots), starts, n,
                                ROW_BLOCK, scratch, threads)
        return y

    def fast(self, bits: int, in_features: int, group: int) -> bool:
        """Whether `qmm_grouped` multiplies this shape here (AVX2 and a shape the integer path covers)."""
        return self.avx2 and fast_path_shape(bits, in_features, group)

    def _scratch(self, nbytes: int) -> int:
        """A buffer of at least `nbytes` owned by this thread (calls on one thread never overlap), grown as needed."""
        buf = getattr(self._local, "scratch", None)
        if buf is None or buf.numel() < nbytes:
            buf = self._local.scratch = torch.empty(max(nbytes, 1 << 16), dtype=torch.uint8)
        return buf.data_ptr()


def _contiguous(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.device.type != "cpu":
        raise ValueError(f"the CPU kernels take CPU tensors, got one on {t.device}")
    return t.to(dtype).contiguous()


def _check_packed(packed: torch.Tensor, numel: int, bits: int) -> None:
    if packed.numel() < packed_bytes(numel, bits):
        raise ValueError(f"{numel} codes at {bits} bits need {packed_bytes(numel, bits)} packed bytes, got "
                         f"{packed.numel()}")


# -- the same packing in torch: no compiler needed, and the oracle of the C code -------------------------------
def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (values < 2^bits) -> 16-byte chunks of 128 / bits codes: byte j holds codes j + 16 v at v * bits."""
    per_chunk, planes = 128 // bits, 8 // bits
    flat = codes.reshape(-1).to(torch.uint8)
    padded = torch.zeros(packed_bytes(flat.numel(), bits) // CHUNK * per_chunk, dtype=torch.uint8)
    padded[: flat.numel()] = flat
    planes_ = padded.view(-1, planes, CHUNK)  # [chunks, v, j]
    out = torch.zeros(planes_.shape[0], CHUNK, dtype=torch.uint8)
    for v in range(planes):
        out |= planes_[:, v] << (v * bits)
    return out.reshape(-1)


def unpack(packed: torch.Tensor, numel: int, bits: int) -> torch.Tensor:
    """The inverse of `pack`: codes uint8 [numel]."""
    planes, mask = 8 // bits, (1 << bits) - 1
    _check_packed(packed, numel, bits)
    chunks = packed[: packed_bytes(numel, bits)].reshape(-1, 1, CHUNK)  # [chunks, 1, j]
    shifts = torch.arange(planes, dtype=torch.uint8).view(1, planes, 1) * bits
    return ((chunks >> shifts) & mask).reshape(-1)[:numel]


def widen3(lo2: torch.Tensor, hi1: torch.Tensor, numel: int) -> torch.Tensor:
    """3-bit planes -> 4-bit chunks."""
    return pack(unpack(lo2, numel, 2) | (unpack(hi1, numel, 1) << 2), 4)


# -- building and loading -------------------------------------------------------------------------------------
def _march_flags() -> list[str]:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686"):
        return ["-march=native"]
    if machine in ("aarch64", "arm64"):
        return ["-mcpu=native"]
    return []


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and flags (a copied cache folder must not run another
    CPU's build)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    wanted = compiler_from_env()
    candidates = [wanted] if wanted else ["cc", "gcc", "clang"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    return None


def _build(compiler: str, out: Path) -> None:
    base = [compiler, "-O3", "-fPIC", "-shared", "-std=c11", *_march_flags()]
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    errors = []
    # OpenMP first (the kernels' threads are torch's libgomp threads); without it, one thread (clang on macOS).
    for flags in (["-fopenmp"], []):
        result = subprocess.run([*base, *flags, str(SOURCE), "-o", str(tmp), "-lm"], capture_output=True, text=True)
        if result.returncode == 0:
            if not flags:
                logger.warning("moeshard's CPU kernels built without OpenMP (%s has none): they run on one thread",
                               compiler)
            os.replace(tmp, out)
            return
        errors.append(result.stderr.strip().splitlines()[-1:] or ["(no message)"])
    tmp.unlink(missing_ok=True)
    raise OSError(f"{compiler} could not build {SOURCE.name}: {errors[0][0]}")


@functools.lru_cache(maxsize=None)
def cpu_kernels() -> CpuKernels | None:
    """The compiled kernels, built on first use; None (with one warning) where no C compiler can build them."""
    compiler = _compiler()
    if compiler is None:
        logger.warning("no C compiler found (cc, gcc or clang; or set CC): quantized experts and attention are "
                       "dequantized on every call, 10-30x slower. Install one (apt install gcc) for moeshard's "
                       "packed kernels")
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256(b"\0".join(s.encode() for s in (
            SOURCE.read_text(), compiler, version, " ".join(_march_flags()), _cpu_signature(), str(_ABI)))).hexdigest()
        folder = cache_root_from_env() / "kernels"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"qkernels-{key[:20]}.so"
        if not path.is_file():
            with tempfile.TemporaryDirectory():  # keeps stray compiler temp files out of the cache folder
                _build(compiler, path)
            logger.info("built moeshard's CPU kernels with %s into %s", compiler, path)
        lib = ctypes.CDLL(str(path))
        if lib.ms_version() != _ABI:
            raise OSError(f"{path} speaks kernel ABI {lib.ms_version()}, expected {_ABI}")
        return CpuKernels(lib, path)
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("moeshard's CPU kernels are unavailable (%s): quantized weights are dequantized on every "
                       "call, 10-30x slower", exc)
        return None
