//! Small statistics: latency percentiles of one measurement, and min/median/max of one figure
//! over the repeats of a run.

use serde::{Deserialize, Serialize};

/// Percentiles of a set of samples in microseconds (nearest-rank).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Percentiles {
    /// Sorts `samples` in place. `None` when there are none.
    pub fn of(samples: &mut [i64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |q: f64| sample_at(samples, q);
        Some(Self {
            count: samples.len(),
            p50_us: at(0.50),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: at(1.0),
        })
    }
}

/// Nearest-rank quantile of sorted samples.
fn sample_at(sorted: &[i64], q: f64) -> f64 {
    let n = sorted.len();
    // Rank in 1..=n; the float-to-int conversion saturates and the clamp keeps it in range.
    let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
    sorted.get(rank - 1).copied().map_or(0.0, |v| v as f64)
}

/// One figure over the repeats of a run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    /// `None` when no repeat produced the figure.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Self> {
        let mut values: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            f64::midpoint(values[n / 2 - 1], values[n / 2])
        };
        Some(Self {
            min: values[0],
            median,
            max: values[n - 1],
            n,
        })
    }

    /// `median (min–max)` with `digits` decimals, or just the value for a single repeat.
    pub fn show(&self, digits: usize) -> String {
        if self.n == 1 {
            format!("{:.digits$}", self.median)
        } else {
            format!(
                "{:.digits$} ({:.digits$}–{:.digits$})",
                self.median, self.min, self.max
            )
        }
    }
}

/// `Spread::show` or a dash when the figure is missing.
pub fn show(spread: Option<Spread>, digits: usize) -> String {
    spread.map_or_else(|| "–".to_owned(), |s| s.show(digits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() -> Result<(), String> {
        let mut samples: Vec<i64> = (1..=1000).rev().collect();
        let p = Percentiles::of(&mut samples).ok_or("no samples")?;
        assert_eq!(p.count, 1000);
        assert!((p.p50_us - 500.0).abs() < f64::EPSILON);
        assert!((p.p99_us - 990.0).abs() < f64::EPSILON);
        assert!((p.p999_us - 999.0).abs() < f64::EPSILON);
        assert!((p.max_us - 1000.0).abs() < f64::EPSILON);
        assert!(Percentiles::of(&mut []).is_none());
        Ok(())
    }

    #[test]
    fn spread_of_repeats() -> Result<(), String> {
        let s = Spread::of([3.0, 1.0, 2.0, f64::NAN]).ok_or("empty")?;
        assert_eq!((s.min, s.median, s.max, s.n), (1.0, 2.0, 3.0, 3));
        let even = Spread::of([4.0, 1.0]).ok_or("empty")?;
        assert!((even.median - 2.5).abs() < f64::EPSILON);
        assert_eq!(even.show(1), "2.5 (1.0–4.0)");
        assert_eq!(show(None, 1), "–");
        Ok(())
    }
}
