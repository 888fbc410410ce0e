//! Fake upstreams and helpers shared by the cache tests.
#![allow(dead_code, unreachable_pub)]

use std::{path::Path, sync::Mutex, time::Duration};

use bytes::Bytes;
use futures_util::{StreamExt, future::BoxFuture, stream};
use registry_cache::{
    BlobSource, BlobStream, Cache, CacheConfig, CacheError, Digest, SourceBody, SourceError,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

#[derive(Debug)]
pub struct NotFound;
impl std::fmt::Display for NotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream 404")
    }
}
impl std::error::Error for NotFound {}

/// A configurable fake upstream that counts opens and their offsets.
pub struct Fake {
    pub data: Bytes,
    pub chunk: usize,
    /// Sleep before every chunk but the first of a body.
    pub delay: Duration,
    /// Break each body with a retryable error after this many bytes...
    pub fail_after: Option<u64>,
    /// ...but only for the first `fail_times` opens.
    pub fail_times: usize,
    /// Flip one byte in the middle.
    pub corrupt: bool,
    /// Announce the total length.
    pub announce_len: bool,
    /// `total_len` announced by resumed bodies (offset > 0), if different.
    pub resumed_total: Option<u64>,
    /// Fail every open with a fatal 404.
    pub not_found: bool,
    /// A broken body ends cleanly (premature EOF) instead of with an error.
    pub eof_instead_of_error: bool,
    pub opens: Mutex<Vec<u64>>,
}

impl Fake {
    pub fn new(data: Bytes) -> Self {
        Self {
            data,
            chunk: 16 * 1024,
            delay: Duration::ZERO,
            fail_after: None,
            fail_times: 0,
            corrupt: false,
            announce_len: true,
            resumed_total: None,
            not_found: false,
            eof_instead_of_error: false,
            opens: Mutex::new(Vec::new()),
        }
    }

    pub fn slow(mut self, chunk: usize, delay_ms: u64) -> Self {
        self.chunk = chunk;
        self.delay = Duration::from_millis(delay_ms);
        self
    }

    pub fn broken(mut self, after: u64, times: usize) -> Self {
        self.fail_after = Some(after);
        self.fail_times = times;
        self
    }

    pub fn opens(&self) -> Vec<u64> {
        self.opens.lock().unwrap().clone()
    }
}

impl BlobSource for Fake {
    fn open(&self, offset: u64) -> BoxFuture<'static, Result<SourceBody, SourceError>> {
        let n = {
            let mut o = self.opens.lock().unwrap();
            o.push(offset);
            o.len() - 1
        };
        if self.not_found {
            return Box::pin(async { Err(SourceError::fatal(NotFound)) });
        }
        let mut full = self.data.to_vec();
        if self.corrupt {
            let mid = full.len() / 2;
            full[mid] ^= 0xff;
        }
        let total = full.len() as u64;
        let body = Bytes::from(full).slice(offset as usize..);
        let limit = match self.fail_after {
            Some(k) if n < self.fail_times => Some(k as usize),
            _ => None,
        };
        let total_len = match (self.announce_len, offset > 0, self.resumed_total) {
            (false, _, _) => None,
            (true, true, Some(t)) => Some(t),
            (true, _, _) => Some(total),
        };
        let (chunk, delay, eof) = (self.chunk, self.delay, self.eof_instead_of_error);
        let s = stream::unfold((0usize, false), move |(pos, ended)| {
            let body = body.clone();
            async move {
                if ended {
                    return None;
                }
                if pos > 0 && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let end = (pos + chunk).min(body.len());
                if let Some(k) = limit
                    && pos >= k
                {
                    if eof {
                        return None;
                    }
                    let e = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
                    return Some((Err(SourceError::retryable(e)), (pos, true)));
                }
                let end = limit.map_or(end, |k| end.min(k));
                if pos >= body.len() {
                    return None;
                }
                Some((Ok(body.slice(pos..end)), (end, false)))
            }
        });
        Box::pin(async move {
            Ok(SourceBody {
                total_len,
                body: s.boxed(),
            })
        })
    }
}

pub fn data(n: usize) -> Bytes {
    (0..n)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 9)) as u8)
        .collect::<Vec<u8>>()
        .into()
}

pub fn digest_of(b: &[u8]) -> Digest {
    registry_oci::sha256_digest(b)
}

pub struct Harness {
    pub cache: Cache,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
}

pub fn cfg(dir: &Path) -> CacheConfig {
    CacheConfig {
        dir: dir.to_path_buf(),
        resume_backoff: Duration::from_millis(5),
        ..CacheConfig::default()
    }
}

pub async fn open(cfg: CacheConfig) -> Harness {
    let tasks = TaskTracker::new();
    let shutdown = CancellationToken::new();
    let cache = Cache::open(cfg, tasks.clone(), shutdown.clone())
        .await
        .unwrap();
    Harness {
        cache,
        tasks,
        shutdown,
    }
}

impl Harness {
    /// Cancels, closes and waits for every task (bounded).
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.close();
        tokio::time::timeout(Duration::from_secs(5), self.tasks.wait())
            .await
            .expect("tasks outlived shutdown");
    }
}

pub async fn collect(mut s: BlobStream) -> Result<Vec<u8>, CacheError> {
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        let c = c?;
        assert!(c.len() as u64 <= registry_cache::CHUNK, "chunk over bound");
        out.extend_from_slice(&c);
    }
    Ok(out)
}

/// Polls `f` every 5 ms for up to 5 s.
pub async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..1000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting for {what}");
}

pub fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// An upstream the test feeds chunk by chunk: each `open` takes the next queued body (its
/// receiver); bytes arrive only when the test sends them, so a test can hold a fill at any
/// offset. A body whose sender is dropped ends (cleanly) there.
pub struct Gated {
    pub total: u64,
    bodies: Mutex<std::collections::VecDeque<tokio::sync::mpsc::Receiver<Bytes>>>,
    pub opens: Mutex<Vec<u64>>,
}

impl Gated {
    /// A source of `total` bytes with `bodies` bodies; returns their senders.
    pub fn new(total: u64, bodies: usize) -> (Self, Vec<tokio::sync::mpsc::Sender<Bytes>>) {
        let mut rxs = std::collections::VecDeque::new();
        let mut txs = Vec::new();
        for _ in 0..bodies {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            rxs.push_back(rx);
            txs.push(tx);
        }
        let g = Self {
            total,
            bodies: Mutex::new(rxs),
            opens: Mutex::new(Vec::new()),
        };
        (g, txs)
    }

    pub fn opens(&self) -> Vec<u64> {
        self.opens.lock().unwrap().clone()
    }
}

impl BlobSource for Gated {
    fn open(&self, offset: u64) -> BoxFuture<'static, Result<SourceBody, SourceError>> {
        self.opens.lock().unwrap().push(offset);
        let rx = self.bodies.lock().unwrap().pop_front();
        let total_len = Some(self.total);
        Box::pin(async move {
            let Some(rx) = rx else {
                return Err(SourceError::fatal(NotFound));
            };
            let body = stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|b| (Ok(b), rx)) },
            );
            Ok(SourceBody {
                total_len,
                body: body.boxed(),
            })
        })
    }
}
