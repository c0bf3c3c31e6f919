//! Shared helpers of the integration tests.
#![allow(dead_code)]

pub mod kafka;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    try_run(cfg).expect("run completes")
}

/// Runs a pipeline and hands back its error, for tests of refusals.
pub fn try_run(cfg: PipelineConfig) -> anyhow::Result<RunReport> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(pipeline::run(cfg, RunOptions::default(), Shutdown::new()))
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

/// The bundled Milan archive with its `internet` values edited by `edits` (Python lines on
/// the list `v`), written by pyarrow to `dir/name.parquet`; returns the `source.path` override.
pub fn milan_edited(dir: &Path, name: &str, edits: &str) -> String {
    let milan = repo().join("data/milan/internet_square5161.parquet");
    python(&format!(
        "import pyarrow as pa, pyarrow.parquet as pq\n\
         t = pq.read_table('{m}')\n\
         v = t['internet'].to_pylist()\n\
         {edits}\n\
         pq.write_table(t.set_column(2, 'internet', pa.array(v, pa.float64())), '{d}/{name}.parquet')\n",
        m = milan.display(),
        d = dir.display()
    ));
    format!("source.path=\"{}/{name}.parquet\"", dir.display())
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

/// Which Kafka-protocol broker a test runs against. Both listen on loopback and are started
/// by the harness: Tansu as a child process, and librdkafka's mock cluster inside the test
/// process (it serves fetches from inside a record batch and expires dead group members the
/// way Apache Kafka does, which tells a Tansu fault from a gradsift one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerKind {
    Tansu,
    Mock,
}

/// A real Kafka-protocol broker on a free loopback port, stopped on drop.
pub struct Broker {
    backend: Backend,
}

enum Backend {
    Tansu(Tansu),
    Mock(rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>),
}

struct Tansu {
    child: Option<std::process::Child>,
    port: u16,
    bin: PathBuf,
    storage: String,
    dir: tempfile::TempDir,
}

/// The command that installs the broker the tests use (also in the README's test command).
pub const TANSU_INSTALL: &str =
    "cargo install --locked tansu --version 0.6.0 --features dynostore,libsql";

/// The Tansu binary: $TANSU, or `tansu` on the PATH (`~/.cargo/bin` after the install
/// command). Panics with the install command when neither is there: Kafka tests never pass
/// by skipping.
pub fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU") {
        return PathBuf::from(p);
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME").or_else(|| {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo").into_os_string())
    }) {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("tansu"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the Kafka tests need the Tansu broker with SQLite storage: `{TANSU_INSTALL}` \
                 (or set TANSU=/path/to/tansu); they are not skipped without it"
            )
        })
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Broker {
    /// A Tansu broker keeping everything in memory.
    pub fn start() -> Broker {
        Self::of(BrokerKind::Tansu)
    }

    /// A fresh broker of the given kind (Tansu in memory, or a one-broker mock cluster).
    pub fn of(kind: BrokerKind) -> Broker {
        match kind {
            BrokerKind::Tansu => Self::tansu("memory://tansu/"),
            BrokerKind::Mock => Broker {
                backend: Backend::Mock(
                    rdkafka::mocking::MockCluster::new(1).expect("librdkafka's mock cluster"),
                ),
            },
        }
    }

    /// A broker whose topics and group offsets survive [`Broker::restart`]: Tansu on SQLite,
    /// or the mock cluster (its broker goes down and up, the cluster keeps its log).
    pub fn start_persistent(kind: BrokerKind) -> Broker {
        match kind {
            BrokerKind::Tansu => Self::tansu("sqlite://tansu.db"),
            BrokerKind::Mock => Self::of(kind),
        }
    }

    pub fn kind(&self) -> BrokerKind {
        match self.backend {
            Backend::Tansu(_) => BrokerKind::Tansu,
            Backend::Mock(_) => BrokerKind::Mock,
        }
    }

    fn tansu(storage: &str) -> Broker {
        let mut t = Tansu {
            child: None,
            port: free_port(),
            bin: tansu_bin(),
            storage: storage.to_string(),
            dir: tempfile::tempdir().unwrap(),
        };
        t.spawn();
        Broker {
            backend: Backend::Tansu(t),
        }
    }

    /// Stops the broker: SIGKILL for Tansu; the mock broker refuses and drops connections.
    pub fn kill(&mut self) {
        match &mut self.backend {
            Backend::Tansu(t) => t.kill(),
            Backend::Mock(m) => m.broker_down(1).expect("mock broker down"),
        }
    }

    /// Starts it again on the same port and storage.
    pub fn restart(&mut self) {
        match &mut self.backend {
            Backend::Tansu(t) => {
                t.kill();
                t.spawn();
            }
            Backend::Mock(m) => m.broker_up(1).expect("mock broker up"),
        }
    }

    /// The mock cluster refuses every offset commit (a non-retriable error) until called
    /// again with `false`. Tansu cannot inject errors: a test calling this on Tansu fails.
    pub fn refuse_commits(&self, refuse: bool) {
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        let err = RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE;
        self.refuse(RDKafkaApiKey::OffsetCommit, err, refuse);
    }

    /// The mock cluster refuses every produce request (topic authorization failed, not
    /// retriable) until called again with `false`; Tansu cannot, as above.
    pub fn refuse_produce(&self, refuse: bool) {
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        let err = RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED;
        self.refuse(RDKafkaApiKey::Produce, err, refuse);
    }

    fn refuse(
        &self,
        api: rdkafka::types::RDKafkaApiKey,
        err: rdkafka::types::RDKafkaRespErr,
        refuse: bool,
    ) {
        let Backend::Mock(m) = &self.backend else {
            panic!("only the mock cluster refuses requests on request");
        };
        if refuse {
            m.request_errors(api, &vec![err; 100_000]);
        } else {
            m.clear_request_errors(api);
        }
    }

    pub fn address(&self) -> String {
        match &self.backend {
            Backend::Tansu(t) => format!("127.0.0.1:{}", t.port),
            Backend::Mock(m) => m.bootstrap_servers(),
        }
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        let t = match &self.backend {
            Backend::Tansu(t) => t,
            Backend::Mock(m) => {
                m.create_topic(name, partitions as i32, 1)
                    .unwrap_or_else(|e| panic!("mock topic {name}: {e}"));
                return;
            }
        };
        let out = Command::new(&t.bin)
            .args([
                "topic",
                "create",
                "--broker",
                &format!("tcp://127.0.0.1:{}", t.port),
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

impl Tansu {
    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(&self.bin)
            .current_dir(self.dir.path())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                &self.storage,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "tansu exited ({status}) with --storage-engine {}: is it built with `--features dynostore,libsql`? `{TANSU_INSTALL}`",
                    self.storage
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "tansu did not listen on {}",
                self.port
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Python (pyarrow) code that loads every score file of a run into a table `t`: the
/// `scores.parquet` file, or the `scores/part-*.parquet` segments of a checkpointed run.
pub fn load_scores_py(out: &Path) -> String {
    format!(
        "import glob, os, pyarrow as pa, pyarrow.parquet as pq\n\
         d = '{}'\n\
         fs = [os.path.join(d, 'scores.parquet')] if os.path.exists(os.path.join(d, 'scores.parquet')) \
              else sorted(glob.glob(os.path.join(d, 'scores', 'part-*.parquet')))\n\
         assert fs, 'no score files in ' + d\n\
         t = pa.concat_tables([pq.ParquetFile(f).read() for f in fs])\n",
        out.display()
    )
}

/// `gradsift run pipelines/NAME` as a child process with `--set` overrides; its stderr lines
/// are collected in the returned log. The metrics endpoint is off (several children run at
/// once); a test that wants it sets `telemetry.enabled=true` and a free `telemetry.listen`.
pub fn spawn_run(
    pipeline: &str,
    out: &Path,
    sets: &[String],
) -> (RunChild, Arc<Mutex<Vec<String>>>) {
    let mut args: Vec<String> = vec![
        "run".into(),
        format!("pipelines/{pipeline}"),
        "--quiet".into(),
        "--output".into(),
        out.display().to_string(),
        "--set".into(),
        "telemetry.enabled=false".into(),
    ];
    for kv in sets {
        args.push("--set".into());
        args.push(kv.clone());
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_gradsift"))
        .current_dir(repo())
        .env(
            "GRADSIFT_LOG",
            std::env::var("GRADSIFT_TEST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env("NO_COLOR", "1")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if std::env::var_os("GRADSIFT_TEST_ECHO").is_some() {
                eprintln!("[gradsift] {line}");
            }
            sink.lock().unwrap().push(line);
        }
    });
    (RunChild(child), log)
}

/// A gradsift child process that is killed when dropped, so that a test which panics
/// mid-run does not leave it running.
pub struct RunChild(Child);

impl std::ops::Deref for RunChild {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for RunChild {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for RunChild {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Polls `cond` every 100 ms; panics naming `what` after `secs`.
pub fn wait_until(what: &str, secs: u64, cond: impl FnMut() -> bool) {
    assert!(poll_until(secs, cond), "timed out after {secs} s: {what}");
}

/// Polls `cond` every 100 ms for up to `secs`; whether it came to hold (for a caller that
/// says more than [`wait_until`] when it does not).
pub fn poll_until(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

pub fn log_text(log: &Arc<Mutex<Vec<String>>>) -> String {
    log.lock().unwrap().join("\n")
}

/// A plain HTTP/1.0 GET on loopback (the tests need no HTTP client crate): the body of a
/// 200 response, or None when the server is not up yet or answers otherwise.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.")
        .then(|| head.split_whitespace().nth(1) == Some("200"))?
        .then(|| body.to_string())
}

/// Percent-encodes a URL query value.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
