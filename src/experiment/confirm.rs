//! `gradsift experiment --confirm N`: every family's pick, the random configuration at equal
//! compute beside it and the reference run again on N fresh seeds, and the comparison made
//! over all seeds, paired. Why: with a handful of families on five seeds, the cheapest pick
//! within tolerance, and a "beats random" verdict, are partly the luck of those seeds (the
//! default grid's clipping on Milan beat random on seeds 1-5 and not on 1-15). The picks are
//! the first stage's, made on its seeds; the verdicts read the fresh seeds alone (the first
//! stage's validation chose the pick, so its seeds lean its way), and the figures over all
//! seeds are printed beside them.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};

use super::Metric;
use super::grid::{self, Config};
use super::results::csv_field;
use super::summary::{BySeed, MeanSd, Summary, num, paired, pct, relative, verdict};

/// The configurations a confirmation runs: the reference, each family's pick and its random
/// partner.
pub fn configs(first: &Summary) -> BTreeSet<usize> {
    let mut set = BTreeSet::from([0]);
    for r in &first.rows {
        set.insert(r.chosen);
        set.extend(r.random);
    }
    set
}

/// `n` seeds after the largest one used.
pub fn fresh_seeds(seeds: &[u64], n: u64) -> Vec<u64> {
    let last = seeds.iter().copied().max().unwrap_or(0);
    (last + 1..=last + n).collect()
}

/// One family's pick over every seed.
#[derive(Debug, Clone)]
pub struct ConfirmRow {
    pub family: String,
    pub chosen: usize,
    pub random: Option<usize>,
    /// Validation and test metric vs random at equal compute, %, paired over all seeds.
    pub validation: MeanSd,
    pub test: MeanSd,
    /// The same two over the fresh seeds alone: what the verdicts read.
    pub fresh_validation: MeanSd,
    pub fresh_test: MeanSd,
    /// Seeds where the pick's test metric is better than random's, of those paired.
    pub better: usize,
    /// Test metric vs the reference, %, paired over all seeds.
    pub reference: MeanSd,
    /// Random's learning compute over the pick's (first stage).
    pub ratio: f64,
}

/// The first stage's picks, compared over every seed in `by_config` (all runs, both stages)
/// and over the `fresh` seeds alone.
pub fn rows(first: &Summary, by_config: &[BySeed], fresh: &[u64]) -> Vec<ConfirmRow> {
    let m = first.metric;
    let only_fresh = |b: &BySeed| -> BySeed {
        (b.iter())
            .filter(|(s, _)| fresh.contains(s))
            .map(|(s, r)| (*s, r.clone()))
            .collect()
    };
    first
        .rows
        .iter()
        .skip(1)
        .map(|r| {
            let (runs, reference) = (&by_config[r.chosen], &by_config[0]);
            let none = BySeed::new();
            let partner = r.random.map_or(&none, |i| &by_config[i]);
            let test = paired(runs, partner, relative(|x| x.test));
            let better = runs
                .iter()
                .filter(|(s, p)| {
                    partner
                        .get(s)
                        .is_some_and(|q| m.worse_by(p.test, q.test) < 0.0)
                })
                .count();
            let (fresh_runs, fresh_partner) = (only_fresh(runs), only_fresh(partner));
            let ratio = r
                .random
                .map_or(f64::NAN, |i| first.compute_ratio(r.chosen, i));
            ConfirmRow {
                family: r.family.clone(),
                chosen: r.chosen,
                random: r.random,
                validation: paired(runs, partner, relative(|x| x.validation)),
                test,
                fresh_validation: paired(&fresh_runs, &fresh_partner, relative(|x| x.validation)),
                fresh_test: paired(&fresh_runs, &fresh_partner, relative(|x| x.test)),
                better,
                reference: paired(runs, reference, relative(|x| x.test)),
                ratio,
            }
        })
        .collect()
}

/// The verdict on a paired Δ (see [`verdict`]); "baseline" for random itself.
fn judged(metric: Metric, row: &ConfirmRow, d: &MeanSd) -> String {
    match row.random {
        Some(_) => verdict(metric, d, row.ratio).to_string(),
        None if row.family == grid::RANDOM => "baseline".into(),
        None => "no random family".into(),
    }
}

/// The table as printed.
pub fn render(metric: Metric, rows: &[ConfirmRow], configs: &[Config], seeds: &[u64]) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec![
        "family".to_string(),
        "pick (first stage)".into(),
        "test Δ vs reference %".into(),
        "validation Δ vs random %".into(),
        "test Δ vs random %".into(),
        "fresh seeds: validation / test Δ vs random %".into(),
        "seeds better on test".into(),
        "verdict (fresh seeds): validation / test".into(),
    ]);
    for r in rows {
        t.add_row(vec![
            r.family.clone(),
            configs[r.chosen].label.clone(),
            pct(&r.reference),
            pct(&r.validation),
            pct(&r.test),
            format!("{} / {}", pct(&r.fresh_validation), pct(&r.fresh_test)),
            if r.random.is_some() {
                format!("{} of {}", r.better, r.test.n)
            } else {
                "—".into()
            },
            format!(
                "{} / {}",
                judged(metric, r, &r.fresh_validation),
                judged(metric, r, &r.fresh_test)
            ),
        ]);
    }
    format!(
        "confirmation: the picks and random at equal compute on seeds {seeds:?} (the first stage's and fresh ones), paired\n{t}\n"
    )
}

/// `confirm.csv` in `out`.
pub fn write(out: &Path, metric: Metric, rows: &[ConfirmRow], configs: &[Config]) -> Result<()> {
    let mut text = String::from(
        "family,chosen_label,random_at_equal_compute,seeds,delta_reference_pct_mean,delta_reference_pct_sd,delta_random_validation_pct_mean,delta_random_validation_pct_sd,delta_random_test_pct_mean,delta_random_test_pct_sd,seeds_better_on_test,verdict_validation,verdict_test,delta_random_validation_fresh_pct_mean,delta_random_validation_fresh_pct_sd,delta_random_test_fresh_pct_mean,delta_random_test_fresh_pct_sd,random_compute_ratio\n",
    );
    for r in rows {
        let random = r.random.map_or(String::new(), |i| configs[i].label.clone());
        let line = [
            csv_field(&r.family),
            csv_field(&configs[r.chosen].label),
            csv_field(&random),
            r.reference.n.to_string(),
            num(r.reference.mean),
            num(r.reference.sd),
            num(r.validation.mean),
            num(r.validation.sd),
            num(r.test.mean),
            num(r.test.sd),
            r.better.to_string(),
            judged(metric, r, &r.fresh_validation),
            judged(metric, r, &r.fresh_test),
            num(r.fresh_validation.mean),
            num(r.fresh_validation.sd),
            num(r.fresh_test.mean),
            num(r.fresh_test.sd),
            num(r.ratio),
        ];
        text.push_str(&line.join(","));
        text.push('\n');
    }
    let path = out.join("confirm.csv");
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Keeps the runs of the configurations in `set`.
pub fn runs_of(set: &BTreeSet<usize>, runs: Vec<grid::Run>) -> Vec<grid::Run> {
    runs.into_iter()
        .filter(|r| set.contains(&r.config))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_seeds_follow_the_largest_one() {
        assert_eq!(fresh_seeds(&[1, 2, 3, 4, 5], 3), [6, 7, 8]);
        assert_eq!(fresh_seeds(&[7, 2], 2), [8, 9]);
        assert!(fresh_seeds(&[1], 0).is_empty());
    }
}
