//! The command line: `run` a pipeline, `train` one offline, `experiment` over a grid of runs,
//! `produce` an archive into a topic, `schema check` a file against a schema.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

use crate::config::PipelineConfig;
use crate::pipeline::{self, RunOptions};
use crate::schema::Schema;
use crate::shutdown::Shutdown;

#[derive(Parser, Debug)]
#[command(
    name = "gradsift",
    version,
    about = "Gradient-norm sample selection for streaming telecom data"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// What `run` and `train` take: a pipeline, overrides and how to show the result.
#[derive(clap::Args, Debug)]
pub struct PipelineArgs {
    /// The pipeline file (`train` needs a Parquet source; `[offline]` sets its epochs).
    pub pipeline: PathBuf,
    /// Override a setting, e.g. --set selection.keep=0.7 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Output folder (default: runs/NAME).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Print the JSON report instead of the tables.
    #[arg(long)]
    pub json: bool,
    /// Draw the windowed metric and the drift detections (`metric.png`/`.svg`).
    #[arg(long)]
    pub plot: bool,
}

impl PipelineArgs {
    /// The pipeline with its overrides and output folder applied.
    fn config(&self) -> Result<PipelineConfig> {
        let mut cfg = PipelineConfig::load(&self.pipeline, &self.overrides)?;
        if let Some(o) = &self.output {
            cfg.output.dir = Some(o.clone());
        }
        cfg.output.plot |= self.plot;
        Ok(cfg)
    }

    fn options(&self) -> RunOptions {
        RunOptions {
            progress: !self.quiet,
        }
    }

    /// Prints a report as JSON or as its rendered text.
    fn show(&self, report: &impl serde::Serialize, text: impl FnOnce() -> String) -> Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(report)?);
        } else {
            print!("{}", text());
        }
        Ok(())
    }
}

fn signal_shutdown() -> Shutdown {
    let shutdown = Shutdown::new();
    shutdown.listen_for_signals();
    shutdown
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a pipeline (pipelines/*.toml) to the end of its source.
    Run(PipelineArgs),
    /// Train offline on a Parquet archive: epochs, per-epoch selection, early stopping on the
    /// `validation` period, figures on the `test` period (the published setting).
    Train(PipelineArgs),
    /// Run a grid of pipeline configurations × seeds and compare every selection policy with
    /// full data and with random selection at equal compute (tables, CSV/Parquet, plots).
    Experiment {
        /// The experiment file (experiments/*.toml).
        #[arg(required_unless_present = "pipeline")]
        file: Option<PathBuf>,
        /// Instead of a file: the default grid on this pipeline (random rows and micro-batches,
        /// top-k by exact norm, trim, InfoBatch, clipping, at keep 0.5-1 and the pipeline's
        /// replay ratio, ⅔ and ⅓ of it), written to OUTPUT/experiment.toml and run. The
        /// pipeline needs `validation` and `test` periods.
        #[arg(long, conflicts_with = "file")]
        pipeline: Option<PathBuf>,
        /// Seeds of the default grid.
        #[arg(long, default_value_t = 5, requires = "pipeline")]
        seeds: u64,
        /// Override a pipeline key in every run: --set a.b=value (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Then run each family's pick, random at equal compute beside it and the reference
        /// on this many fresh seeds, and compare them over all seeds (confirm.csv).
        #[arg(long, default_value_t = 0)]
        confirm: u64,
        /// Output folder (default: experiments/results/NAME).
        #[arg(long)]
        output: Option<PathBuf>,
        /// Re-run runs whose report.json already exists (default: reuse them).
        #[arg(long)]
        fresh: bool,
        /// Runs at once (overrides the file's `jobs`).
        #[arg(long)]
        jobs: Option<usize>,
    },
    /// Replay a Parquet archive into a Kafka topic as JSON, keyed by the schema key.
    Produce {
        /// A file, a folder or a glob.
        path: String,
        /// The schema (names the key, the time and the columns sent).
        #[arg(long)]
        schema: PathBuf,
        #[arg(long)]
        topic: String,
        #[arg(long, default_value = "127.0.0.1:9092")]
        brokers: String,
        /// Rows per second.
        #[arg(long, conflicts_with = "speedup")]
        rate: Option<f64>,
        /// Event time runs this many times faster than wall time.
        #[arg(long)]
        speedup: Option<f64>,
        /// Stop after this many rows.
        #[arg(long)]
        max_rows: Option<u64>,
        /// librdkafka option, e.g. -X security.protocol=ssl (repeatable).
        #[arg(short = 'X', value_name = "KEY=VALUE")]
        options: Vec<String>,
        /// Payload format.
        #[arg(long, value_enum, default_value = "json")]
        format: crate::payload::PayloadFormat,
    },
    /// Draw several runs' windowed metric in one figure (e.g. without and with drift
    /// reactions), from their run folders' report.json: `gradsift plot none=runs/a
    /// forget=runs/b --output DIR`.
    Plot {
        /// LABEL=RUN_FOLDER, one per run.
        #[arg(required = true, value_name = "LABEL=DIR")]
        runs: Vec<String>,
        /// Folder for NAME.png and NAME.svg.
        #[arg(long)]
        output: PathBuf,
        #[arg(long, default_value = "compare")]
        name: String,
        #[arg(long, default_value = "prequential metric, windowed")]
        title: String,
    },
    /// Schema tools.
    Schema {
        #[command(subcommand)]
        command: SchemaCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum SchemaCommand {
    /// Check Parquet files against a schema; lists every mismatching column, exits 1 if any.
    Check {
        schema: PathBuf,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

pub async fn main(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => {
            let cfg = args.config()?;
            if cfg.telemetry.enabled {
                crate::telemetry::serve(&cfg.telemetry)?;
            }
            let report = pipeline::run(cfg, args.options(), signal_shutdown()).await?;
            args.show(&report, || report.render())
        }
        Command::Train(args) => {
            let cfg = args.config()?;
            let report = crate::offline::train(cfg, args.options(), signal_shutdown()).await?;
            args.show(&report, || report.render())
        }
        Command::Experiment {
            file,
            pipeline,
            seeds,
            sets,
            confirm,
            output,
            fresh,
            jobs,
        } => {
            let args = crate::experiment::Args {
                file,
                pipeline,
                seeds,
                sets,
                output,
                fresh,
                jobs,
                confirm,
            };
            // Blocking: threads waiting on subprocesses, off the async runtime.
            tokio::task::spawn_blocking(move || crate::experiment::run(args)).await?
        }
        Command::Produce {
            path,
            schema,
            topic,
            brokers,
            rate,
            speedup,
            max_rows,
            options,
            format,
        } => {
            let schema = std::sync::Arc::new(Schema::load(&schema)?);
            let pace =
                (rate.is_some() || speedup.is_some()).then_some(crate::source::parquet::Pace {
                    rows_per_second: rate,
                    speedup,
                });
            let args = crate::produce::ProduceArgs {
                path,
                schema,
                brokers,
                topic,
                pace,
                max_rows,
                options: key_values(&options)?,
                format,
            };
            produce(args).await
        }
        Command::Plot {
            runs,
            output,
            name,
            title,
        } => plot(&runs, &output, &name, &title),
        Command::Schema {
            command: SchemaCommand::Check { schema, files },
        } => check_schema(&schema, &files),
    }
}

/// `-X KEY=VALUE` options as pairs.
fn key_values(options: &[String]) -> Result<Vec<(String, String)>> {
    options
        .iter()
        .map(|o| {
            o.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| anyhow::anyhow!("-X takes KEY=VALUE"))
}

/// `gradsift produce`: an archive into a topic, until done or interrupted.
async fn produce(args: crate::produce::ProduceArgs) -> Result<()> {
    let shutdown = Shutdown::new();
    shutdown.listen_for_signals();
    let topic = args.topic.clone();
    let n = crate::produce::produce(args, shutdown).await?;
    println!("produced {n} messages to {topic}");
    Ok(())
}

/// `gradsift plot`: several runs' windowed metric on one chart.
fn plot(runs: &[String], output: &Path, name: &str, title: &str) -> Result<()> {
    let runs = runs
        .iter()
        .map(|r| {
            r.split_once('=')
                .map(|(l, d)| (l.to_string(), PathBuf::from(d)))
                .ok_or_else(|| anyhow::anyhow!("plot takes LABEL=RUN_FOLDER, got {r}"))
        })
        .collect::<Result<Vec<_>>>()?;
    std::fs::create_dir_all(output)?;
    let png = crate::sink::metric_plot::compare(output, name, title, &runs)?;
    println!("{}", png.display());
    Ok(())
}

/// `gradsift schema check`: each file's columns against the schema, every mismatch named.
fn check_schema(schema: &Path, files: &[PathBuf]) -> Result<()> {
    let schema = Schema::load(schema)?;
    let mut bad = 0;
    for f in files {
        let file = std::fs::File::open(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| anyhow::anyhow!("{}: not a Parquet file: {e}", f.display()))?;
        let rows = builder.metadata().file_metadata().num_rows();
        let problems = schema.mismatches(builder.schema());
        if problems.is_empty() {
            println!("{}: ok ({rows} rows, schema {})", f.display(), schema.name);
            continue;
        }
        bad += 1;
        println!(
            "{}: {} mismatch(es) against schema {}",
            f.display(),
            problems.len(),
            schema.name
        );
        for (col, what) in problems {
            println!("  column `{col}`: {what}");
        }
    }
    if bad > 0 {
        bail!(
            "{bad} of {} file(s) do not match schema {}",
            files.len(),
            schema.name
        );
    }
    Ok(())
}
