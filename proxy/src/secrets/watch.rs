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

use registry_oci::sha256;
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

/// Parses and installs a file's new content. Runs on the watcher task: keep it quick
/// (parsing a key or an htpasswd file is), do no blocking I/O.
type OnChange = Box<dyn FnMut(&[u8]) -> Result<(), Reason> + Send>;

struct Watched {
    path: PathBuf,
    what: &'static str,
    on_change: OnChange,
    /// Hash of the last content handed to the callback (or loaded by the caller).
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
                &self.files.iter().map(|w| &w.path).collect::<Vec<_>>(),
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
        on_change: impl FnMut(&[u8]) -> Result<(), Reason> + Send + 'static,
    ) -> &mut Self {
        self.files.push(Watched {
            path: path.into(),
            what,
            on_change: Box::new(on_change),
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
            w.seen = Some(sha256(loaded));
        }
        self
    }

    /// Checks every file once; returns how many new contents were installed.
    pub(crate) async fn poll(&mut self) -> usize {
        let mut applied = 0;
        for w in &mut self.files {
            let bytes = match read_limited(&w.path).await {
                Ok(b) => {
                    if w.read_failing {
                        tracing::info!(path = %w.path.display(), what = w.what, "file readable again");
                        w.read_failing = false;
                    }
                    b
                }
                Err(e) => {
                    if !w.read_failing {
                        tracing::warn!(path = %w.path.display(), what = w.what, error = %e, "cannot read watched file; keeping the previous value");
                        w.read_failing = true;
                    }
                    continue;
                }
            };
            let hash = sha256(&bytes);
            if w.seen == Some(hash) {
                continue;
            }
            w.seen = Some(hash);
            match (w.on_change)(&bytes) {
                Ok(()) => {
                    applied += 1;
                    tracing::info!(path = %w.path.display(), what = w.what, "reloaded");
                }
                Err(reason) => {
                    let e = SecretError {
                        what: w.what,
                        path: w.path.clone(),
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
