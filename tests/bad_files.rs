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

/// The Milan archive with NaN targets at rows 300..310 and 5000..5010, written by pyarrow.
fn milan_with_nans(dir: &std::path::Path) -> String {
    common::milan_edited(
        dir,
        "nans",
        "for i in list(range(300, 310)) + list(range(5000, 5010)): v[i] = float('nan')",
    )
}

#[test]
fn a_resume_after_a_crash_leaves_no_torn_or_duplicated_dead_letter() {
    // Issue 10, defect 5: after SIGKILL and resume the file held torn and repeated letters.
    let data = tempfile::tempdir().unwrap();
    let src = milan_with_nans(data.path());
    let out = tempfile::tempdir().unwrap();
    let first = common::run(common::pipeline(
        "milan-replay.toml",
        out.path(),
        &[&src, "checkpoint.enabled=true", "source.max_rows=4000"],
    ));
    assert_eq!(first.dead_lettered_rows, 10);
    // What a crash after that checkpoint leaves: letters the checkpoint does not cover (they
    // will be written again on replay) and a torn last line.
    let path = out.path().join("dead_letters.jsonl");
    let mut text = std::fs::read_to_string(&path).unwrap();
    let one = text.lines().next().unwrap().to_string();
    text.push_str(&format!("{one}\n{one}\n{{\"reason\":\"non_fin"));
    std::fs::write(&path, text).unwrap();
    let second = common::run(common::pipeline(
        "milan-replay.toml",
        out.path(),
        &[&src, "checkpoint.enabled=true"],
    ));
    assert_eq!(second.dead_lettered_rows, 20);
    let l = letters(out.path());
    assert_eq!(l.len(), 20, "each bad row once, every line whole");
    let mut rows: Vec<u64> = l.iter().map(|l| l["row"].as_u64().unwrap()).collect();
    rows.sort_unstable();
    rows.dedup();
    assert_eq!(rows.len(), 20, "no letter twice: {rows:?}");
}

#[test]
fn a_fresh_run_clears_an_earlier_runs_outputs_and_a_folder_in_their_place_is_refused() {
    // Issue 10, defects 13 and 15: an old dead-letter file survived a later clean run, and a
    // `report.json` folder failed the run only after the whole replay.
    let data = tempfile::tempdir().unwrap();
    let src = milan_with_nans(data.path());
    let out = tempfile::tempdir().unwrap();
    let sets = [src.as_str(), "source.max_rows=2000"];
    common::run(common::pipeline("milan-replay.toml", out.path(), &sets));
    assert!(out.path().join("dead_letters.jsonl").exists());
    let clean = common::run(common::pipeline(
        "milan-replay.toml",
        out.path(),
        &["source.max_rows=2000"],
    ));
    assert_eq!(clean.dead_lettered_rows, 0);
    assert!(
        !out.path().join("dead_letters.jsonl").exists(),
        "the earlier run's dead letters are gone"
    );
    assert!(out.path().join("report.json").exists() && out.path().join("scores.parquet").exists());
    assert!(!out.path().join("scores.parquet.tmp").exists());

    let bad = tempfile::tempdir().unwrap();
    std::fs::create_dir(bad.path().join("report.json")).unwrap();
    let started = std::time::Instant::now();
    let err = common::try_run(common::pipeline("milan-replay.toml", bad.path(), &[]))
        .expect_err("a folder where report.json goes is refused");
    assert!(format!("{err:#}").contains("report.json"), "{err:#}");
    assert!(
        !bad.path().join("scores.parquet").exists(),
        "refused at start, before any replay ({:?})",
        started.elapsed()
    );
}

#[test]
fn a_mixed_folder_is_cast_per_file_and_only_losslessly() {
    // Issue 10, defect 8: column types came from the earliest file, so an int64 `internet`
    // there truncated every later file's floats (300.64 → 300) and an int32 key turned keys
    // above 2^31 into nulls. pyarrow writes three files of different types.
    let dir = tempfile::tempdir().unwrap();
    let milan = common::repo().join("data/milan/internet_square5161.parquet");
    common::python(&format!(
        "import pyarrow as pa, pyarrow.parquet as pq\n\
         t = pq.read_table('{m}')\n\
         a = t.slice(0, 4000)\n\
         pq.write_table(pa.table({{'square_id': pa.array([7] * 4000, pa.int32()), 'ts': a['ts'], \
             'internet': pa.array([int(v) for v in a['internet'].to_pylist()], pa.int64())}}), '{d}/a_int.parquet')\n\
         b = t.slice(4000, 3000)\n\
         pq.write_table(pa.table({{'square_id': pa.array([5_000_000_000] * 3000, pa.int64()), 'ts': b['ts'], \
             'internet': b['internet']}}), '{d}/b_float.parquet')\n\
         c = t.slice(7000, 300)\n\
         big = [int(v) for v in c['internet'].to_pylist()]\n\
         big[150] = 2**60\n\
         pq.write_table(pa.table({{'square_id': pa.array([9] * 300, pa.int64()), 'ts': c['ts'], \
             'internet': pa.array(big, pa.int64())}}), '{d}/c_huge_int.parquet', row_group_size=100)\n",
        m = milan.display(),
        d = dir.path().display()
    ));
    let out = tempfile::tempdir().unwrap();
    let src = format!("source.path=\"{}\"", dir.path().display());
    let r = common::run(common::pipeline("milan-replay.toml", out.path(), &[&src]));
    println!("{:?}", r.skipped);
    // One integer beyond 2^53 loses its batch (its row group of 100), not the rest of the
    // file: the groups before and after it are read.
    assert_eq!(r.rows_read, 7300);
    assert_eq!(r.skipped.get("lossy_cast:internet"), Some(&100));
    assert!(
        !r.skipped.keys().any(|k| k.starts_with("null:")),
        "no value became null: {:?}",
        r.skipped
    );
    assert_eq!(r.samples, 4000 - 144 + 3000 - 144 + 200 - 144);
    // The float file's values kept their fractions, and its key above 2^31 survived.
    let py = common::python(&format!(
        "{}import pyarrow.compute as pc\nk = t.filter(pc.equal(t['key'], '5000000000'))['target'].to_pylist()\n\
         print(len(k), sum(1 for v in k if v != int(v)))",
        common::load_scores_py(out.path())
    ));
    let counts: Vec<usize> = py.split_whitespace().map(|v| v.parse().unwrap()).collect();
    assert_eq!(counts[0], 3000 - 144);
    assert!(counts[1] > 2000, "{py}");
}

#[test]
fn sigkill_mid_replay_then_resume_writes_every_dead_letter_once_and_whole() {
    // Issue 10, defect 5, with a real SIGKILL: a paced replay with a bad row every 5 is
    // killed after its first checkpoints, then resumed to the end.
    let data = tempfile::tempdir().unwrap();
    let src = common::milan_edited(
        data.path(),
        "every5",
        "for i in range(200, len(v), 5): v[i] = float('nan')",
    );
    let bad_rows = (200..8928).step_by(5).count() as u64;
    let out = tempfile::tempdir().unwrap();
    let sets = vec![
        src.clone(),
        "checkpoint.enabled=true".to_string(),
        "checkpoint.every_rows=500".to_string(),
        "source.batch_size=100".to_string(),
        "source.pace={ rows_per_second = 1500.0 }".to_string(),
    ];
    let (mut child, _log) = common::spawn_run("milan-replay.toml", out.path(), &sets);
    let ckpt = out.path().join("checkpoint.bin");
    common::wait_until("two checkpoints", 60, || {
        checkpoint_positions(&ckpt).is_some_and(|p| p >= 1000)
    });
    std::thread::sleep(std::time::Duration::from_millis(700));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let killed_at = checkpoint_positions(&ckpt).unwrap();
    let on_disk =
        std::fs::read_to_string(out.path().join("dead_letters.jsonl")).unwrap_or_default();
    println!(
        "killed with the checkpoint at row {killed_at}: {} bytes, {} lines of dead letters on disk",
        on_disk.len(),
        on_disk.lines().count()
    );
    assert!(
        killed_at < 8928,
        "killed mid-stream (checkpoint at row {killed_at})"
    );
    let r = common::run(common::pipeline(
        "milan-replay.toml",
        out.path(),
        &[&src, "checkpoint.enabled=true", "checkpoint.every_rows=500"],
    ));
    assert_eq!(r.dead_lettered_rows, bad_rows);
    let l = letters(out.path());
    let mut rows: Vec<u64> = l.iter().map(|l| l["row"].as_u64().unwrap()).collect();
    rows.sort_unstable();
    rows.dedup();
    assert_eq!(
        (l.len() as u64, rows.len() as u64),
        (bad_rows, bad_rows),
        "each bad row once, every line whole"
    );
}

/// The file position a checkpoint on disk covers, if one is there and readable.
fn checkpoint_positions(path: &std::path::Path) -> Option<u64> {
    let c = gradsift::checkpoint::load(path).ok()??;
    c.positions.values().copied().max()
}
