//! Distributions in bounded memory, for streaming statistics.
//!
//! Quantiles use the nearest-rank method: the p-quantile of n values is the smallest value
//! whose cumulative count reaches ⌈p·n⌉ (so the median of an even count is the lower middle
//! value). Lengths are exact: a histogram keyed by length holds at most one entry per
//! distinct length. Fractions in [0, 1] are binned to 1/1000, so their median is exact to
//! ±0.0005; their minimum, maximum and mean are exact.

use std::collections::BTreeMap;

use serde::Serialize;

/// Min, median, p95, max and mean of a set of lengths.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LengthSummary {
    pub min: usize,
    pub median: usize,
    pub p95: usize,
    pub max: usize,
    pub mean: f64,
}

/// Exact histogram of non-negative integers.
#[derive(Debug, Clone, Default)]
pub struct LengthHistogram {
    counts: BTreeMap<usize, u64>,
    n: u64,
    sum: u128,
}

impl LengthHistogram {
    pub fn add(&mut self, value: usize) {
        *self.counts.entry(value).or_default() += 1;
        self.n += 1;
        self.sum += value as u128;
    }

    /// The nearest-rank p-quantile, `None` when empty.
    pub fn quantile(&self, p: f64) -> Option<usize> {
        let rank = nearest_rank(p, self.n)?;
        let mut seen = 0;
        for (&value, &count) in &self.counts {
            seen += count;
            if seen >= rank {
                return Some(value);
            }
        }
        None
    }

    pub fn summary(&self) -> Option<LengthSummary> {
        Some(LengthSummary {
            min: *self.counts.keys().next()?,
            median: self.quantile(0.5)?,
            p95: self.quantile(0.95)?,
            max: *self.counts.keys().next_back()?,
            mean: self.sum as f64 / self.n as f64,
        })
    }
}

fn nearest_rank(p: f64, n: u64) -> Option<u64> {
    if n == 0 {
        return None;
    }
    Some(((p * n as f64).ceil() as u64).clamp(1, n))
}

/// Min, median, mean and max of fractions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FractionSummary {
    pub min: f64,
    pub median: f64,
    pub mean: f64,
    pub max: f64,
}

const BINS: usize = 1000;

/// Fractions in [0, 1], binned to 1/1000 for the median.
#[derive(Debug, Clone)]
pub struct FractionHistogram {
    bins: Vec<u64>,
    n: u64,
    sum: f64,
    min: f64,
    max: f64,
}

impl Default for FractionHistogram {
    fn default() -> Self {
        Self {
            bins: vec![0; BINS + 1],
            n: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl FractionHistogram {
    pub fn add(&mut self, fraction: f64) {
        let fraction = fraction.clamp(0.0, 1.0);
        self.bins[(fraction * BINS as f64).round() as usize] += 1;
        self.n += 1;
        self.sum += fraction;
        self.min = self.min.min(fraction);
        self.max = self.max.max(fraction);
    }

    pub fn summary(&self) -> Option<FractionSummary> {
        let rank = nearest_rank(0.5, self.n)?;
        let mut seen = 0;
        let mut median = self.max;
        for (bin, &count) in self.bins.iter().enumerate() {
            seen += count;
            if seen >= rank {
                median = bin as f64 / BINS as f64;
                break;
            }
        }
        Some(FractionSummary {
            min: self.min,
            median: median.clamp(self.min, self.max),
            mean: self.sum / self.n as f64,
            max: self.max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let mut h = LengthHistogram::default();
        assert_eq!(h.summary(), None);
        for v in [5, 1, 3, 2, 4, 100, 3, 3, 7, 9] {
            h.add(v);
        }
        let s = h.summary().unwrap();
        assert_eq!((s.min, s.median, s.p95, s.max), (1, 3, 100, 100));
        assert!((s.mean - 13.7).abs() < 1e-12);
        // 20 values 1..=20: the median is the 10th, p95 the 19th.
        let mut h = LengthHistogram::default();
        (1..=20).for_each(|v| h.add(v));
        assert_eq!((h.quantile(0.5), h.quantile(0.95)), (Some(10), Some(19)));
        let mut one = LengthHistogram::default();
        one.add(7);
        assert_eq!(one.quantile(0.95), Some(7));
    }

    #[test]
    fn fraction_summary_is_exact_at_the_ends() {
        let mut h = FractionHistogram::default();
        assert_eq!(h.summary(), None);
        for f in [0.25, 1.0, 0.5, 1.0 / 3.0] {
            h.add(f);
        }
        let s = h.summary().unwrap();
        assert_eq!((s.min, s.max), (0.25, 1.0));
        assert_eq!(s.median, 0.333);
        assert!((s.mean - (0.25 + 1.0 + 0.5 + 1.0 / 3.0) / 4.0).abs() < 1e-12);
    }
}
