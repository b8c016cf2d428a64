//! A/B experiment decisions: how many visits the always-valid sequential
//! test (`deploykit::experiment`) needs to call a winner, against effect
//! size, and what peeking does to a fixed-horizon z-test.
//!
//! Each run simulates two variants at a 5 % base conversion rate; every
//! check adds 500 visits per variant (conversions drawn from a binomial,
//! normal approximation, fixed seeds), for at most 100 checks (50,000 visits
//! per variant). The sequential test (alpha 0.05, minimum detectable effect
//! 1 point, 1,000 visits before any decision) is read at every check. For
//! comparison: the fixed-horizon two-proportion z-test's sample size for
//! 80 % power at the same alpha (read once), and the same z-test read at
//! every check and stopped at the first p < 0.05 (peeking).
//!
//! Run: `cargo bench -p deploykit-benches --bench experiment`
//! (`EXPERIMENT_BENCH_RUNS=N`, default 2,000 runs per row).

use deploykit::experiment::{fixed_horizon_p_value, ExperimentRules, Sequential, Tally, Verdict};

#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (((z ^ (z >> 31)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    fn binomial(&mut self, n: f64, p: f64) -> f64 {
        (n * p + self.normal() * (n * p * (1.0 - p)).sqrt())
            .round()
            .clamp(0.0, n)
    }
}

const VISITS_PER_CHECK: f64 = 500.0;
const CHECKS: usize = 100;
const BASE: f64 = 0.05;

fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Visits per variant a fixed-horizon test needs for 80 % power at a
/// two-sided 0.05.
fn fixed_n(effect: f64) -> f64 {
    let (p1, p2) = (BASE, BASE + effect);
    (1.959_964 + 0.841_621_f64).powi(2) * (p1 * (1.0 - p1) + p2 * (1.0 - p2)) / (effect * effect)
}

fn main() {
    let runs: usize = std::env::var("EXPERIMENT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let rules = ExperimentRules {
        alpha: 0.05,
        min_detectable_effect: 0.01,
        min_samples: 1000,
        ..ExperimentRules::default()
    };
    let wall = std::time::Instant::now();
    println!("| effect (points) | sequential: winner found | right winner | visits per variant at the decision: median / p90 | fixed horizon, read once: visits for 80 % power | z-test read every check: winner found |");
    println!("|---|---|---|---|---|---|");
    for (row, effect) in [0.0, 0.005, 0.01, 0.02, 0.03].into_iter().enumerate() {
        let mut rng = Rng(1000 + row as u64);
        let (mut found, mut right, mut peek_found) = (0usize, 0usize, 0usize);
        let mut at = Vec::new();
        for _ in 0..runs {
            let (mut a, mut b) = (Tally::default(), Tally::default());
            let mut seq = Sequential::default();
            let (mut decided, mut peeked) = (false, false);
            for _ in 0..CHECKS {
                a.visits += VISITS_PER_CHECK;
                b.visits += VISITS_PER_CHECK;
                a.conversions += rng.binomial(VISITS_PER_CHECK, BASE);
                b.conversions += rng.binomial(VISITS_PER_CHECK, BASE + effect);
                if !peeked && fixed_horizon_p_value(a, b) < 0.05 {
                    peeked = true;
                }
                if !decided {
                    match seq.read(&rules, a, b).verdict {
                        Verdict::Continue => {}
                        v => {
                            decided = true;
                            found += 1;
                            at.push(a.visits);
                            if v == Verdict::TreatmentWins && effect > 0.0 {
                                right += 1;
                            }
                        }
                    }
                }
                if decided && peeked {
                    break;
                }
            }
            if peeked {
                peek_found += 1;
            }
        }
        let pct = |k: usize| format!("{:.1} %", k as f64 * 100.0 / runs as f64);
        let fixed = if effect > 0.0 {
            format!("{:.0}", fixed_n(effect))
        } else {
            "-".into()
        };
        let right = if effect > 0.0 { pct(right) } else { "-".into() };
        println!(
            "| {:.1} | {} | {} | {:.0} / {:.0} | {} | {} |",
            effect * 100.0,
            pct(found),
            right,
            quantile(&mut at.clone(), 0.5),
            quantile(&mut at, 0.9),
            fixed,
            pct(peek_found)
        );
    }
    eprintln!(
        "{runs} runs per row, wall time {:.1}s",
        wall.elapsed().as_secs_f64()
    );
}
