//! The bundled Milan archive as source events, for the stages' in-process tests (no broker,
//! no Python: read with the parquet crate).

use std::sync::Arc;

use crate::source::{RowOrigin, SourceEvent};

/// The archive in batches of 1,024 rows of `source`, acknowledged as a feed's are when `feed`.
pub fn milan_events(source: &str, feed: bool) -> Vec<SourceEvent> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/milan/internet_square5161.parquet");
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(path).unwrap(),
    )
    .unwrap()
    .with_batch_size(1024)
    .build()
    .unwrap();
    let mut at = 0u64;
    let source: Arc<str> = Arc::from(source);
    (reader.map(|b| {
        let batch = b.unwrap();
        let n = batch.num_rows() as u64;
        let origins: Vec<RowOrigin> = (at..at + n)
            .map(|index| RowOrigin {
                source: source.clone(),
                index,
            })
            .collect();
        at += n;
        SourceEvent::Batch {
            batch,
            ack: feed.then(|| origins.clone()),
            origins,
        }
    }))
    .collect()
}
