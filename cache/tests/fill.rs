//! Fills: atomic commit, single flight, streaming, resume, digest mismatch, ranges, shutdown,
//! no-cache mode.

mod common;

use std::sync::Arc;

use common::*;
use futures_util::StreamExt;
use registry_cache::{CacheConfig, CacheError, FillError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn miss_commits_atomically_then_hits() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(cfg(dir.path())).await;
    let body = data(300_000);
    let d = digest_of(&body);
    let src = Arc::new(Fake::new(body.clone()));
    let fill = h.cache.fill(&d, src.clone());
    assert!(fill.is_leader());
    assert_eq!(fill.meta().await.unwrap(), 300_000);
    assert_eq!(collect(fill.reader(0, u64::MAX)).await.unwrap(), body);
    assert_eq!(fill.wait().await.unwrap(), 300_000);

    let blob_path = dir.path().join("blobs/sha256").join(d.digest());
    assert_eq!(std::fs::read(&blob_path).unwrap(), body);
    assert!(
        files_in(&dir.path().join("tmp")).is_empty(),
        "spool left behind"
    );
    let hit = h.cache.blob(&d).await.unwrap().expect("hit after commit");
    assert_eq!(hit.len(), 300_000);
    assert_eq!(collect(hit.reader(0, u64::MAX)).await.unwrap(), body);
    assert_eq!(src.opens(), vec![0]);
    let s = h.cache.stats();
    assert_eq!((s.blob_entries, s.size_bytes), (1, 300_000));
    assert!(h.cache.verify_blob(&d).await.unwrap());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_blob_is_never_visible_as_complete() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(cfg(dir.path())).await;
    let body = data(8 * 4096);
    let d = digest_of(&body);
    let fill = h
        .cache
        .fill(&d, Arc::new(Fake::new(body.clone()).slow(4096, 20)));
    let mut r = fill.reader(0, u64::MAX);
    let first = r.next().await.unwrap().unwrap();
    assert_eq!(&first[..], &body[..first.len()]);
    // Bytes are flowing, but nothing exists under the final name and blob() misses.
    assert!(h.cache.blob(&d).await.unwrap().is_none());
    assert!(files_in(&dir.path().join("blobs/sha256")).is_empty());
    assert_eq!(
        files_in(&dir.path().join("tmp")).len(),
        1,
        "spool lives in tmp/"
    );
    assert_eq!(h.cache.stats().fills_in_flight, 1);
    fill.wait().await.unwrap();
    assert!(h.cache.blob(&d).await.unwrap().is_some());
    eventually("in-flight entry removed", || {
        h.cache.stats().fills_in_flight == 0
    })
    .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fills_share_one_upstream_open_and_stream_early() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(cfg(dir.path())).await;
    let body = data(20 * 8192);
    let d = digest_of(&body);
    let src = Arc::new(Fake::new(body.clone()).slow(8192, 25));
    let mut joins = Vec::new();
    for _ in 0..8 {
        let cache = h.cache.clone();
        let (d, src, body) = (d.clone(), src.clone(), body.clone());
        joins.push(tokio::spawn(async move {
            let fill = cache.fill(&d, src);
            let leader = fill.is_leader();
            let mut r = fill.reader(0, u64::MAX);
            let first = r.next().await.unwrap().unwrap();
            // Bytes stream while the fill (20 chunks, 25 ms apart) is still running.
            assert!(
                cache.blob(&d).await.unwrap().is_none(),
                "first chunk only after completion"
            );
            let mut all = first.to_vec();
            all.extend(collect(r).await.unwrap());
            assert_eq!(all, body);
            leader
        }));
    }
    let mut leaders = 0;
    for j in joins {
        leaders += usize::from(j.await.unwrap());
    }
    assert_eq!(leaders, 1, "exactly one leader");
    assert_eq!(src.opens(), vec![0], "exactly one upstream open");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_every_reader_does_not_cancel_the_fill() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(cfg(dir.path())).await;
    let body = data(10 * 4096);
    let d = digest_of(&body);
    let src = Arc::new(Fake::new(body.clone()).slow(4096, 10));
    {
        let fill = h.cache.fill(&d, src.clone());
        let mut r = fill.reader(0, u64::MAX);
        r.next().await.unwrap().unwrap();
        // Client disconnects: reader and handle dropped mid-body.
    }
    eventually("fill completes without readers", || {
        h.cache.stats().blob_entries == 1
    })
    .await;
    let hit = h.cache.blob(&d).await.unwrap().unwrap();
    assert_eq!(collect(hit.reader(0, u64::MAX)).await.unwrap(), body);
    assert_eq!(src.opens(), vec![0]);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_mismatch_fails_every_reader_and_caches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(cfg(dir.path())).await;
    let body = data(100_000);
    let d = digest_of(&body);
    let mut fake = Fake::new(body.clone()).slow(10_000, 5);
    fake.corrupt = true;
    let src = Arc::new(fake);
    let fills: Vec<_> = (0..3).map(|_| h.cache.fill(&d, src.clone())).collect();
    for f in &fills {
        let mut r = f.reader(0, u64::MAX);
        let mut got_err = false;
        while let Some(item) = r.next().await {
            if let Err(e) = item {
                assert!(
                    matches!(e, CacheError::Fill(FillError::DigestMismatch { .. })),
                    "{e}"
                );
                got_err = true;
            }
        }
        assert!(got_err, "reader must end with an error, not cleanly");
    }
    assert!(matches!(
        fills[0].wait().await,
        Err(FillError::DigestMismatch { .. })
    ));
    assert_eq!(src.opens(), vec![0]);
    assert_eq!(h.cache.stats().digest_mismatches_total, 1);
    assert!(h.cache.blob(&d).await.unwrap().is_none());
    assert!(files_in(&dir.path().join("blobs/sha256")).is_empty());
    eventually("spool removed", || {
        files_in(&dir.path().join("tmp")).is_empty()
    })
    .await;
    h.stop().await;
}

/// A reader never holds the complete byte count of a blob that has not verified yet: the
/// proxy's response carries Content-Length, so a reader that had delivered every byte
/// would end as a clean response even if the digest check failed an instant later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_byte_is_held_back_until_verified() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(cfg(dir.path())).await;
    for corrupt in [true, false] {
        let body = data(300_000 + usize::from(corrupt));
        let d = digest_of(&body);
        let mut fake = Fake::new(body.clone());
        fake.corrupt = corrupt;
        let fill = h.cache.fill(&d, Arc::new(fake));
        // Full blob and a range ending before the last byte.
        for (start, end) in [(0, u64::MAX), (10, 99)] {
            let mut r = fill.reader(start, end);
            let mut got = 0u64;
            let mut err = false;
            while let Some(item) = r.next().await {
                match item {
                    Ok(b) => got += b.len() as u64,
                    Err(_) => err = true,
                }
            }
            let want = if end == u64::MAX {
                body.len() as u64
            } else {
                end - start + 1
            };
            if corrupt {
                assert!(err, "a corrupt fill must end readers with an error");
                assert!(
                    got < want,
                    "all {want} bytes were handed out before verification"
                );
            } else {
                assert!(!err);
                assert_eq!(got, want);
            }
        }
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_upstream_drop_is_seamless() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(cfg(dir.path())).await;
    let body = data(200_000);
    let d = digest_of(&body);
    let src = Arc::new(Fake::new(body.clone()).broken(70_000, 2));
    let fill = h.cache.fill(&d, src.clone());
    assert_eq!(collect(fill.reader(0, u64::MAX)).await.unwrap(), body);
    assert_eq!(
        src.opens(),
        vec![0, 70_000, 140_000],
        "Range re-requests at the written offset"
    );
    assert_eq!(h.cache.stats().resumes_total, 2);
    // Readers finish once the digest matched; the commit follows.
    fill.wait().await.unwrap();
    assert!(h.cache.verify_blob(&d).await.unwrap());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_budget_exhausted_fails_readers() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.resume_attempts = 2;
    let h = open(c).await;
    let body = data(100_000);
    let d = digest_of(&body);
    let src = Arc::new(Fake::new(body.clone()).broken(10_000, usize::MAX));
    let fill = h.cache.fill(&d, src.clone());
    let err = collect(fill.reader(0, u64::MAX)).await.unwrap_err();
    assert!(
        matches!(
            err,
            CacheError::Fill(FillError::ResumeExhausted { attempts: 2, .. })
        ),
        "{err}"
    );
    assert_eq!(src.opens(), vec![0, 10_000, 20_000]);
    assert!(h.cache.blob(&d).await.unwrap().is_none());
    eventually("spool removed", || {
        files_in(&dir.path().join("tmp")).is_empty()
    })
    .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_body_with_another_length_fails() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(cfg(dir.path())).await;
    let body = data(50_000);
    let d = digest_of(&body);
    let mut fake = Fake::new(body.clone()).broken(20_000, 1);
    fake.resumed_total = Some(60_000);
    let fill = h.cache.fill(&d, Arc::new(fake));
    let err = fill.wait().await.unwrap_err();
    assert!(
        matches!(
            err,
            FillError::LengthMismatch {
                expected: 50_000,
                actual: 60_000
            }
        ),
        "{err}"
    );
    assert!(h.cache.blob(&d).await.unwrap().is_none());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_body_is_resumed_and_unknown_length_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(cfg(dir.path())).await;
    let body = data(30_000);
    let d = digest_of(&body);
    // A body that ends cleanly but short of Content-Length is a drop: resume.
    let mut fake = Fake::new(body.clone()).broken(12_000, 1);
    fake.eof_instead_of_error = true;
    let src = Arc::new(fake);
    let fill = h.cache.fill(&d, src.clone());
    assert_eq!(collect(fill.reader(0, u64::MAX)).await.unwrap(), body);
    assert_eq!(src.opens(), vec![0, 12_000]);

    let body2 = data(30_001);
    let d2 = digest_of(&body2);
    let mut fake = Fake::new(body2.clone());
    fake.announce_len = false;
    let fill = h.cache.fill(&d2, Arc::new(fake));
    // Without a length, meta() waits for the verified end.
    assert_eq!(fill.meta().await.unwrap(), 30_001);
    assert_eq!(
        collect(fill.reader(100, 199)).await.unwrap(),
        &body2[100..200]
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_error_reaches_meta_with_the_callers_error() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(cfg(dir.path())).await;
    let d = digest_of(b"missing");
    let mut fake = Fake::new(data(10));
    fake.not_found = true;
    let src = Arc::new(fake);
    let fill = h.cache.fill(&d, src.clone());
    match fill.meta().await {
        Err(FillError::Source(e)) => {
            assert!(!e.retryable);
            assert!(e.downcast_ref::<NotFound>().is_some(), "proxy can map 404");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(src.opens(), vec![0], "fatal errors are not retried");
    assert!(collect(fill.reader(0, u64::MAX)).await.is_err());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_on_in_flight_fill_and_on_hit() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(cfg(dir.path())).await;
    let body = data(16 * 8192);
    let d = digest_of(&body);
    let fill = h
        .cache
        .fill(&d, Arc::new(Fake::new(body.clone()).slow(8192, 10)));
    assert_eq!(fill.meta().await.unwrap(), body.len() as u64);
    // A range near the end waits for those bytes, then gets exactly them.
    let (a, b) = (100_000u64, 120_000u64);
    let tail = fill.reader(a, b);
    let head = fill.reader(0, 9);
    assert_eq!(collect(head).await.unwrap(), &body[..10]);
    assert_eq!(collect(tail).await.unwrap(), &body[a as usize..=b as usize]);
    // Past the end is unsatisfiable; an end past the end is clamped.
    assert!(matches!(
        collect(fill.reader(body.len() as u64, u64::MAX)).await,
        Err(CacheError::RangeNotSatisfiable { .. })
    ));
    assert_eq!(
        collect(fill.reader(131_000, 999_999)).await.unwrap(),
        &body[131_000..]
    );
    fill.wait().await.unwrap();

    let hit = h.cache.blob(&d).await.unwrap().unwrap();
    let ranges = [
        (0u64, 0u64),
        (65_535, 65_536),
        (7, 100_007),
        (131_071, 131_071),
    ];
    for (s, e) in ranges {
        assert_eq!(
            collect(hit.reader(s, e)).await.unwrap(),
            &body[s as usize..=e as usize]
        );
    }
    assert!(collect(hit.reader(200_000, 200_001)).await.is_err());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cache_mode_coalesces_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.persist = false;
    let h = open(c).await;
    let body = data(10 * 4096);
    let d = digest_of(&body);
    let src = Arc::new(Fake::new(body.clone()).slow(4096, 10));
    let fills: Vec<_> = (0..4).map(|_| h.cache.fill(&d, src.clone())).collect();
    assert_eq!(fills.iter().filter(|f| f.is_leader()).count(), 1);
    let readers: Vec<_> = fills.iter().map(|f| f.reader(0, u64::MAX)).collect();
    drop(fills);
    for r in readers {
        assert_eq!(collect(r).await.unwrap(), body);
    }
    assert_eq!(src.opens(), vec![0]);
    eventually("fill finished", || h.cache.stats().fills_in_flight == 0).await;
    assert!(
        files_in(&dir.path().join("tmp")).is_empty(),
        "spool deleted"
    );
    assert!(files_in(&dir.path().join("blobs/sha256")).is_empty());
    assert!(
        h.cache.blob(&d).await.unwrap().is_none(),
        "never served from disk"
    );
    // Manifests and tags are not stored either.
    let m = br#"{"schemaVersion":2}"#;
    let md = digest_of(m);
    h.cache
        .put_manifest(&md, "application/json", m.as_slice().into(), vec![])
        .await
        .unwrap();
    assert!(h.cache.manifest(&md).await.unwrap().is_none());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_fills_and_removes_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(cfg(dir.path())).await;
    let body = data(100 * 4096);
    let d = digest_of(&body);
    let fill = h
        .cache
        .fill(&d, Arc::new(Fake::new(body.clone()).slow(4096, 50)));
    let mut r = fill.reader(0, u64::MAX);
    r.next().await.unwrap().unwrap();
    let cache = h.cache.clone();
    h.stop().await; // bounded: panics if a task outlives the tracker
    let rest = collect(r).await;
    assert!(
        matches!(rest, Err(CacheError::Fill(FillError::ShuttingDown))),
        "{rest:?}"
    );
    assert!(files_in(&dir.path().join("tmp")).is_empty());
    assert!(cache.blob(&d).await.unwrap().is_none());
    let late = cache.fill(&d, Arc::new(Fake::new(body)));
    assert!(matches!(late.meta().await, Err(FillError::ShuttingDown)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_sha256_digests_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(cfg(dir.path())).await;
    let d: registry_cache::Digest = format!("sha512:{}", "a".repeat(128)).parse().unwrap();
    assert!(matches!(
        h.cache.blob(&d).await,
        Err(CacheError::InvalidDigest(_))
    ));
    let fill = h.cache.fill(&d, Arc::new(Fake::new(data(1))));
    assert!(matches!(
        fill.meta().await,
        Err(FillError::InvalidDigest(_))
    ));
    h.stop().await;
}

/// The leader's reader is served from memory as the bytes arrive; a follower that joins late
/// and one that stalls (falling behind the memory window) read the spool until they catch up,
/// and every reader gets the exact blob from one upstream open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_reads_memory_late_and_slow_followers_read_the_spool() {
    const MIB: usize = 1024 * 1024;
    const PIECE: usize = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let h = open(cfg(dir.path())).await;
    let body = data(24 * MIB);
    let d = digest_of(&body);
    let (src, mut txs) = Gated::new(body.len() as u64, 1);
    let src = Arc::new(src);
    let tx = txs.remove(0);

    let fill = h.cache.fill(&d, src.clone());
    assert!(fill.is_leader());
    let got = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let leader = {
        let (mut r, got) = (fill.reader(0, u64::MAX), got.clone());
        tokio::spawn(async move {
            let mut out = Vec::new();
            while let Some(c) = r.next().await {
                let c = c?;
                out.extend_from_slice(&c);
                got.store(out.len() as u64, std::sync::atomic::Ordering::SeqCst);
            }
            Ok::<_, CacheError>(out)
        })
    };
    // The slow follower takes one chunk, then stalls until the fill is far ahead of it.
    let go = Arc::new(tokio::sync::Notify::new());
    let slow = {
        let (mut r, go) = (fill.reader(0, u64::MAX), go.clone());
        tokio::spawn(async move {
            let mut out = r.next().await.unwrap()?.to_vec();
            go.notified().await;
            out.extend(collect(r).await?);
            Ok::<_, CacheError>(out)
        })
    };

    let feed = |from: usize, to: usize| {
        let (tx, body) = (tx.clone(), body.clone());
        async move {
            for p in (from..to).step_by(PIECE) {
                tx.send(body.slice(p..(p + PIECE).min(to))).await.unwrap();
            }
        }
    };
    // The leader's client keeps up with the upstream (as a client on a fast link does).
    for m in 0..20 {
        feed(m * MIB, (m + 1) * MIB).await;
        eventually("the leader has every byte sent so far", || {
            got.load(std::sync::atomic::Ordering::SeqCst) == ((m + 1) * MIB) as u64
        })
        .await;
    }
    let s = h.cache.stats();
    assert_eq!(
        s.fill_spool_bytes_total, 0,
        "the leader (and the slow follower's first chunk) came from memory"
    );
    assert!(s.fill_memory_bytes_total >= (20 * MIB) as u64);

    // Joins 20 MiB into the fill: the start is no longer in memory.
    let late = h.cache.fill(&d, src.clone());
    assert!(!late.is_leader(), "joined the running fill");
    let late = tokio::spawn(collect(late.reader(0, u64::MAX)));
    go.notify_one();
    feed(20 * MIB, body.len()).await;
    drop(tx);

    assert_eq!(leader.await.unwrap().unwrap(), body, "leader bytes");
    assert_eq!(slow.await.unwrap().unwrap(), body, "slow follower bytes");
    assert_eq!(late.await.unwrap().unwrap(), body, "late follower bytes");
    assert_eq!(src.opens(), vec![0], "exactly one upstream open");
    let s = h.cache.stats();
    assert!(
        s.fill_spool_bytes_total >= (2 * 8 * MIB) as u64,
        "the two followers read back what left memory: {s:?}"
    );
    assert!(
        s.fill_spilled_readers_total >= 1,
        "the stalled follower was dropped from the window, not waited for: {s:?}"
    );
    fill.wait().await.unwrap();
    assert!(h.cache.verify_blob(&d).await.unwrap());
    h.stop().await;
}

/// A client a little slower than the upstream (here: the source delivers at once, the reader
/// pauses every 2 MiB) paces the fill instead of falling behind the memory window: every byte
/// it takes before the digest matched comes from memory, and no reader is dropped to the spool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_slower_than_the_upstream_paces_the_fill_from_memory() {
    const MIB: usize = 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    // Only a fill that does not wait for its reader drops it, however busy the test machine.
    let h = open(CacheConfig {
        fill_pace_wait: std::time::Duration::from_secs(30),
        ..cfg(dir.path())
    })
    .await;
    let body = data(64 * MIB);
    let d = digest_of(&body);
    let mut fake = Fake::new(body.clone());
    fake.chunk = 256 * 1024;
    let src = Arc::new(fake);
    let fill = h.cache.fill(&d, src.clone());
    let mut r = fill.reader(0, u64::MAX);
    let mut out = Vec::with_capacity(body.len());
    let mut paused_at = 0;
    let mut peak_window = 0;
    while let Some(c) = r.next().await {
        out.extend_from_slice(&c.unwrap());
        if out.len() - paused_at >= 2 * MIB {
            paused_at = out.len();
            tokio::time::sleep(std::time::Duration::from_millis(3)).await;
            peak_window = peak_window.max(h.cache.stats().fill_memory_window_bytes);
        }
    }
    assert_eq!(out, body);
    assert_eq!(src.opens(), vec![0]);
    let s = h.cache.stats();
    assert_eq!(s.fill_spilled_readers_total, 0, "{s:?}");
    // What the reader had not taken when the digest matched comes from the spool (the window
    // is released then); everything before, from memory.
    assert!(
        s.fill_spool_bytes_total <= 16 * MIB as u64 + 1,
        "the reader fell behind the window: {s:?}"
    );
    assert!(s.fill_memory_bytes_total >= 48 * MIB as u64, "{s:?}");
    assert!(
        peak_window <= (16 * MIB + 16 * 256 * 1024) as u64,
        "window above its bound: {peak_window}"
    );
    fill.wait().await.unwrap();
    h.stop().await;
}

/// A hundred readers of one fill (a blob every node pulls at once) each get the exact blob
/// from one upstream open, whether the window waits for them or leaves them to the spool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_readers_share_one_paced_fill() {
    const MIB: usize = 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let h = open(cfg(dir.path())).await;
    let body = data(24 * MIB);
    let d = digest_of(&body);
    let mut fake = Fake::new(body.clone());
    fake.chunk = 64 * 1024;
    let src = Arc::new(fake);
    let fill = h.cache.fill(&d, src.clone());
    // Each reader compares as it goes (a hundred copies of the blob would be 2.4 GB).
    let readers: Vec<_> = (0..100)
        .map(|_| {
            let (mut r, body) = (fill.reader(0, u64::MAX), body.clone());
            tokio::spawn(async move {
                let mut pos = 0;
                while let Some(c) = r.next().await {
                    let c = c?;
                    assert!(c[..] == body[pos..pos + c.len()], "wrong bytes at {pos}");
                    pos += c.len();
                }
                Ok::<_, CacheError>(pos)
            })
        })
        .collect();
    for r in readers {
        assert_eq!(
            r.await.unwrap().unwrap(),
            body.len(),
            "a reader ended short"
        );
    }
    assert_eq!(src.opens(), vec![0]);
    fill.wait().await.unwrap();
    let s = h.cache.stats();
    assert_eq!(
        s.fill_memory_bytes_total + s.fill_spool_bytes_total,
        100 * body.len() as u64,
        "{s:?}"
    );
    h.stop().await;
}

/// An upstream body that trickles below the floor is re-opened at its offset; when every
/// attempt trickles, the resume budget fails the fill, and the overall deadline fails a fill
/// that never ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_body_is_resumed_then_failed() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.fill_min_rate = Some((64 * 1024, std::time::Duration::from_millis(200)));
    c.resume_attempts = 2;
    let h = open(c).await;

    // First body: 100 KiB, then it stalls; the second body delivers the rest.
    let body = data(300_000);
    let d = digest_of(&body);
    let (src, txs) = Gated::new(body.len() as u64, 2);
    let src = Arc::new(src);
    txs[0].send(body.slice(..100_000)).await.unwrap();
    let fill = h.cache.fill(&d, src.clone());
    let reader = tokio::spawn(collect(fill.reader(0, u64::MAX)));
    eventually("the trickling body is re-opened", || src.opens().len() == 2).await;
    assert_eq!(
        src.opens(),
        vec![0, 100_000],
        "resumed at the received offset"
    );
    txs[1].send(body.slice(100_000..)).await.unwrap();
    assert_eq!(reader.await.unwrap().unwrap(), body);
    assert_eq!(h.cache.stats().resumes_total, 1);

    // Every body trickles: two resumes, then the fill fails and so does its reader.
    let body = data(200_000);
    let d = digest_of(&body);
    let (src, txs) = Gated::new(body.len() as u64, 3);
    let src = Arc::new(src);
    for (i, tx) in txs.iter().enumerate() {
        tx.send(body.slice(i * 1000..(i + 1) * 1000)).await.unwrap();
    }
    let started = std::time::Instant::now();
    let fill = h.cache.fill(&d, src.clone());
    let err = collect(fill.reader(0, u64::MAX)).await.unwrap_err();
    assert!(
        matches!(
            &err,
            CacheError::Fill(FillError::ResumeExhausted { last, .. })
                if last.downcast_ref::<registry_cache::Stalled>().is_some()
        ),
        "{err:?}"
    );
    assert_eq!(src.opens(), vec![0, 1000, 2000]);
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    drop(txs);
    h.stop().await;

    // The overall deadline ends a fill whose upstream keeps the floor but never finishes.
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.fill_deadline = Some(std::time::Duration::from_millis(300));
    let h = open(c).await;
    let (src, txs) = Gated::new(body.len() as u64, 1);
    txs[0].send(body.slice(..1000)).await.unwrap();
    let fill = h.cache.fill(&d, Arc::new(src));
    let err = collect(fill.reader(0, u64::MAX)).await.unwrap_err();
    assert!(
        matches!(err, CacheError::Fill(FillError::DeadlineExceeded { .. })),
        "{err:?}"
    );
    assert!(
        files_in(&dir.path().join("tmp")).is_empty(),
        "spool removed"
    );
    drop(txs);
    h.stop().await;
}
