//! Next-token cross-entropy on CUDA in one read of the logits: a row-wise log-sum-exp kernel
//! compiled at run time.
//!
//! libtorch's path ([`super::queue_libtorch_token_losses`]) reads and writes the logits about
//! four times (aminmax for the finiteness check, an upcast copy of bf16, a log-softmax written
//! in f32, the NLL gather): about 16 bytes of memory traffic per bf16 logit. Here one thread
//! block per predicting position reads its V logits once (16-byte loads, streaming), keeps an
//! online log-sum-exp in f32 registers (a running maximum m and Σ exp(x − m), rescaled when
//! the maximum rises, as the CPU's `fused_ce` does), reduces it over the block, and writes the
//! position's loss `ln Σ − (x[target] − m)` (libtorch's log-softmax arithmetic: max-shifted, f32
//! sums) and a byte saying whether all its logits were finite. The exponential is the GPU's
//! `ex2.approx` (2 ulp) rather than the accurate `expf`, and finiteness is read from the
//! running minimum, maximum and sum rather than tested per logit: both leave the bf16 kernel
//! bound by memory rather than by its arithmetic, and each loss within 1e-6 relative of
//! libtorch's (tests/cuda_ce.rs). A row's last position
//! predicts nothing and is not launched: its logits are neither read nor checked, as on the
//! other paths. A position with a NaN or infinite logit gets a NaN loss and a 0 byte; the
//! caller reduces the bytes on the device (`all`), so [`QueuedLosses`]'s `finite` is the same
//! device-side bool as libtorch's path gives, and nothing waits for the device.
//!
//! No CUDA compiler is needed to build maskaudit: the kernel's source is compiled for the GPU's
//! compute capability by NVRTC (the runtime compiler that PyTorch's CUDA wheels ship) on the
//! first CUDA batch, and launched through the CUDA driver API on the legacy default stream, the
//! stream libtorch queues its work on (maskaudit sets no other). Both libraries are opened with
//! `dlopen` when first needed, so nothing changes for the CPU path or on machines without a GPU.
//! Where either is missing, or compiling or loading fails, [`queue_token_losses`] returns
//! `None` and the caller takes libtorch's path; [`cross_entropy_used`] says which ran.
//!
//! `MASKAUDIT_FUSED_CE=0` in the environment turns the fused kernel off (libtorch's path, for
//! comparison and as an escape hatch); read once per process.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

use tch::{Device, Kind, Tensor};

use crate::sys::Library;

use super::{kernel_cache, QueuedLosses};

/// The kernel, one `extern "C"` entry point per logits dtype. No headers (NVRTC has none of
/// the CUDA toolkit's at hand here): bf16 is widened by a shift, f16 by `cvt.f32.f16`.
pub const KERNEL_SOURCE: &str = r#"
typedef unsigned int u32;
typedef unsigned short u16;
typedef long long i64;

#define MASKAUDIT_MAX_WARPS 32

struct Acc {
    float m;   // running maximum
    float s;   // sum of exp(x - m)
    float lo;  // running minimum: -inf if a logit was -inf (NaN and +inf make s NaN)
};

__device__ __forceinline__ u32 not_finite(float x) {
    return (__float_as_uint(x) & 0x7f800000u) == 0x7f800000u;
}

// exp(d) for d <= 0 through the GPU's base-2 exponential (2 ulp; its result flushed to zero
// below 2^-126, where a term no longer moves a sum that holds exp(0) = 1).
__device__ __forceinline__ float exp_le0(float d) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(d * 1.4426950408889634f));
    return y;
}

// Adds K logits to the accumulator: one rescale when their maximum exceeds the running one.
// Finiteness costs one fminf per logit: fmaxf and fminf skip a NaN, but exp(NaN - m) makes the
// sum NaN, and +inf makes the maximum infinite and the sum NaN (inf - inf).
template <int K>
__device__ __forceinline__ void add(Acc& a, const float (&x)[K]) {
    float vm = x[0];
    float vl = x[0];
#pragma unroll
    for (int i = 1; i < K; ++i) {
        vm = fmaxf(vm, x[i]);
        vl = fminf(vl, x[i]);
    }
    a.lo = fminf(a.lo, vl);
    if (vm > a.m) {
        a.s *= exp_le0(a.m - vm);
        a.m = vm;
    }
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < K; ++i) {
        s += exp_le0(x[i] - a.m);
    }
    a.s += s;
}

__device__ __forceinline__ Acc combine(Acc a, Acc b) {
    Acc r;
    r.m = fmaxf(a.m, b.m);
    r.lo = fminf(a.lo, b.lo);
    if (r.m == -__int_as_float(0x7f800000)) {
        r.s = a.s + b.s;
    } else {
        r.s = a.s * exp_le0(a.m - r.m) + b.s * exp_le0(b.m - r.m);
    }
    return r;
}

// The combination of a warp's 32 accumulators, in every lane.
__device__ __forceinline__ Acc warp_reduce(Acc a) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        Acc o;
        o.m = __shfl_xor_sync(0xffffffffu, a.m, off);
        o.s = __shfl_xor_sync(0xffffffffu, a.s, off);
        o.lo = __shfl_xor_sync(0xffffffffu, a.lo, off);
        a = combine(a, o);
    }
    return a;
}

// Element widening, and the vector width (16 bytes) per element type.
struct F32 {
    typedef float T;
    enum { K = 4 };
    __device__ static float get(float x) { return x; }
    __device__ static void unpack(uint4 v, float (&x)[4]) {
        x[0] = __uint_as_float(v.x); x[1] = __uint_as_float(v.y);
        x[2] = __uint_as_float(v.z); x[3] = __uint_as_float(v.w);
    }
};
struct BF16 {
    typedef u16 T;
    enum { K = 8 };
    __device__ static float get(u16 h) { return __uint_as_float(((u32)h) << 16); }
    __device__ static void unpack(uint4 v, float (&x)[8]) {
        u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            x[2 * i] = __uint_as_float(w[i] << 16);
            x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        }
    }
};
struct F16 {
    typedef u16 T;
    enum { K = 8 };
    __device__ static float get(u16 h) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
        return f;
    }
    __device__ static void unpack(uint4 v, float (&x)[8]) {
        u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            x[2 * i] = get((u16)(w[i] & 0xffffu));
            x[2 * i + 1] = get((u16)(w[i] >> 16));
        }
    }
};

__device__ __forceinline__ uint4 load_streaming(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// One block per predicting position r of B*(T-1): batch row b = r / (T-1), position
// p = r % (T-1), logits row b*T + p (contiguous, stride V), target ids[b*T + p + 1].
template <class E>
__device__ __forceinline__ void lse_ce(const typename E::T* __restrict__ logits,
                                       const i64* __restrict__ ids, float* __restrict__ loss,
                                       unsigned char* __restrict__ ok, i64 t, i64 v) {
    typedef typename E::T T;
    const int K = E::K;
    __shared__ float sm[MASKAUDIT_MAX_WARPS];
    __shared__ float ss[MASKAUDIT_MAX_WARPS];
    __shared__ float sl[MASKAUDIT_MAX_WARPS];

    const i64 r = blockIdx.x;
    const i64 b = r / (t - 1);
    const i64 p = r - b * (t - 1);
    const T* row = logits + (b * t + p) * v;
    const int tid = threadIdx.x;
    const int nt = blockDim.x;

    // Scalars up to the first 16-byte boundary, whole vectors, then the scalar tail.
    const i64 misalign = (i64)(((unsigned long long)row) & 15u);
    i64 head = misalign == 0 ? 0 : (16 - misalign) / (i64)sizeof(T);
    if (head > v) head = v;
    const i64 nv = (v - head) / K;
    const i64 tail_start = head + nv * K;

    Acc a;
    a.m = -__int_as_float(0x7f800000);
    a.s = 0.0f;
    a.lo = __int_as_float(0x7f800000);
    for (i64 i = tid; i < head; i += nt) {
        float x[1] = {E::get(row[i])};
        add<1>(a, x);
    }
    const uint4* vec = (const uint4*)(row + head);
    i64 j = tid;
    for (; j + 3 * (i64)nt < nv; j += 4 * (i64)nt) {
        uint4 w0 = load_streaming(vec + j);
        uint4 w1 = load_streaming(vec + j + nt);
        uint4 w2 = load_streaming(vec + j + 2 * nt);
        uint4 w3 = load_streaming(vec + j + 3 * nt);
        float x[K];
        E::unpack(w0, x); add<K>(a, x);
        E::unpack(w1, x); add<K>(a, x);
        E::unpack(w2, x); add<K>(a, x);
        E::unpack(w3, x); add<K>(a, x);
    }
    for (; j < nv; j += nt) {
        float x[K];
        E::unpack(load_streaming(vec + j), x);
        add<K>(a, x);
    }
    for (i64 i = tail_start + tid; i < v; i += nt) {
        float x[1] = {E::get(row[i])};
        add<1>(a, x);
    }

    // Warp, then block.
    a = warp_reduce(a);
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int warps = (nt + 31) >> 5;
    if (lane == 0) {
        sm[warp] = a.m;
        ss[warp] = a.s;
        sl[warp] = a.lo;
    }
    __syncthreads();
    if (warp == 0) {
        if (lane < warps) {
            a.m = sm[lane];
            a.s = ss[lane];
            a.lo = sl[lane];
        } else {
            a.m = -__int_as_float(0x7f800000);
            a.s = 0.0f;
            a.lo = __int_as_float(0x7f800000);
        }
        a = warp_reduce(a);
        if (lane == 0) {
            const i64 target = ids[b * t + p + 1];
            // Ids are checked against the vocabulary before any batch runs; an id outside it
            // here reads nothing and counts as a non-finite position.
            const u32 in_range = target >= 0 && target < v;
            const float nan = __int_as_float(0x7fc00000);
            const u32 bad = not_finite(a.s) | not_finite(a.m)
                          | (a.lo == -__int_as_float(0x7f800000));
            if (bad || !in_range) {
                loss[r] = nan;
                ok[r] = 0;
            } else {
                const float xt = E::get(row[target]);
                loss[r] = logf(a.s) - (xt - a.m);
                ok[r] = 1;
            }
        }
    }
}

extern "C" __global__ void maskaudit_ce_f32(const float* logits, const i64* ids, float* loss,
                                            unsigned char* ok, i64 t, i64 v) {
    lse_ce<F32>(logits, ids, loss, ok, t, v);
}
extern "C" __global__ void maskaudit_ce_bf16(const u16* logits, const i64* ids, float* loss,
                                             unsigned char* ok, i64 t, i64 v) {
    lse_ce<BF16>(logits, ids, loss, ok, t, v);
}
extern "C" __global__ void maskaudit_ce_f16(const u16* logits, const i64* ids, float* loss,
                                            unsigned char* ok, i64 t, i64 v) {
    lse_ce<F16>(logits, ids, loss, ok, t, v);
}
"#;

/// The kernels' names in [`KERNEL_SOURCE`], in the order of [`Kernels::functions`].
const KERNEL_NAMES: [&CStr; 3] = [
    c"maskaudit_ce_f32",
    c"maskaudit_ce_bf16",
    c"maskaudit_ce_f16",
];

/// Threads per block: the logits' 16-byte vectors over about 16 per thread, a power of two
/// between one warp and 512 (the kernel's shared memory holds 32 warps).
pub fn block_threads(v: i64, element_bytes: i64) -> u32 {
    let per_vector = 16 / element_bytes.max(1);
    let vectors = (v.max(1) + per_vector - 1) / per_vector;
    let want = ((vectors + 15) / 16) as u64;
    want.next_power_of_two().clamp(32, 512) as u32
}

/// The compiler options for a GPU of compute capability `major.minor`: machine code
/// (`sm_XY`, for `nvrtcGetCUBIN`) or PTX (`compute_XY`, compiled by the driver).
pub fn compile_options(major: i32, minor: i32, cubin: bool) -> Vec<CString> {
    let arch = if cubin {
        format!("-arch=sm_{major}{minor}")
    } else {
        format!("-arch=compute_{major}{minor}")
    };
    [arch.as_str(), "--std=c++14", "-default-device"]
        .iter()
        .map(|s| CString::new(*s).expect("no NUL in options"))
        .collect()
}

/// Whether the fused kernel runs: on unless [`configure`] turned it off (the binary's
/// settings: `MASKAUDIT_FUSED_CE=0`).
pub fn enabled() -> bool {
    !FUSED_OFF.load(Ordering::Relaxed)
}

static FUSED_OFF: AtomicBool = AtomicBool::new(false);

/// The process's switches for the CUDA cross-entropy: the fused kernel on or off, and the
/// folder its compiled machine code is kept in between runs (none: compiled every run).
pub fn configure(fused: bool, kernel_cache: Option<PathBuf>) {
    FUSED_OFF.store(!fused, Ordering::Relaxed);
    kernel_cache::set_folder(kernel_cache);
}

/// The kernel cache's folder from the environment's values (`MASKAUDIT_CACHE`,
/// `XDG_CACHE_HOME`, `HOME`); `None` when it is off or no folder is named.
pub fn cache_folder(
    maskaudit_cache: Option<&str>,
    xdg_cache_home: Option<&str>,
    home: Option<&str>,
) -> Option<PathBuf> {
    kernel_cache::folder_from(maskaudit_cache, xdg_cache_home, home)
}

const RAN_FUSED: u8 = 1;
const RAN_LIBTORCH: u8 = 2;
static RAN: AtomicU8 = AtomicU8::new(0);

/// Records that libtorch's kernels computed a CUDA cross-entropy ([`cross_entropy_used`]).
pub fn note_libtorch_ran() {
    RAN.fetch_or(RAN_LIBTORCH, Ordering::Relaxed);
}

/// Which cross-entropy the CUDA batches of this process took: `fused-cuda`, `libtorch`, both
/// (`fused-cuda+libtorch`), or `None` when no cross-entropy ran on a GPU (CPU runs).
pub fn cross_entropy_used() -> Option<&'static str> {
    match RAN.load(Ordering::Relaxed) {
        RAN_FUSED => Some("fused-cuda"),
        RAN_LIBTORCH => Some("libtorch"),
        0 => None,
        _ => Some("fused-cuda+libtorch"),
    }
}

/// The fused cross-entropy of contiguous f32, bf16 or f16 CUDA logits `[B, T, V]` (T ≥ 2)
/// against `input_ids` `[B, T]`, queued on the device without waiting for it: the losses
/// `[B, T-1]` (f32) and whether every logit they used is finite, as in
/// [`super::queue_flat_token_losses`]. `Ok(None)`: not applicable here (another device or
/// dtype, a view, the kernel unavailable), take libtorch's path. Ignores
/// `MASKAUDIT_FUSED_CE` (the caller asks [`enabled`]).
pub fn queue_token_losses(
    logits: &Tensor,
    input_ids: &Tensor,
) -> Result<Option<QueuedLosses>, tch::TchError> {
    queue_token_losses_of(
        logits,
        input_ids,
        logits.size().get(1).copied().unwrap_or(0),
    )
}

/// [`queue_token_losses`] for the first `columns` of the batch's T (2 ≤ `columns` ≤ T): the
/// losses `[B, columns-1]`, and finiteness over those positions alone. The columns past them
/// are the padding appended to round a batch's shape up ([`super::batch::gpu_columns`]): the
/// kernel runs over them too (one launch over the whole batch), and their results are dropped.
pub fn queue_token_losses_of(
    logits: &Tensor,
    input_ids: &Tensor,
    columns: i64,
) -> Result<Option<QueuedLosses>, tch::TchError> {
    let size = logits.size();
    let Device::Cuda(index) = logits.device() else {
        return Ok(None);
    };
    let (slot, element_bytes) = match logits.kind() {
        Kind::Float => (0, 4),
        Kind::BFloat16 => (1, 2),
        Kind::Half => (2, 2),
        _ => return Ok(None),
    };
    if size.len() != 3 || size[1] < 2 || size[2] < 1 || !logits.is_contiguous() {
        return Ok(None);
    }
    let (b, t, v) = (size[0], size[1], size[2]);
    if columns < 2
        || columns > t
        || input_ids.size() != [b, t]
        || input_ids.kind() != Kind::Int64
        || input_ids.device() != logits.device()
    {
        return Ok(None);
    }
    let positions = b * (t - 1);
    // One block per position: the grid's x dimension takes up to 2³¹ − 1.
    if positions > i64::from(i32::MAX) {
        return Ok(None);
    }
    let Ok(kernels) = kernels(index) else {
        return Ok(None);
    };
    let device = logits.device();
    let ids = input_ids.f_contiguous()?;
    let losses = Tensor::f_empty([b, t - 1], (Kind::Float, device))?;
    let ok = Tensor::f_empty([positions], (Kind::Bool, device))?;
    if positions > 0 {
        let mut logits_ptr = logits.data_ptr() as u64;
        let mut ids_ptr = ids.data_ptr() as u64;
        let mut loss_ptr = losses.data_ptr() as u64;
        let mut ok_ptr = ok.data_ptr() as u64;
        let mut t_arg = t;
        let mut v_arg = v;
        let mut args: [*mut c_void; 6] = [
            (&mut logits_ptr as *mut u64).cast(),
            (&mut ids_ptr as *mut u64).cast(),
            (&mut loss_ptr as *mut u64).cast(),
            (&mut ok_ptr as *mut u64).cast(),
            (&mut t_arg as *mut i64).cast(),
            (&mut v_arg as *mut i64).cast(),
        ];
        kernels
            .launch(
                slot,
                positions as u32,
                block_threads(v, element_bytes),
                &mut args,
            )
            .map_err(tch::TchError::Torch)?;
    }
    RAN.fetch_or(RAN_FUSED, Ordering::Relaxed);
    if columns < t {
        return Ok(Some(QueuedLosses {
            losses: losses.f_narrow(1, 0, columns - 1)?,
            finite: ok
                .f_view([b, t - 1])?
                .f_narrow(1, 0, columns - 1)?
                .f_all()?,
        }));
    }
    Ok(Some(QueuedLosses {
        losses,
        finite: ok.f_all()?,
    }))
}

/// Starts compiling and loading the kernels for CUDA device `index` on a thread of its own, so
/// that NVRTC's fraction of a second of CPU overlaps the model's load instead of delaying the
/// first batch (which then finds them ready, or waits for the rest). Where the kernel cache
/// ([`super::kernel_cache`]) holds this source's machine code, the thread only loads it, and
/// NVRTC is not opened unless the first batch finds it was for another GPU. Nothing when
/// `MASKAUDIT_FUSED_CE=0` or neither the cache nor NVRTC has the kernels.
///
/// A process that exits while the thread compiles would run NVRTC's and the driver's static
/// destructors under it, so both libraries are opened here, on the calling thread, before an
/// `atexit` handler that waits for the thread is registered: handlers run in the reverse order
/// of registration, so that one runs before theirs. The thread that only reads the cache never
/// opens NVRTC.
pub fn prepare_in_background(index: usize) {
    if !enabled() || Library::open("libcuda.so.1").is_err() {
        return;
    }
    let cached = kernel_cache::folder().is_some_and(|d| kernel_cache::has_any(&d, KERNEL_SOURCE));
    if !cached && nvrtc().is_err() {
        return;
    }
    PREPARING.store(true, Ordering::SeqCst);
    // SAFETY: registers a plain `extern "C" fn()`.
    if unsafe { libc::atexit(wait_for_preparation) } != 0 {
        PREPARING.store(false, Ordering::SeqCst);
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("maskaudit-nvrtc".into())
        .spawn(move || {
            let how = if cached { Get::CacheOnly } else { Get::Compile };
            let _ = kernels_by(index, how);
            PREPARING.store(false, Ordering::SeqCst);
        });
    if spawned.is_err() {
        PREPARING.store(false, Ordering::SeqCst);
    }
}

/// Whether [`prepare_in_background`]'s thread is still at work.
static PREPARING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// At exit: waits (up to a minute) for [`prepare_in_background`]'s thread.
extern "C" fn wait_for_preparation() {
    let start = std::time::Instant::now();
    while PREPARING.load(Ordering::SeqCst) && start.elapsed() < std::time::Duration::from_secs(60) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Whether the kernels can be had on CUDA device `index` (compiling them on the first call),
/// or why not.
pub fn available(index: usize) -> Result<(), String> {
    kernels(index).map(|_| ())
}

// ---------------------------------------------------------------------------------------------
// The CUDA driver API and NVRTC, opened at run time.

type CuResult = c_int;
type CuDevice = c_int;
type CuContext = *mut c_void;
type CuModule = *mut c_void;
type CuFunction = *mut c_void;

struct Driver {
    init: unsafe extern "C" fn(c_uint) -> CuResult,
    device_get: unsafe extern "C" fn(*mut CuDevice, c_int) -> CuResult,
    device_get_attribute: unsafe extern "C" fn(*mut c_int, c_int, CuDevice) -> CuResult,
    primary_ctx_retain: unsafe extern "C" fn(*mut CuContext, CuDevice) -> CuResult,
    ctx_push: unsafe extern "C" fn(CuContext) -> CuResult,
    ctx_pop: unsafe extern "C" fn(*mut CuContext) -> CuResult,
    module_load_data: unsafe extern "C" fn(*mut CuModule, *const c_void) -> CuResult,
    module_get_function: unsafe extern "C" fn(*mut CuFunction, CuModule, *const c_char) -> CuResult,
    #[allow(clippy::type_complexity)]
    launch_kernel: unsafe extern "C" fn(
        CuFunction,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        *mut c_void,
        *mut *mut c_void,
        *mut *mut c_void,
    ) -> CuResult,
    get_error_string: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
}

/// `CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR` and `_MINOR`.
const CC_MAJOR: c_int = 75;
const CC_MINOR: c_int = 76;

type NvrtcResult = c_int;
type NvrtcProgram = *mut c_void;

struct Nvrtc {
    #[allow(clippy::type_complexity)]
    create_program: unsafe extern "C" fn(
        *mut NvrtcProgram,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> NvrtcResult,
    compile_program: unsafe extern "C" fn(NvrtcProgram, c_int, *const *const c_char) -> NvrtcResult,
    destroy_program: unsafe extern "C" fn(*mut NvrtcProgram) -> NvrtcResult,
    get_log_size: unsafe extern "C" fn(NvrtcProgram, *mut usize) -> NvrtcResult,
    get_log: unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> NvrtcResult,
    get_cubin_size: unsafe extern "C" fn(NvrtcProgram, *mut usize) -> NvrtcResult,
    get_cubin: unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> NvrtcResult,
    get_ptx_size: unsafe extern "C" fn(NvrtcProgram, *mut usize) -> NvrtcResult,
    get_ptx: unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> NvrtcResult,
    get_error_string: unsafe extern "C" fn(NvrtcResult) -> *const c_char,
    /// Where it was loaded from, for messages.
    path: String,
}

fn driver() -> Result<&'static Driver, String> {
    static DRIVER: OnceLock<Result<Driver, String>> = OnceLock::new();
    DRIVER
        .get_or_init(|| {
            let lib = Library::open("libcuda.so.1")?;
            // SAFETY: each type is the C declaration of that name in cuda.h.
            let driver = unsafe {
                Driver {
                    init: lib.get(c"cuInit")?,
                    device_get: lib.get(c"cuDeviceGet")?,
                    device_get_attribute: lib.get(c"cuDeviceGetAttribute")?,
                    primary_ctx_retain: lib.get(c"cuDevicePrimaryCtxRetain")?,
                    ctx_push: lib.get(c"cuCtxPushCurrent_v2")?,
                    ctx_pop: lib.get(c"cuCtxPopCurrent_v2")?,
                    module_load_data: lib.get(c"cuModuleLoadData")?,
                    module_get_function: lib.get(c"cuModuleGetFunction")?,
                    launch_kernel: lib.get(c"cuLaunchKernel")?,
                    get_error_string: lib.get(c"cuGetErrorString")?,
                }
            };
            // SAFETY: cuInit takes flags 0.
            driver.check(unsafe { (driver.init)(0) }, "cuInit")?;
            Ok(driver)
        })
        .as_ref()
        .map_err(Clone::clone)
}

impl Driver {
    fn check(&self, code: CuResult, what: &str) -> Result<(), String> {
        if code == 0 {
            return Ok(());
        }
        let mut s: *const c_char = std::ptr::null();
        // SAFETY: cuGetErrorString sets a pointer to a static string, or leaves it null.
        let text = unsafe {
            if (self.get_error_string)(code, &mut s) == 0 && !s.is_null() {
                CStr::from_ptr(s).to_string_lossy().into_owned()
            } else {
                "unknown error".into()
            }
        };
        Err(format!("{what} failed: CUDA error {code} ({text})"))
    }
}

/// NVRTC: by name first (LD_LIBRARY_PATH, the runpath, the system's), then in the folders of
/// the CUDA libraries already loaded ([`nvrtc_candidates`]).
fn nvrtc() -> Result<&'static Nvrtc, String> {
    static NVRTC: OnceLock<Result<Nvrtc, String>> = OnceLock::new();
    NVRTC
        .get_or_init(|| {
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
            let cudart = loaded_library_dir(&maps, "libcudart.so");
            let torch = loaded_library_dir(&maps, "libtorch_cuda.so");
            let mut tried = Vec::new();
            for candidate in nvrtc_candidates(cudart.as_deref(), torch.as_deref()) {
                // NVRTC opens its builtins library by name when it compiles, and PyTorch's
                // wheels give it no runpath: one loaded from its folder first is found by name.
                if let Some(dir) = Path::new(&candidate).parent().filter(|d| d.is_dir()) {
                    if let Some(builtins) = builtins_in(dir) {
                        let _ = Library::open(&builtins.display().to_string());
                    }
                }
                let lib = match Library::open(&candidate) {
                    Ok(lib) => lib,
                    Err(e) => {
                        tried.push(e);
                        continue;
                    }
                };
                // SAFETY: each type is the C declaration of that name in nvrtc.h.
                let nvrtc = unsafe {
                    Nvrtc {
                        create_program: lib.get(c"nvrtcCreateProgram")?,
                        compile_program: lib.get(c"nvrtcCompileProgram")?,
                        destroy_program: lib.get(c"nvrtcDestroyProgram")?,
                        get_log_size: lib.get(c"nvrtcGetProgramLogSize")?,
                        get_log: lib.get(c"nvrtcGetProgramLog")?,
                        get_cubin_size: lib.get(c"nvrtcGetCUBINSize")?,
                        get_cubin: lib.get(c"nvrtcGetCUBIN")?,
                        get_ptx_size: lib.get(c"nvrtcGetPTXSize")?,
                        get_ptx: lib.get(c"nvrtcGetPTX")?,
                        get_error_string: lib.get(c"nvrtcGetErrorString")?,
                        path: candidate,
                    }
                };
                return Ok(nvrtc);
            }
            Err(format!("NVRTC not found: {}", tried.join("; ")))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The library names NVRTC is looked for under, in order: by name (the dynamic linker's
/// search), then beside the loaded CUDA runtime (PyTorch's CUDA 13 wheels keep every CUDA
/// library in `nvidia/cu13/lib`), then where PyTorch's wheels install it relative to
/// `torch/lib` (`nvidia/cu13/lib` for CUDA 13, `nvidia/cuda_nvrtc/lib` for CUDA 12).
pub fn nvrtc_candidates(cudart_dir: Option<&Path>, torch_lib_dir: Option<&Path>) -> Vec<String> {
    const NAMES: [&str; 3] = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];
    let mut out: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = cudart_dir {
        dirs.push(d.to_path_buf());
    }
    if let Some(d) = torch_lib_dir {
        let site = d.join("../..");
        dirs.push(site.join("nvidia/cu13/lib"));
        dirs.push(site.join("nvidia/cuda_nvrtc/lib"));
    }
    for dir in dirs {
        for name in NAMES {
            let path = dir.join(name).display().to_string();
            if !out.contains(&path) {
                out.push(path);
            }
        }
    }
    out
}

/// NVRTC's builtins library in `dir` (`libnvrtc-builtins.so.13.0`; not the `.alt.` variant).
pub fn builtins_in(dir: &Path) -> Option<PathBuf> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("libnvrtc-builtins.so.") && !n.contains(".alt."))
        .collect();
    names.sort();
    names.pop().map(|n| dir.join(n))
}

/// The folder of the first library in `/proc/self/maps` text whose file name starts with
/// `prefix` (`libcudart.so` matches `libcudart.so.13`).
pub fn loaded_library_dir(maps: &str, prefix: &str) -> Option<PathBuf> {
    maps.lines().find_map(|line| {
        // address perms offset dev inode path
        let path = line.split_whitespace().nth(5)?;
        let path = Path::new(path);
        let name = path.file_name()?.to_str()?;
        name.starts_with(prefix)
            .then(|| path.parent().map(Path::to_path_buf))
            .flatten()
    })
}

impl Nvrtc {
    fn error(&self, code: NvrtcResult) -> String {
        // SAFETY: returns a static string (or null).
        let s = unsafe { (self.get_error_string)(code) };
        if s.is_null() {
            format!("NVRTC error {code}")
        } else {
            // SAFETY: non-null, NUL-terminated, static.
            unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
        }
    }

    /// [`KERNEL_SOURCE`] compiled with `options`: a CUBIN (`cubin`) or NUL-terminated PTX.
    pub fn compile(&self, options: &[CString], cubin: bool) -> Result<Vec<u8>, String> {
        let source = CString::new(KERNEL_SOURCE).map_err(|e| e.to_string())?;
        let mut program: NvrtcProgram = std::ptr::null_mut();
        // SAFETY: NUL-terminated source and name, no headers; the program is destroyed below.
        let code = unsafe {
            (self.create_program)(
                &mut program,
                source.as_ptr(),
                c"maskaudit_ce.cu".as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        if code != 0 {
            return Err(format!("nvrtcCreateProgram: {}", self.error(code)));
        }
        let result = self.compile_program(program, options, cubin);
        // SAFETY: created above, destroyed once.
        unsafe {
            (self.destroy_program)(&mut program);
        }
        result
    }

    fn compile_program(
        &self,
        program: NvrtcProgram,
        options: &[CString],
        cubin: bool,
    ) -> Result<Vec<u8>, String> {
        let pointers: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
        // SAFETY: `program` is live; the options outlive the call.
        let code =
            unsafe { (self.compile_program)(program, pointers.len() as c_int, pointers.as_ptr()) };
        if code != 0 {
            let mut size = 0usize;
            let mut log = String::new();
            // SAFETY: the log is written into a buffer of the size NVRTC gave.
            unsafe {
                if (self.get_log_size)(program, &mut size) == 0 && size > 1 {
                    let mut buf = vec![0u8; size];
                    if (self.get_log)(program, buf.as_mut_ptr().cast()) == 0 {
                        log = String::from_utf8_lossy(&buf[..size - 1]).into_owned();
                    }
                }
            }
            return Err(format!(
                "nvrtcCompileProgram ({}): {}: {}",
                self.path,
                self.error(code),
                log.trim()
            ));
        }
        let (get_size, get) = if cubin {
            (self.get_cubin_size, self.get_cubin)
        } else {
            (self.get_ptx_size, self.get_ptx)
        };
        let mut size = 0usize;
        // SAFETY: as above.
        let code = unsafe { get_size(program, &mut size) };
        if code != 0 || size == 0 {
            return Err(format!("NVRTC output size: {}", self.error(code)));
        }
        let mut out = vec![0u8; size];
        // SAFETY: a buffer of the size NVRTC gave.
        let code = unsafe { get(program, out.as_mut_ptr().cast()) };
        if code != 0 {
            return Err(format!("NVRTC output: {}", self.error(code)));
        }
        Ok(out)
    }
}

/// The compiled kernels on one device, with that device's primary context.
struct Kernels {
    context: CuContext,
    functions: [CuFunction; 3],
}

// SAFETY: CUDA contexts and functions are process-wide handles, usable from any thread.
unsafe impl Send for Kernels {}
// SAFETY: as for Send: the handles are only passed to the driver, which is thread-safe.
unsafe impl Sync for Kernels {}

fn kernels(index: usize) -> Result<&'static Kernels, String> {
    kernels_by(index, Get::Compile)
}

/// How [`kernels_by`] may get the kernels.
#[derive(Clone, Copy, PartialEq)]
enum Get {
    /// From the cache, else compiled.
    Compile,
    /// From the cache only; a miss is not remembered, so that a later call compiles.
    CacheOnly,
}

fn kernels_by(index: usize, how: Get) -> Result<&'static Kernels, String> {
    static CACHE: Mutex<Vec<(usize, Result<&'static Kernels, String>)>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, k)) = cache.iter().find(|(i, _)| *i == index) {
        return k.clone();
    }
    // Leaked once per device: the module stays loaded for the process.
    let k = load(index, how).map(|k| &*Box::leak(Box::new(k)));
    if k.is_ok() || how == Get::Compile {
        cache.push((index, k.clone()));
    }
    k
}

const FROM_CACHE: u8 = 1;
const COMPILED: u8 = 2;
static ORIGIN: AtomicU8 = AtomicU8::new(0);

/// Where this process's kernels came from, for `MASKAUDIT_TIMING`: `the cache`, `NVRTC`, or
/// both (several GPUs); `None` before any were loaded.
pub fn kernels_origin() -> Option<&'static str> {
    match ORIGIN.load(Ordering::Relaxed) {
        FROM_CACHE => Some("machine code from the cache"),
        COMPILED => Some("compiled by NVRTC"),
        o if o == FROM_CACHE | COMPILED => Some("from the cache and compiled by NVRTC"),
        _ => None,
    }
}

/// Loads the kernels for device `index`: its compute capability's machine code from the cache,
/// else compiled (then cached), else PTX for the driver to compile where that fails.
fn load(index: usize, how: Get) -> Result<Kernels, String> {
    let driver = driver()?;
    let mut device: CuDevice = 0;
    let mut context: CuContext = std::ptr::null_mut();
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain driver calls with out-pointers to locals.
    unsafe {
        driver.check(
            (driver.device_get)(&mut device, index as c_int),
            "cuDeviceGet",
        )?;
        driver.check(
            (driver.device_get_attribute)(&mut major, CC_MAJOR, device),
            "cuDeviceGetAttribute",
        )?;
        driver.check(
            (driver.device_get_attribute)(&mut minor, CC_MINOR, device),
            "cuDeviceGetAttribute",
        )?;
        // Retained for the process (never released): libtorch's runtime uses the same one.
        driver.check(
            (driver.primary_ctx_retain)(&mut context, device),
            "cuDevicePrimaryCtxRetain",
        )?;
    }
    let machine_code = compile_options(major, minor, true);
    let folder = kernel_cache::folder();
    let key = kernel_cache::Key::new(
        KERNEL_SOURCE,
        &machine_code
            .iter()
            .map(|o| o.to_str().unwrap_or(""))
            .collect::<Vec<_>>(),
    );
    if let Some(image) = folder.as_deref().and_then(|d| kernel_cache::read(d, &key)) {
        // One the driver refuses is compiled again below, and replaced.
        if let Ok(functions) = load_module(driver, context, &image) {
            ORIGIN.fetch_or(FROM_CACHE, Ordering::Relaxed);
            return Ok(Kernels { context, functions });
        }
    }
    if how == Get::CacheOnly {
        return Err("not in the kernel cache".into());
    }
    let nvrtc = nvrtc()?;
    let mut errors = Vec::new();
    for cubin in [true, false] {
        let image = match nvrtc.compile(&compile_options(major, minor, cubin), cubin) {
            Ok(image) => image,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        match load_module(driver, context, &image) {
            Ok(functions) => {
                ORIGIN.fetch_or(COMPILED, Ordering::Relaxed);
                if let (true, Some(dir)) = (cubin, &folder) {
                    // Best effort: without it the next run compiles again.
                    let _ = kernel_cache::write(dir, &key, &image);
                }
                return Ok(Kernels { context, functions });
            }
            Err(e) => errors.push(e),
        }
    }
    Err(errors.join("; "))
}

fn load_module(
    driver: &Driver,
    context: CuContext,
    image: &[u8],
) -> Result<[CuFunction; 3], String> {
    with_context(driver, context, || {
        let mut module: CuModule = std::ptr::null_mut();
        // SAFETY: a CUBIN or NUL-terminated PTX image from NVRTC; the module is never unloaded.
        unsafe {
            driver.check(
                (driver.module_load_data)(&mut module, image.as_ptr().cast()),
                "cuModuleLoadData",
            )?;
        }
        let mut functions = [std::ptr::null_mut(); 3];
        for (f, name) in functions.iter_mut().zip(KERNEL_NAMES) {
            // SAFETY: a loaded module and a NUL-terminated name.
            unsafe {
                driver.check(
                    (driver.module_get_function)(f, module, name.as_ptr()),
                    "cuModuleGetFunction",
                )?;
            }
        }
        Ok(functions)
    })
}

/// Runs `f` with `context` current on this thread, then puts back what was current.
fn with_context<T>(
    driver: &Driver,
    context: CuContext,
    f: impl FnOnce() -> Result<T, String>,
) -> Result<T, String> {
    // SAFETY: a retained primary context; popped below whatever `f` returns.
    unsafe {
        driver.check((driver.ctx_push)(context), "cuCtxPushCurrent")?;
    }
    let out = f();
    let mut popped: CuContext = std::ptr::null_mut();
    // SAFETY: pops the context pushed above.
    let pop = unsafe { driver.check((driver.ctx_pop)(&mut popped), "cuCtxPopCurrent") };
    let out = out?;
    pop?;
    Ok(out)
}

impl Kernels {
    /// Launches kernel `slot` on `grid` blocks of `threads` on the legacy default stream.
    fn launch(
        &self,
        slot: usize,
        grid: u32,
        threads: u32,
        args: &mut [*mut c_void; 6],
    ) -> Result<(), String> {
        let driver = driver()?;
        with_context(driver, self.context, || {
            // SAFETY: `args` points at six live values whose types are the kernel's parameters
            // (three device pointers, a device pointer, two 64-bit integers); the tensors they
            // point into are allocated by the caller for the shapes the kernel indexes.
            let code = unsafe {
                (driver.launch_kernel)(
                    self.functions[slot],
                    grid,
                    1,
                    1,
                    threads,
                    1,
                    1,
                    0,
                    std::ptr::null_mut(),
                    args.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            };
            driver.check(code, "cuLaunchKernel (fused cross-entropy)")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_per_block_follow_the_vocabulary() {
        assert_eq!(block_threads(1, 2), 32);
        assert_eq!(block_threads(48, 4), 32);
        assert_eq!(block_threads(32000, 2), 256);
        assert_eq!(block_threads(50257, 2), 512);
        assert_eq!(block_threads(50257, 4), 512);
        assert_eq!(block_threads(151936, 2), 512);
        assert_eq!(block_threads(8192, 4), 128);
        for v in [1, 7, 31, 33, 1000, 1 << 20] {
            for bytes in [2, 4] {
                let n = block_threads(v, bytes);
                assert!(
                    n.is_power_of_two() && (32..=512).contains(&n),
                    "{v} {bytes}: {n}"
                );
            }
        }
    }

    #[test]
    fn options_name_the_architecture() {
        let names = |o: Vec<CString>| -> Vec<String> {
            o.into_iter().map(|s| s.into_string().unwrap()).collect()
        };
        assert_eq!(names(compile_options(9, 0, true))[0], "-arch=sm_90");
        assert_eq!(names(compile_options(8, 6, false))[0], "-arch=compute_86");
    }

    #[test]
    fn nvrtc_is_looked_for_by_name_then_beside_cuda() {
        let c = nvrtc_candidates(
            Some(Path::new("/x/nvidia/cu13/lib")),
            Some(Path::new("/x/torch/lib")),
        );
        assert_eq!(&c[..3], ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]);
        assert_eq!(c[3], "/x/nvidia/cu13/lib/libnvrtc.so.13");
        assert!(c.contains(&"/x/torch/lib/../../nvidia/cu13/lib/libnvrtc.so.13".to_string()));
        assert!(c.contains(&"/x/torch/lib/../../nvidia/cuda_nvrtc/lib/libnvrtc.so.12".to_string()));
        assert_eq!(nvrtc_candidates(None, None).len(), 3);
    }

    #[test]
    fn loaded_libraries_are_found_in_the_maps() {
        let maps = "\
7f00-7f01 r--p 00000000 08:01 1 /usr/lib/libc.so.6
7f01-7f02 r-xp 00001000 08:01 2 /venv/site-packages/nvidia/cu13/lib/libcudart.so.13
7f02-7f03 rw-p 00000000 00:00 0
7f03-7f04 r-xp 00001000 08:01 3 /venv/site-packages/torch/lib/libtorch_cuda.so
7f04-7f05 rw-p 00000000 00:00 0 [heap]
";
        assert_eq!(
            loaded_library_dir(maps, "libcudart.so"),
            Some(PathBuf::from("/venv/site-packages/nvidia/cu13/lib"))
        );
        assert_eq!(
            loaded_library_dir(maps, "libtorch_cuda.so"),
            Some(PathBuf::from("/venv/site-packages/torch/lib"))
        );
        assert_eq!(loaded_library_dir(maps, "libnvrtc.so"), None);
    }

    /// The kernel compiles with NVRTC for Hopper (machine code) and as PTX, where NVRTC can be
    /// found (no GPU needed: compiling is host work). Skipped, saying so, without it.
    #[test]
    #[allow(clippy::print_stderr)]
    fn the_kernel_compiles_with_nvrtc() {
        // Puts libtorch_cuda.so and the CUDA runtime in /proc/self/maps, as a CUDA run does.
        let _ = crate::model::load_cuda_backend();
        let nvrtc = match nvrtc() {
            Ok(n) => n,
            Err(e) => {
                eprintln!("skipped: {e}");
                return;
            }
        };
        let cubin = nvrtc.compile(&compile_options(9, 0, true), true).unwrap();
        assert_eq!(&cubin[..4], b"\x7fELF");
        let ptx = nvrtc.compile(&compile_options(8, 0, false), false).unwrap();
        let ptx = String::from_utf8_lossy(&ptx);
        for name in KERNEL_NAMES {
            assert!(ptx.contains(name.to_str().unwrap()), "{name:?} in the PTX");
        }
        assert!(ptx.contains("ld.global.cs.v4.u32"));
        // A compile error comes back as an error with NVRTC's log, not a panic.
        let err = nvrtc
            .compile(&[CString::new("-arch=sm_1").unwrap()], true)
            .unwrap_err();
        assert!(err.contains("nvrtc"), "{err}");
    }
}
