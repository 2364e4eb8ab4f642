//! The statistics of `make bench-check`'s A/B (see `ab.rs`): how far apart
//! two small samples are, with a confidence interval that assumes nothing
//! about the noise's distribution.
//!
//! The check compares a figure's values over a few runs of the base build
//! with its values over as many runs of the head build. Machine noise on a
//! shared VM is neither normal nor symmetric (a stall makes one run much
//! slower, never much faster), so the comparison is a rank one: the
//! Hodges-Lehmann estimate of the shift between the two samples (the median
//! of every head − base difference) and its Moses confidence interval, the
//! one that inverts the Mann-Whitney U test. Both are exact for any sample
//! size: the interval's bounds are order statistics of those differences,
//! chosen with the exact null distribution of U, no normal approximation.
//! Applied to logarithms, the shift is a ratio: head/base = exp(shift).

/// Above this, a sample's null distribution would lose exactness in f64;
/// the check never takes that many runs.
pub const MAX_SAMPLE: usize = 40;

/// The null distribution of the Mann-Whitney U for samples of `n` and `m`
/// (no ties): `P(U ≤ u)` for u = 0 ..= n·m. Empty when either sample is
/// empty or larger than [`MAX_SAMPLE`].
///
/// The number of arrangements with U = u is the coefficient of q^u in the
/// Gaussian binomial [n+m choose n]_q = ∏_{i=1..n} (1 − q^(m+i)) / (1 − q^i),
/// built one factor at a time: after factor i the polynomial is
/// [m+i choose i]_q, whose coefficients are counts (integers below 2^53 for
/// these sizes, so f64 holds them exactly).
pub fn mann_whitney_cdf(n: usize, m: usize) -> Vec<f64> {
    if n == 0 || m == 0 || n > MAX_SAMPLE || m > MAX_SAMPLE {
        return Vec::new();
    }
    let top = n * m;
    let mut poly = vec![0.0f64; top + 1];
    poly[0] = 1.0;
    for i in 1..=n {
        // × (1 − q^(m+i)), from the top down so each term is used once.
        let shift = m + i;
        for k in (shift..=top).rev() {
            poly[k] -= poly[k - shift];
        }
        // ÷ (1 − q^i): the series 1 + q^i + q^2i + ..., a running sum.
        for k in i..=top {
            poly[k] += poly[k - i];
        }
    }
    let total: f64 = poly.iter().sum();
    let mut cumulative = 0.0;
    poly.iter()
        .map(|count| {
            cumulative += count;
            cumulative / total
        })
        .collect()
}

/// The rank k of the Moses interval's bounds at one-sided level `alpha`:
/// the lower bound is the k-th smallest of the n·m differences, the upper
/// the k-th largest, so that each bound misses the true shift with a
/// probability of at most `alpha`. k is one more than the largest u with
/// P(U ≤ u) ≤ alpha; 0 when even U = 0 is likelier than that: the samples
/// are too small for the level, and there is no bound.
pub fn moses_rank(n: usize, m: usize, alpha: f64) -> usize {
    mann_whitney_cdf(n, m)
        .iter()
        .take_while(|p| **p <= alpha)
        .count()
}

/// How far `head` lies from `base`: the Hodges-Lehmann estimate of the
/// shift head − base and its Moses confidence interval at one-sided level
/// `alpha` on each side.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shift {
    pub estimate: f64,
    /// None when the samples are too small for the level.
    pub low: Option<f64>,
    pub high: Option<f64>,
}

/// The shift of `head` against `base`; None when either is empty, larger
/// than [`MAX_SAMPLE`], or holds a value that is not finite.
pub fn shift(head: &[f64], base: &[f64], alpha: f64) -> Option<Shift> {
    let (n, m) = (head.len(), base.len());
    if n == 0 || m == 0 || n > MAX_SAMPLE || m > MAX_SAMPLE {
        return None;
    }
    if head.iter().chain(base).any(|v| !v.is_finite()) {
        return None;
    }
    let mut differences: Vec<f64> = head
        .iter()
        .flat_map(|h| base.iter().map(move |b| h - b))
        .collect();
    differences.sort_by(f64::total_cmp);
    let k = moses_rank(n, m, alpha);
    let count = differences.len();
    let (low, high) = if k == 0 || k > count {
        (None, None)
    } else {
        (Some(differences[k - 1]), Some(differences[count - k]))
    };
    Some(Shift {
        estimate: median(&differences),
        low,
        high,
    })
}

/// The shift of the logarithms: head/base as a ratio, `exp` of each field.
/// None also when a value is 0 or negative (no ratio to speak of).
pub fn log_shift(head: &[f64], base: &[f64], alpha: f64) -> Option<Shift> {
    if head.iter().chain(base).any(|v| *v <= 0.0) {
        return None;
    }
    let ln = |values: &[f64]| values.iter().map(|v| v.ln()).collect::<Vec<_>>();
    shift(&ln(head), &ln(base), alpha)
}

/// The median; NaN for no values.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_distribution_of_small_samples() {
        // n = m = 2: the 6 arrangements give U = 0, 1, 2, 2, 3, 4.
        let cdf = mann_whitney_cdf(2, 2);
        let expected = [1.0, 2.0, 4.0, 5.0, 6.0].map(|c| c / 6.0);
        assert_eq!(cdf.len(), expected.len());
        for (p, e) in cdf.iter().zip(expected) {
            assert!((p - e).abs() < 1e-12, "{cdf:?}");
        }
        // One sample of one: U is uniform over 0..=m.
        let cdf = mann_whitney_cdf(1, 4);
        assert!((cdf[0] - 0.2).abs() < 1e-12 && (cdf[4] - 1.0).abs() < 1e-12);
        // Symmetric in the two sizes, and ends at 1.
        assert_eq!(mann_whitney_cdf(3, 7), mann_whitney_cdf(7, 3));
        let big = mann_whitney_cdf(MAX_SAMPLE, MAX_SAMPLE);
        assert!((big[big.len() - 1] - 1.0).abs() < 1e-9);
        assert!(big.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn no_distribution_for_empty_or_oversized_samples() {
        assert!(mann_whitney_cdf(0, 5).is_empty());
        assert!(mann_whitney_cdf(5, 0).is_empty());
        assert!(mann_whitney_cdf(MAX_SAMPLE + 1, 5).is_empty());
        assert_eq!(moses_rank(0, 5, 0.025), 0);
    }

    #[test]
    fn ranks_match_the_published_critical_values() {
        // Two-sided 5% critical values of U for equal samples (any table):
        // 5: 2, 6: 5, 7: 8, 8: 13, 9: 17, 10: 23; the bound's rank is one more.
        for (n, critical) in [(5, 2), (6, 5), (7, 8), (8, 13), (9, 17), (10, 23)] {
            assert_eq!(moses_rank(n, n, 0.025), critical + 1, "n = m = {n}");
        }
        // Too small for the level: 4 and 4 cannot reach 1% on one side
        // (P(U = 0) = 1/70); 5 and 5 can (P(U ≤ 1) = 2/252).
        assert_eq!(moses_rank(4, 4, 0.01), 0);
        assert_eq!(moses_rank(5, 5, 0.01), 2);
        assert_eq!(moses_rank(3, 3, 0.025), 0);
    }

    #[test]
    fn shift_of_separated_samples() {
        let base = [10.0, 11.0, 12.0, 13.0, 14.0];
        let head: Vec<f64> = base.iter().map(|b| b + 100.0).collect();
        let s = shift(&head, &base, 0.025).unwrap();
        assert_eq!(s.estimate, 100.0);
        // k = 3: the 3rd smallest and 3rd largest of the 25 differences
        // 100 + i − j (96 once, 97 twice, ...).
        assert_eq!((s.low, s.high), (Some(97.0), Some(103.0)));
        // The same samples swapped: the opposite shift.
        let back = shift(&base, &head, 0.025).unwrap();
        assert_eq!(back.estimate, -100.0);
        assert_eq!((back.low, back.high), (Some(-103.0), Some(-97.0)));
    }

    #[test]
    fn identical_samples_straddle_zero() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let s = shift(&a, &a, 0.025).unwrap();
        assert_eq!(s.estimate, 0.0);
        assert!(s.low.unwrap() < 0.0 && s.high.unwrap() > 0.0, "{s:?}");
    }

    #[test]
    fn too_few_or_bad_values_give_no_interval_or_nothing() {
        let s = shift(&[1.0, 2.0], &[1.5, 2.5], 0.025).unwrap();
        assert_eq!((s.low, s.high), (None, None));
        // The median of the differences −1.5, −0.5, −0.5, 0.5.
        assert_eq!(s.estimate, -0.5);
        assert!(shift(&[], &[1.0], 0.025).is_none());
        assert!(shift(&[f64::NAN], &[1.0], 0.025).is_none());
        assert!(shift(&[f64::INFINITY], &[1.0], 0.025).is_none());
        assert!(log_shift(&[0.0, 1.0], &[1.0, 1.0], 0.025).is_none());
        assert!(log_shift(&[1.0], &[-1.0], 0.025).is_none());
    }

    #[test]
    fn log_shift_is_a_ratio() {
        let base = [100.0, 101.0, 99.0, 100.5, 99.5, 100.2];
        let head: Vec<f64> = base.iter().map(|b| b * 0.9).collect();
        let s = log_shift(&head, &base, 0.025).unwrap();
        assert!((s.estimate.exp() - 0.9).abs() < 0.01, "{s:?}");
        assert!(s.high.unwrap().exp() < 0.92, "{s:?}");
    }

    #[test]
    fn medians() {
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[3.0]), 3.0);
        assert_eq!(median(&[3.0, 1.0]), 2.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }
}
