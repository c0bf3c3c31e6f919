//! Files that cannot be read do not stop a replay (issue 10, defects 2, 9 and 11): a 0-row
//! file, a 0-byte file, a text file, a truncated file and a file with one corrupt row group
//! sit in one folder with the good archive; pyarrow writes them all. Each unreadable part is
//! dead-lettered once with its real row range, the rest is learned, and a resumed run does not
//! count or write the letters again.

mod common;

use serde_json::Value;

fn letters(out: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("dead_letters.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every dead letter is one JSON line"))
        .collect()
}

#[test]
fn unreadable_files_and_row_groups_are_dead_lettered_and_the_replay_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let milan = common::repo().join("data/milan/internet_square5161.parquet");
    // f_corrupt: 4 row groups of 1024 rows (key 1), no dictionary, snappy; the first page
    // header of row group 1's `internet` column is overwritten with garbage.
    let said = common::python(&format!(
        "import pyarrow as pa, pyarrow.parquet as pq, pyarrow.compute as pc\n\
         t = pq.read_table('{m}')\n\
         pq.write_table(t, '{d}/a_good.parquet', row_group_size=1024)\n\
         pq.write_table(t.slice(0, 0), '{d}/b_empty.parquet')\n\
         open('{d}/c_zero_bytes.parquet', 'wb').close()\n\
         open('{d}/d_text.parquet', 'w').write('square_id,ts,internet\\n1,2,3\\n')\n\
         raw = open('{d}/a_good.parquet', 'rb').read()\n\
         open('{d}/e_truncated.parquet', 'wb').write(raw[: len(raw) // 2])\n\
         c = t.slice(0, 4096).set_column(0, 'square_id', pa.array([1] * 4096, pa.int32()))\n\
         pq.write_table(c, '{d}/f_corrupt.parquet', row_group_size=1024, use_dictionary=False, compression='snappy')\n\
         md = pq.ParquetFile('{d}/f_corrupt.parquet').metadata\n\
         off = md.row_group(1).column(2).data_page_offset\n\
         b = bytearray(open('{d}/f_corrupt.parquet', 'rb').read())\n\
         b[off:off + 24] = b'\\xff' * 24\n\
         open('{d}/f_corrupt.parquet', 'wb').write(bytes(b))\n\
         print(md.num_row_groups, md.row_group(1).num_rows)\n",
        m = milan.display(),
        d = dir.path().display()
    ));
    assert_eq!(said.trim(), "4 1024");
    let out = tempfile::tempdir().unwrap();
    let path = format!("source.path=\"{}\"", dir.path().display());
    let sets = [path.as_str(), "checkpoint.enabled=true"];
    let r = common::run(common::pipeline("milan-replay.toml", out.path(), &sets));
    println!("{:?}", r.skipped);
    // The corrupt row group is lost, nothing else of its file; the files without a footer
    // are letters with an unknown (0) row count; the empty file is simply empty.
    assert_eq!(r.skipped.get("unreadable_file"), Some(&1024));
    assert_eq!(r.rows_read, 8928 + 4096);
    assert_eq!(r.samples + r.skipped_total, r.rows_read);
    let l = letters(out.path());
    let unreadable: Vec<&Value> = l
        .iter()
        .filter(|l| l["reason"] == "unreadable_file")
        .collect();
    assert_eq!(unreadable.len(), 4, "{unreadable:?}");
    for name in ["c_zero_bytes", "d_text", "e_truncated"] {
        assert!(
            unreadable
                .iter()
                .any(|l| l["origin"].as_str().unwrap().contains(name) && l["rows"] == 0),
            "{name} is dead-lettered as a file: {unreadable:?}"
        );
    }
    let group = unreadable
        .iter()
        .find(|l| l["origin"].as_str().unwrap().contains("f_corrupt"))
        .expect("the corrupt row group is dead-lettered");
    assert_eq!(
        (group["row"].as_u64(), group["rows"].as_u64()),
        (Some(1024), Some(1024))
    );
    assert!(
        group["detail"]
            .as_str()
            .unwrap()
            .contains("rows 1024..2048")
    );
    // Key 1 (the corrupt file) learned from the row groups around the bad one.
    assert!(
        r.samples > 8928 - 144 + 3072 - 2 * 144 - 10,
        "{} samples",
        r.samples
    );

    // Resume from the final checkpoint: every row is covered, nothing is counted or written
    // twice (the whole-file letters were before).
    let again = common::run(common::pipeline("milan-replay.toml", out.path(), &sets));
    assert_eq!(again.rows_read, r.rows_read);
    assert_eq!(again.skipped, r.skipped);
    assert_eq!(
        letters(out.path()).len(),
        l.len(),
        "no letter written twice"
    );
}
