//! What a client stores is what it reads back: random sequences of records of every size and
//! shape (0 B to 64 MiB; random, zeros, repeated, mixed; compression on and off) committed
//! through one client, each read back by other clients through every read path. Issue 18: a
//! record committed after a large incompressible one was stored as an invalid zlib stream, and
//! acknowledged.

use neo_client::{Client, ClientError};
use neo_lib::{MAX_RECORD_SIZE, Oid, Tid};
use neo_tests::{Cluster, Options};

/// A record of `n` bytes of one of the shapes applications store.
fn record(rng: &mut fastrand::Rng, n: usize) -> Vec<u8> {
    match rng.u8(0..5) {
        0 => std::iter::repeat_with(|| rng.u8(..)).take(n).collect(),
        1 => vec![0; n],
        2 => b"ab".iter().cycle().take(n).copied().collect(),
        3 => b"(dp0\nS'title'\np1\nVpersistent mapping\np2\n".iter().cycle().take(n).copied().collect(),
        _ => {
            let mut v = Vec::with_capacity(n);
            while v.len() < n {
                let k = rng.usize(1..=8192).min(n - v.len());
                if rng.bool() {
                    v.extend(std::iter::repeat_with(|| rng.u8(..)).take(k));
                } else {
                    v.extend(std::iter::repeat_n(rng.u8(..), k));
                }
            }
            v
        }
    }
}

/// A size from 0 to 16 MiB, most of them small, some around powers of two.
fn size(rng: &mut fastrand::Rng) -> usize {
    match rng.u8(0..4) {
        0 => rng.usize(0..=300),
        1 => rng.usize(0..=70_000),
        2 => ((1usize << rng.u32(7..=24)) + rng.usize(0..3)).saturating_sub(1),
        _ => rng.usize(0..=4 << 20),
    }
}

/// Commit `records` (oid, data) in one transaction through `c`.
async fn commit_all(c: &Client, records: &[(Oid, Vec<u8>)]) -> Tid {
    let mut t = c.tpc_begin(b"records", b"", b"").await.unwrap();
    for (oid, data) in records {
        c.store(&mut t, *oid, Tid::ZERO, data).unwrap();
    }
    c.tpc_vote(&mut t).await.unwrap();
    c.tpc_finish(t).await.unwrap()
}

/// Records committed in a random order of shapes and sizes, the sequence first (3 MiB of
/// noise, then 8 KiB of "ab"; then 0 B and 1 B) and the largest records (64 MiB, random and zeros) in between,
/// through a client that compresses and one that does not (same thread, alternately); then
/// every revision is loaded by fresh clients: async loads, loads on read connections (the
/// Python path, on a thread of its own), loads of exact serials.
async fn random_records_of_every_size_come_back_as_committed(opts: Options) {
    let cluster = Cluster::start(opts).await;
    let compressing = cluster.client().await;
    let mut cfg = cluster.client_config();
    cfg.compress = false;
    let plain = Client::connect(cfg).await.unwrap();
    let mut rng = fastrand::Rng::with_seed(18);
    let noise: Vec<u8> = std::iter::repeat_with(|| rng.u8(..)).take(3 << 20).collect();
    let mut sequence: Vec<Vec<u8>> = vec![noise, b"ab".repeat(4096), Vec::new(), b"x".to_vec()];
    for i in 0..36 {
        match i {
            12 => sequence.push(std::iter::repeat_with(|| rng.u8(..)).take(MAX_RECORD_SIZE).collect()),
            24 => sequence.push(vec![0; MAX_RECORD_SIZE]),
            _ => {
                let n = size(&mut rng);
                sequence.push(record(&mut rng, n));
            }
        }
    }
    let mut committed: Vec<(Oid, Tid, Vec<u8>)> = Vec::new();
    let mut pending = Vec::new();
    for (i, data) in sequence.into_iter().enumerate() {
        let oid = compressing.new_oid().await.unwrap();
        pending.push((oid, data));
        // One to three records per transaction, by either client.
        if i < 2 || rng.u8(0..3) != 0 {
            let c = if i < 2 || rng.bool() { &compressing } else { &plain };
            let tid = commit_all(c, &pending).await;
            committed.extend(pending.drain(..).map(|(o, d)| (o, tid, d)));
        }
    }
    if !pending.is_empty() {
        let tid = commit_all(&plain, &pending).await;
        committed.extend(pending.drain(..).map(|(o, d)| (o, tid, d)));
    }

    // Async loads and exact serials on one fresh client, in a random order.
    let reader = cluster.client().await;
    let mut order: Vec<usize> = (0..committed.len()).collect();
    rng.shuffle(&mut order);
    for &i in &order {
        let (oid, tid, data) = &committed[i];
        let (got, serial) = reader.load(*oid).await.unwrap();
        assert!(got == *data && serial == *tid, "record {i} ({} bytes): {} bytes back", data.len(), got.len());
        assert!(reader.load_serial(*oid, *tid).await.unwrap() == *data, "record {i}: load_serial");
    }
    // Read connections (blocking, on a thread of their own) of another fresh client.
    let blocking = cluster.client().await;
    let committed = std::sync::Arc::new(committed);
    let all = committed.clone();
    let served = tokio::task::spawn_blocking(move || {
        let mut served = 0;
        for (i, (oid, tid, data)) in all.iter().enumerate() {
            if let Some(r) = blocking.load_before_blocking(*oid, Tid(tid.0 + 1)) {
                let (got, serial, _) = r.unwrap().unwrap();
                assert!(*got == *data && serial == *tid, "record {i} ({} bytes) on a read connection", data.len());
                served += 1;
            }
        }
        served
    })
    .await
    .unwrap();
    assert!(served >= committed.len() / 2, "only {served} of {} loads took the read connections", committed.len());

    // A record larger than the largest is refused at once, clearly; the transaction goes on.
    let mut t = compressing.tpc_begin(b"", b"", b"").await.unwrap();
    let oid = compressing.new_oid().await.unwrap();
    match compressing.store(&mut t, oid, Tid::ZERO, &vec![0; MAX_RECORD_SIZE + 1]) {
        Err(e @ ClientError::TooLarge { .. }) => assert!(e.to_string().contains("larger than the maximum"), "{e}"),
        other => panic!("{:?}", other.map_err(|e| e.to_string())),
    }
    compressing.store(&mut t, oid, Tid::ZERO, b"small").unwrap();
    compressing.tpc_vote(&mut t).await.unwrap();
    let tid = compressing.tpc_finish(t).await.unwrap();
    // Another client sees a commit once it has synced with the master (its invalidation may
    // still be on the way).
    reader.sync().await.unwrap();
    assert_eq!(reader.load(oid).await.unwrap(), (b"small".to_vec(), tid));
}

crate::both_backends!(random_records_of_every_size_come_back_as_committed);
