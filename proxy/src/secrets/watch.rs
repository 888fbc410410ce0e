//! Polling watcher for mounted secret files.
//!
//! A Kubernetes Secret volume updates by writing a new `..data_<ts>` directory and
//! atomically swapping the `..data` symlink; the path a container opens
//! (`key -> ..data/key`) keeps its own mtime and inode, so inotify on the path and
//! mtime checks both miss updates. The watcher instead re-reads each file through
//! its symlinks every interval and compares a SHA-256 of the content, which sees every
//! swap and costs one small read per file per interval.
//!
//! Each file has a callback that parses the new bytes and installs them (e.g.
//! `ClientAuth::set_htpasswd`). When it fails, the previous value stays in force and one
//! warning, a [`SecretError`] naming the file (never its content), is logged; the same
//! broken content is not reported again, and the next different content is tried afresh.

use std::path::{Path, PathBuf};
use std::time::Duration;

use registry_oci::Sha256Hasher;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Largest file read; secrets are a few KiB, a bigger file is a mistake.
const MAX_FILE_LEN: u64 = 1024 * 1024;

/// Why a callback refused new content.
pub(crate) type Reason = Box<dyn std::error::Error + Send + Sync>;

/// A watched file whose new content could not be read or installed; the previous value
/// stays in force.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {reason}", path.display())]
pub(crate) struct SecretError {
    /// What the file holds, e.g. "upstream CA".
    pub(crate) what: &'static str,
    /// The watched path.
    pub(crate) path: PathBuf,
    /// Why.
    pub(crate) reason: Reason,
}

/// Parses and installs new content, one slice per watched path. Runs on the watcher task:
/// keep it quick (parsing a key or an htpasswd file is), do no blocking I/O; the watcher
/// has read every file it needs.
type OnChange = Box<dyn FnMut(&[Vec<u8>]) -> Result<(), Reason> + Send>;

/// Files installed together (one, or a pair such as an S3 key pair): a change of any
/// hands the current content of all to the callback at once.
struct Watched {
    /// The first names the entry in logs.
    paths: Vec<PathBuf>,
    what: &'static str,
    on_change: OnChange,
    /// Hash of the last contents handed to the callback (or loaded by the caller).
    seen: Option<[u8; 32]>,
    /// A read failure is reported once until the file is readable again.
    read_failing: bool,
}

/// Watches a set of files; see the module docs.
pub(crate) struct FileWatcher {
    interval: Duration,
    files: Vec<Watched>,
}

impl std::fmt::Debug for FileWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileWatcher")
            .field("interval", &self.interval)
            .field(
                "files",
                &self.files.iter().map(|w| &w.paths).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl FileWatcher {
    /// A watcher polling every `interval` (at least 10 ms).
    #[must_use]
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval: interval.max(Duration::from_millis(10)),
            files: Vec::new(),
        }
    }

    /// Watches `path`; the first poll hands its current content to `on_change`.
    pub(crate) fn watch(
        &mut self,
        path: impl Into<PathBuf>,
        what: &'static str,
        mut on_change: impl FnMut(&[u8]) -> Result<(), Reason> + Send + 'static,
    ) -> &mut Self {
        self.files.push(Watched {
            paths: vec![path.into()],
            what,
            on_change: Box::new(move |all: &[Vec<u8>]| {
                on_change(all.first().map_or(&[][..], Vec::as_slice))
            }),
            seen: None,
            read_failing: false,
        });
        self
    }

    /// Watches `path` whose content `loaded` the caller has already installed: only a
    /// later, different content reaches `on_change`. Race-free with the startup load:
    /// if the file changed since, the first poll sees the difference.
    pub(crate) fn watch_loaded(
        &mut self,
        path: impl Into<PathBuf>,
        what: &'static str,
        loaded: &[u8],
        on_change: impl FnMut(&[u8]) -> Result<(), Reason> + Send + 'static,
    ) -> &mut Self {
        self.watch(path, what, on_change);
        if let Some(w) = self.files.last_mut() {
            w.seen = Some(sha256_all(&[loaded]));
        }
        self
    }

    /// Watches two files installed together, whose contents `loaded` the caller has
    /// already installed: when either changes, `on_change` gets both as they are now,
    /// in one call, so a Secret swapping both never installs a mixed pair.
    pub(crate) fn watch_pair_loaded(
        &mut self,
        paths: [PathBuf; 2],
        what: &'static str,
        loaded: [&[u8]; 2],
        mut on_change: impl FnMut(&[u8], &[u8]) -> Result<(), Reason> + Send + 'static,
    ) -> &mut Self {
        self.files.push(Watched {
            paths: paths.into(),
            what,
            on_change: Box::new(move |all: &[Vec<u8>]| match all {
                [a, b] => on_change(a, b),
                _ => Err("a pair of files expected".into()),
            }),
            seen: Some(sha256_all(&loaded)),
            read_failing: false,
        });
        self
    }

    /// Checks every file once; returns how many new contents were installed.
    pub(crate) async fn poll(&mut self) -> usize {
        let mut applied = 0;
        for w in &mut self.files {
            let Some(contents) = read_all(w).await else {
                continue;
            };
            let hash = sha256_all(&contents);
            if w.seen == Some(hash) {
                continue;
            }
            w.seen = Some(hash);
            let path = w.paths.first().cloned().unwrap_or_default();
            match (w.on_change)(&contents) {
                Ok(()) => {
                    applied += 1;
                    tracing::info!(path = %path.display(), what = w.what, "reloaded");
                }
                Err(reason) => {
                    let e = SecretError {
                        what: w.what,
                        path,
                        reason,
                    };
                    tracing::warn!(error = %e, "new content rejected; keeping the previous value");
                }
            }
        }
        applied
    }

    /// Polls every interval on a task owned by `tracker` until `cancel` fires.
    pub(crate) fn spawn(mut self, tracker: &TaskTracker, cancel: CancellationToken) {
        tracker.spawn(async move {
            let mut ticker = tokio::time::interval(self.interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    _ = ticker.tick() => {
                        self.poll().await;
                    }
                }
            }
        });
    }
}

/// Reads every file of `w`; `None` when one fails (reported once until readable again)
/// or, for several files, while a swap is under way.
async fn read_all(w: &mut Watched) -> Option<Vec<Vec<u8>>> {
    let first = read_once(w).await?;
    if w.paths.len() > 1 {
        // A Secret swap (`..data` retargeted) between the reads of two files would hand
        // over a mixed pair: take the set only when a second pass reads the same; the
        // next poll sees the settled swap.
        let again = read_once(w).await?;
        if again != first {
            return None;
        }
    }
    Some(first)
}

async fn read_once(w: &mut Watched) -> Option<Vec<Vec<u8>>> {
    let mut contents = Vec::with_capacity(w.paths.len());
    for path in &w.paths {
        match read_limited(path).await {
            Ok(b) => contents.push(b),
            Err(e) => {
                if !w.read_failing {
                    tracing::warn!(path = %path.display(), what = w.what, error = %e, "cannot read watched file; keeping the previous value");
                    w.read_failing = true;
                }
                return None;
            }
        }
    }
    if w.read_failing {
        let path = w.paths.first().map(|p| p.display().to_string());
        tracing::info!(path, what = w.what, "file readable again");
        w.read_failing = false;
    }
    Some(contents)
}

/// Reads a file through its symlinks, refusing files over [`MAX_FILE_LEN`].
async fn read_limited(path: &Path) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt as _;
    let file = tokio::fs::File::open(path).await?;
    let mut buf = Vec::new();
    // One byte past the limit tells "exactly at the limit" from "too large".
    file.take(MAX_FILE_LEN + 1).read_to_end(&mut buf).await?;
    if buf.len() as u64 > MAX_FILE_LEN {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("file larger than {MAX_FILE_LEN} bytes"),
        ));
    }
    Ok(buf)
}

/// One hash over several contents, each length-prefixed so that moving bytes from one
/// file to the next is a change.
fn sha256_all<B: AsRef<[u8]>>(parts: &[B]) -> [u8; 32] {
    let mut h = Sha256Hasher::new();
    for p in parts {
        let p = p.as_ref();
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Lays a file out like a Secret volume: `dir/..data_N/name`, `dir/..data ->
    /// ..data_N`, `dir/name -> ..data/name`.
    struct SecretDir {
        dir: tempfile::TempDir,
        generation: u32,
    }

    impl SecretDir {
        fn new(name: &str, content: &[u8]) -> Self {
            let mut s = Self {
                dir: tempfile::tempdir().unwrap(),
                generation: 0,
            };
            s.update(name, content);
            std::os::unix::fs::symlink(format!("..data/{name}"), s.dir.path().join(name)).unwrap();
            s
        }

        /// Writes a new `..data_N` and swaps `..data` to it atomically (rename over the
        /// old symlink), exactly as kubelet's atomic writer does.
        fn update(&mut self, name: &str, content: &[u8]) {
            self.generation += 1;
            let data = format!("..data_{}", self.generation);
            std::fs::create_dir(self.dir.path().join(&data)).unwrap();
            std::fs::write(self.dir.path().join(&data).join(name), content).unwrap();
            let tmp = self.dir.path().join("..data_tmp");
            std::os::unix::fs::symlink(&data, &tmp).unwrap();
            std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
    }

    /// A callback that accepts content starting with "ok" and records it.
    type Seen = Arc<Mutex<Vec<String>>>;

    fn recorder() -> (Seen, impl FnMut(&[u8]) -> Result<(), Reason> + Send) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let cb = move |b: &[u8]| {
            if !b.starts_with(b"ok") {
                return Err("does not start with ok".into());
            }
            s.lock()
                .unwrap()
                .push(String::from_utf8_lossy(b).into_owned());
            Ok(())
        };
        (seen, cb)
    }

    #[tokio::test]
    async fn sees_a_symlink_swap_and_keeps_the_old_value_on_a_broken_file() {
        let mut dir = SecretDir::new("token.key", b"ok-1");
        let (seen, cb) = recorder();
        let mut w = FileWatcher::new(Duration::from_millis(10));
        w.watch_loaded(dir.path("token.key"), "test file", b"ok-1", cb);

        assert_eq!(w.poll().await, 0, "unchanged content is not re-applied");

        dir.update("token.key", b"ok-2");
        assert_eq!(w.poll().await, 1);
        assert_eq!(*seen.lock().unwrap(), ["ok-2"]);

        dir.update("token.key", b"broken");
        assert_eq!(w.poll().await, 0);
        assert_eq!(w.poll().await, 0, "the same broken content is tried once");
        assert_eq!(*seen.lock().unwrap(), ["ok-2"], "old value kept");

        dir.update("token.key", b"ok-3");
        assert_eq!(w.poll().await, 1);
        assert_eq!(*seen.lock().unwrap(), ["ok-2", "ok-3"]);
    }

    #[tokio::test]
    async fn watch_applies_the_first_content_and_survives_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let (seen, cb) = recorder();
        let mut w = FileWatcher::new(Duration::from_millis(10));
        w.watch(&path, "test file", cb);
        assert_eq!(w.poll().await, 0, "missing file: nothing applied, no panic");
        std::fs::write(&path, b"ok-a").unwrap();
        assert_eq!(w.poll().await, 1);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(w.poll().await, 0);
        std::fs::write(&path, b"ok-a").unwrap();
        assert_eq!(
            w.poll().await,
            0,
            "same content after a blip is not re-applied"
        );
        assert_eq!(*seen.lock().unwrap(), ["ok-a"]);
    }

    #[tokio::test]
    async fn a_pair_is_handed_over_whole_once_per_change() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"a1").unwrap();
        std::fs::write(&b, b"b1").unwrap();
        let seen: Seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut w = FileWatcher::new(Duration::from_millis(10));
        w.watch_pair_loaded(
            [a.clone(), b.clone()],
            "test pair",
            [b"a1", b"b1"],
            move |x, y| {
                let pair = format!(
                    "{}+{}",
                    String::from_utf8_lossy(x),
                    String::from_utf8_lossy(y)
                );
                if pair.contains("bad") {
                    return Err("bad".into());
                }
                s.lock().unwrap().push(pair);
                Ok(())
            },
        );
        assert_eq!(w.poll().await, 0, "the loaded pair is not re-applied");
        // Both files replaced before the next poll: one call with both new halves, never
        // a mixed pair.
        std::fs::write(&a, b"a2").unwrap();
        std::fs::write(&b, b"b2").unwrap();
        assert_eq!(w.poll().await, 1);
        // One half changed: the other is handed over as it is.
        std::fs::write(&b, b"b3").unwrap();
        assert_eq!(w.poll().await, 1);
        // Bytes moved from one file to the other are a change.
        std::fs::write(&a, b"a2b").unwrap();
        std::fs::write(&b, b"3").unwrap();
        assert_eq!(w.poll().await, 1);
        // A missing half: nothing installed, no call.
        std::fs::remove_file(&b).unwrap();
        assert_eq!(w.poll().await, 0);
        std::fs::write(&b, b"bad").unwrap();
        assert_eq!(w.poll().await, 0, "refused by the callback");
        assert_eq!(*seen.lock().unwrap(), ["a2+b2", "a2+b3", "a2b+3"]);
    }

    #[tokio::test]
    async fn oversize_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        std::fs::write(&path, vec![b'o'; MAX_FILE_LEN as usize + 1]).unwrap();
        let err = read_limited(&path).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
        std::fs::write(&path, vec![b'o'; MAX_FILE_LEN as usize]).unwrap();
        assert_eq!(
            read_limited(&path).await.unwrap().len(),
            MAX_FILE_LEN as usize
        );
    }

    #[tokio::test]
    async fn spawned_watcher_reloads_and_stops_on_cancel() {
        let mut dir = SecretDir::new("password", b"ok-1");
        let (seen, cb) = recorder();
        let mut w = FileWatcher::new(Duration::from_millis(20));
        w.watch_loaded(dir.path("password"), "test file", b"ok-1", cb);
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        w.spawn(&tracker, cancel.clone());

        dir.update("password", b"ok-2");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while seen.lock().unwrap().is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "reload not seen within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(*seen.lock().unwrap(), ["ok-2"]);

        cancel.cancel();
        tracker.close();
        tokio::time::timeout(Duration::from_secs(5), tracker.wait())
            .await
            .unwrap();
    }
}
