//! Persistence: manifests, tags, restart sweep and index rebuild, corruption handling, eviction,
//! path safety.

mod common;

use std::{
    fs::File,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use proptest::prelude::*;
use registry_cache::{Cache, CacheError, Digest};

async fn put_blob(cache: &Cache, body: &Bytes) -> Digest {
    let d = digest_of(body);
    cache
        .fill(&d, Arc::new(Fake::new(body.clone())))
        .wait()
        .await
        .unwrap();
    d
}

fn blob_path(dir: &std::path::Path, d: &Digest) -> std::path::PathBuf {
    dir.join("blobs/sha256").join(d.digest())
}

fn set_mtime(path: &std::path::Path, ago: Duration) {
    File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(SystemTime::now() - ago)
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_are_verified_and_served_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(cfg(dir.path())).await;
    let m = Bytes::from_static(
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#,
    );
    let d = digest_of(&m);
    let wrong = digest_of(b"other");
    let err = h
        .cache
        .put_manifest(&wrong, "x", m.clone(), vec![])
        .await
        .unwrap_err();
    assert!(matches!(err, CacheError::DigestMismatch { .. }));
    assert_eq!(h.cache.stats().digest_mismatches_total, 1);
    assert!(h.cache.manifest(&wrong).await.unwrap().is_none());

    let mt = "application/vnd.oci.image.manifest.v1+json";
    h.cache
        .put_manifest(&d, mt, m.clone(), vec![])
        .await
        .unwrap();
    let got = h.cache.manifest(&d).await.unwrap().unwrap();
    assert_eq!((got.bytes, got.media_type.as_str()), (m.clone(), mt));

    // Bit rot on disk: detected on read, removed, reported as a miss.
    let path = dir.path().join("manifests/sha256").join(d.digest());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[3] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    assert!(h.cache.manifest(&d).await.unwrap().is_none());
    assert!(!path.exists());
    assert_eq!(h.cache.stats().corrupt_total, 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_roundtrip_survive_restart_and_reject_bad_names() {
    let dir = tempfile::tempdir().unwrap();
    let d = digest_of(b"manifest");
    {
        let h = open(cfg(dir.path())).await;
        let before = SystemTime::now() - Duration::from_secs(1);
        h.cache
            .put_tag("library/alpine", "3.20", &d, "application/json")
            .await
            .unwrap();
        let rec = h
            .cache
            .tag("library/alpine", "3.20")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rec.digest, d);
        assert!(rec.checked_at >= before);
        assert!(
            h.cache
                .tag("library/alpine", "3.21")
                .await
                .unwrap()
                .is_none()
        );
        for bad in ["../x", "..", "a/b", "", ".x"] {
            assert!(matches!(
                h.cache.put_tag("r", bad, &d, "m").await,
                Err(CacheError::InvalidTag)
            ));
        }
        // A traversal-looking repo is only ever hashed.
        h.cache
            .put_tag("../../../etc", "passwd", &d, "m")
            .await
            .unwrap();
        h.stop().await;
    }
    assert_eq!(files_in(dir.path()), ["blobs", "manifests", "tags", "tmp"]);
    let h = open(cfg(dir.path())).await;
    assert_eq!(h.cache.stats().tag_entries, 2);
    let rec = h
        .cache
        .tag("../../../etc", "passwd")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.media_type, "m");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_sweeps_temp_and_drops_truncated_or_foreign_files() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (data(50_000), data(40_000));
    let m = Bytes::from_static(b"{\"m\":1}");
    let (da, db, dm);
    {
        let h = open(cfg(dir.path())).await;
        da = put_blob(&h.cache, &a).await;
        db = put_blob(&h.cache, &b).await;
        dm = digest_of(&m);
        h.cache
            .put_manifest(&dm, "t", m.clone(), vec![da.clone()])
            .await
            .unwrap();
        h.stop().await;
    }
    // Simulated crash debris and damage.
    std::fs::write(dir.path().join("tmp/.tmpSPOOL"), b"partial").unwrap();
    std::fs::write(dir.path().join("blobs/sha256/not-a-digest"), b"junk").unwrap();
    std::fs::write(
        dir.path()
            .join("blobs/sha256")
            .join(format!("{}.meta", "ab".repeat(32))),
        b"{}",
    )
    .unwrap();
    File::options()
        .write(true)
        .open(blob_path(dir.path(), &da))
        .unwrap()
        .set_len(10_000)
        .unwrap();
    let mpath = dir.path().join("manifests/sha256").join(dm.digest());
    std::fs::write(&mpath, b"{\"m\"").unwrap();

    let h = open(cfg(dir.path())).await;
    assert!(files_in(&dir.path().join("tmp")).is_empty());
    assert!(
        h.cache.blob(&da).await.unwrap().is_none(),
        "truncated blob never served"
    );
    assert!(
        h.cache.manifest(&dm).await.unwrap().is_none(),
        "truncated manifest never served"
    );
    let hit = h.cache.blob(&db).await.unwrap().unwrap();
    assert_eq!(collect(hit.reader(0, u64::MAX)).await.unwrap(), b);
    let left = files_in(&dir.path().join("blobs/sha256"));
    assert_eq!(
        left,
        [db.digest().to_string(), format!("{}.meta", db.digest())]
    );
    let s = h.cache.stats();
    assert_eq!(
        (s.blob_entries, s.manifest_entries, s.size_bytes),
        (1, 0, 40_000)
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_is_detected_at_serve_time_and_on_deep_verify() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(cfg(dir.path())).await;
    let (a, b) = (data(30_000), data(31_000));
    let da = put_blob(&h.cache, &a).await;
    let db = put_blob(&h.cache, &b).await;
    // Truncated under a running cache: the size check catches it.
    File::options()
        .write(true)
        .open(blob_path(dir.path(), &da))
        .unwrap()
        .set_len(5)
        .unwrap();
    assert!(h.cache.blob(&da).await.unwrap().is_none());
    assert!(!blob_path(dir.path(), &da).exists());
    // Same length, flipped byte: only the deep check catches it.
    let p = blob_path(dir.path(), &db);
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[100] ^= 0x55;
    std::fs::write(&p, bytes).unwrap();
    assert!(h.cache.blob(&db).await.unwrap().is_some());
    assert!(!h.cache.verify_blob(&db).await.unwrap());
    assert!(h.cache.blob(&db).await.unwrap().is_none());
    assert!(!p.exists());
    assert_eq!(h.cache.stats().corrupt_total, 2);
    // Refetch works after removal.
    let fill = h.cache.fill(&db, Arc::new(Fake::new(b.clone())));
    fill.wait().await.unwrap();
    assert!(h.cache.verify_blob(&db).await.unwrap());
    h.stop().await;
}

fn capped(dir: &std::path::Path, max: u64, low: f64) -> registry_cache::CacheConfig {
    let mut c = cfg(dir);
    c.max_size = Some(max);
    c.high_watermark = 0.9;
    c.low_watermark = low;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_is_lru_down_to_the_low_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(capped(dir.path(), 100_000, 0.5)).await;
    let mut ds = Vec::new();
    for i in 0..4 {
        ds.push(put_blob(&h.cache, &data(20_000 + i)).await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        h.cache.stats().evictions_total,
        0,
        "below the high watermark"
    );
    drop(h.cache.blob(&ds[0]).await.unwrap().unwrap()); // A is now recent
    tokio::time::sleep(Duration::from_millis(5)).await;
    ds.push(put_blob(&h.cache, &data(20_004)).await); // 100 KB > 90 KB
    h.cache.evict().await.unwrap(); // waits for the triggered pass
    let s = h.cache.stats();
    assert_eq!(s.evictions_total, 3);
    assert!(s.size_bytes <= 50_000, "{}", s.size_bytes);
    for (i, d) in ds.iter().enumerate() {
        let cached = h.cache.blob(d).await.unwrap().is_some();
        assert_eq!(cached, i == 0 || i == 4, "blob {i}");
        assert_eq!(blob_path(dir.path(), d).exists(), cached);
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_never_takes_pinned_or_in_flight_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(capped(dir.path(), 100_000, 0.1)).await;
    let old = data(30_000);
    let d_old = put_blob(&h.cache, &old).await;
    let hit = h.cache.blob(&d_old).await.unwrap().unwrap(); // pinned: a client is reading it
    let mut reader = hit.reader(0, u64::MAX);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let slow = data(40 * 1024);
    let d_slow = digest_of(&slow);
    let fill = h
        .cache
        .fill(&d_slow, Arc::new(Fake::new(slow.clone()).slow(4096, 10)));
    let d_other = put_blob(&h.cache, &data(35_000)).await;
    let d_last = put_blob(&h.cache, &data(36_000)).await; // 101 KB committed > 90 KB
    h.cache.evict().await.unwrap();
    assert!(
        h.cache.blob(&d_other).await.unwrap().is_none(),
        "unpinned LRU evicted"
    );
    assert!(blob_path(dir.path(), &d_old).exists(), "pinned blob kept");
    let mut got = Vec::new();
    while let Some(c) = reader.next().await {
        got.extend_from_slice(&c.unwrap());
    }
    assert_eq!(got, old);
    drop((reader, hit));
    assert_eq!(collect(fill.reader(0, u64::MAX)).await.unwrap(), slow);
    fill.wait().await.unwrap();
    assert!(
        blob_path(dir.path(), &d_slow).exists(),
        "in-flight fill committed"
    );
    drop(fill);
    let _ = d_last;
    // Once unpinned, the old blob is evictable.
    put_blob(&h.cache, &data(60_000)).await;
    h.cache.evict().await.unwrap();
    assert!(h.cache.blob(&d_old).await.unwrap().is_none());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_and_tags_go_before_the_blobs_they_reference() {
    let dir = tempfile::tempdir().unwrap();
    let h = open(capped(dir.path(), 100_000, 0.6)).await;
    let layer = put_blob(&h.cache, &data(40_000)).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let man = Bytes::from(format!(r#"{{"layers":["{layer}"]}}"#));
    let dman = digest_of(&man);
    h.cache
        .put_manifest(&dman, "m", man, vec![layer.clone()])
        .await
        .unwrap();
    let idx = Bytes::from(format!(r#"{{"manifests":["{dman}"]}}"#));
    let didx = digest_of(&idx);
    h.cache
        .put_manifest(&didx, "i", idx, vec![dman.clone()])
        .await
        .unwrap();
    h.cache.put_tag("app", "v1", &didx, "i").await.unwrap();
    h.cache
        .put_tag("app", "v1-amd64", &dman, "m")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    // Keep the manifests recent, so only the layer's age selects it.
    assert!(h.cache.manifest(&dman).await.unwrap().is_some());
    let keep = put_blob(&h.cache, &data(30_000)).await;
    let keep2 = put_blob(&h.cache, &data(25_000)).await; // > 90 KB
    h.cache.evict().await.unwrap();
    assert!(
        h.cache.blob(&layer).await.unwrap().is_none(),
        "LRU layer evicted"
    );
    assert!(
        h.cache.manifest(&dman).await.unwrap().is_none(),
        "its manifest first"
    );
    assert!(
        h.cache.manifest(&didx).await.unwrap().is_none(),
        "and the index above it"
    );
    assert!(h.cache.tag("app", "v1").await.unwrap().is_none());
    assert!(h.cache.tag("app", "v1-amd64").await.unwrap().is_none());
    assert!(files_in(&dir.path().join("manifests/sha256")).is_empty());
    assert!(h.cache.blob(&keep).await.unwrap().is_some());
    assert!(h.cache.blob(&keep2).await.unwrap().is_some());
    assert_eq!(h.cache.stats().evictions_total, 3);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_access_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (data(40_000), data(40_001));
    let (da, db);
    {
        let h = open(cfg(dir.path())).await;
        da = put_blob(&h.cache, &a).await;
        db = put_blob(&h.cache, &b).await;
        h.stop().await;
    }
    set_mtime(&blob_path(dir.path(), &da), Duration::from_secs(7200));
    set_mtime(&blob_path(dir.path(), &db), Duration::from_secs(3600));
    {
        let h = open(cfg(dir.path())).await;
        drop(h.cache.blob(&da).await.unwrap().unwrap()); // A used now; persisted as mtime
        let p = blob_path(dir.path(), &da);
        eventually("mtime persisted", || {
            let m = std::fs::metadata(&p).unwrap().modified().unwrap();
            SystemTime::now().duration_since(m).unwrap_or_default() < Duration::from_secs(60)
        })
        .await;
        h.stop().await;
    }
    // After the restart the cap forces one eviction: B, untouched for an hour, goes.
    let h = open(capped(dir.path(), 80_000, 0.5)).await;
    h.cache.evict().await.unwrap();
    assert!(h.cache.blob(&db).await.unwrap().is_none());
    assert!(h.cache.blob(&da).await.unwrap().is_some());
    h.stop().await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn crafted_repo_and_tag_never_escape_the_cache_dir(
        repo in prop_oneof![".{0,60}", "(\\.\\./){1,4}[a-z]{0,5}", "/[a-z/]{0,20}"],
        tag in prop_oneof![".{0,20}", "\\.\\.(/\\.\\.){0,3}", "[a-z]{1,5}/\\.\\./[a-z]{1,5}"],
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("cache");
        rt.block_on(async {
            let h = open(cfg(&root)).await;
            let d = digest_of(b"x");
            let put = h.cache.put_tag(&repo, &tag, &d, "m").await;
            let got = h.cache.tag(&repo, &tag).await;
            match put {
                Ok(()) => prop_assert_eq!(got.unwrap().unwrap().digest, d),
                Err(e) => prop_assert!(matches!(e, CacheError::InvalidTag | CacheError::InvalidRepo)),
            }
            h.stop().await;
            Ok(())
        })?;
        prop_assert_eq!(files_in(outer.path()), ["cache"]);
        // Every tag record sits exactly two levels below tags/.
        for repo_dir in std::fs::read_dir(root.join("tags")).unwrap() {
            let repo_dir = repo_dir.unwrap().path();
            prop_assert!(repo_dir.is_dir());
            for f in std::fs::read_dir(&repo_dir).unwrap() {
                prop_assert!(f.unwrap().path().is_file());
            }
        }
    }
}

/// The hit path reads one chunk ahead of the consumer: a flipped byte in any chunk of a blob not
/// yet verified in this process is still caught on its first whole read, the stream ends with an
/// error before its last chunk, and the blob is evicted; a Range of it never carries the bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_under_read_ahead_is_never_served_as_complete() {
    let chunk = registry_cache::CHUNK as usize;
    let len = 4 * chunk + 1234;
    // Flip in the first chunk (read ahead of everything), a middle one and the last one.
    for flip in [10, 2 * chunk + 7, len - 3] {
        let dir = tempfile::tempdir().unwrap();
        let body = data(len);
        let d;
        {
            let h = open(cfg(dir.path())).await;
            d = put_blob(&h.cache, &body).await;
            h.stop().await;
        }
        let p = blob_path(dir.path(), &d);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[flip] ^= 0x01;
        std::fs::write(&p, bytes).unwrap();

        // A restart forgets that the fill verified it: the first read hashes.
        let h = open(cfg(dir.path())).await;
        let hit = h.cache.blob(&d).await.unwrap().expect("committed blob");
        assert!(!hit.is_trusted());
        let mut s = hit.reader(0, u64::MAX);
        let (mut got, mut err) = (0usize, None);
        while let Some(item) = s.next().await {
            match item {
                Ok(c) => {
                    assert!(c.len() <= chunk, "chunk over bound");
                    got += c.len();
                }
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        assert!(
            matches!(err, Some(CacheError::Corrupt(_))),
            "flip at {flip}: {err:?}"
        );
        assert!(got < len, "flip at {flip}: all {len} bytes were handed out");
        assert!(s.next().await.is_none(), "the stream ends after its error");
        drop(s);
        drop(hit);
        assert!(h.cache.blob(&d).await.unwrap().is_none(), "evicted");
        assert!(!p.exists());
        assert_eq!(h.cache.stats().corrupt_total, 1);
        h.stop().await;
    }
}
