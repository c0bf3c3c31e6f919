//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use gradsift::config::PipelineConfig;
use gradsift::decode::Decoder;
use gradsift::features::{FeatureEngine, Samples};
use gradsift::pipeline::{self, RunOptions};
use gradsift::report::RunReport;
use gradsift::schema::Schema;
use gradsift::shutdown::Shutdown;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `../shared/data` beside the repository. Fails loudly when it is missing: these tests
/// read real, pyarrow-written data and must not pass by skipping.
pub fn shared_data() -> PathBuf {
    let d = repo().join("../shared/data");
    assert!(
        d.join("lte").is_dir() && d.join("beam").is_dir(),
        "the shared telecom data is missing: expected ../shared/data (beside the repository) with lte/ and beam/; \
         these integration tests need it and are not skipped without it"
    );
    d
}

/// Loads a bundled pipeline with overrides and an output folder.
pub fn pipeline(name: &str, out: &Path, overrides: &[&str]) -> PipelineConfig {
    let mut o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    o.push(format!("output.dir=\"{}\"", out.display()));
    PipelineConfig::load(&repo().join("pipelines").join(name), &o).expect("pipeline loads")
}

pub fn run(cfg: PipelineConfig) -> RunReport {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(pipeline::run(cfg, RunOptions::default(), Shutdown::new()))
        .expect("run completes")
}

/// Runs python3 with pyarrow; panics with a clear message when either is missing.
pub fn python(script: &str) -> String {
    let out = Command::new("python3")
        .args(["-c", script])
        .output()
        .expect(
            "python3 is needed by this test (pyarrow is the independent Parquet implementation)",
        );
    assert!(
        out.status.success(),
        "python3/pyarrow script failed (is pyarrow installed? `pip install pyarrow`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The first `n` feature rows of a Parquet file under a bundled schema.
pub fn feature_rows(schema_name: &str, file: &Path, n: usize) -> (Samples, usize, Arc<Schema>) {
    let schema = Arc::new(
        Schema::load(&repo().join("schemas").join(format!("{schema_name}.json"))).unwrap(),
    );
    let dec = Decoder::new(schema.clone());
    let mut fe = FeatureEngine::new(schema.clone(), dec.numeric_columns(), 1000);
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(file).unwrap(),
    )
    .unwrap()
    .with_batch_size(1024)
    .build()
    .unwrap();
    let mut s = Samples::default();
    for b in reader {
        let d = dec.decode(&b.unwrap()).unwrap();
        fe.push_batch(&d, &mut s, |_, _| {});
        if s.len() >= n {
            break;
        }
    }
    let w = fe.width();
    (s.take_front(n, w), w, schema)
}
