//! The per-workload answer: for each family, the cheapest configuration whose validation
//! metric is within `tolerance` of full data (else the best one, marked), how much learning
//! compute it saves against the reference, and how its test metric compares with the
//! reference and with random selection at equal compute, seed by seed. Decisions are made on
//! the validation period and figures reported on the test period, so the choice does not
//! flatter its own numbers. Also the frontier: every configuration's compute and test metric.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};

use super::grid::{self, Config};
use super::results::{RunRecord, Status, csv_field};
use super::{Experiment, Metric};

/// Mean and sample standard deviation (n − 1; NaN below 2 values) of the finite values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeanSd {
    pub mean: f64,
    pub sd: f64,
    pub n: usize,
}

impl MeanSd {
    pub fn of(values: impl IntoIterator<Item = f64>) -> MeanSd {
        let v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        let n = v.len();
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n as f64 - 1.0);
        MeanSd {
            mean: if n > 0 { mean } else { f64::NAN },
            sd: if n > 1 { var.sqrt() } else { f64::NAN },
            n,
        }
    }
}

/// Ok runs of one configuration by seed (failed and diverged runs never enter an average).
pub type BySeed = BTreeMap<u64, RunRecord>;

/// `f(a, b)` over the seeds where both configurations have an ok run.
pub fn paired(a: &BySeed, b: &BySeed, f: impl Fn(&RunRecord, &RunRecord) -> f64) -> MeanSd {
    MeanSd::of(a.iter().filter_map(|(s, x)| b.get(s).map(|y| f(x, y))))
}

/// One configuration over its seeds.
#[derive(Debug, Clone)]
pub struct ConfigStats {
    pub validation: f64,
    pub test: MeanSd,
    /// Mean learning compute (FLOPs, else CPU seconds).
    pub compute: f64,
    /// Learning compute / the reference's, seed-paired.
    pub fraction: MeanSd,
    /// Every seed the reference finished, this configuration finished too. Why: a mean over
    /// the seeds that survived drops the hard ones, so a configuration that failed or
    /// diverged on one cannot be "as good as full data".
    pub complete: bool,
}

fn stats(runs: &BySeed, reference: &BySeed) -> ConfigStats {
    // Validation, which the pick compares with the reference's, over the reference's seeds
    // only: a seed the reference failed on must not weigh on one side alone.
    let shared = runs.iter().filter(|(s, _)| reference.contains_key(s));
    ConfigStats {
        complete: !runs.is_empty() && reference.keys().all(|s| runs.contains_key(s)),
        validation: MeanSd::of(shared.map(|(_, r)| r.validation)).mean,
        test: MeanSd::of(runs.values().map(|r| r.test)),
        compute: MeanSd::of(runs.values().map(RunRecord::compute)).mean,
        fraction: paired(runs, reference, |p, r| p.compute() / r.compute()),
    }
}

/// The family's pick among `candidates`: the least mean compute among those, complete on
/// the reference's seeds, whose mean validation metric is worse than the reference's by at
/// most `tolerance`; if none, the best validation metric, among the complete ones if any is
/// (a configuration that failed its hardest seeds must not look best on the rest). Returns
/// (configuration, qualified).
pub fn choose(
    metric: Metric,
    tolerance: f64,
    reference: f64,
    candidates: &[(usize, &ConfigStats)],
) -> Option<(usize, bool)> {
    let valid = candidates.iter().filter(|(_, s)| s.validation.is_finite());
    let qualified = valid
        .clone()
        .filter(|(_, s)| s.complete && metric.worse_by(s.validation, reference) <= tolerance);
    if let Some((i, _)) = qualified.min_by(|a, b| a.1.compute.total_cmp(&b.1.compute)) {
        return Some((*i, true));
    }
    let sign = if metric.higher_is_better() { -1.0 } else { 1.0 };
    let by_validation = |a: &&(usize, &ConfigStats), b: &&(usize, &ConfigStats)| {
        (sign * a.1.validation).total_cmp(&(sign * b.1.validation))
    };
    let best = (valid
        .clone()
        .filter(|(_, s)| s.complete)
        .min_by(by_validation))
    .or_else(|| valid.min_by(by_validation));
    best.map(|(i, _)| (*i, false))
}

const PAIRED_KEYS: [&str; 5] = [
    "selection.keep",
    "selection.unit",
    "buffer.replay_ratio",
    "training.micro_batch",
    "training.steps_per_batch",
];

/// How far (relative) the mean learning compute of the random configuration with the same
/// settings may be from the chosen one's and still be its partner. Why: a policy that scores
/// by backward passes, or adapts its replay, trains the rows random trains at other compute
/// (Milan's surprise-exact: 0.864 of the reference against random's 0.956 at its settings).
pub const SAME_SETTINGS_GAP: f64 = 0.05;

/// Random at equal compute: the random configuration with the same keep, selection unit,
/// replay ratio, micro-batch and steps per micro-batch (a value a configuration leaves unset
/// matches only an unset one) when its mean learning compute is within
/// [`SAME_SETTINGS_GAP`] of the chosen one's, else the one with the nearest mean learning
/// compute.
pub fn random_for(configs: &[Config], stats: &[ConfigStats], chosen: usize) -> Option<usize> {
    // Those that finished every seed the reference did; any that finished some only if
    // none did (a partner missing seeds pairs on fewer: `random_pairs` says how many).
    let finished = |complete: bool| -> Vec<usize> {
        (0..configs.len())
            .filter(|&i| configs[i].family == grid::RANDOM && stats[i].test.n > 0)
            .filter(|&i| !complete || stats[i].complete)
            .collect()
    };
    let randoms = match finished(true) {
        r if r.is_empty() => finished(false),
        r => r,
    };
    let c = &configs[chosen];
    let same = |&&i: &&usize| {
        PAIRED_KEYS
            .iter()
            .all(|k| grid::same_value(c.value(k).as_deref(), configs[i].value(k).as_deref()))
    };
    let gap = |i: usize| (stats[i].compute - stats[chosen].compute).abs();
    let near = |i: usize| gap(i) <= SAME_SETTINGS_GAP * stats[chosen].compute.abs();
    if let Some(&i) = randoms.iter().find(same).filter(|&&i| near(i)) {
        return Some(i);
    }
    randoms
        .into_iter()
        .min_by(|&a, &b| gap(a).total_cmp(&gap(b)))
}

/// How far (relative) the random partner's compute may be from the policy's for a win or a
/// loss to be told as such either way. Beyond it a win counts only against a random that
/// spent more, a loss only against one that spent less.
pub const VERDICT_COMPUTE_GAP: f64 = 0.10;

/// "beats random" when the paired difference is better by more than 2 sd, "loses" when worse
/// by more than 2 sd; `ratio` is the partner's compute over the policy's. A win over a random
/// that spent much less (or a loss to one that spent much more) says nothing about equal
/// compute: "n/a (unequal compute)".
pub fn verdict(metric: Metric, delta: &MeanSd, ratio: f64) -> &'static str {
    if delta.n == 0 {
        return "n/a";
    }
    if delta.n < 2 {
        return "n/a (one seed)";
    }
    let gain = if metric.higher_is_better() {
        delta.mean
    } else {
        -delta.mean
    };
    let (cheaper, dearer) = (
        ratio < 1.0 - VERDICT_COMPUTE_GAP,
        ratio > 1.0 + VERDICT_COMPUTE_GAP,
    );
    if gain > 2.0 * delta.sd {
        if cheaper {
            "n/a (unequal compute)"
        } else {
            "beats random"
        }
    } else if gain < -2.0 * delta.sd {
        if dearer {
            "n/a (unequal compute)"
        } else {
            "loses"
        }
    } else {
        "tie"
    }
}

/// One line of the summary.
#[derive(Debug, Clone)]
pub struct FamilyRow {
    pub family: String,
    pub chosen: usize,
    /// Within tolerance of the reference on validation (else: the best-validation fallback).
    pub qualified: bool,
    pub saved_flops: MeanSd,
    pub saved_backward: MeanSd,
    pub saved_cpu: MeanSd,
    /// Test metric vs the reference, %.
    pub delta_reference: MeanSd,
    pub random: Option<usize>,
    /// Test metric vs random at equal compute, %.
    pub delta_random: MeanSd,
    pub verdict: String,
}

/// Everything the summary, the frontier and the plots need.
#[derive(Debug, Clone)]
pub struct Summary {
    pub name: String,
    pub metric: Metric,
    pub tolerance: f64,
    pub seeds: Vec<u64>,
    /// Every ok report had validation/test periods, and a compute section.
    pub periods: bool,
    pub has_compute: bool,
    pub counts: [usize; 3],
    pub by_config: Vec<BySeed>,
    pub stats: Vec<ConfigStats>,
    pub rows: Vec<FamilyRow>,
}

fn saving(f: impl Fn(&RunRecord) -> Option<f64>) -> impl Fn(&RunRecord, &RunRecord) -> f64 {
    move |p, r| 1.0 - f(p).unwrap_or(f64::NAN) / f(r).unwrap_or(f64::NAN)
}

/// `field` of the first run against the second's, in percent.
pub fn relative(field: fn(&RunRecord) -> f64) -> impl Fn(&RunRecord, &RunRecord) -> f64 {
    move |p, r| 100.0 * (field(p) - field(r)) / field(r).abs()
}

fn family_row(
    s: &Summary,
    configs: &[Config],
    family: &str,
    chosen: usize,
    qualified: bool,
) -> FamilyRow {
    let (runs, reference) = (&s.by_config[chosen], &s.by_config[0]);
    let random = (family != grid::RANDOM && chosen != 0)
        .then(|| random_for(configs, &s.stats, chosen))
        .flatten();
    let delta_random = random.map_or(MeanSd::of([]), |r| {
        paired(runs, &s.by_config[r], relative(|x| x.test))
    });
    let verdict = match random {
        Some(r) => verdict(s.metric, &delta_random, s.compute_ratio(chosen, r)).to_string(),
        None if family == grid::RANDOM || chosen == 0 => "baseline".to_string(),
        None => "no random family".to_string(),
    };
    FamilyRow {
        family: family.to_string(),
        chosen,
        qualified,
        saved_flops: paired(runs, reference, saving(|r| r.learn_flops)),
        saved_backward: paired(runs, reference, saving(|r| r.rows_backward)),
        saved_cpu: paired(runs, reference, saving(|r| r.learn_cpu_s)),
        delta_reference: paired(runs, reference, relative(|x| x.test)),
        random,
        delta_random,
        verdict,
    }
}

fn families(configs: &[Config]) -> Vec<&str> {
    let mut names: Vec<&str> = Vec::new();
    for c in configs.iter().skip(1) {
        if !names.contains(&c.family.as_str()) {
            names.push(&c.family);
        }
    }
    names
}

/// Chooses per family and compares (configuration 0 is the reference).
pub fn summarize(exp: &Experiment, configs: &[Config], records: &[RunRecord]) -> Summary {
    let mut by_config: Vec<BySeed> = vec![BySeed::new(); configs.len()];
    let mut counts = [0; 3];
    for r in records {
        counts[r.status as usize] += 1;
        if r.status == Status::Ok {
            by_config[r.config].insert(r.seed, r.clone());
        }
    }
    let ok = || records.iter().filter(|r| r.ok());
    let stats = by_config.iter().map(|b| stats(b, &by_config[0])).collect();
    let mut s = Summary {
        name: exp.name.clone(),
        metric: exp.metric,
        tolerance: exp.tolerance,
        seeds: exp.seeds.clone(),
        periods: ok().all(|r| r.periods),
        has_compute: ok().all(|r| r.has_compute),
        counts,
        by_config,
        stats,
        rows: vec![],
    };
    let reference = s.stats[0].validation;
    let mut rows = vec![family_row(&s, configs, grid::REFERENCE, 0, true)];
    for family in families(configs) {
        let candidates: Vec<(usize, &ConfigStats)> = (0..configs.len())
            .filter(|&i| configs[i].family == family)
            .map(|i| (i, &s.stats[i]))
            .collect();
        if let Some((chosen, qualified)) = choose(exp.metric, exp.tolerance, reference, &candidates)
        {
            rows.push(family_row(&s, configs, family, chosen, qualified));
        }
    }
    s.rows = rows;
    s
}

/// `+m ± sd` (a paired Δ in percent), `n/a` without values.
pub fn pct(m: &MeanSd) -> String {
    match (m.n, m.sd.is_finite()) {
        (0, _) => "n/a".into(),
        (_, true) => format!("{:+.2} ± {:.2}", m.mean, m.sd),
        (_, false) => format!("{:+.2}", m.mean),
    }
}

fn saved(m: &MeanSd) -> String {
    if m.n == 0 {
        "n/a".into()
    } else {
        format!("{:.1}%", 100.0 * m.mean)
    }
}

fn value(m: &MeanSd) -> String {
    match (m.n, m.sd.is_finite()) {
        (0, _) => "n/a".into(),
        (_, true) => format!("{:.4} ± {:.4}", m.mean, m.sd),
        (_, false) => format!("{:.4}", m.mean),
    }
}

impl Summary {
    pub fn header(&self) -> Vec<String> {
        let dir = if self.metric.higher_is_better() {
            "higher"
        } else {
            "lower"
        };
        let mut h = vec![format!(
            "experiment {}: test {} ({dir} is better), seeds {:?}; a configuration qualifies when its validation metric is at most {}% worse than the reference's",
            self.name,
            self.metric.label(),
            self.seeds,
            100.0 * self.tolerance
        )];
        h.push(format!(
            "runs: {} ok, {} failed, {} diverged (failed and diverged runs enter no average)",
            self.counts[0], self.counts[1], self.counts[2]
        ));
        if !self.periods {
            h.push("reports have no validation/test periods: decisions and figures both use the whole-stream metric".into());
        }
        if !self.has_compute {
            h.push("reports have no compute section: learning compute is process CPU seconds (FLOPs n/a), back-propagated rows are the report's `backpropagated`".into());
        }
        h
    }

    /// The random partner's mean learning compute over the chosen configuration's.
    /// The random partner's mean learning compute over the chosen configuration's.
    pub fn compute_ratio(&self, chosen: usize, random: usize) -> f64 {
        self.stats[random].compute / self.stats[chosen].compute
    }

    fn chosen_label(&self, configs: &[Config], row: &FamilyRow) -> String {
        let mark = if row.qualified {
            ""
        } else {
            " [none within tolerance: best validation]"
        };
        format!("{}{mark}", configs[row.chosen].label)
    }

    /// The family table, then the frontier, as printed.
    pub fn render(&self, configs: &[Config]) -> String {
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        t.set_header(vec![
            "family".to_string(),
            "chosen configuration".into(),
            format!("test {} (mean ± sd)", self.metric.key()),
            "saved FLOPs".into(),
            "saved backprop rows".into(),
            "saved learn CPU".into(),
            "Δ vs reference %".into(),
            "random at equal compute".into(),
            "Δ vs random %".into(),
            "verdict".into(),
        ]);
        for r in &self.rows {
            t.add_row(vec![
                r.family.clone(),
                self.chosen_label(configs, r),
                value(&self.stats[r.chosen].test),
                saved(&r.saved_flops),
                saved(&r.saved_backward),
                saved(&r.saved_cpu),
                pct(&r.delta_reference),
                r.random.map_or("—".into(), |i| {
                    format!(
                        "{} (compute ×{:.2})",
                        configs[i].label,
                        self.compute_ratio(r.chosen, i)
                    )
                }),
                pct(&r.delta_random),
                r.verdict.clone(),
            ]);
        }
        format!(
            "{}\n{t}\nfrontier (every configuration):\n{}\n",
            self.header().join("\n"),
            self.frontier_table(configs)
        )
    }

    fn frontier_table(&self, configs: &[Config]) -> Table {
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        t.set_header(vec![
            "configuration".to_string(),
            "seeds ok".into(),
            "compute / reference".into(),
            format!("test {}", self.metric.key()),
            format!("validation {}", self.metric.key()),
        ]);
        for (c, s) in configs.iter().zip(&self.stats) {
            t.add_row(vec![
                c.label.clone(),
                s.test.n.to_string(),
                value(&s.fraction),
                value(&s.test),
                format!("{:.4}", s.validation),
            ]);
        }
        t
    }

    /// `summary.csv` and `frontier.csv` in `out`.
    pub fn write(&self, out: &Path, configs: &[Config]) -> Result<()> {
        let mut text = String::from(
            "family,chosen_label,within_tolerance,seeds,test_mean,test_sd,saved_flops,saved_rows_backward,saved_learn_cpu,delta_reference_pct_mean,delta_reference_pct_sd,random_at_equal_compute,delta_random_pct_mean,delta_random_pct_sd,verdict,random_compute_ratio,random_pairs\n",
        );
        for r in &self.rows {
            let t = &self.stats[r.chosen].test;
            let random = r.random.map_or(String::new(), |i| configs[i].label.clone());
            let f = [
                t.mean,
                t.sd,
                r.saved_flops.mean,
                r.saved_backward.mean,
                r.saved_cpu.mean,
                r.delta_reference.mean,
                r.delta_reference.sd,
            ];
            let f: Vec<String> = f.iter().map(|x| num(*x)).collect();
            let line = [
                csv_field(&r.family),
                csv_field(&configs[r.chosen].label),
                r.qualified.to_string(),
                t.n.to_string(),
                f.join(","),
                csv_field(&random),
                num(r.delta_random.mean),
                num(r.delta_random.sd),
                csv_field(&r.verdict),
                r.random
                    .map_or(String::new(), |i| num(self.compute_ratio(r.chosen, i))),
                r.delta_random.n.to_string(),
            ];
            text.push_str(&line.join(","));
            text.push('\n');
        }
        write_file(&out.join("summary.csv"), &text)?;
        let mut text = String::from(
            "family,label,seeds,compute_fraction_mean,compute_fraction_sd,compute_mean,test_mean,test_sd,validation_mean\n",
        );
        for (c, s) in configs.iter().zip(&self.stats) {
            let f = [
                s.fraction.mean,
                s.fraction.sd,
                s.compute,
                s.test.mean,
                s.test.sd,
                s.validation,
            ]
            .map(num);
            text.push_str(&format!(
                "{},{},{},{}\n",
                csv_field(&c.family),
                csv_field(&c.label),
                s.test.n,
                f.join(",")
            ));
        }
        write_file(&out.join("frontier.csv"), &text)
    }
}

pub fn num(x: f64) -> String {
    if x.is_finite() {
        x.to_string()
    } else {
        String::new()
    }
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::grid::expand;
    use std::path::Path;

    /// An experiment of three seeds, reference keep 1.0, with these two families' axes.
    fn exp_with(random_axes: &str, exact_axes: &str) -> Experiment {
        let text = format!(
            r#"
name = "t"
pipeline = "p.toml"
metric = "mae"
seeds = [1, 2, 3]
[reference]
set = ["selection.keep=1.0"]
[[family]]
name = "random"
axes = {{ {random_axes} }}
[[family]]
name = "exact"
axes = {{ {exact_axes} }}
"#
        );
        crate::experiment::parse(&text, Path::new("e.toml")).unwrap()
    }

    fn exp(random_keep: &str) -> Experiment {
        exp_with(
            &format!(r#""selection.keep" = {random_keep}"#),
            r#""selection.keep" = [0.5, 0.7, 0.9]"#,
        )
    }

    /// Runs of configuration `config` with test = validation = metric + seed noise.
    fn runs(config: usize, metric: f64, flops: f64) -> Vec<RunRecord> {
        (1..=3)
            .map(|seed| RunRecord {
                config,
                seed,
                validation: metric + seed as f64 * 0.01,
                test: metric + seed as f64 * 0.01,
                whole: metric,
                learn_flops: Some(flops),
                rows_backward: Some(flops / 10.0),
                learn_cpu_s: Some(flops / 1000.0),
                ..Default::default()
            })
            .collect()
    }

    /// reference 100 @ 1000 FLOPs; random keep 0.5/0.9 (configs 1, 2); exact 0.5/0.7/0.9 (3, 4, 5).
    fn records(exact: [f64; 3]) -> Vec<RunRecord> {
        let mut r = runs(0, 100.0, 1000.0);
        r.extend(runs(1, 103.0, 500.0));
        r.extend(runs(2, 100.5, 900.0));
        for (i, m) in exact.into_iter().enumerate() {
            r.extend(runs(3 + i, m, 500.0 + 200.0 * i as f64));
        }
        r
    }

    #[test]
    fn the_cheapest_configuration_within_tolerance_is_chosen_and_paired_with_random() {
        let e = exp("[0.5, 0.9]");
        let c = expand(&e).unwrap();
        // exact keep 0.5 is 2% worse (out), 0.7 is 0.5% worse (in, cheaper than 0.9).
        let s = summarize(&e, &c, &records([102.0, 100.5, 100.0]));
        let exact = s.rows.iter().find(|r| r.family == "exact").unwrap();
        assert_eq!(c[exact.chosen].label, "exact/selection.keep=0.7");
        assert!(exact.qualified);
        assert!((exact.saved_flops.mean - 0.3).abs() < 1e-12);
        assert!((exact.saved_backward.mean - 0.3).abs() < 1e-12);
        // No random configuration with keep 0.7: the nearest in compute (both 200 FLOPs
        // away: the first).
        assert_eq!(c[exact.random.unwrap()].label, "random/selection.keep=0.5");
        let random = s.rows.iter().find(|r| r.family == "random").unwrap();
        assert_eq!(c[random.chosen].label, "random/selection.keep=0.9");
        assert_eq!(random.verdict, "baseline");
        assert_eq!(s.rows[0].family, "reference");
        assert!((s.stats[4].fraction.mean - 0.7).abs() < 1e-12);
    }

    /// With no configuration within tolerance, the best validation among the complete ones
    /// is picked: one that failed its hardest seed looks best on the rest, and is not.
    #[test]
    fn the_fallback_pick_prefers_a_configuration_that_finished_every_seed() {
        let one = |validation: f64, complete: bool| ConfigStats {
            validation,
            test: MeanSd::of([validation]),
            compute: 1.0,
            fraction: MeanSd::of([1.0]),
            complete,
        };
        let (failed, finished) = (one(104.0, false), one(106.0, true));
        let picked = choose(Metric::Mae, 0.01, 100.0, &[(1, &failed), (2, &finished)]);
        assert_eq!(picked, Some((2, false)));
        // Only incomplete ones: the best of them, unqualified.
        assert_eq!(
            choose(Metric::Mae, 0.01, 100.0, &[(1, &failed)]),
            Some((1, false))
        );
    }

    /// Configs: reference; random keep 0.5 and 0.7 at `random_flops`; exact keep 0.5, 0.7
    /// and 0.9 at 500, 700 and 900 FLOPs (0.7 is chosen: 0.5 is 2% worse).
    fn paired_with(random_flops: [f64; 2]) -> (Vec<Config>, Summary) {
        let e = exp("[0.5, 0.7]");
        let c = expand(&e).unwrap();
        let mut r = runs(0, 100.0, 1000.0);
        r.extend(runs(1, 103.0, random_flops[0]));
        r.extend(runs(2, 100.5, random_flops[1]));
        for (i, m) in [102.0, 100.5, 100.0].into_iter().enumerate() {
            r.extend(runs(3 + i, m, 500.0 + 200.0 * i as f64));
        }
        let s = summarize(&e, &c, &r);
        (c, s)
    }

    #[test]
    fn random_at_equal_compute_has_the_same_keep_when_its_compute_is_near() {
        // Random keep 0.5 costs exactly the chosen 700 FLOPs, but keep 0.7 (720) is within 5%.
        let (c, s) = paired_with([700.0, 720.0]);
        let exact = s.rows.iter().find(|r| r.family == "exact").unwrap();
        assert_eq!(c[exact.chosen].label, "exact/selection.keep=0.7");
        assert_eq!(c[exact.random.unwrap()].label, "random/selection.keep=0.7");
        // Same per-seed noise: the paired difference is exactly 0 → tie.
        assert!(exact.delta_random.mean.abs() < 1e-12);
        assert_eq!(exact.verdict, "tie");
        assert!(
            s.render(&c)
                .contains("random/selection.keep=0.7 (compute ×1.03)")
        );
    }

    /// Qualifying compares validation means over the same seeds: a seed the reference
    /// failed on (here a hard one, 10% worse everywhere) leaves every configuration's mean.
    #[test]
    fn qualifying_compares_validation_over_the_reference_seeds() {
        let e = exp("[0.5, 0.9]");
        let c = expand(&e).unwrap();
        let mut r = records([102.0, 100.5, 100.0]);
        for x in r.iter_mut().filter(|x| x.seed == 3) {
            x.validation *= 1.1;
        }
        r.iter_mut()
            .find(|x| x.config == 0 && x.seed == 3)
            .unwrap()
            .status = Status::Failed;
        let s = summarize(&e, &c, &r);
        let exact = s.rows.iter().find(|r| r.family == "exact").unwrap();
        // Over seeds 1-2, exact keep 0.7 is 0.5% worse than the reference: within 1%.
        assert_eq!(c[exact.chosen].label, "exact/selection.keep=0.7");
        assert!(exact.qualified);
    }

    /// A random configuration that failed on a seed pairs on fewer seeds: one that finished
    /// every seed is preferred, and the summary says how many pairs a verdict rests on.
    #[test]
    fn random_at_equal_compute_finished_every_seed() {
        let e = exp("[0.5, 0.7]");
        let c = expand(&e).unwrap();
        let mut r = runs(0, 100.0, 1000.0);
        r.extend(runs(1, 103.0, 690.0));
        r.extend(runs(2, 100.5, 700.0));
        for (i, m) in [102.0, 100.5, 100.0].into_iter().enumerate() {
            r.extend(runs(3 + i, m, 500.0 + 200.0 * i as f64));
        }
        let failed = r.iter_mut().find(|r| r.config == 2 && r.seed == 2).unwrap();
        failed.status = Status::Failed;
        let s = summarize(&e, &c, &r);
        let exact = s.rows.iter().find(|r| r.family == "exact").unwrap();
        assert_eq!(c[exact.random.unwrap()].label, "random/selection.keep=0.5");
        assert_eq!(exact.delta_random.n, 3);
        let dir = tempfile::tempdir().unwrap();
        s.write(dir.path(), &c).unwrap();
        let text = std::fs::read_to_string(dir.path().join("summary.csv")).unwrap();
        assert!(
            text.lines().next().unwrap().ends_with(",random_pairs"),
            "{text}"
        );
    }

    /// A policy whose scoring costs (or whose replay adapts) trains the rows random trains at
    /// other compute: beyond 5% apart, the random configuration nearest in compute partners.
    #[test]
    fn random_at_the_same_settings_but_other_compute_gives_way_to_the_nearest() {
        let (c, s) = paired_with([690.0, 900.0]);
        let exact = s.rows.iter().find(|r| r.family == "exact").unwrap();
        assert_eq!(c[exact.random.unwrap()].label, "random/selection.keep=0.5");
        assert!(
            s.render(&c)
                .contains("random/selection.keep=0.5 (compute ×0.99)")
        );
    }

    #[test]
    fn random_at_equal_compute_also_has_the_same_micro_batch() {
        let e = exp_with(
            r#""training.micro_batch" = [8, 11], "selection.keep" = [0.7]"#,
            r#""training.micro_batch" = [11], "selection.keep" = [0.7]"#,
        );
        let c = expand(&e).unwrap();
        // Configs: reference, random mb 8, random mb 11, exact mb 11; the mb-8 random one is
        // nearer in compute, but only the mb-11 one has the same steps (and is within 5%).
        let mut r = runs(0, 100.0, 1000.0);
        r.extend(runs(1, 100.0, 700.0));
        r.extend(runs(2, 100.0, 680.0));
        r.extend(runs(3, 100.0, 700.0));
        let s = summarize(&e, &c, &r);
        let exact = s.rows.iter().find(|r| r.family == "exact").unwrap();
        assert_eq!(
            c[exact.random.unwrap()].label,
            "random/selection.keep=0.7,training.micro_batch=11"
        );
    }

    #[test]
    fn when_none_qualifies_the_best_validation_is_chosen_and_marked() {
        let e = exp("[0.5, 0.9]");
        let c = expand(&e).unwrap();
        let s = summarize(&e, &c, &records([110.0, 104.0, 107.0]));
        let exact = s.rows.iter().find(|r| r.family == "exact").unwrap();
        assert_eq!(c[exact.chosen].label, "exact/selection.keep=0.7");
        assert!(!exact.qualified);
        assert!(
            s.render(&c)
                .contains("[none within tolerance: best validation]")
        );
    }

    /// A diverged run enters no average, and its configuration cannot qualify: a mean over
    /// the seeds it survived would leave the hard one out.
    #[test]
    fn a_diverged_run_enters_no_average() {
        let e = exp("[0.5, 0.9]");
        let c = expand(&e).unwrap();
        let mut r = records([102.0, 100.5, 100.0]);
        let bad = r.iter_mut().find(|r| r.config == 4 && r.seed == 2).unwrap();
        bad.status = Status::Diverged;
        bad.validation = f64::NAN;
        bad.test = f64::INFINITY;
        let s = summarize(&e, &c, &r);
        assert_eq!(s.counts, [17, 0, 1]);
        assert_eq!(s.stats[4].test.n, 2);
        assert!(s.stats[4].test.mean.is_finite());
        assert!(!s.stats[4].complete && s.stats[5].complete);
        // keep 0.7 (config 4) was the pick with every seed; now keep 0.9, on three seeds.
        let exact = s.rows.iter().find(|r| r.family == "exact").unwrap();
        assert_eq!(c[exact.chosen].label, "exact/selection.keep=0.9");
        assert!(exact.qualified);
        assert_eq!(exact.delta_reference.n, 3);
    }

    #[test]
    fn verdicts_need_more_than_two_paired_sd() {
        let d = |mean, sd| MeanSd { mean, sd, n: 3 };
        assert_eq!(verdict(Metric::Mae, &d(-1.0, 0.4), 1.0), "beats random");
        assert_eq!(verdict(Metric::Mae, &d(1.0, 0.4), 1.0), "loses");
        assert_eq!(verdict(Metric::Mae, &d(-1.0, 0.6), 1.0), "tie");
        assert_eq!(verdict(Metric::Top1, &d(1.0, 0.4), 1.0), "beats random");
        // A win over a random at 60% of the compute, a loss to one at 150%: no verdict; the
        // other way round, the verdict stands (it holds at equal compute a fortiori).
        let unequal = "n/a (unequal compute)";
        assert_eq!(verdict(Metric::Mae, &d(-1.0, 0.4), 0.6), unequal);
        assert_eq!(verdict(Metric::Mae, &d(1.0, 0.4), 1.5), unequal);
        assert_eq!(verdict(Metric::Mae, &d(-1.0, 0.4), 1.5), "beats random");
        assert_eq!(verdict(Metric::Mae, &d(1.0, 0.4), 0.6), "loses");
        assert_eq!(verdict(Metric::Mae, &d(-1.0, 0.4), 0.95), "beats random");
        let one = MeanSd::of([-5.0]);
        assert_eq!(verdict(Metric::Mae, &one, 1.0), "n/a (one seed)");
        let m = MeanSd::of([1.0, 2.0, 3.0, f64::NAN]);
        assert_eq!((m.mean, m.sd, m.n), (2.0, 1.0, 3));
    }
}
