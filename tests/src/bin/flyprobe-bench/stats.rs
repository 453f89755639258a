//! The statistics the benchmark judges by: medians, a bootstrap interval of the median
//! (resampling rounds with replacement), and a three-way verdict against a target. The
//! PRNG is a fixed-seed splitmix64, so a report's intervals and round orders reproduce.

/// splitmix64: small, fast, and good enough to shuffle variants and resample rounds.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is negligible for the small n used here).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Fisher–Yates.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A median with its bootstrap 95% interval.
#[derive(Debug, Clone, Copy)]
pub struct Interval {
    pub median: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Interval {
    pub fn map(self, f: impl Fn(f64) -> f64) -> Self {
        let (a, b) = (f(self.lo), f(self.hi));
        Self {
            median: f(self.median),
            lo: a.min(b),
            hi: a.max(b),
        }
    }
}

/// Resamples used for every interval in the report.
pub const RESAMPLES: usize = 10_000;
/// The bootstrap's seed: every interval is computed from a fresh generator with it.
pub const BOOTSTRAP_SEED: u64 = 0xf1f0_be0c_5eed_0001;

/// The median of `samples` and the 2.5th..97.5th percentile of the medians of
/// `RESAMPLES` resamples (with replacement, same size) of it.
pub fn bootstrap_median(samples: &[f64]) -> Interval {
    let median = median(samples);
    if samples.len() < 2 {
        return unbounded(median);
    }
    let mut rng = Rng::new(BOOTSTRAP_SEED);
    let mut draw = vec![0.0; samples.len()];
    let medians = (0..RESAMPLES)
        .map(|_| self::median(resample(samples, &mut rng, &mut draw)))
        .collect();
    percentiles(median, medians)
}

/// `a`'s added % minus `factor` × `b`'s (each the median of ratios to 1, in %), with the
/// 2.5th..97.5th percentile of that difference over `RESAMPLES` resamples of both (drawn
/// independently: the two sets of ratios come from different loads).
pub fn bootstrap_difference(a: &[f64], b: &[f64], factor: f64) -> Interval {
    let added = |v: &[f64]| (median(v) - 1.0) * 100.0;
    let median = added(a) - factor * added(b);
    if a.len() < 2 || b.len() < 2 {
        return unbounded(median);
    }
    let mut rng = Rng::new(BOOTSTRAP_SEED);
    let mut draw_a = vec![0.0; a.len()];
    let mut draw_b = vec![0.0; b.len()];
    let diffs = (0..RESAMPLES)
        .map(|_| {
            let a = added(resample(a, &mut rng, &mut draw_a));
            a - factor * added(resample(b, &mut rng, &mut draw_b))
        })
        .collect();
    percentiles(median, diffs)
}

/// No interval: too few samples to resample.
fn unbounded(median: f64) -> Interval {
    Interval {
        median,
        lo: f64::NEG_INFINITY,
        hi: f64::INFINITY,
    }
}

/// `draw` filled with `samples` drawn with replacement.
fn resample<'a>(samples: &[f64], rng: &mut Rng, draw: &'a mut [f64]) -> &'a [f64] {
    for d in draw.iter_mut() {
        *d = samples[rng.below(samples.len())];
    }
    draw
}

/// The 2.5th..97.5th percentile of `RESAMPLES` resampled statistics, around `median`.
fn percentiles(median: f64, mut values: Vec<f64>) -> Interval {
    values.sort_by(f64::total_cmp);
    let lo = values[(RESAMPLES as f64 * 0.025).floor() as usize];
    let hi = values[((RESAMPLES as f64 * 0.975).ceil() as usize - 1).min(RESAMPLES - 1)];
    Interval { median, lo, hi }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    Undecided,
}

impl Verdict {
    /// Judged on the interval: PASS only if all of it meets the target, FAIL only if none
    /// of it does.
    pub fn at_most(iv: Interval, target: f64) -> Self {
        if iv.hi <= target {
            Self::Pass
        } else if iv.lo > target {
            Self::Fail
        } else {
            Self::Undecided
        }
    }

    pub fn at_least(iv: Interval, target: f64) -> Self {
        if iv.lo >= target {
            Self::Pass
        } else if iv.hi < target {
            Self::Fail
        } else {
            Self::Undecided
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Fail => "FAIL",
            Self::Undecided => "UNDECIDED (interval wider than target)",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn difference_of_added_costs() {
        let socket = [1.08, 1.09, 1.085, 1.08, 1.09];
        let floor = [1.01, 1.0, 1.005, 1.01, 1.0];
        let iv = bootstrap_difference(&socket, &floor, 1.5);
        // 8.5 − 1.5 × 0.5
        assert!((iv.median - 7.75).abs() < 1e-9);
        assert!(iv.lo <= iv.median && iv.median <= iv.hi);
        assert!(iv.lo > 5.0 && iv.hi < 10.0);
        let one = bootstrap_difference(&[1.1], &floor, 1.5);
        assert!(one.lo.is_infinite() && one.hi.is_infinite());
    }

    #[test]
    fn bootstrap_brackets_the_median_and_reproduces() {
        let v: Vec<f64> = (0..15).map(|i| 1.0 + f64::from(i) * 0.001).collect();
        let a = bootstrap_median(&v);
        let b = bootstrap_median(&v);
        assert_eq!((a.lo, a.hi), (b.lo, b.hi));
        assert!(a.lo <= a.median && a.median <= a.hi);
        assert!(a.lo >= 1.0 && a.hi <= 1.014);
        let same = bootstrap_median(&[2.0; 15]);
        assert_eq!((same.lo, same.median, same.hi), (2.0, 2.0, 2.0));
    }

    #[test]
    fn verdicts() {
        let iv = |lo, hi| Interval {
            median: (lo + hi) / 2.0,
            lo,
            hi,
        };
        assert_eq!(Verdict::at_most(iv(0.5, 2.9), 3.0), Verdict::Pass);
        assert_eq!(Verdict::at_most(iv(3.1, 4.0), 3.0), Verdict::Fail);
        assert_eq!(Verdict::at_most(iv(2.0, 4.0), 3.0), Verdict::Undecided);
        assert_eq!(Verdict::at_least(iv(0.98, 1.0), 0.97), Verdict::Pass);
        assert_eq!(Verdict::at_least(iv(0.9, 0.96), 0.97), Verdict::Fail);
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut rng = Rng::new(7);
        let mut v: Vec<u32> = (0..5).collect();
        rng.shuffle(&mut v);
        let mut s = v.clone();
        s.sort_unstable();
        assert_eq!(s, vec![0, 1, 2, 3, 4]);
    }
}
