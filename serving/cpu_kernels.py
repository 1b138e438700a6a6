"""CPU kernels the packed path calls (`csrc/cpu_kernels.cpp`): paged decode attention, RMSNorm,
SwiGLU's silu(gate) * up, RoPE with the KV-cache write, a folded bank's expand, and (on CPUs with
AVX512-BF16) a bfloat16 GEMM for decode's few rows (`Bf16Linear`).

Decode attention over a paged KV cache, done with SDPA, first gathers every sequence's keys and
values into a (B, Hkv, L, hd) batch and then reads them again: on SmolLM2-135M at batch 64 the
gathers and SDPA took 35 ms of a 107 ms step. The kernel here reads each key and value once, where
the cache holds it (as vLLM's CPU backend does with its own C++ kernels). RMSNorm (torch's CPU
`rms_norm` is 8 small ops, ~45 us a call at 16 rows) and silu * up are one pass each.

It is compiled on first use with the system's C++ compiler (`$CXX`, else `c++` / `g++`; about a
second: it includes no torch header) into `$KILOLORA_CACHE_DIR/kernels` (default
`~/.cache/kilolora/kernels`; a private temporary directory if that is not writable), one file per
source, compiler and CPU, and loaded with ctypes; its
OpenMP team is the one torch runs (same libgomp). Without a compiler, or with
`KILOLORA_CPU_KERNELS=0`, `available()` is False and the engine keeps SDPA (one warning says why).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("kilolora.kernels")

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
FLAGS = ["-O3", "-march=native", "-std=c++17", "-fopenmp", "-shared", "-fPIC"]
"""the compiler's flags; `KILOLORA_CPU_MARCH` replaces `native` (e.g. `haswell`: the AVX2 code paths
on an AVX-512 machine, as a laptop runs them)"""
_ABI = 9
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
why_unavailable: str | None = None
"""why `available()` is False (None when it is True or was not asked yet)"""


def cache_dir() -> Path:
    root = os.environ.get("KILOLORA_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "kilolora") / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's model and flags (Linux), else the platform."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() + platform.machine()


def _flags() -> list[str]:
    march = os.environ.get("KILOLORA_CPU_MARCH", "native")
    if not march.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise RuntimeError(f"KILOLORA_CPU_MARCH={march!r} is not a -march value")
    return [f"-march={march}" if f == "-march=native" else f for f in FLAGS]


def _build(cxx: str) -> Path:
    src = SOURCE.read_bytes()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    flags = _flags()
    key = hashlib.sha256(b"\0".join([src, " ".join(flags).encode(), version.encode(), _cpu_id().encode()])).hexdigest()
    out = cache_dir() / f"cpu_kernels-{key[:16]}.so"
    if out.exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out.parent, os.W_OK):
            raise PermissionError(f"{out.parent} is not writable")
    except OSError:  # a read-only home: a private temporary directory instead
        out = Path(tempfile.gettempdir()) / f"kilolora-kernels-{os.getuid()}" / out.name
        out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if out.exists():
            return out
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cxx, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {r.stderr.strip()[-2000:]}")
        os.replace(tmp, out)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load() -> ctypes.CDLL | None:
    global _lib, _tried, why_unavailable
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("KILOLORA_CPU_KERNELS", "1") == "0":
            why_unavailable = "KILOLORA_CPU_KERNELS=0"
            return None
        cxx = _compiler()
        if cxx is None:
            why_unavailable = "no C++ compiler ($CXX, c++, g++ or clang++)"
        else:
            try:
                lib = ctypes.CDLL(str(_build(cxx)))
                if lib.kl_abi_version() != _ABI:
                    raise RuntimeError(f"ABI {lib.kl_abi_version()}, expected {_ABI}")
                ptr, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
                for fn in (lib.kl_decode_attention_f32, lib.kl_decode_attention_bf16):
                    fn.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, i32, i32, i32, i32, i32, i32, f32, i32]
                    fn.restype = i32
                for fn in (lib.kl_rms_norm_f32, lib.kl_rms_norm_bf16):
                    fn.argtypes = [ptr, i64, ptr, ptr, i64, i32, f32, i32]
                    fn.restype = None
                for fn in (lib.kl_silu_mul_f32, lib.kl_silu_mul_bf16):
                    fn.argtypes = [ptr, i64, ptr, i64, i32, i32]
                    fn.restype = None
                for fn in (lib.kl_rope_kv_f32, lib.kl_rope_kv_bf16):
                    fn.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, i64, i32, i32, i32, i64, i32]
                    fn.restype = i32
                lib.kl_has_gemm_bf16.restype = i32
                lib.kl_pack_bf16.argtypes = [ptr, i64, i64, ptr]
                lib.kl_pack_bf16.restype = None
                lib.kl_gemm_bf16.argtypes = [ptr, i64, ptr, i64, i64, ptr, ptr, i64, ptr, i64, i64, i32]
                lib.kl_gemm_bf16.restype = None
                for fn in (lib.kl_bank_expand_f32, lib.kl_bank_expand_bf16):
                    fn.argtypes = [ptr, i64, ptr, i32, i32, ptr, ptr, i64, i64, i32, i32, ptr, i32, i32]
                    fn.restype = None
                _lib = lib
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                why_unavailable = f"building {SOURCE.name}: {err}"
        if _lib is None:
            log.warning("kilolora: CPU kernels unavailable (%s); decode attention uses SDPA, RMSNorm and SwiGLU torch",
                        why_unavailable)
        return _lib


def available() -> bool:
    """Whether the kernels are built and loaded (builds them on the first call)."""
    return _load() is not None


def vector_lanes() -> int | None:
    """float32 lanes of the kernels' vectors as built: 16 (AVX-512), 8 (AVX2 or narrower; the
    compiler splits the vectors), None when the kernels are unavailable."""
    lib = _load()
    return None if lib is None else int(lib.kl_vector_lanes())


# ----------------------------------------------------------------------------- the heap
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
HEAP_MMAP_THRESHOLD = 32 << 20
"""blocks below this come from the heap, not a fresh mmap (glibc's largest allowed on 64-bit)"""
HEAP_TRIM_THRESHOLD = 512 << 20
"""free memory kept at the heap's top before it goes back to the system"""
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_heap: bool | None = None


def retain_heap() -> bool:
    """Keep freed activation-sized blocks in the process's heap instead of handing them back.

    A forward allocates each activation fresh; glibc serves blocks from 128 KiB up (its threshold
    moves up to the largest size freed so far) with a new mmap, or trims the heap's top once 2x
    that is free, and each page of such a block faults on first touch: ~1 us a 4 KiB page here,
    3 ms for one 12 MB gate/up output of a 2048-token prefill chunk, which the GEMM itself
    computes in 4 ms. With blocks up to 32 MiB from the heap and 512 MiB of free top kept, a
    steady stream of steps reuses warm pages (the demo's verifier rounds: ~20% faster). What
    tcmalloc or jemalloc under LD_PRELOAD give, as vLLM's CPU guide advises, without either.

    Process-wide and once (the engine calls it on CPU); skipped where the user set glibc's own
    knobs (`MALLOC_*_` or `GLIBC_TUNABLES`), with `KILOLORA_RETAIN_HEAP=0`, or off glibc.
    True when the settings are in place."""
    global _heap
    with _lock:
        if _heap is None:
            _heap = False
            if (os.environ.get("KILOLORA_RETAIN_HEAP", "1") != "0" and platform.system() == "Linux"
                    and not any(k in os.environ for k in _MALLOC_ENV) and "malloc" not in os.environ.get(
                        "GLIBC_TUNABLES", "")):
                try:
                    libc = ctypes.CDLL(None)
                    libc.gnu_get_libc_version  # glibc's: musl's mallopt does nothing
                    _heap = (libc.mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD) == 1
                             and libc.mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD) == 1)
                except (OSError, AttributeError):
                    pass
        return _heap


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_slots: torch.Tensor,
                     lengths: torch.Tensor, window: int | None = None, scale: float | None = None) -> torch.Tensor:
    """Attention of one query per sequence over its keys in a paged cache.

    q (B, H, hd) (rows may be strided, heads contiguous); k_cache, v_cache (S, Hkv, hd) contiguous,
    float32 or bfloat16 like q; key_slots (B, L) int64, the cache slot of each key position;
    lengths (B,) int64 in 1..L, the keys of each sequence; window: attend only the last `window`
    keys. Returns (B, H * hd), softmax(q k^T * scale) v with scale 1/sqrt(hd) by default — SDPA's
    values on the gathered keys with the engine's decode mask."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the decode-attention kernel is unavailable: {why_unavailable}")
    b, h, hd = q.shape
    s, hkv, hd2 = k_cache.shape
    dtype = q.dtype
    if dtype not in (torch.float32, torch.bfloat16) or k_cache.dtype != dtype or v_cache.dtype != dtype:
        raise TypeError(f"q, k_cache and v_cache must all be float32 or all bfloat16, got {q.dtype}, "
                        f"{k_cache.dtype}, {v_cache.dtype}")
    if hd2 != hd or v_cache.shape != k_cache.shape or h % hkv:
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)}")
    if q.device.type != "cpu" or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("q and the caches must be CPU tensors, the caches contiguous")
    if q.stride(2) != 1 or q.stride(1) != hd:
        q = q.contiguous()
    key_slots = key_slots.to(torch.int64).contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    if key_slots.dim() != 2 or key_slots.shape[0] != b or lengths.shape != (b,):
        raise ValueError(f"key_slots must be (B, L) and lengths (B,) with B = {b}")
    out = q.new_empty(b, h * hd)
    if b == 0:
        return out
    fn = lib.kl_decode_attention_f32 if dtype == torch.float32 else lib.kl_decode_attention_bf16
    rc = fn(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), key_slots.data_ptr(),
            lengths.data_ptr(), out.data_ptr(), s, b, hkv, h // hkv, hd, key_slots.shape[1], window or 0,
            hd ** -0.5 if scale is None else scale, torch.get_num_threads())
    if rc == 1:
        raise ValueError(f"unsupported head size {hd} or group {h // hkv} (at most 256 and 16)")
    if rc == 2:
        raise ValueError(f"lengths must be in 1..{key_slots.shape[1]}")
    if rc == 3:
        raise ValueError(f"key slots must be in 0..{s - 1}")
    return out


_SMALL_OP = 1 << 15
"""elements below which a kernel runs on the calling thread: no thread team to wake"""


def _threads(elements: int) -> int:
    return 1 if elements < _SMALL_OP else torch.get_num_threads()


def _rows(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() != 2 or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"{what} must be a 2-D float32 or bfloat16 CPU tensor, got {x.dtype} {tuple(x.shape)} "
                         f"on {x.device}")
    return x if x.stride(1) == 1 else x.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(N, D) -> (N, D): transformers' LlamaRMSNorm (float32 statistics; in bfloat16 the normalised
    row is rounded before the weight scales it). Rows may be strided."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the CPU kernels are unavailable: {why_unavailable}")
    x = _rows(x, "x")
    n, d = x.shape
    if weight.shape != (d,) or weight.dtype != x.dtype:
        raise ValueError(f"weight must be ({d},) {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    weight = weight.contiguous()
    out = x.new_empty(n, d)
    fn = lib.kl_rms_norm_f32 if x.dtype == torch.float32 else lib.kl_rms_norm_bf16
    fn(x.data_ptr(), x.stride(0), weight.data_ptr(), out.data_ptr(), n, d, eps, _threads(n * d))
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(N, 2I) rows of [gate | up] -> (N, I): silu(gate) * up, each op rounded as torch's are."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the CPU kernels are unavailable: {why_unavailable}")
    gate_up = _rows(gate_up, "gate_up")
    n, two_i = gate_up.shape
    if two_i % 2:
        raise ValueError(f"gate_up's width {two_i} is odd")
    out = gate_up.new_empty(n, two_i // 2)
    fn = lib.kl_silu_mul_f32 if gate_up.dtype == torch.float32 else lib.kl_silu_mul_bf16
    fn(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), n, two_i // 2, _threads(n * two_i))
    return out


def rope_kv(qkv: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, num_heads: int, num_kv_heads: int,
            k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """RoPE on q and k of a fused q|k|v output, k and v written to the cache: returns q (N, H, hd).

    qkv (N, (H + 2 Hkv) hd), rows may be strided; cos, sin_signed (N, hd) in qkv's dtype, the
    rotate-half tables ([cos, cos] and [-sin, sin]); k_cache, v_cache (S, Hkv, hd) contiguous;
    slots (N,) int64, each row's cache slot. As `torch.addcmul(qk * cos, cat([x2, x1]), sin_signed)`
    on q|k and `index_copy_` of k and v, rounded as those ops round."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the CPU kernels are unavailable: {why_unavailable}")
    qkv = _rows(qkv, "qkv")
    n, width = qkv.shape
    s, hkv, hd = k_cache.shape
    if (hkv != num_kv_heads or hd % 2 or width != (num_heads + 2 * hkv) * hd or v_cache.shape != k_cache.shape
            or cos.shape != (n, hd) or sin_signed.shape != (n, hd) or slots.shape != (n,)):
        raise ValueError(f"rope_kv: qkv {tuple(qkv.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin_signed.shape)}, "
                         f"caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)}, slots {tuple(slots.shape)} do not "
                         f"fit {num_heads} + {num_kv_heads} heads")
    if not (cos.dtype == sin_signed.dtype == k_cache.dtype == v_cache.dtype == qkv.dtype):
        raise TypeError(f"rope_kv: qkv, cos, sin and the caches must share one dtype, got {qkv.dtype}, {cos.dtype}, "
                        f"{sin_signed.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.is_cpu and v_cache.is_cpu):
        raise ValueError("rope_kv: the caches must be contiguous CPU tensors")
    cos, sin_signed = cos.contiguous(), sin_signed.contiguous()
    slots = slots.to(torch.int64).contiguous()
    q = qkv.new_empty(n, num_heads, hd)
    fn = lib.kl_rope_kv_f32 if qkv.dtype == torch.float32 else lib.kl_rope_kv_bf16
    if fn(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin_signed.data_ptr(), q.data_ptr(), k_cache.data_ptr(),
          v_cache.data_ptr(), slots.data_ptr(), n, num_heads, hkv, hd, s, _threads(n * width)):
        raise ValueError(f"rope_kv: slots must be in 0..{s - 1}")
    return q


def has_gemm_bf16() -> bool:
    """Whether `Bf16Linear` runs here (the kernels were built for a CPU with AVX512-BF16)."""
    lib = _load()
    return lib is not None and bool(lib.kl_has_gemm_bf16())


class Bf16Linear:
    """A bfloat16 weight (N, K) packed for the kernels' small-batch GEMM: `self(x)` is
    x @ w.T (+ bias) (+ residual), the float32 sums rounded to bfloat16 once (AVX512-BF16 dot
    products of input pairs; each output sums its k in one order whatever the batch). For decode's
    few rows: on SmolLM2-135M's projections (2 cores, Zen 5) 5.0 ms a step against 6.6 for
    oneDNN's packed GEMMs at 16 rows, 3.2 against 4.3 at 1; with the head, 10.2 against 11.1 at 32
    rows, 13.9 against 16.0 at 48; from 64 rows as fast as oneDNN's, whose prefill GEMMs win."""

    def __init__(self, w: torch.Tensor):
        lib = _load()
        if lib is None or not lib.kl_has_gemm_bf16():
            raise RuntimeError(f"the bfloat16 GEMM kernel is unavailable: {why_unavailable or 'no AVX512-BF16'}")
        if w.dim() != 2 or w.dtype != torch.bfloat16 or not w.is_cpu or w.shape[1] % 2:
            raise ValueError(f"Bf16Linear needs a 2-D bfloat16 CPU weight with an even width, got {w.dtype} "
                             f"{tuple(w.shape)} on {w.device}")
        self.n, self.k = w.shape
        w = w.contiguous()
        self.packed = torch.empty((self.n + 15) // 16 * 16 * self.k, dtype=torch.bfloat16)
        lib.kl_pack_bf16(w.data_ptr(), self.n, self.k, self.packed.data_ptr())
        self._fn = lib.kl_gemm_bf16
        self._threads = self.n * self.k >= 1 << 16

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        m = x.shape[0]
        if x.dim() != 2 or x.shape[1] != self.k or x.dtype != torch.bfloat16 or not x.is_cpu or x.stride(1) != 1:
            raise ValueError(f"Bf16Linear: x must be (M, {self.k}) bfloat16 CPU rows, got {x.dtype} {tuple(x.shape)}")
        if bias is not None and (bias.shape != (self.n,) or bias.dtype != torch.bfloat16 or not bias.is_contiguous()):
            raise ValueError(f"Bf16Linear: bias must be ({self.n},) bfloat16, got {bias.dtype} {tuple(bias.shape)}")
        if residual is not None and (residual.shape != (m, self.n) or residual.dtype != torch.bfloat16
                                     or residual.stride(1) != 1 or not residual.is_cpu):
            raise ValueError(f"Bf16Linear: residual must be ({m}, {self.n}) bfloat16 rows, got {residual.dtype} "
                             f"{tuple(residual.shape)}")
        y = x.new_empty(m, self.n)
        if m:
            self._fn(x.data_ptr(), x.stride(0), self.packed.data_ptr(), self.n, self.k,
                     None if bias is None else bias.data_ptr(), None if residual is None else residual.data_ptr(),
                     0 if residual is None else residual.stride(0), y.data_ptr(), self.n, m,
                     torch.get_num_threads() if self._threads else 1)
        return y


def bank_blocks(blocks, r: int, d_out: int) -> torch.Tensor:
    """`bank_expand`'s block table from a folded group's (core slice, output slice) per module, or
    one block over everything (None)."""
    if blocks is None:
        return torch.tensor([[0, r, 0, d_out]], dtype=torch.int32)
    return torch.tensor([[a.start, a.stop, b.start, b.stop] for a, b in blocks], dtype=torch.int32)


def bank_expand(z: torch.Tensor, cores: torch.Tensor, zs: bool, ut: torch.Tensor, y: torch.Tensor,
                blocks: torch.Tensor) -> None:
    """y[n] += (S_n z[n]) Uᵀ in place, per module block (`bank_blocks`): a folded bank's work per
    token (`lora_batch`). z (N, R) in y's dtype (rows may be strided); cores (N, R, R) float32 in
    `core_layout` (`zs`: they hold Sᵀ) or (N, R) diagonal; ut (R, D) float32; y (N, D) float32 or
    bfloat16, rows may be strided. Only each block's diagonal core block is read."""
    BankExpand(cores, zs, ut, blocks)(z, y)


_EXPAND_DTYPES = (torch.float32, torch.bfloat16)


class BankExpand:
    """`bank_expand` with the operands a batch keeps (cores, Uᵀ, blocks) checked once: a folded
    group calls it every decode step with only z and y new, and the checks and conversions of the
    one-shot form cost more than the kernel's own start (~5 us a call, 120 calls a SmolLM2 step)."""

    def __init__(self, cores: torch.Tensor, zs: bool, ut: torch.Tensor, blocks: torch.Tensor):
        lib = _load()
        if lib is None:
            raise RuntimeError(f"the CPU kernels are unavailable: {why_unavailable}")
        r, d = ut.shape
        if (cores.dim() not in (2, 3) or cores.shape[1:] not in ((r, r), (r,)) or cores.dtype != torch.float32
                or ut.dtype != torch.float32 or blocks.dtype != torch.int32 or blocks.dim() != 2
                or blocks.shape[1] != 4 or cores.device.type != "cpu" or ut.device.type != "cpu"):
            raise ValueError(f"bank_expand: cores {tuple(cores.shape)} {cores.dtype}, ut {tuple(ut.shape)} {ut.dtype}, "
                             f"blocks {tuple(blocks.shape)} {blocks.dtype} do not fit")
        b = blocks.tolist()
        if any(not (0 <= r0 <= r1 <= r and 0 <= c0 <= c1 <= d) for r0, r1, c0, c1 in b):
            raise ValueError(f"bank_expand: blocks {b} outside R = {r}, D = {d}")
        self.cores, self.ut, self.blocks = cores.contiguous(), ut.contiguous(), blocks.contiguous()
        self.rows, self.r, self.d = cores.shape[0], r, d
        self._args = (self.cores.data_ptr(), int(cores.dim() == 2), int(zs), self.ut.data_ptr())
        self._tail = (r, d, self.blocks.data_ptr(), len(b))
        self._f32, self._bf16 = lib.kl_bank_expand_f32, lib.kl_bank_expand_bf16
        self._big = self.rows * r * d // 8 >= _SMALL_OP

    def __call__(self, z: torch.Tensor, y: torch.Tensor) -> None:
        n = self.rows
        # the checks in their cheapest forms (~0.4 us: this runs 120 times a SmolLM2 decode step)
        if (z.shape != (n, self.r) or y.shape != (n, self.d) or z.dtype != y.dtype or not (z.is_cpu and y.is_cpu)
                or y.stride(1) != 1 or y.dtype not in _EXPAND_DTYPES):
            raise ValueError(f"bank_expand: z {tuple(z.shape)} {z.dtype}, y {tuple(y.shape)} {y.dtype} (rows must "
                             f"be contiguous) do not fit {n} rows of R = {self.r}, D = {self.d}")
        if n == 0:
            return
        if z.stride(1) != 1:
            z = z.contiguous()
        fn = self._f32 if y.dtype == torch.float32 else self._bf16
        fn(z.data_ptr(), z.stride(0), *self._args, y.data_ptr(), y.stride(0), n, *self._tail,
           torch.get_num_threads() if self._big else 1)
