//! Recovering the gradient weight map from the logits and the loss's gradient (the
//! method and its error model: `maskaudit_core::loss::weights`).

use tch::{Kind, Tensor};

use maskaudit_core::loss::weights::{
    fit, log_softmax_error, residual_tolerance, FitSums, TokenWeights,
};

/// Recovers the weights from the logits `z` `[B,T,V]` and the loss's gradient `g` (same
/// shape): on the CPU with f32 logits and their log-sum-exp `lse` (`[B·T]`, from
/// `crate::loss::fused_ce::log_sum_exp`), by the fused kernel beside the cross-entropy's
/// (`crate::loss::fused_ce::gradient_terms`: two passes over each position, no allocation),
/// otherwise with libtorch, `chunk` positions' worth of `[n, V]` at a time so memory stays
/// bounded.
pub fn recover(
    logits: &Tensor,
    grad: &Tensor,
    input_ids: &Tensor,
    lse: Option<&[f32]>,
    chunk_elements: i64,
) -> Result<TokenWeights, tch::TchError> {
    let fused = match lse {
        Some(lse) => {
            let ids = Vec::<i64>::try_from(
                input_ids
                    .f_to_device(tch::Device::Cpu)?
                    .f_contiguous()?
                    .f_view([-1])?,
            )?;
            crate::loss::fused_ce::gradient_terms(logits, grad, &ids, lse)?
        }
        None => None,
    };
    {
        if let Some(terms) = fused {
            let last: f64 = terms.last_norms.iter().sum();
            return Ok(TokenWeights {
                weights: terms.weights,
                residuals: terms.residuals,
                tolerances: terms.tolerances,
                last_position_norm: last,
                total_norm: terms.norms.iter().sum::<f64>() + last,
            });
        }
    }
    recover_with_libtorch(logits, grad, input_ids, chunk_elements)
}

/// [`recover`] with libtorch's kernels, in f64: any device and dtype, and the reference the
/// fused CPU path is tested against.
pub fn recover_with_libtorch(
    logits: &Tensor,
    grad: &Tensor,
    input_ids: &Tensor,
    chunk_elements: i64,
) -> Result<TokenWeights, tch::TchError> {
    let size = logits.size();
    let (b, t, v) = (size[0], size[1], size[2]);
    let positions = (t - 1).max(0);
    let rows_per_chunk = (chunk_elements / v.max(1)).max(1);
    let mut out = TokenWeights {
        weights: Vec::with_capacity((b * positions) as usize),
        residuals: Vec::with_capacity((b * positions) as usize),
        tolerances: Vec::with_capacity((b * positions) as usize),
        last_position_norm: 0.0,
        total_norm: 0.0,
    };
    let ids = input_ids.f_to_device(logits.device())?;
    for row in 0..b {
        let z_row = logits.f_select(0, row)?;
        let g_row = grad.f_select(0, row)?;
        let ids_row = ids.f_select(0, row)?;
        let mut start = 0;
        while start < positions {
            let n = rows_per_chunk.min(positions - start);
            let z = z_row.f_narrow(0, start, n)?.f_to_kind(Kind::Double)?;
            let g = g_row.f_narrow(0, start, n)?.f_to_kind(Kind::Double)?;
            let target = ids_row.f_narrow(0, start + 1, n)?.f_unsqueeze(1)?;
            fit_chunk(&z, &g, &target, &mut out)?;
            start += n;
        }
        if t >= 1 {
            let g_last = g_row.f_select(0, t - 1)?.f_to_kind(Kind::Double)?;
            let norm = f64::try_from(g_last.f_norm()?)?;
            out.last_position_norm += norm;
            out.total_norm += norm;
        }
    }
    Ok(out)
}

/// The weighted fit of [`recover_with_libtorch`] on `n` positions: logits `z` and gradient `g`
/// `[n, V]` in f64, `target` `[n, 1]`.
fn fit_chunk(
    z: &Tensor,
    g: &Tensor,
    target: &Tensor,
    out: &mut TokenWeights,
) -> Result<(), tch::TchError> {
    let (n, v) = (z.size()[0], z.size()[1]);
    let device = z.device();
    let sum = |x: &Tensor| x.f_sum_dim_intlist(-1, false, Kind::Double);
    let p = z.f_softmax(-1, Kind::Double)?;
    let minus_one = Tensor::f_full([n, 1], -1.0, (Kind::Double, device))?;
    let d = p.f_scatter_add(1, target, &minus_one)?;
    let lse = z.f_logsumexp([-1], false)?;
    let big = z.f_abs()?.f_amax([-1], false)?;
    let host = |x: &Tensor| Vec::<f64>::try_from(x.f_to_device(tch::Device::Cpu)?);
    let (lse, big) = (host(&lse)?, host(&big)?);
    let z_t = host(&z.f_gather(1, target, false)?.f_flatten(0, -1)?)?;
    let units: Vec<f64> = (0..n as usize)
        .map(|k| log_softmax_error(lse[k], big[k], v as usize, lse[k] - z_t[k]))
        .collect();
    let zeros = Tensor::f_zeros([n, 1], (Kind::Double, device))?;
    let off = Tensor::f_ones([n, v], (Kind::Double, device))?.f_scatter(1, target, &zeros)?;
    let off_gp = host(&sum(&off.f_mul(g)?.f_mul(&p)?)?)?;
    let off_pp = host(&sum(&off.f_mul(&p)?.f_mul(&p)?)?)?;
    let off_gg = host(&sum(&off.f_mul(g)?.f_mul(g)?)?)?;
    let at_target = |x: &Tensor| -> Result<Vec<f64>, tch::TchError> {
        host(&x.f_gather(1, target, false)?.f_flatten(0, -1)?)
    };
    let (g_t, d_t) = (at_target(g)?, at_target(&d)?);
    let w: Vec<f64> = (0..n as usize)
        .map(|k| {
            let sums = FitSums {
                off_gp: off_gp[k],
                off_pp: off_pp[k],
                off_gg: off_gg[k],
                g_t: g_t[k],
                d_t: d_t[k],
            };
            fit(sums, units[k])
        })
        .collect();
    let w = Tensor::f_from_slice(&w)?.f_to_device(device)?;
    let rest = g.f_sub(&d.f_mul(&w.f_unsqueeze(1)?)?)?;
    let rr = sum(&rest.f_square()?)?;
    let gg = sum(&g.f_square()?)?;
    let pp = sum(&p.f_square()?)?;
    let (w, rr, gg, pp) = (host(&w)?, host(&rr)?, host(&gg)?, host(&pp)?);
    for k in 0..n as usize {
        out.weights.push(w[k]);
        out.residuals.push(if gg[k] > 0.0 {
            (rr[k].max(0.0) / gg[k]).sqrt()
        } else {
            0.0
        });
        out.tolerances
            .push(residual_tolerance(units[k], pp[k], w[k], gg[k].sqrt()));
        out.total_norm += gg[k].sqrt();
    }
    Ok(())
}
#[cfg(test)]
mod tests {
    use super::*;

    /// The fused CPU path against libtorch's in f64, on a token-mean gradient plus noise (so
    /// residuals are not all zero), with a vocabulary that leaves a tail after the lanes.
    #[test]
    fn the_fused_path_agrees_with_libtorch() {
        let _guard = tch::no_grad_guard();
        tch::manual_seed(5);
        let (b, t, v) = (3, 6, 37);
        let opts = (Kind::Float, tch::Device::Cpu);
        let logits = Tensor::randn([b, t, v], opts) * 3.0;
        let ids = Tensor::randint(v, [b, t], (Kind::Int64, tch::Device::Cpu));
        let p = logits.softmax(-1, Kind::Float);
        let onehot = ids.narrow(1, 1, t - 1).onehot(v);
        let d = Tensor::cat(&[p.narrow(1, 0, t - 1) - onehot, p.narrow(1, t - 1, 1)], 1);
        let w = Tensor::rand([b, t, 1], opts);
        let noise = Tensor::randn([b, t, v], opts) * 1e-3;
        let grad = &d * &w + noise;
        let lse = crate::loss::fused_ce::log_sum_exp(&logits).expect("an AVX2 CPU");
        let fused = recover(&logits, &grad, &ids, Some(&lse), 1 << 20).unwrap();
        let reference = recover_with_libtorch(&logits, &grad, &ids, 1 << 20).unwrap();
        for (a, r) in fused.weights.iter().zip(&reference.weights) {
            assert!((a - r).abs() <= 1e-5 * r.abs().max(1e-3), "{a} vs {r}");
        }
        for (a, r) in fused.residuals.iter().zip(&reference.residuals) {
            assert!((a - r).abs() <= 1e-4 * r.abs().max(1e-2), "{a} vs {r}");
        }
        let rel = (fused.total_norm - reference.total_norm).abs() / reference.total_norm;
        assert!(rel < 1e-5, "{rel}");
    }
}

#[cfg(test)]
mod certain {
    use super::*;

    /// A model certain of every target (margin 30 nats): p_t rounds to 1 in float32 and the
    /// loss's gradient at the target to 0, yet every trained position's weight is recovered
    /// exactly (1/n for a token mean), by the fused path and by libtorch's, with no residual
    /// above its tolerance.
    #[test]
    fn a_certain_models_weights_are_exact() {
        let _guard = tch::no_grad_guard();
        tch::manual_seed(11);
        let (b, t, v) = (2i64, 9i64, 37i64);
        let cpu = (Kind::Float, tch::Device::Cpu);
        let ids = Tensor::randint(v, [b, t], (Kind::Int64, tch::Device::Cpu));
        let next = Tensor::cat(&[ids.narrow(1, 1, t - 1), ids.narrow(1, 0, 1)], 1);
        let logits = (Tensor::randn([b, t, v], cpu) * 3.0).scatter_add(
            2,
            &next.unsqueeze(2),
            &Tensor::full([b, t, 1], 30.0, cpu),
        );
        let leaf = logits.copy().set_requires_grad(true);
        let n = b * (t - 1);
        let grad = tch::with_grad(|| {
            let loss = leaf
                .narrow(1, 0, t - 1)
                .reshape([n, v])
                .cross_entropy_loss::<Tensor>(
                    &ids.narrow(1, 1, t - 1).reshape([n]),
                    None,
                    tch::Reduction::Mean,
                    -100,
                    0.0,
                );
            Tensor::run_backward(&[&loss], &[&leaf], false, false)
                .pop()
                .unwrap()
        });
        let lse = crate::loss::fused_ce::log_sum_exp(&logits).expect("an AVX2 CPU");
        let fused = recover(&logits, &grad, &ids, Some(&lse), 1 << 20).unwrap();
        let reference = recover_with_libtorch(&logits, &grad, &ids, 1 << 20).unwrap();
        for (path, w) in [("fused", &fused), ("libtorch", &reference)] {
            for (k, x) in w.weights.iter().enumerate() {
                let want = 1.0 / n as f64;
                assert!(
                    (x - want).abs() <= 1e-5 * want,
                    "{path}, position {k}: {x} vs {want}"
                );
            }
            for (r, tol) in w.residuals.iter().zip(&w.tolerances) {
                assert!(r <= tol, "{path}: residual {r} above its tolerance {tol}");
            }
        }
    }
}
