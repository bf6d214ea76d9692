//! Per-token next-token cross-entropy: libtorch's kernels, chunked, and a fused CPU kernel.

use tch::{Device, Kind, Tensor};

/// Elements of the largest `[rows, V]` slice of logits that the cross-entropy works on at once.
/// Bounds the f32 upcast and log-softmax buffers (64 MiB each at f32).
pub const CHUNK_ELEMENTS: i64 = 1 << 24;

/// Next-token cross-entropy with reduction 'none': `ℓ[b,t] = CE(logits[b,t], input_ids[b,t+1])`,
/// as f32 `[B, T-1]` on the logits' device. Half-precision logits are upcast chunk by chunk.
/// Returns `Ok(None)` when a logit is NaN or infinite.
///
/// Contiguous f32 logits on a CPU with AVX2 and FMA take [`fused_ce`], which reads each
/// position's logits once and writes nothing but its loss; contiguous f32, bf16 and f16 logits
/// on CUDA take [`flat_token_losses`] (the fused kernel of [`super::cuda_ce`], or libtorch's in a
/// few large chunks, upcast to f32 a chunk at a time);
/// everything else (half and double precision on the CPU, other CPUs)
/// takes libtorch's kernels, [`shifted_token_losses`].
pub fn token_losses(
    logits: &Tensor,
    input_ids: &Tensor,
    chunk_elements: i64,
) -> Result<Option<Tensor>, tch::TchError> {
    let size = logits.size();
    if size.len() == 3
        && size[1] >= 2
        && logits.device() == Device::Cpu
        && logits.kind() == Kind::Float
        && logits.is_contiguous()
        && fused_ce::available()
    {
        match fused_ce::token_losses(logits, input_ids)? {
            fused_ce::Outcome::Losses(losses) => return Ok(Some(losses)),
            fused_ce::Outcome::NonFinite => return Ok(None),
            // A target outside the vocabulary: libtorch's kernels say so in their own words.
            fused_ce::Outcome::NotApplicable => {}
        }
    }
    if size.len() == 3 && size[1] >= 2 && takes_flat_path(logits) {
        return flat_token_losses(logits, input_ids, chunk_elements.max(CUDA_CHUNK_ELEMENTS));
    }
    if logits.device().is_cuda() {
        super::cuda_ce::note_libtorch_ran();
    }
    shifted_token_losses(logits, input_ids, 1, chunk_elements)
}

/// Whether logits of three dimensions with two positions or more take [`flat_token_losses`]
/// (and can be queued, [`queue_flat_token_losses`]): contiguous f32, bf16 or f16 on CUDA.
pub fn takes_flat_path(logits: &Tensor) -> bool {
    logits.device().is_cuda()
        && matches!(logits.kind(), Kind::Float | Kind::BFloat16 | Kind::Half)
        && logits.is_contiguous()
}

/// The chunk of [`flat_token_losses`] on a GPU: 2²⁶ logits, a 256 MiB f32 log-softmax buffer.
/// On the GPU the cost of a chunk is its kernel launches as much as its bytes: smaller chunks
/// meant dozens of launches a batch (docs/performance.md, "Figures behind the code").
pub const CUDA_CHUNK_ELEMENTS: i64 = 1 << 26;

/// The fewest positions in a GPU chunk of [`flat_token_losses`] (see there): with a 152k
/// vocabulary a 622 MB f32 buffer.
pub const CUDA_MIN_POSITIONS: i64 = 1024;

/// Whether libtorch's `_log_softmax` takes bfloat16 input with a float32 output
/// (`half_to_float`) on this device; cleared after the first refusal.
static BF16_TO_FLOAT_LOG_SOFTMAX: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(true);

/// Whether bf16 logits are still upcast inside the log-softmax kernel (false once libtorch has
/// refused it, and bf16 chunks are upcast by a copy first).
pub fn bf16_upcast_in_kernel() -> bool {
    BF16_TO_FLOAT_LOG_SOFTMAX.load(std::sync::atomic::Ordering::Relaxed)
}

/// Next-token cross-entropy of contiguous f32, bf16 or f16 logits, for a GPU: the logits are
/// taken as one `[B·T, V]` matrix, split into chunks of whole positions, and each position's
/// target is the next token of its row, or -100 (ignored, loss 0) at a row's last position.
/// Per chunk: `aminmax` over the vocabulary (one read of the logits in their own dtype: the
/// finiteness check), `_log_softmax` into one f32 buffer (f16 logits upcast inside the kernel,
/// `half_to_float`: read once in their dtype, written once in f32; bf16 logits are tried the
/// same way, but libtorch 2.11 refuses `half_to_float` for bf16 on an H200 (seen 2026-12-01),
/// so they take `log_softmax(dtype=float32)`, which upcasts the chunk by a copy first), and
/// `nll_loss` into the losses. Nothing of size `[B, T, V]` is allocated beyond the logits
/// themselves: the extra memory is the chunk's f32 buffer and, for bf16 without
/// `half_to_float`, its f32 copy. The last position of a row is computed and dropped (1/T of
/// the work); its logits are not part of the finiteness check, as on the other paths.
pub fn flat_token_losses(
    logits: &Tensor,
    input_ids: &Tensor,
    chunk_elements: i64,
) -> Result<Option<Tensor>, tch::TchError> {
    let queued = queue_flat_token_losses(logits, input_ids, chunk_elements)?;
    if !bool::try_from(&queued.finite)? {
        return Ok(None);
    }
    Ok(Some(queued.losses))
}

/// [`flat_token_losses`]' work, queued on the logits' device without waiting for it: the
/// losses `[B, T-1]` (f32) and whether every logit the losses used is finite (a bool scalar),
/// both still on the device.
pub struct QueuedLosses {
    pub losses: Tensor,
    pub finite: Tensor,
}

/// Queues [`flat_token_losses`]' kernels; nothing here waits for the device. On CUDA that is
/// the fused kernel of [`super::cuda_ce`] where it can be had (and `MASKAUDIT_FUSED_CE` is not
/// `0`), otherwise [`queue_libtorch_token_losses`].
pub fn queue_flat_token_losses(
    logits: &Tensor,
    input_ids: &Tensor,
    chunk_elements: i64,
) -> Result<QueuedLosses, tch::TchError> {
    let columns = logits.size().get(1).copied().unwrap_or(0);
    queue_flat_token_losses_of(logits, input_ids, chunk_elements, columns)
}

/// [`queue_flat_token_losses`] for the first `columns` of the batch's T (2 ≤ `columns` ≤ T):
/// losses `[B, columns-1]` and their finiteness, the columns past them (padding appended to
/// round the batch's shape up, [`super::batch::gpu_columns`]) computed and dropped.
pub fn queue_flat_token_losses_of(
    logits: &Tensor,
    input_ids: &Tensor,
    chunk_elements: i64,
    columns: i64,
) -> Result<QueuedLosses, tch::TchError> {
    if logits.device().is_cuda() {
        if super::cuda_ce::enabled() {
            if let Some(queued) = super::cuda_ce::queue_token_losses_of(logits, input_ids, columns)?
            {
                return Ok(queued);
            }
        }
        super::cuda_ce::note_libtorch_ran();
    }
    queue_libtorch_token_losses_of(logits, input_ids, chunk_elements, columns)
}

/// [`queue_flat_token_losses`] with libtorch's kernels, chunked (see [`flat_token_losses`]).
pub fn queue_libtorch_token_losses(
    logits: &Tensor,
    input_ids: &Tensor,
    chunk_elements: i64,
) -> Result<QueuedLosses, tch::TchError> {
    let columns = logits.size().get(1).copied().unwrap_or(0);
    queue_libtorch_token_losses_of(logits, input_ids, chunk_elements, columns)
}

/// [`queue_libtorch_token_losses`] for the first `columns` of the batch's T, as
/// [`queue_flat_token_losses_of`].
fn queue_libtorch_token_losses_of(
    logits: &Tensor,
    input_ids: &Tensor,
    chunk_elements: i64,
    columns: i64,
) -> Result<QueuedLosses, tch::TchError> {
    let size = logits.size();
    let (b, t, v) = (size[0], size[1], size[2]);
    if columns < 2 || columns > t {
        return Err(tch::TchError::Shape(format!(
            "losses of {columns} columns asked of logits with {t}"
        )));
    }
    let device = logits.device();
    let kind = logits.kind();
    let n = b * t;
    let flat = logits.f_view([n, v])?;
    let targets = Tensor::f_cat(
        &[
            input_ids.f_narrow(1, 1, t - 1)?,
            Tensor::f_full([b, 1], -100i64, (Kind::Int64, device))?,
        ],
        1,
    )?
    .f_view([n])?;
    // libtorch's log-softmax runs one thread block per position when V > 1024: a chunk of
    // fewer positions than a few waves of blocks leaves multiprocessors idle (110 positions of
    // a 152k vocabulary on 132 of them), so a GPU chunk has at least CUDA_MIN_POSITIONS.
    let min_rows = if device.is_cuda() {
        CUDA_MIN_POSITIONS
    } else {
        1
    };
    let rows = (chunk_elements / v.max(1)).max(min_rows).clamp(1, n);
    let scratch = Tensor::f_empty([rows, v], (Kind::Float, device))?;
    let losses = Tensor::f_empty([n], (Kind::Float, device))?;
    let lo = Tensor::f_empty([n], (kind, device))?;
    let hi = Tensor::f_empty([n], (kind, device))?;
    let mut start = 0;
    while start < n {
        let m = rows.min(n - start);
        let x = flat.f_narrow(0, start, m)?;
        let _ = x.f_aminmax_out(
            &lo.f_narrow(0, start, m)?,
            &hi.f_narrow(0, start, m)?,
            1,
            false,
        )?;
        let log_probs = log_softmax_into(&x, &scratch.f_narrow(0, 0, m)?)?;
        let _ = log_probs.f_nll_loss_out::<Tensor>(
            &losses.f_narrow(0, start, m)?,
            &targets.f_narrow(0, start, m)?,
            None,
            tch::Reduction::None,
            -100,
        )?;
        start += m;
    }
    let used = |x: &Tensor| x.f_view([b, t])?.f_narrow(1, 0, columns - 1);
    let finite = used(&lo)?
        .f_isfinite()?
        .f_logical_and(&used(&hi)?.f_isfinite()?)?
        .f_all()?;
    Ok(QueuedLosses {
        losses: used(&losses)?,
        finite,
    })
}

/// The float32 log-softmax of a chunk of logits `x` `[m, V]` into `out`: half-precision logits
/// upcast inside the kernel where libtorch takes it (see [`flat_token_losses`]).
fn log_softmax_into(x: &Tensor, out: &Tensor) -> Result<Tensor, tch::TchError> {
    use std::sync::atomic::Ordering;
    match x.kind() {
        Kind::Float => x.f_internal_log_softmax_out(out, 1, false),
        Kind::Half => x.f_internal_log_softmax_out(out, 1, true),
        _ if BF16_TO_FLOAT_LOG_SOFTMAX.load(Ordering::Relaxed) => {
            match x.f_internal_log_softmax_out(out, 1, true) {
                Ok(lp) => Ok(lp),
                Err(_) => {
                    BF16_TO_FLOAT_LOG_SOFTMAX.store(false, Ordering::Relaxed);
                    x.f_log_softmax_int_out(out, 1, Kind::Float)
                }
            }
        }
        _ => x.f_log_softmax_int_out(out, 1, Kind::Float),
    }
}

/// Cross-entropy of the logits at t against `input_ids[t+shift]`, `[B, T-shift]`, with
/// libtorch's kernels, on any device and for any floating-point logits: shift 1 is next-token
/// prediction ([`token_losses`]' fallback); 0 and 2 are what a missing or a double shift
/// computes.
///
/// The work is `F.cross_entropy`'s own (log-softmax, then the negative log-likelihood of the
/// target), arranged so that a batch costs little beyond it:
/// - each row's first T-1 positions are a contiguous `[T-1, V]` slice of the logits, so every
///   chunk is a view: nothing is copied but the upcast of half-precision chunks;
/// - the log-softmax of every chunk is written into one scratch buffer, allocated once per
///   batch, instead of fresh memory for each chunk (fresh memory is page-faulted in and zeroed
///   by the kernel, 4 KiB at a time: a cost of the order of the log-softmax itself);
/// - finiteness is read from each chunk's minimum and maximum (`aminmax` propagates NaN, and
///   ±inf shows as an extreme): one pass that writes nothing, where `isfinite` wrote a mask and
///   an `abs` copy of the chunk (two and a half times the cost of the cross-entropy on the CPU).
///   The extremes of all chunks are checked together: one device sync per batch.
pub fn shifted_token_losses(
    logits: &Tensor,
    input_ids: &Tensor,
    shift: i64,
    chunk_elements: i64,
) -> Result<Option<Tensor>, tch::TchError> {
    Ok(
        shifted_token_losses_each(logits, input_ids, &[shift], chunk_elements)?
            .map(|mut losses| losses.remove(0)),
    )
}

/// [`shifted_token_losses`] for several shifts of the same logits at once, one tensor per shift
/// in the order given: each chunk's log-softmax and finiteness are computed once for all of
/// them, and only the gathered targets differ. `None` when a logit is not finite at a
/// position any of the shifts uses.
pub fn shifted_token_losses_each(
    logits: &Tensor,
    input_ids: &Tensor,
    shifts: &[i64],
    chunk_elements: i64,
) -> Result<Option<Vec<Tensor>>, tch::TchError> {
    let size = logits.size();
    let (b, t, v) = (size[0], size[1], size[2]);
    let valid = |shift: i64| (t - shift).max(0);
    // Positions any shift uses: the smallest shift uses the most.
    let positions = shifts.iter().map(|&s| valid(s)).max().unwrap_or(0);
    let mut pieces: Vec<Vec<Tensor>> = shifts.iter().map(|_| Vec::new()).collect();
    let mut extremes = Vec::new();
    if positions > 0 {
        let rows_per_chunk = (chunk_elements / v.max(1)).max(1).min(positions);
        // Double logits stay double, as F.cross_entropy would keep them; the rest is upcast to
        // f32.
        let kind = match logits.kind() {
            Kind::Double => Kind::Double,
            _ => Kind::Float,
        };
        let scratch = Tensor::f_empty([rows_per_chunk, v], (kind, logits.device()))?;
        for row in 0..b {
            let row_logits = logits.f_select(0, row)?;
            let row_ids = input_ids.f_select(0, row)?;
            let mut start = 0;
            while start < positions {
                let n = rows_per_chunk.min(positions - start);
                let x = row_logits.f_narrow(0, start, n)?;
                let (lo, hi) = x.f_aminmax(None, false)?;
                extremes.push(lo);
                extremes.push(hi);
                let log_probs = x.f_log_softmax_int_out(&scratch.f_narrow(0, 0, n)?, 1, kind)?;
                for (&shift, out) in shifts.iter().zip(&mut pieces) {
                    // This shift's positions within the chunk: a prefix of it, or none.
                    let m = (valid(shift) - start).clamp(0, n);
                    if m == 0 {
                        continue;
                    }
                    let target = row_ids.f_narrow(0, start + shift, m)?;
                    let loss = log_probs.f_narrow(0, 0, m)?.f_nll_loss::<Tensor>(
                        &target,
                        None,
                        tch::Reduction::None,
                        -100,
                    )?;
                    out.push(loss.f_to_kind(Kind::Float)?);
                }
                start += n;
            }
        }
    }
    if !extremes.is_empty() {
        let all_finite = Tensor::f_stack(&extremes, 0)?.f_isfinite()?.f_all()?;
        if !bool::try_from(&all_finite)? {
            return Ok(None);
        }
    }
    let mut out = Vec::with_capacity(shifts.len());
    for (&shift, pieces) in shifts.iter().zip(&pieces) {
        out.push(if pieces.is_empty() {
            Tensor::f_zeros([b, 0], (Kind::Float, logits.device()))?
        } else {
            Tensor::f_cat(pieces, 0)?.f_view([b, valid(shift)])?
        });
    }
    Ok(Some(out))
}

/// Next-token cross-entropy of contiguous f32 logits on the CPU, fused.
///
/// For each position, two passes over its V logits (the second from cache) find the maximum m
/// and Σ exp(x − m), summed in f64 (see `position_loss_lanes`), and the loss is
/// m − x[target] + ln Σ: libtorch's log-softmax arithmetic (max-shifted), without writing it,
/// and exact to float32 where libtorch's f32 sums lose a confident model's small losses.
/// libtorch's path reads the logits four times (aminmax, then max, Σexp and the write of its
/// log-softmax) and writes them once. exp is Cephes' `expf` (range reduction by ln 2, a
/// degree-6 polynomial; about 1 ulp). Compiled for AVX2 and FMA, and for AVX-512, and used
/// only where the CPU has them, so that the lanes below become vector instructions; positions
/// are split over libtorch's intra-op thread count. Its speed is in docs/performance.md.
pub mod fused_ce {
    use tch::{Kind, Tensor};

    pub enum Outcome {
        Losses(Tensor),
        /// A logit is NaN or infinite.
        NonFinite,
        /// A target id is outside `0..V`.
        NotApplicable,
    }

    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// The caller has checked: `logits` is a contiguous f32 CPU tensor `[B, T, V]` with T ≥ 2,
    /// and [`available`] is true.
    pub fn token_losses(logits: &Tensor, input_ids: &Tensor) -> Result<Outcome, tch::TchError> {
        let size = logits.size();
        let (b, t, v) = (size[0] as usize, size[1] as usize, size[2] as usize);
        let positions = t - 1;
        let ids = Vec::<i64>::try_from(
            input_ids
                .f_to_device(tch::Device::Cpu)?
                .f_contiguous()?
                .f_view([-1])?,
        )?;
        let (Some(targets), Some(data)) = (next_targets(&ids, b, t, v), host_f32(logits)) else {
            return Ok(Outcome::NotApplicable);
        };

        let mut losses = vec![0f32; b * positions];
        let kernel = kernel();
        // A non-finite position marks its part, which still computes every other loss.
        let finite = split(&mut losses, |first, out| {
            let mut finite = true;
            for (k, loss) in out.iter_mut().enumerate() {
                let p = first + k;
                let row = (p / positions) * t + p % positions;
                let x = &data[row * v..(row + 1) * v];
                // SAFETY: `kernel` chose an instruction set this CPU has.
                match unsafe { kernel(x, targets[p]) } {
                    Some(l) => *loss = l,
                    None => finite = false,
                }
            }
            finite
        });
        if !finite {
            return Ok(Outcome::NonFinite);
        }
        Ok(Outcome::Losses(
            Tensor::f_from_slice(&losses)?.f_view([b as i64, positions as i64])?,
        ))
    }

    /// Each row's next-token targets, `[B, T-1]` row-major from ids `[B, T]`; `None` when one
    /// is outside `0..v`.
    fn next_targets(ids: &[i64], b: usize, t: usize, v: usize) -> Option<Vec<usize>> {
        (0..b)
            .flat_map(|row| &ids[row * t + 1..(row + 1) * t])
            .map(|&id| usize::try_from(id).ok().filter(|&id| id < v))
            .collect()
    }

    /// The AVX-512 build of a kernel where the CPU has it (half the instructions: a fifth less
    /// time on Zen 4), else the AVX2 one; the caller has checked [`available`].
    #[cfg(target_arch = "x86_64")]
    fn widest<F>(avx512: F, avx2: F) -> F {
        if std::is_x86_feature_detected!("avx512f") {
            avx512
        } else {
            avx2
        }
    }

    type Kernel = unsafe fn(&[f32], usize) -> Option<f32>;

    /// The widest build of [`position_loss_lanes`] this CPU runs; the caller has checked
    /// [`available`].
    fn kernel() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            widest::<Kernel>(position_loss_avx512, position_loss_avx2)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            unsafe fn portable(x: &[f32], target: usize) -> Option<f32> {
                position_loss_lanes(x, target)
            }
            portable
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn position_loss_avx2(x: &[f32], target: usize) -> Option<f32> {
        position_loss_lanes(x, target)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn position_loss_avx512(x: &[f32], target: usize) -> Option<f32> {
        position_loss_lanes(x, target)
    }

    /// One position's weight, residual, residual tolerance and gradient norm (see
    /// `crate::loss::weights` for the fit and the error model), from its f32 logits `z` and the
    /// loss's gradient `g` there; `scratch` holds V floats. Two passes: p = softmax(z) into
    /// `scratch` with the fit's sums in f64 lanes (the target's own term apart, see
    /// `weights::fit`), then ‖g − w·d‖² directly (not ‖g‖² − w⟨g,d⟩, which
    /// cancels for a pure cross-entropy).
    #[inline(always)]
    pub(super) fn gradient_lanes(
        z: &[f32],
        g: &[f32],
        target: usize,
        lse: f32,
        scratch: &mut [f32],
    ) -> GradientTerm {
        let mut off = OffTarget::default();
        off.add_lanes(&z[..target], &g[..target], &mut scratch[..target], lse);
        off.add_lanes(
            &z[target + 1..],
            &g[target + 1..],
            &mut scratch[target + 1..],
            lse,
        );
        let pt = exp_nonpositive(z[target] - lse);
        scratch[target] = pt;
        let (gt, dt) = (f64::from(g[target]), f64::from(pt) - 1.0);
        let big = off.big.max(z[target].abs());
        let loss = f64::from(lse) - f64::from(z[target]);
        let unit = maskaudit_core::loss::weights::log_softmax_error(
            f64::from(lse),
            f64::from(big),
            z.len(),
            loss,
        );
        let sums = maskaudit_core::loss::weights::FitSums {
            off_gp: off.gp,
            off_pp: off.pp,
            off_gg: off.gg,
            g_t: gt,
            d_t: dt,
        };
        let w = maskaudit_core::loss::weights::fit(sums, unit);
        let wf = w as f32;
        // scratch becomes d = p − onehot(target), so the residual needs no correction.
        scratch[target] -= 1.0;
        let mut rr = [0f64; LANES];
        let mut gc = g.chunks_exact(LANES);
        let mut sc = scratch.chunks_exact(LANES);
        for (gs, ss) in (&mut gc).zip(&mut sc) {
            for l in 0..LANES {
                let r = f64::from((-wf).mul_add(ss[l], gs[l]));
                rr[l] += r * r;
            }
        }
        let mut rr: f64 = rr.iter().sum();
        let done = g.len() - gc.remainder().len();
        for i in done..g.len() {
            let r = f64::from(g[i] - wf * scratch[i]);
            rr += r * r;
        }
        let gg = off.gg + gt * gt;
        let residual = if gg > 0.0 {
            (rr.max(0.0) / gg).sqrt()
        } else {
            0.0
        };
        let sum_p2 = off.pp + f64::from(pt) * f64::from(pt);
        GradientTerm {
            weight: w,
            residual,
            tolerance: maskaudit_core::loss::weights::residual_tolerance(
                unit,
                sum_p2,
                w,
                gg.sqrt(),
            ),
            norm: gg.sqrt(),
        }
    }

    /// The sums of [`gradient_lanes`]' fit over the components off the target, in f64 lanes.
    #[derive(Default)]
    struct OffTarget {
        /// Σ g·p.
        gp: f64,
        /// Σ p².
        pp: f64,
        /// Σ g².
        gg: f64,
        /// max |z|.
        big: f32,
    }

    impl OffTarget {
        /// Adds the components of `z`, `g` (a stretch of one position's), writing p into `s`.
        #[inline(always)]
        fn add_lanes(&mut self, z: &[f32], g: &[f32], s: &mut [f32], lse: f32) {
            let (mut gp, mut pp, mut gg) = ([0f64; LANES], [0f64; LANES], [0f64; LANES]);
            let mut big = [0f32; LANES];
            let mut zc = z.chunks_exact(LANES);
            let mut gc = g.chunks_exact(LANES);
            let mut sc = s.chunks_exact_mut(LANES);
            for (i, ((zs, gs), ss)) in (&mut zc).zip(&mut gc).zip(&mut sc).enumerate() {
                prefetch(z, i);
                prefetch(g, i);
                for l in 0..LANES {
                    let p = exp_nonpositive(zs[l] - lse);
                    ss[l] = p;
                    gp[l] += f64::from(gs[l]) * f64::from(p);
                    pp[l] += f64::from(p) * f64::from(p);
                    gg[l] += f64::from(gs[l]) * f64::from(gs[l]);
                    big[l] = big[l].max(zs[l].abs());
                }
            }
            self.gp += gp.iter().sum::<f64>();
            self.pp += pp.iter().sum::<f64>();
            self.gg += gg.iter().sum::<f64>();
            self.big = big.iter().fold(self.big, |a, &b| a.max(b));
            let done = z.len() - zc.remainder().len();
            for i in done..z.len() {
                let p = exp_nonpositive(z[i] - lse);
                s[i] = p;
                self.gp += f64::from(g[i]) * f64::from(p);
                self.pp += f64::from(p) * f64::from(p);
                self.gg += f64::from(g[i]) * f64::from(g[i]);
                self.big = self.big.max(z[i].abs());
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn gradient_avx2(
        z: &[f32],
        g: &[f32],
        target: usize,
        lse: f32,
        scratch: &mut [f32],
    ) -> GradientTerm {
        gradient_lanes(z, g, target, lse, scratch)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn gradient_avx512(
        z: &[f32],
        g: &[f32],
        target: usize,
        lse: f32,
        scratch: &mut [f32],
    ) -> GradientTerm {
        gradient_lanes(z, g, target, lse, scratch)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn lse_avx2(x: &[f32]) -> Option<f32> {
        position_loss_lanes(x, 0).map(|l| l + x[0])
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn lse_avx512(x: &[f32]) -> Option<f32> {
        position_loss_lanes(x, 0).map(|l| l + x[0])
    }

    /// Runs `work(first, part)` over `out` split into libtorch's thread count; false if any
    /// part returned false.
    fn split<T: Send>(out: &mut [T], work: impl Fn(usize, &mut [T]) -> bool + Sync) -> bool {
        let n = out.len().max(1);
        let threads = usize::try_from(tch::get_num_threads())
            .unwrap_or(1)
            .clamp(1, n);
        let per_thread = n.div_ceil(threads);
        let work = &work;
        std::thread::scope(|scope| {
            let mut parts = out.chunks_mut(per_thread).enumerate();
            let Some((_, mine)) = parts.next() else {
                return true;
            };
            let others: Vec<_> = parts
                .map(|(i, part)| scope.spawn(move || work(i * per_thread, part)))
                .collect();
            let mut ok = work(0, mine);
            for handle in others {
                ok &= handle.join().expect("worker thread panicked");
            }
            ok
        })
    }

    /// Host slices of a contiguous f32 CPU tensor `[B, T, V]`, if it is one.
    fn host_f32(t: &Tensor) -> Option<&[f32]> {
        // SAFETY: the logits and gradients given here are this module's to read: nothing
        // writes them while the kernels borrow them.
        unsafe { crate::model::host_f32(t) }.filter(|_| t.dim() == 3)
    }

    /// The log-sum-exp of every position of contiguous f32 CPU logits `[B, T, V]`, `[B·T]`:
    /// with it, the cross-entropy against any target is one subtraction, so several shifts and
    /// the gradient weights share one pass. `None` when the logits are not such a tensor, the
    /// CPU lacks the instructions, or a logit is not finite.
    pub fn log_sum_exp(logits: &Tensor) -> Option<Vec<f32>> {
        if !available() {
            return None;
        }
        let data = host_f32(logits)?;
        let v = logits.size()[2] as usize;
        let mut out = vec![0f32; data.len() / v.max(1)];
        #[cfg(target_arch = "x86_64")]
        let kernel = widest::<unsafe fn(&[f32]) -> Option<f32>>(lse_avx512, lse_avx2);
        #[cfg(not(target_arch = "x86_64"))]
        return None;
        let finite = split(&mut out, |first, part| {
            for (k, slot) in part.iter_mut().enumerate() {
                let p = first + k;
                // SAFETY: `kernel` chose an instruction set this CPU has.
                match unsafe { kernel(&data[p * v..(p + 1) * v]) } {
                    Some(lse) => *slot = lse,
                    None => return false,
                }
            }
            true
        });
        finite.then_some(out)
    }

    /// Cross-entropy of position t against `input_ids[t + shift]`, `[B, T − shift]` row-major,
    /// from [`log_sum_exp`]'s values: `lse[t] − z[t, id]`.
    pub fn shifted_from_lse(
        logits: &Tensor,
        lse: &[f32],
        ids: &[i64],
        shift: usize,
    ) -> Option<Vec<f32>> {
        let data = host_f32(logits)?;
        let size = logits.size();
        let (b, t, v) = (size[0] as usize, size[1] as usize, size[2] as usize);
        let n = t.saturating_sub(shift);
        let mut out = Vec::with_capacity(b * n);
        for row in 0..b {
            for pos in 0..n {
                let id = usize::try_from(ids[row * t + pos + shift])
                    .ok()
                    .filter(|&i| i < v)?;
                let p = row * t + pos;
                out.push(lse[p] - data[p * v + id]);
            }
        }
        Some(out)
    }

    /// Per position of contiguous f32 CPU logits and gradient `[B, T, V]`, with the logits'
    /// [`log_sum_exp`]: the weight and residual of every target position (`[B, T-1]`
    /// row-major) and the gradient norm of each row's last position. `None` when the tensors
    /// are not such or a target is out of range (the caller falls back to libtorch).
    pub fn gradient_terms(
        logits: &Tensor,
        grad: &Tensor,
        ids: &[i64],
        lse: &[f32],
    ) -> Result<Option<GradientTerms>, tch::TchError> {
        let size = logits.size();
        let (b, t, v) = (size[0] as usize, size[1] as usize, size[2] as usize);
        if t < 2 || !available() || lse.len() != b * t {
            return Ok(None);
        }
        let positions = t - 1;
        let Some(targets) = next_targets(ids, b, t, v) else {
            return Ok(None);
        };
        let g = grad.f_to_kind(Kind::Float)?.f_contiguous()?;
        let (Some(zd), Some(gd)) = (host_f32(logits), host_f32(&g)) else {
            return Ok(None);
        };
        #[cfg(target_arch = "x86_64")]
        let kernel = widest::<GradientKernel>(gradient_avx512, gradient_avx2);
        #[cfg(not(target_arch = "x86_64"))]
        return Ok(None);
        let mut out = vec![GradientTerm::default(); b * positions];
        split(&mut out, |first, part| {
            let mut scratch = vec![0f32; v];
            for (k, slot) in part.iter_mut().enumerate() {
                let p = first + k;
                let row = (p / positions) * t + p % positions;
                let span = row * v..(row + 1) * v;
                // SAFETY: `kernel` chose an instruction set this CPU has.
                *slot = unsafe {
                    kernel(
                        &zd[span.clone()],
                        &gd[span],
                        targets[p],
                        lse[row],
                        &mut scratch,
                    )
                };
            }
            true
        });
        let mut last_norms = Vec::with_capacity(b);
        for row in 0..b {
            let last = &gd[(row * t + t - 1) * v..(row * t + t) * v];
            last_norms.push(
                last.iter()
                    .map(|&x| (x as f64) * (x as f64))
                    .sum::<f64>()
                    .sqrt(),
            );
        }
        Ok(Some(GradientTerms {
            weights: out.iter().map(|o| o.weight).collect(),
            residuals: out.iter().map(|o| o.residual).collect(),
            tolerances: out.iter().map(|o| o.tolerance).collect(),
            norms: out.iter().map(|o| o.norm).collect(),
            last_norms,
        }))
    }

    /// One position's [`GradientTerm`] from its logits, gradient, target and log-sum-exp,
    /// with a scratch row.
    type GradientKernel = unsafe fn(&[f32], &[f32], usize, f32, &mut [f32]) -> GradientTerm;

    /// What [`gradient_lanes`] finds at one position.
    #[derive(Debug, Clone, Copy, Default)]
    pub(super) struct GradientTerm {
        pub(super) weight: f64,
        pub(super) residual: f64,
        /// The residual a correct float32 loss may reach here (`weights::residual_tolerance`).
        pub(super) tolerance: f64,
        /// ‖g‖.
        pub(super) norm: f64,
    }

    /// What [`gradient_terms`] found.
    pub struct GradientTerms {
        pub weights: Vec<f64>,
        pub residuals: Vec<f64>,
        /// The residual a correct loss may reach at each target position.
        pub tolerances: Vec<f64>,
        /// ‖g‖ of every target position.
        pub norms: Vec<f64>,
        /// ‖g‖ of each row's last position.
        pub last_norms: Vec<f64>,
    }

    /// Independent accumulators: two AVX2 registers' worth, one AVX-512 register's.
    const LANES: usize = 16;

    /// How far ahead (in f32s, 4 KiB) the kernel asks for the logits it will read. Without it
    /// the pass ran at its arithmetic's time plus its reads'; with it, close to one read pass,
    /// the same from 1 KiB to 16 KiB ahead (docs/performance.md, "Figures behind the code").
    const PREFETCH_AHEAD: usize = 1024;

    /// Asks for the cache line [`PREFETCH_AHEAD`] past `x`'s chunk `chunk` (of [`LANES`]); past
    /// the logits' end it asks for nothing that matters.
    #[inline(always)]
    fn prefetch(x: &[f32], chunk: usize) {
        let p = x.as_ptr().wrapping_add(PREFETCH_AHEAD + chunk * LANES);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch reads nothing and cannot fault, whatever the address.
        unsafe {
            std::arch::x86_64::_mm_prefetch(p.cast::<i8>(), std::arch::x86_64::_MM_HINT_T0);
        }
    }

    /// The cross-entropy of one position's logits `x` against `target`, `None` if a logit is
    /// NaN or infinite.
    ///
    /// Two passes over the logits, the second from cache: the maximum m (and the minimum, for
    /// -inf), then Σ e^(x − m) with the exponentials in f32 and their sum in f64 lanes. The sum
    /// is 1 (the maximum's own term, exact) plus terms that a confident model makes tiny: added
    /// to that 1, in f32 or even f64, they would lose their last digits, and the loss, ln of the
    /// sum, is made of exactly those digits. So the 1 is kept apart and the loss takes ln_1p of
    /// the rest. NaN turns the sum into NaN; +inf shows as the maximum, -inf as the minimum.
    #[inline(always)]
    pub(super) fn position_loss_lanes(x: &[f32], target: usize) -> Option<f32> {
        let chunks = x.chunks_exact(LANES);
        let tail = chunks.remainder();
        let mut max = [f32::NEG_INFINITY; LANES];
        let mut min = [f32::INFINITY; LANES];
        for (i, chunk) in chunks.clone().enumerate() {
            prefetch(x, i);
            for ((m, lo), &xi) in max.iter_mut().zip(min.iter_mut()).zip(chunk) {
                *m = if xi > *m { xi } else { *m };
                *lo = if xi < *lo { xi } else { *lo };
            }
        }
        let mut m = f32::NEG_INFINITY;
        let mut lo = f32::INFINITY;
        for (&lane_max, &lane_min) in max.iter().zip(&min) {
            m = if lane_max > m { lane_max } else { m };
            lo = if lane_min < lo { lane_min } else { lo };
        }
        for &xi in tail {
            m = if xi > m { xi } else { m };
            lo = if xi < lo { xi } else { lo };
        }
        if !m.is_finite() || lo == f32::NEG_INFINITY {
            return None;
        }
        // Σ e^(x − m) − 1: the terms below the maximum, and the count of those equal to it
        // (each an exact 1), so that ln Σ is ln_1p of what is small, not ln of 1 + it.
        let mut below = [0f64; LANES];
        let mut ties = [0f64; LANES];
        for chunk in chunks {
            for ((b, t), &xi) in below.iter_mut().zip(ties.iter_mut()).zip(chunk) {
                let top = xi == m;
                *b += if top {
                    0.0
                } else {
                    f64::from(exp_nonpositive(xi - m))
                };
                *t += if top { 1.0 } else { 0.0 };
            }
        }
        let mut below: f64 = below.iter().sum();
        let mut ties: f64 = ties.iter().sum();
        for &xi in tail {
            if xi == m {
                ties += 1.0;
            } else {
                below += f64::from(exp_nonpositive(xi - m));
            }
        }
        // ties ≥ 1 (the maximum itself): ties − 1 is exact.
        let small = below + (ties - 1.0);
        if !small.is_finite() {
            return None;
        }
        Some((f64::from(m) - f64::from(x[target]) + small.ln_1p()) as f32)
    }

    /// e^x for x ≤ 0 (Cephes `expf`, its coefficients rounded to f32): x = n·ln 2 + r with
    /// |r| ≤ ln 2 / 2 (ln 2 split in two for precision), e^r by a degree-6 polynomial, 2^n put
    /// into the exponent bits. Arguments below −87.3 give about 1e-38, not 0: nothing next to
    /// the exp(0) = 1 of the maximum.
    #[inline(always)]
    pub(super) fn exp_nonpositive(x: f32) -> f32 {
        let x = if x < -87.3 { -87.3 } else { x };
        let n = x.mul_add(std::f32::consts::LOG2_E, 0.5).floor();
        let r = n.mul_add(2.121_944_4e-4, n.mul_add(-0.693_359_4, x));
        let p = 1.987_569_1e-4_f32
            .mul_add(r, 1.398_199_9e-3)
            .mul_add(r, 8.333_452e-3)
            .mul_add(r, 4.166_579_6e-2)
            .mul_add(r, 1.666_666_6e-1)
            .mul_add(r, 0.5);
        let y = p.mul_add(r * r, r) + 1.0;
        // 2^n, n in -126..=0: 2^23 + 127 + n is an integer below 2^24, so it sits in the low
        // mantissa bits of that float, ready to be shifted into the exponent (a float-to-int
        // cast would do the same, but saturating, and the compiler does not vectorise that).
        let biased = (n + (127.0 + 8_388_608.0)).to_bits() - 8_388_608.0f32.to_bits();
        y * f32::from_bits(biased << 23)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Several shifts at once equal one call per shift, against F.cross_entropy on each
    /// alignment, whatever the chunking (chunks of 1, 2 and 3 positions of V = 11, and whole).
    #[test]
    fn several_shifts_at_once_match_each_alone() {
        let _guard = tch::no_grad_guard();
        tch::manual_seed(3);
        let (b, t, v) = (2, 7, 11);
        let logits = Tensor::randn([b, t, v], (Kind::Float, Device::Cpu));
        let ids = Tensor::randint(v, [b, t], (Kind::Int64, Device::Cpu));
        for chunk in [11, 22, 33, 1 << 20] {
            let each = shifted_token_losses_each(&logits, &ids, &[0, 2, 1], chunk)
                .unwrap()
                .unwrap();
            for (k, shift) in [0i64, 2, 1].into_iter().enumerate() {
                let n = t - shift;
                let flat = logits
                    .narrow(1, 0, n)
                    .reshape([b * n, v])
                    .cross_entropy_loss::<Tensor>(
                        &ids.narrow(1, shift, n).reshape([b * n]),
                        None,
                        tch::Reduction::None,
                        -100,
                        0.0,
                    )
                    .view([b, n]);
                assert_eq!(each[k].size(), vec![b, n], "shift {shift}, chunk {chunk}");
                assert!(
                    each[k].allclose(&flat, 1e-6, 1e-6, false),
                    "shift {shift}, chunk {chunk}"
                );
                let alone = shifted_token_losses(&logits, &ids, shift, chunk)
                    .unwrap()
                    .unwrap();
                assert!(each[k].equal(&alone), "shift {shift}, chunk {chunk}");
            }
        }
    }

    /// Cross-entropy from the fused log-sum-exp equals libtorch's, for shifts 0, 1 and 2.
    #[test]
    fn shifts_from_the_log_sum_exp_match_libtorch() {
        if !fused_ce::available() {
            return;
        }
        let _guard = tch::no_grad_guard();
        tch::manual_seed(4);
        let (b, t, v) = (2, 7, 37);
        let logits = Tensor::randn([b, t, v], (Kind::Float, Device::Cpu)) * 4.0;
        let ids = Tensor::randint(v, [b, t], (Kind::Int64, Device::Cpu));
        let host_ids = Vec::<i64>::try_from(ids.view([-1])).unwrap();
        let lse = fused_ce::log_sum_exp(&logits).unwrap();
        let each = shifted_token_losses_each(&logits, &ids, &[0, 1, 2], 1 << 20)
            .unwrap()
            .unwrap();
        for (k, shift) in [0usize, 1, 2].into_iter().enumerate() {
            let got = fused_ce::shifted_from_lse(&logits, &lse, &host_ids, shift).unwrap();
            let want = Vec::<f32>::try_from(each[k].view([-1])).unwrap();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "shift {shift}: {g} vs {w}"
                );
            }
        }
        let nan = logits.copy();
        let _ = nan.narrow(1, 3, 1).fill_(f64::NAN);
        assert!(fused_ce::log_sum_exp(&nan).is_none());
    }

    /// The GPU path (run here on the CPU, in f32) against the per-row path, whatever the
    /// chunking; a NaN counts at a position that predicts, not at a row's last.
    #[test]
    fn flat_cross_entropy_matches_the_per_row_path() {
        let _guard = tch::no_grad_guard();
        tch::manual_seed(5);
        let (b, t, v) = (3, 7, 11);
        let logits = Tensor::randn([b, t, v], (Kind::Float, Device::Cpu)) * 3.0;
        let ids = Tensor::randint(v, [b, t], (Kind::Int64, Device::Cpu));
        let reference = shifted_token_losses(&logits, &ids, 1, 1 << 20)
            .unwrap()
            .unwrap();
        for chunk in [1, 11, 22, 77, 1 << 20] {
            let flat = flat_token_losses(&logits, &ids, chunk).unwrap().unwrap();
            assert_eq!(flat.size(), vec![b, t - 1]);
            assert_eq!(flat.kind(), Kind::Float);
            assert!(
                flat.allclose(&reference, 1e-6, 1e-6, false),
                "chunk {chunk}"
            );
        }
        let last = logits.copy();
        let _ = last.select(1, t - 1).fill_(f64::NAN);
        assert!(flat_token_losses(&last, &ids, 22).unwrap().is_some());
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let x = logits.copy();
            let _ = x.select(0, 2).select(0, 3).narrow(0, 4, 1).fill_(bad);
            assert!(flat_token_losses(&x, &ids, 22).unwrap().is_none(), "{bad}");
        }
    }

    /// Losses of a batch's first columns from logits with padding columns appended: the same
    /// as the batch alone, finiteness over those columns only.
    #[test]
    fn losses_of_the_first_columns_ignore_the_appended_ones() {
        let _guard = tch::no_grad_guard();
        tch::manual_seed(6);
        let (b, t, extra, v) = (3, 7, 5, 11);
        let logits = Tensor::randn([b, t + extra, v], (Kind::Float, Device::Cpu)) * 3.0;
        let ids = Tensor::randint(v, [b, t + extra], (Kind::Int64, Device::Cpu));
        let alone = queue_flat_token_losses(
            &logits.narrow(1, 0, t).contiguous(),
            &ids.narrow(1, 0, t).contiguous(),
            22,
        )
        .unwrap();
        let of = queue_flat_token_losses_of(&logits, &ids, 22, t).unwrap();
        assert_eq!(of.losses.size(), vec![b, t - 1]);
        assert!(of.losses.equal(&alone.losses));
        assert!(bool::try_from(&of.finite).unwrap());
        // A non-finite logit in an appended column is not the batch's; one in its own is.
        let x = logits.copy();
        let _ = x.select(1, t + 1).fill_(f64::NAN);
        let of = queue_flat_token_losses_of(&x, &ids, 22, t).unwrap();
        assert!(bool::try_from(&of.finite).unwrap());
        let _ = x.select(1, t - 2).fill_(f64::INFINITY);
        let of = queue_flat_token_losses_of(&x, &ids, 22, t).unwrap();
        assert!(!bool::try_from(&of.finite).unwrap());
        assert!(queue_flat_token_losses_of(&logits, &ids, 22, t + extra + 1).is_err());
        assert!(queue_flat_token_losses_of(&logits, &ids, 22, 1).is_err());
    }

    #[test]
    fn chunked_cross_entropy_matches_unchunked() {
        let _guard = tch::no_grad_guard();
        tch::manual_seed(0);
        let logits = Tensor::randn([3, 7, 11], (Kind::Float, Device::Cpu));
        let ids = Tensor::randint(11, [3, 7], (Kind::Int64, Device::Cpu));
        let whole = shifted_token_losses(&logits, &ids, 1, 1 << 20)
            .unwrap()
            .unwrap();
        let chunked = shifted_token_losses(&logits, &ids, 1, 22).unwrap().unwrap();
        assert_eq!(whole.size(), vec![3, 6]);
        assert!(whole.allclose(&chunked, 1e-6, 1e-6, false));
        // Reference: the flattened call on a contiguous copy.
        let flat = logits
            .narrow(1, 0, 6)
            .reshape([18, 11])
            .cross_entropy_loss::<Tensor>(
                &ids.narrow(1, 1, 6).reshape([18]),
                None,
                tch::Reduction::None,
                -100,
                0.0,
            )
            .view([3, 6]);
        assert!(whole.allclose(&flat, 1e-6, 1e-6, false));
        // The dispatching entry point gives the same (the fused kernel, where the CPU has it).
        let dispatched = token_losses(&logits, &ids, 1 << 20).unwrap().unwrap();
        assert!(dispatched.allclose(&flat, 1e-6, 1e-6, false));
    }

    /// The fused CPU kernel against libtorch's log-softmax + NLL, over vocabularies that do and
    /// do not fill its 16 lanes, logits of ordinary and of large spread, and ragged row splits
    /// over threads.
    #[test]
    fn fused_cross_entropy_matches_libtorch() {
        if !fused_ce::available() {
            return;
        }
        let _guard = tch::no_grad_guard();
        tch::manual_seed(1);
        for (b, t, v) in [
            (1, 2, 1),
            (3, 7, 11),
            (2, 5, 16),
            (4, 9, 48),
            (3, 33, 1000),
            (2, 6, 32003),
        ] {
            for scale in [1.0, 30.0] {
                let logits = Tensor::randn([b, t, v], (Kind::Float, Device::Cpu)) * scale;
                let ids = Tensor::randint(v, [b, t], (Kind::Int64, Device::Cpu));
                let fused = match fused_ce::token_losses(&logits, &ids).unwrap() {
                    fused_ce::Outcome::Losses(l) => l,
                    _ => panic!("finite logits, targets in range"),
                };
                let reference = shifted_token_losses(&logits, &ids, 1, 1 << 24)
                    .unwrap()
                    .unwrap();
                assert_eq!(fused.size(), vec![b, t - 1]);
                let err = (&fused - &reference).abs().max().double_value(&[]);
                let top = reference.abs().max().double_value(&[]).max(1.0);
                assert!(err <= 2e-6 * top, "b{b} t{t} v{v} x{scale}: {err} vs {top}");
            }
        }
        // A target outside the vocabulary is left to libtorch, which names the problem.
        let logits = Tensor::zeros([1, 3, 4], (Kind::Float, Device::Cpu));
        let ids = Tensor::from_slice(&[0i64, 1, 4]).view([1, 3]);
        assert!(matches!(
            fused_ce::token_losses(&logits, &ids).unwrap(),
            fused_ce::Outcome::NotApplicable
        ));
        assert!(token_losses(&logits, &ids, 1 << 20).is_err());
    }

    /// A confident model's losses (the target 10 to 30 nats above the rest, a loss of 1e-3 down
    /// to 1e-10) against libtorch's in float64: relative to the loss itself, not to the
    /// logits, as float32 sums could not be.
    #[test]
    fn fused_cross_entropy_is_exact_on_confident_logits() {
        if !fused_ce::available() {
            return;
        }
        let _guard = tch::no_grad_guard();
        tch::manual_seed(2);
        for v in [37i64, 4099, 32000, 152_064] {
            for margin in [10.0, 20.0, 30.0] {
                let (b, t) = (2, 5);
                let ids = Tensor::randint(v, [b, t], (Kind::Int64, Device::Cpu));
                let next = Tensor::cat(&[ids.narrow(1, 1, t - 1), ids.narrow(1, 0, 1)], 1);
                let peak = Tensor::full([b, t, 1], margin, (Kind::Float, Device::Cpu));
                let logits = Tensor::randn([b, t, v], (Kind::Float, Device::Cpu)).scatter_add(
                    2,
                    &next.unsqueeze(2),
                    &peak,
                );
                let fused = match fused_ce::token_losses(&logits, &ids).unwrap() {
                    fused_ce::Outcome::Losses(l) => l.to_kind(Kind::Double),
                    _ => panic!("finite logits, targets in range"),
                };
                // ln(1 + Σ_{j≠t} e^(z_j − z_t)) in f64, the target's own term kept out of the
                // sum (libtorch's log of the whole sum would lose the same digits).
                let z = logits.narrow(1, 0, t - 1).to_kind(Kind::Double);
                let target = ids.narrow(1, 1, t - 1).unsqueeze(2);
                let others = (&z - z.gather(2, &target, false))
                    .exp()
                    .scatter_value(2, &target, 0.0)
                    .sum_dim_intlist(2, false, Kind::Double);
                let exact = others.log1p();
                let err = ((&fused - &exact).abs() / &exact).max().double_value(&[]);
                assert!(err <= 1e-5, "V {v}, margin {margin}: relative error {err}");
            }
        }
    }

    /// Both instruction sets against the portable code they are compiled from: the same
    /// operations in the same order, so the same bits; and non-finite logits caught by each.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn each_instruction_set_gives_the_portable_result() {
        type Kernel = unsafe fn(&[f32], usize) -> Option<f32>;
        let mut kernels: Vec<(&str, Kernel)> = vec![];
        if fused_ce::available() {
            kernels.push(("avx2", fused_ce::position_loss_avx2));
        }
        if std::is_x86_feature_detected!("avx512f") {
            kernels.push(("avx512", fused_ce::position_loss_avx512));
        }
        let mut state = 12345u32;
        for v in [1usize, 15, 16, 17, 100, 1000, 32003] {
            let x: Vec<f32> = (0..v)
                .map(|_| {
                    state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (state >> 8) as f32 / (1 << 24) as f32 * 40.0 - 20.0
                })
                .collect();
            let target = v / 2;
            let want = fused_ce::position_loss_lanes(&x, target).unwrap();
            for (name, kernel) in &kernels {
                // SAFETY: each kernel was pushed only when its features were detected.
                let got = unsafe { kernel(&x, target) };
                assert_eq!(got, Some(want), "{name}, V {v}");
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut y = x.clone();
                    y[v - 1] = bad;
                    // SAFETY: as above.
                    let got = unsafe { kernel(&y, target) };
                    assert_eq!(got, None, "{name}, V {v}, {bad}");
                }
            }
        }
    }

    #[test]
    fn fused_exp_is_within_two_ulp() {
        let mut x = -87.0f32;
        while x <= 0.0 {
            let exact = f64::from(x).exp();
            let got = f64::from(fused_ce::exp_nonpositive(x));
            assert!(
                ((got - exact) / exact).abs() < 2.5e-7,
                "exp({x}) = {got}, not {exact}"
            );
            x += 0.0137;
        }
        assert_eq!(fused_ce::exp_nonpositive(0.0), 1.0);
        assert!(fused_ce::exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn non_finite_logits_are_reported() {
        let _guard = tch::no_grad_guard();
        let logits = Tensor::zeros([1, 3, 4], (Kind::Float, Device::Cpu));
        let _ = logits.narrow(1, 1, 1).fill_(f64::NAN);
        let ids = Tensor::zeros([1, 3], (Kind::Int64, Device::Cpu));
        assert!(token_losses(&logits, &ids, 1 << 20).unwrap().is_none());
        for bad in [f64::INFINITY, f64::NEG_INFINITY] {
            let logits = Tensor::zeros([2, 3, 4], (Kind::Float, Device::Cpu));
            let _ = logits
                .select(0, 1)
                .narrow(0, 1, 1)
                .narrow(1, 2, 1)
                .fill_(bad);
            let ids = Tensor::zeros([2, 3], (Kind::Int64, Device::Cpu));
            assert!(token_losses(&logits, &ids, 1 << 20).unwrap().is_none());
            // Also when the chunk holding it is not the first of its row.
            assert!(token_losses(&logits, &ids, 4).unwrap().is_none());
        }
        // The last position of a row predicts nothing: its logits are not looked at.
        let logits = Tensor::zeros([1, 3, 4], (Kind::Float, Device::Cpu));
        let _ = logits.narrow(1, 2, 1).fill_(f64::NAN);
        let ids = Tensor::zeros([1, 3], (Kind::Int64, Device::Cpu));
        assert!(token_losses(&logits, &ids, 1 << 20).unwrap().is_some());
        assert!(shifted_token_losses(&logits, &ids, 1, 1 << 20)
            .unwrap()
            .is_some());
        // Both paths, with the bad logit in the fused kernel's lanes (index 5 of 37) and in
        // its tail (index 35), and in libtorch's first and later chunks.
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            for (position, index) in [(0, 5), (3, 35), (4, 0)] {
                let logits = Tensor::randn([2, 6, 37], (Kind::Float, Device::Cpu));
                let _ = logits
                    .select(0, 1)
                    .narrow(0, position, 1)
                    .narrow(1, index, 1)
                    .fill_(bad);
                let ids = Tensor::zeros([2, 6], (Kind::Int64, Device::Cpu));
                assert!(token_losses(&logits, &ids, 1 << 20).unwrap().is_none());
                assert!(shifted_token_losses(&logits, &ids, 1, 37 * 2)
                    .unwrap()
                    .is_none());
            }
        }
        // Half-precision logits take libtorch's path, upcast.
        let logits = Tensor::randn([2, 5, 9], (Kind::Float, Device::Cpu));
        let ids = Tensor::randint(9, [2, 5], (Kind::Int64, Device::Cpu));
        let half = token_losses(&logits.to_kind(Kind::Half), &ids, 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(half.kind(), Kind::Float);
        let full = token_losses(
            &logits.to_kind(Kind::Half).to_kind(Kind::Float),
            &ids,
            1 << 20,
        )
        .unwrap()
        .unwrap();
        assert!(half.allclose(&full, 1e-6, 1e-6, false));
    }
}
