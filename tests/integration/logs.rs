//! The binary's JSON log is machine-readable: a whole run (start-up with a warning,
//! requests, a failing probe, shutdown) parsed line by line with a parser that refuses
//! duplicate keys, durations as plain numbers, one drain line per named listener.

use std::collections::HashSet;
use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use registry_tests::{FakeUpstream, Image, fake_upstream::UPSTREAM_REPO, test_client};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::config::proxy_bin;

/// A JSON value whose objects must not repeat a key (serde_json keeps the last one
/// silently; Loki, jq and friends disagree on which one wins).
struct Strict;

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Strict;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!("duplicate key {key:?}")));
            }
            map.next_value::<Strict>()?;
        }
        Ok(Strict)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        while seq.next_element::<Strict>()?.is_some() {}
        Ok(Strict)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_str<E>(self, _: &str) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict)
    }
}

#[test]
fn strict_parser_rejects_duplicate_keys() {
    assert!(serde_json::from_str::<Strict>(r#"{"a":1,"b":{"c":[{"d":1}]}}"#).is_ok());
    assert!(serde_json::from_str::<Strict>(r#"{"message":"x","message":"y"}"#).is_err());
    assert!(serde_json::from_str::<Strict>(r#"{"a":{"b":1,"b":2}}"#).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_of_a_whole_run_parses_strictly() {
    let up = FakeUpstream::start().await;
    let img = Image::random(&[1024]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &img);
    let cache = tempfile::tempdir().unwrap();
    let mut child = Command::new(proxy_bin())
        .args(up.proxy_args())
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--log-format", "json", "--client-auth", "none"])
        // A start-up warning (the directory is moot) and a probe warning (no such tag).
        .args(["--no-cache", "--cache-dir", cache.path().to_str().unwrap()])
        .args(["--probe-reference", "no-such-tag"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut api = None;
    let mut probe_warned = false;
    while api.is_none() || !probe_warned {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = tokio::task::block_in_place(|| rx.recv_timeout(left))
            .unwrap_or_else(|_| panic!("no start-up within 20s: {lines:#?}"));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["message"] == "serving registry API" {
            api = v["addr"].as_str().map(str::to_owned);
        }
        probe_warned |= v["message"] == "upstream probe failing";
        lines.push(line);
    }
    let api = api.unwrap();
    let c = test_client();
    for (path, status) in [
        ("/v2/".to_owned(), 200),
        ("/v2/system/deckhouse/manifests/v1".to_owned(), 200),
        (
            format!("/v2/system/deckhouse/blobs/{}", img.layers[0].digest),
            200,
        ),
        ("/v2/system/deckhouse/manifests/missing".to_owned(), 404),
    ] {
        let r = c.get(format!("http://{api}{path}")).send().await.unwrap();
        assert_eq!(r.status(), status, "{path}");
        r.bytes().await.unwrap();
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit within 15s of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    reader.join().unwrap();
    lines.extend(rx.try_iter());

    let mut drained = Vec::new();
    let mut requests = 0;
    for line in &lines {
        serde_json::from_str::<Strict>(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
        if v["message"] == "all connections drained" {
            drained.push(v["span"]["listener"].as_str().unwrap_or("?").to_owned());
        }
        if v["message"] == "request" {
            requests += 1;
            let d = &v["duration_ms"];
            assert!(d.as_f64().is_some_and(|d| d >= 0.0), "{line}");
            // Microsecond resolution: at most three decimals as written.
            let raw = line.split("\"duration_ms\":").nth(1).unwrap();
            let raw = raw.split([',', '}']).next().unwrap();
            let decimals = raw.split_once('.').map_or(0, |(_, f)| f.len());
            assert!(decimals <= 3, "duration_ms {raw} in {line}");
        }
    }
    assert_eq!(requests, 4, "{lines:#?}");
    drained.sort();
    assert_eq!(drained, ["api", "metrics"], "{lines:#?}");
    let warned = |m: &str| lines.iter().any(|l| l.contains(m));
    assert!(
        warned("--cache-dir has no effect with --no-cache"),
        "{lines:#?}"
    );
    assert!(
        warned("\"detail\":"),
        "probe warning carries its detail: {lines:#?}"
    );
    let signals = lines
        .iter()
        .filter(|l| l.contains("shutdown signal received"))
        .count();
    assert_eq!(signals, 1, "{lines:#?}");
}
