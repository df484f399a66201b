//! Repeated rounds (`--rounds N`): every strategy runs once per round, in
//! the given order on even rounds and reversed on odd ones, so that none
//! always runs first (on a machine whose caches, and whose server's, the
//! previous run warmed); the summary gives each strategy's medians over the
//! rounds (of p50, p99, wall time, calls and 429s; the worst round's
//! duplicate-fetch ratio) and the ratios of the latency medians to
//! cache-aside's, all measured in the one run.
//! A single run of a short workload (the open scenario takes under a
//! second) varies by several percent from one run to the next: a ratio
//! from one pair of runs can fall either side of 1.

use serde::Serialize;

/// The order of the strategies in round `round` (counted from 0).
pub fn order<T: Copy>(given: &[T], round: usize) -> Vec<T> {
    let mut order = given.to_vec();
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

/// What one run of one strategy gave, as the summary needs it.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub name: &'static str,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub wall_s: f64,
    pub duplicate_ratio: f64,
    pub provider_calls: u64,
    /// Calls the provider refused (429s).
    pub refused: u64,
}

/// One strategy over every round.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub name: &'static str,
    pub rounds: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub wall_s: f64,
    /// The highest of the rounds: a duplicate in any round shows.
    pub duplicate_ratio: f64,
    pub provider_calls: f64,
    pub refused: f64,
    /// The medians' ratios to cache-aside's, when it ran.
    pub p50_vs_cache_aside: Option<f64>,
    pub p99_vs_cache_aside: Option<f64>,
}

/// The median of `values` (the mean of the middle two for an even count);
/// `NaN` for none.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Each strategy's medians over `rounds` (each round's runs, in any
/// order), in the order the strategies first appear.
pub fn summarize(rounds: &[Vec<Measured>]) -> Vec<Summary> {
    let mut names: Vec<&'static str> = Vec::new();
    for run in rounds.iter().flatten() {
        if !names.contains(&run.name) {
            names.push(run.name);
        }
    }
    let mut summaries: Vec<Summary> = names
        .into_iter()
        .map(|name| {
            let runs: Vec<&Measured> = rounds.iter().flatten().filter(|r| r.name == name).collect();
            let of = |field: fn(&Measured) -> f64| {
                median(&runs.iter().map(|r| field(r)).collect::<Vec<_>>())
            };
            Summary {
                name,
                rounds: runs.len(),
                p50_ms: of(|r| r.p50_ms),
                p99_ms: of(|r| r.p99_ms),
                wall_s: of(|r| r.wall_s),
                duplicate_ratio: runs.iter().map(|r| r.duplicate_ratio).fold(0.0, f64::max),
                provider_calls: of(|r| r.provider_calls as f64),
                refused: of(|r| r.refused as f64),
                p50_vs_cache_aside: None,
                p99_vs_cache_aside: None,
            }
        })
        .collect();
    if let Some(base) = summaries.iter().find(|s| s.name == "cache-aside").cloned() {
        for summary in &mut summaries {
            summary.p50_vs_cache_aside = Some(summary.p50_ms / base.p50_ms);
            summary.p99_vs_cache_aside = Some(summary.p99_ms / base.p99_ms);
        }
    }
    summaries
}

/// The summary as a table.
pub fn print(summaries: &[Summary]) {
    let ratio = |r: Option<f64>| r.map_or_else(|| "-".to_owned(), |r| format!("{r:.3}x"));
    println!(
        "{:<14} {:>6} {:>7} {:>8} {:>8} {:>8} {:>8} {:>7} {:>10} {:>10}",
        "strategy",
        "rounds",
        "dup",
        "calls",
        "429s",
        "p50 ms",
        "p99 ms",
        "wall s",
        "p50/c-a",
        "p99/c-a"
    );
    for s in summaries {
        println!(
            "{:<14} {:>6} {:>7.3} {:>8.0} {:>8.0} {:>8.1} {:>8.1} {:>7.2} {:>10} {:>10}",
            s.name,
            s.rounds,
            s.duplicate_ratio,
            s.provider_calls,
            s.refused,
            s.p50_ms,
            s.p99_ms,
            s.wall_s,
            ratio(s.p50_vs_cache_aside),
            ratio(s.p99_vs_cache_aside),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &'static str, p50_ms: f64, p99_ms: f64, duplicate_ratio: f64) -> Measured {
        Measured {
            name,
            p50_ms,
            p99_ms,
            wall_s: p50_ms / 10.0,
            duplicate_ratio,
            provider_calls: p50_ms as u64,
            refused: 0,
        }
    }

    #[test]
    fn odd_rounds_run_the_strategies_in_reverse() {
        assert_eq!(order(&["a", "b", "c"], 0), ["a", "b", "c"]);
        assert_eq!(order(&["a", "b", "c"], 1), ["c", "b", "a"]);
        assert_eq!(order(&["a", "b", "c"], 2), ["a", "b", "c"]);
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[5.0]), 5.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn a_summary_takes_medians_per_strategy_and_divides_by_cache_aside() {
        let rounds = vec![
            vec![
                run("cache-aside", 20.0, 40.0, 1.2),
                run("loadlock", 22.0, 38.0, 1.0),
            ],
            vec![
                run("loadlock", 30.0, 90.0, 1.0),
                run("cache-aside", 24.0, 50.0, 1.3),
            ],
            vec![
                run("cache-aside", 22.0, 45.0, 1.25),
                run("loadlock", 21.0, 44.0, 1.001),
            ],
        ];
        let summaries = summarize(&rounds);
        let names: Vec<&str> = summaries.iter().map(|s| s.name).collect();
        assert_eq!(names, ["cache-aside", "loadlock"]);
        let (base, loadlock) = (&summaries[0], &summaries[1]);
        assert_eq!((base.rounds, base.p50_ms, base.p99_ms), (3, 22.0, 45.0));
        assert_eq!((loadlock.p50_ms, loadlock.p99_ms), (22.0, 44.0));
        assert_eq!((loadlock.wall_s, loadlock.provider_calls), (2.2, 22.0));
        // The worst round's duplicates, not the median's.
        assert_eq!(loadlock.duplicate_ratio, 1.001);
        assert_eq!(base.duplicate_ratio, 1.3);
        assert_eq!(loadlock.p50_vs_cache_aside, Some(1.0));
        assert_eq!(loadlock.p99_vs_cache_aside, Some(44.0 / 45.0));
        assert_eq!(base.p50_vs_cache_aside, Some(1.0));
    }

    #[test]
    fn without_cache_aside_there_are_no_ratios() {
        let summaries = summarize(&[vec![run("loadlock", 22.0, 38.0, 1.0)]]);
        assert_eq!(summaries[0].p50_vs_cache_aside, None);
        assert_eq!(summaries[0].rounds, 1);
    }
}
