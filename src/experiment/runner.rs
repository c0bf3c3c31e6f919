//! Runs the grid: each run is a `gradsift run` subprocess of this very binary, at most `jobs`
//! at once (plain threads over a shared counter), with a progress bar. Subprocesses rather
//! than in-process pipelines because a run owns process-wide state (the metrics recorder,
//! the CPU-time and energy meters) and a crash or divergence must cost one run, not the
//! experiment. A run whose `report.json` already parses is reused (resumable) unless fresh.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use indicatif::{ProgressBar, ProgressStyle};

use super::Mode;
use super::grid::{Config, Run};

/// What became of one run.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Its report; `reused` when it came from an earlier invocation.
    Done {
        report: serde_json::Value,
        reused: bool,
    },
    /// Non-zero exit or unreadable report: the tail of its stderr.
    Failed(String),
}

/// The arguments of one run's `gradsift run` (or `train`, offline).
pub fn command_args(mode: Mode, pipeline: &Path, config: &Config, run: &Run) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![mode.command().into(), pipeline.into()];
    args.extend(["--quiet", "--json", "--output"].map(OsString::from));
    args.push(run.dir.clone().into());
    let sets = config.overrides.iter().cloned().chain([
        format!("training.seed={}", run.seed),
        // Parallel runs must not fight over the metrics port.
        "telemetry.enabled=false".to_string(),
    ]);
    for s in sets {
        args.push("--set".into());
        args.push(s.into());
    }
    args
}

/// A report left by an earlier invocation, if it parses.
pub fn previous(dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("report.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// The last `n` lines of a process's stderr.
pub fn tail(stderr: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What every run invokes: this binary, in the experiment's mode, on its pipeline.
#[derive(Debug, Clone, Copy)]
pub struct Invocation<'a> {
    pub bin: &'a Path,
    pub mode: Mode,
    pub pipeline: &'a Path,
}

fn run_one(inv: Invocation<'_>, config: &Config, run: &Run, fresh: bool) -> Outcome {
    let bin = inv.bin;
    if !fresh && let Some(report) = previous(&run.dir) {
        return Outcome::Done {
            report,
            reused: true,
        };
    }
    if run.dir.exists()
        && let Err(e) = std::fs::remove_dir_all(&run.dir)
    {
        return Outcome::Failed(format!("cannot clear {}: {e}", run.dir.display()));
    }
    if let Err(e) = std::fs::create_dir_all(&run.dir) {
        return Outcome::Failed(format!("cannot create {}: {e}", run.dir.display()));
    }
    let out = Command::new(bin)
        .args(command_args(inv.mode, inv.pipeline, config, run))
        .stdin(Stdio::null())
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => return Outcome::Failed(format!("cannot start {}: {e}", bin.display())),
    };
    // Best effort: the full log beside the run's outputs.
    let _ = std::fs::write(run.dir.join("stderr.log"), &out.stderr);
    if !out.status.success() {
        return Outcome::Failed(format!("{}: {}", out.status, tail(&out.stderr, 12)));
    }
    match previous(&run.dir) {
        Some(report) => Outcome::Done {
            report,
            reused: false,
        },
        None => Outcome::Failed(format!(
            "exit 0 but no readable report.json in {}",
            run.dir.display()
        )),
    }
}

fn progress(total: usize) -> ProgressBar {
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} runs [{elapsed_precise}, ETA {eta}] {msg}",
        )
        .expect("progress template")
        .progress_chars("=> "),
    );
    pb
}

/// Runs every run, at most `jobs` at once; outcomes in the order of `runs`.
pub fn run_all(
    inv: Invocation<'_>,
    configs: &[Config],
    runs: &[Run],
    jobs: usize,
    fresh: bool,
) -> Vec<Outcome> {
    let pb = progress(runs.len());
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<Option<Outcome>>> = Mutex::new(vec![None; runs.len()]);
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, runs.len().max(1)) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(run) = runs.get(i) else { break };
                    let config = &configs[run.config];
                    pb.set_message(format!("{} seed {}", config.label, run.seed));
                    let outcome = run_one(inv, config, run, fresh);
                    if let Outcome::Failed(e) = &outcome {
                        pb.println(format!(
                            "run {} seed {} failed: {}",
                            config.label,
                            run.seed,
                            e.lines().last().unwrap_or("")
                        ));
                    }
                    done.lock().expect("outcomes")[i] = Some(outcome);
                    pb.inc(1);
                }
            });
        }
    });
    pb.finish_and_clear();
    let outcomes: Vec<Outcome> = done
        .into_inner()
        .expect("outcomes")
        .into_iter()
        .map(|o| o.expect("every run ran"))
        .collect();
    let reused = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Done { reused: true, .. }))
        .count();
    eprintln!(
        "{} runs: {} run now, {} reused from an earlier invocation",
        runs.len(),
        runs.len() - reused,
        reused
    );
    outcomes
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn a_run_gets_its_overrides_then_seed_and_telemetry_off() {
        let config = Config {
            family: "random".into(),
            label: "random/selection.keep=0.5".into(),
            slug: "random__selection.keep=0.5".into(),
            axes: vec![("selection.keep".into(), "0.5".into())],
            overrides: vec!["selection.keep=0.5".into()],
        };
        let run = Run {
            config: 0,
            seed: 3,
            dir: PathBuf::from("o/seed-3"),
        };
        let args: Vec<String> = command_args(Mode::Online, Path::new("p.toml"), &config, &run)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "run",
                "p.toml",
                "--quiet",
                "--json",
                "--output",
                "o/seed-3",
                "--set",
                "selection.keep=0.5",
                "--set",
                "training.seed=3",
                "--set",
                "telemetry.enabled=false"
            ]
        );
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail(b"a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail(b"a", 5), "a");
    }
}
