//! Runs the grid: each run is a `gradsift run` subprocess of this very binary, at most `jobs`
//! at once (plain threads over a shared counter), with a progress bar. Subprocesses rather
//! than in-process pipelines because a run owns process-wide state (the metrics recorder,
//! the CPU-time and energy meters) and a crash or divergence must cost one run, not the
//! experiment. A run whose `report.json` already parses is reused (resumable) unless fresh,
//! and only if it was made from the same inputs: the binary, the pipeline file and its schema
//! file, and the run's arguments (their CRC-32 is kept beside the report in `inputs.crc`). A
//! run of an older build or pipeline is run again, never mixed in.

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

/// The CRC-32 of everything a run's result depends on besides its arguments and its
/// archive: the running binary, the pipeline file and the schema file it names (resolved as
/// a run resolves it).
pub fn inputs_crc(bin: &Path, pipeline: &Path) -> anyhow::Result<u32> {
    use anyhow::Context;
    let mut h = crc32fast::Hasher::new();
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    h.update(&read(bin)?);
    h.update(&read(pipeline)?);
    let cfg = crate::config::PipelineConfig::load(pipeline, &[])?;
    h.update(&read(&cfg.schema)?);
    Ok(h.finalize())
}

/// The CRC-32 of what a run reads under its own overrides (an experiment may point
/// `source.path` or `schema` elsewhere): the schema file's bytes, and each archive file with
/// its length and modification time. Why: a folder or a pattern gains, loses or rewrites
/// files without the pipeline changing, and an overridden schema is not the one
/// [`inputs_crc`] read. A source that cannot be listed hashes as such (its run fails, and a
/// failed run is never reused).
fn archive_crc(pipeline: &Path, overrides: &[String]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let files = crate::config::PipelineConfig::load(pipeline, overrides).and_then(|cfg| {
        h.update(&std::fs::read(&cfg.schema)?);
        let crate::source::SourceConfig::Parquet(src) = &cfg.source else {
            return Ok(Vec::new());
        };
        src.files(&crate::schema::Schema::load(&cfg.schema)?)
    });
    match files {
        Ok(files) => {
            for f in files {
                let meta = std::fs::metadata(&f).ok();
                let modified = (meta.as_ref())
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
                h.update(f.as_os_str().as_encoded_bytes());
                h.update(&meta.map_or(0, |m| m.len()).to_le_bytes());
                h.update(&modified.map_or(0, |d| d.as_nanos()).to_le_bytes());
            }
        }
        Err(_) => h.update(b"unlisted"),
    }
    h.finalize()
}

/// This run's inputs: the base CRC and its arguments.
fn run_crc(inv: Invocation<'_>, config: &Config, run: &Run) -> String {
    let mut h = crc32fast::Hasher::new_with_initial(inv.inputs);
    h.update(&archive_crc(inv.pipeline, &config.overrides).to_le_bytes());
    for a in command_args(inv.mode, inv.pipeline, config, run) {
        h.update(a.as_encoded_bytes());
        h.update(&[0]);
    }
    format!("{:08x}\n", h.finalize())
}

/// A report left by an earlier invocation, if it parses and its run was not cut short.
pub fn previous(dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("report.json")).ok()?;
    let report: serde_json::Value = serde_json::from_str(&text).ok()?;
    let interrupted = report
        .get("interrupted")
        .and_then(serde_json::Value::as_bool);
    (interrupted != Some(true)).then_some(report)
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
    /// [`inputs_crc`] of this binary and pipeline.
    pub inputs: u32,
}

fn run_one(inv: Invocation<'_>, config: &Config, run: &Run, fresh: bool) -> Outcome {
    let bin = inv.bin;
    let crc = run_crc(inv, config, run);
    let same_inputs = std::fs::read_to_string(run.dir.join("inputs.crc")).is_ok_and(|c| c == crc);
    if !fresh
        && same_inputs
        && let Some(report) = previous(&run.dir)
    {
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
    if let Err(e) = std::fs::write(run.dir.join("inputs.crc"), &crc) {
        return Outcome::Failed(format!("cannot write {}: {e}", run.dir.display()));
    }
    match previous(&run.dir) {
        Some(report) => Outcome::Done {
            report,
            reused: false,
        },
        None => Outcome::Failed(format!(
            "exit 0 but no readable report.json in {} (or one of a run a shutdown signal cut short)",
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

    /// The random family at keep 0.5.
    fn keep_half() -> Config {
        Config {
            family: "random".into(),
            label: "random/selection.keep=0.5".into(),
            slug: "random__selection.keep=0.5".into(),
            axes: vec![("selection.keep".into(), "0.5".into())],
            overrides: vec!["selection.keep=0.5".into()],
        }
    }

    #[test]
    fn a_run_gets_its_overrides_then_seed_and_telemetry_off() {
        let config = keep_half();
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
    fn a_run_is_reused_only_from_the_same_inputs() {
        let config = keep_half();
        let run = |seed| Run {
            config: 0,
            seed,
            dir: PathBuf::from("o/seed"),
        };
        let inv = |inputs| Invocation {
            bin: Path::new("gradsift"),
            mode: Mode::Online,
            pipeline: Path::new("p.toml"),
            inputs,
        };
        let base = run_crc(inv(7), &config, &run(1));
        assert_eq!(base, run_crc(inv(7), &config, &run(1)));
        assert_ne!(
            base,
            run_crc(inv(8), &config, &run(1)),
            "another binary or pipeline"
        );
        assert_ne!(base, run_crc(inv(7), &config, &run(2)), "another seed");
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let pipeline = repo.join("pipelines/milan-replay.toml");
        let bin = std::env::current_exe().unwrap();
        assert_eq!(
            inputs_crc(&bin, &pipeline).unwrap(),
            inputs_crc(&bin, &pipeline).unwrap()
        );
        // A folder archive that gains a file is another input, the pipeline file unchanged,
        // also when an override points the source there.
        let dir = tempfile::tempdir().unwrap();
        let milan = repo.join("data/milan/internet_square5161.parquet");
        std::fs::copy(&milan, dir.path().join("a.parquet")).unwrap();
        let over = vec![format!(
            "source.path={:?}",
            dir.path().display().to_string()
        )];
        let one = archive_crc(&pipeline, &over);
        assert_eq!(one, archive_crc(&pipeline, &over));
        assert_ne!(one, archive_crc(&pipeline, &[]), "another archive");
        std::fs::copy(&milan, dir.path().join("b.parquet")).unwrap();
        assert_ne!(
            one,
            archive_crc(&pipeline, &over),
            "a file more in the folder"
        );
        // A schema an override names: editing it is another input too.
        let schema = dir.path().join("schema.json");
        std::fs::copy(repo.join("schemas/milan_internet.json"), &schema).unwrap();
        let over = vec![format!("schema={:?}", schema.display().to_string())];
        let before = archive_crc(&pipeline, &over);
        let text = std::fs::read_to_string(&schema).unwrap();
        std::fs::write(
            &schema,
            text.replace("\"description\": \"", "\"description\": \"edited "),
        )
        .unwrap();
        assert_ne!(before, archive_crc(&pipeline, &over), "an edited schema");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail(b"a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail(b"a", 5), "a");
    }
}
