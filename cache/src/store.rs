//! The storage backend behind a small trait. [`BlobStore`] is what the cache logic needs from a
//! store (spool, commit, open, read, remove, list, touch, tag records); [`FsStore`] is the embedded
//! filesystem implementation. See `docs/cache-backends.md` for the object-store design.
//!
//! Filesystem layout under the cache dir:
//!
//! ```text
//! blobs/sha256/<hex>            blob bytes (visible only after verify + fsync + rename)
//! blobs/sha256/<hex>.meta       {"size":N} written before the rename; size checked at start-up
//! manifests/sha256/<hex>        manifest bytes, exactly as the upstream sent them
//! manifests/sha256/<hex>.meta   {"size":N,"media_type":..,"references":[hex..]}
//! tags/<sha256(repo)>/<tag>     JSON tag record
//! tmp/                          spools and atomic-write temporaries; emptied at start-up
//! ```

use std::{
    fs::File,
    io::{self, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tempfile::{NamedTempFile, TempPath};

use crate::{BlobStream, Hex, TagKey, stream::file_range};

/// What an object is; each kind has its own namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A layer or config blob.
    Blob,
    /// A manifest or index.
    Manifest,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Blob => "blobs",
            Kind::Manifest => "manifests",
        }
    }
}

/// A validated object name: kind plus sha256 hex. Only [`Hex`] reaches a path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ObjectKey {
    /// Namespace.
    pub kind: Kind,
    /// Digest hex.
    pub hex: Hex,
}

/// Metadata recorded at commit; `size` is what start-up checks the stored length against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    /// Length committed.
    pub size: u64,
    /// Manifest media type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Hex digests a manifest references (blobs and child manifests).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<String>,
}

/// A small object's bytes with its commit metadata.
pub type SmallObject = (Bytes, Option<ObjectMeta>);

/// One object found by [`BlobStore::list`].
#[derive(Clone, Debug)]
pub struct Listed {
    /// Name.
    pub key: ObjectKey,
    /// Stored length.
    pub len: u64,
    /// Commit metadata, `None` if missing or unreadable (the object is then dropped).
    pub meta: Option<ObjectMeta>,
    /// Last access (file mtime for the filesystem store).
    pub last_access: SystemTime,
}

/// A local spool file being written by a fill. Readers tail `file` with positional reads while the
/// fill appends; dropping `path` unlinks the file (the open handles keep the bytes readable).
pub struct Spool {
    /// Read/write handle shared with readers.
    pub file: Arc<File>,
    /// Unlinks on drop unless committed.
    pub path: TempPath,
}

/// A committed object opened for reading.
pub trait StoredBlob: Send + Sync + 'static {
    /// Length in bytes.
    fn len(&self) -> u64;
    /// Whether the object is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes `start..stop` (exclusive), already validated against `len`, in bounded chunks.
    fn range(&self, start: u64, stop: u64) -> BlobStream;
}

/// The store the cache logic runs on. Spools are always local files (readers tail them while the
/// fill writes); everything else may live elsewhere (an object store shared by replicas).
pub trait BlobStore: Send + Sync + 'static {
    /// A fresh local spool file. Cheap, but blocking: call from `spawn_blocking`.
    fn put_temp(&self) -> io::Result<Spool>;
    /// Makes a fully written and verified spool visible as `key`, durably (fsync + rename for the
    /// filesystem store, upload for an object store).
    fn commit(
        &self,
        spool: Spool,
        key: ObjectKey,
        meta: ObjectMeta,
    ) -> BoxFuture<'static, io::Result<()>>;
    /// Opens a committed object; `None` if absent.
    fn open(&self, key: ObjectKey) -> BoxFuture<'static, io::Result<Option<Arc<dyn StoredBlob>>>>;
    /// Reads a small committed object (a manifest) with its metadata; `None` if absent.
    fn read(&self, key: ObjectKey) -> BoxFuture<'static, io::Result<Option<SmallObject>>>;
    /// Removes an object and its metadata; absent is not an error.
    fn remove(&self, key: ObjectKey) -> BoxFuture<'static, io::Result<()>>;
    /// Records the last access time (survives restarts).
    fn touch(&self, key: ObjectKey, at: SystemTime) -> BoxFuture<'static, io::Result<()>>;
    /// Every committed object of a kind; names that are not a valid digest and orphaned
    /// metadata are deleted on the way.
    fn list(&self, kind: Kind) -> BoxFuture<'static, io::Result<Vec<Listed>>>;
    /// Deletes leftover spools and temporaries; returns how many.
    fn sweep_temp(&self) -> BoxFuture<'static, io::Result<usize>>;
    /// Writes a tag record atomically.
    fn put_record(&self, key: TagKey, bytes: Bytes) -> BoxFuture<'static, io::Result<()>>;
    /// Reads a tag record; `None` if absent.
    fn get_record(&self, key: TagKey) -> BoxFuture<'static, io::Result<Option<Bytes>>>;
    /// Removes a tag record.
    fn remove_record(&self, key: TagKey) -> BoxFuture<'static, io::Result<()>>;
    /// Every tag record.
    fn list_records(&self) -> BoxFuture<'static, io::Result<Vec<Bytes>>>;
    /// Recreates whatever local structure a write needs after it was removed underneath.
    fn repair(&self) -> BoxFuture<'static, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    /// Bytes still free for the store (filesystem space available to this process), when the
    /// backend can tell; the default size cap is derived from it.
    fn free_space(&self) -> BoxFuture<'static, io::Result<Option<u64>>> {
        Box::pin(async { Ok(None) })
    }
}

/// The filesystem backend (the embedded default).
#[derive(Clone, Debug)]
pub struct FsStore {
    root: Arc<PathBuf>,
}

fn blocking<T, F>(f: F) -> BoxFuture<'static, io::Result<T>>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    Box::pin(async move {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(io::Error::other)?
    })
}

fn not_found_ok(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl FsStore {
    /// Creates the directory tree under `root`. Blocking.
    pub fn create(root: &Path) -> io::Result<Self> {
        create_tree(root)?;
        Ok(Self {
            root: Arc::new(root.to_path_buf()),
        })
    }

    fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn kind_dir(&self, kind: Kind) -> PathBuf {
        self.root.join(kind.dir()).join("sha256")
    }

    /// Path of a committed object.
    pub fn path(&self, key: &ObjectKey) -> PathBuf {
        self.kind_dir(key.kind).join(key.hex.as_str())
    }

    fn meta_path(&self, key: &ObjectKey) -> PathBuf {
        self.kind_dir(key.kind).join(format!("{}.meta", key.hex))
    }

    fn record_path(&self, key: &TagKey) -> PathBuf {
        self.root
            .join("tags")
            .join(key.repo_hash().as_str())
            .join(key.tag())
    }

    /// temp + write + fsync + rename + fsync(dir).
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let mut tmp = NamedTempFile::new_in(self.tmp())?;
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        match path.parent() {
            Some(dir) => sync_dir(dir),
            None => Ok(()),
        }
    }

    fn commit_blocking(&self, spool: Spool, key: &ObjectKey, meta: &ObjectMeta) -> io::Result<()> {
        spool.file.sync_all()?;
        // Metadata first: the rename below is the commit point, and an object without metadata is
        // dropped at start-up, so a crash in between leaves nothing half-committed.
        let meta = serde_json::to_vec(meta).map_err(io::Error::other)?;
        self.write_atomic(&self.meta_path(key), &meta)?;
        let dest = self.path(key);
        spool.path.persist(&dest).map_err(|e| e.error)?;
        sync_dir(&self.kind_dir(key.kind))
    }

    fn read_meta(&self, key: &ObjectKey) -> Option<ObjectMeta> {
        let bytes = fs_err::read(self.meta_path(key)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn list_blocking(&self, kind: Kind) -> io::Result<Vec<Listed>> {
        let dir = self.kind_dir(kind);
        let mut out = Vec::new();
        for entry in fs_err::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_str().unwrap_or("");
            if let Some(stem) = name.strip_suffix(".meta") {
                let keep = Hex::parse(stem).is_some_and(|hex| dir.join(hex.as_str()).is_file());
                if !keep {
                    remove_any(&path)?;
                }
                continue;
            }
            let Some(hex) = Hex::parse(name) else {
                tracing::warn!(path = %path.display(), "removing cache file with an invalid name");
                remove_any(&path)?;
                continue;
            };
            let md = entry.metadata()?;
            if !md.is_file() {
                remove_any(&path)?;
                continue;
            }
            let key = ObjectKey { kind, hex };
            let meta = self.read_meta(&key);
            out.push(Listed {
                key,
                len: md.len(),
                meta,
                last_access: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
        Ok(out)
    }
}

fn create_tree(root: &Path) -> io::Result<()> {
    for sub in ["blobs/sha256", "manifests/sha256", "tags", "tmp"] {
        fs_err::create_dir_all(root.join(sub))?;
    }
    Ok(())
}

fn remove_any(path: &Path) -> io::Result<()> {
    if path.is_dir() {
        not_found_ok(fs_err::remove_dir_all(path))
    } else {
        not_found_ok(fs_err::remove_file(path))
    }
}

struct FsBlob {
    file: Arc<File>,
    len: u64,
}

impl StoredBlob for FsBlob {
    fn len(&self) -> u64 {
        self.len
    }

    fn range(&self, start: u64, stop: u64) -> BlobStream {
        file_range(self.file.clone(), start, stop)
    }
}

impl BlobStore for FsStore {
    fn put_temp(&self) -> io::Result<Spool> {
        let (file, path) = NamedTempFile::new_in(self.tmp())?.into_parts();
        Ok(Spool {
            file: Arc::new(file),
            path,
        })
    }

    fn commit(
        &self,
        spool: Spool,
        key: ObjectKey,
        meta: ObjectMeta,
    ) -> BoxFuture<'static, io::Result<()>> {
        let this = self.clone();
        blocking(move || this.commit_blocking(spool, &key, &meta))
    }

    fn open(&self, key: ObjectKey) -> BoxFuture<'static, io::Result<Option<Arc<dyn StoredBlob>>>> {
        let path = self.path(&key);
        blocking(move || {
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let len = file.metadata()?.len();
            let blob: Arc<dyn StoredBlob> = Arc::new(FsBlob {
                file: Arc::new(file),
                len,
            });
            Ok(Some(blob))
        })
    }

    fn read(&self, key: ObjectKey) -> BoxFuture<'static, io::Result<Option<SmallObject>>> {
        let this = self.clone();
        blocking(move || match fs_err::read(this.path(&key)) {
            Ok(b) => Ok(Some((Bytes::from(b), this.read_meta(&key)))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
    }

    fn remove(&self, key: ObjectKey) -> BoxFuture<'static, io::Result<()>> {
        let this = self.clone();
        blocking(move || {
            not_found_ok(fs_err::remove_file(this.path(&key)))?;
            not_found_ok(fs_err::remove_file(this.meta_path(&key)))
        })
    }

    fn touch(&self, key: ObjectKey, at: SystemTime) -> BoxFuture<'static, io::Result<()>> {
        let path = self.path(&key);
        blocking(move || match File::open(&path) {
            Ok(f) => f.set_modified(at),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        })
    }

    fn list(&self, kind: Kind) -> BoxFuture<'static, io::Result<Vec<Listed>>> {
        let this = self.clone();
        blocking(move || this.list_blocking(kind))
    }

    fn sweep_temp(&self) -> BoxFuture<'static, io::Result<usize>> {
        let tmp = self.tmp();
        blocking(move || {
            let mut n = 0;
            for entry in fs_err::read_dir(&tmp)? {
                remove_any(&entry?.path())?;
                n += 1;
            }
            Ok(n)
        })
    }

    fn put_record(&self, key: TagKey, bytes: Bytes) -> BoxFuture<'static, io::Result<()>> {
        let this = self.clone();
        blocking(move || {
            let path = this.record_path(&key);
            if let Some(dir) = path.parent() {
                fs_err::create_dir_all(dir)?;
            }
            this.write_atomic(&path, &bytes)
        })
    }

    fn get_record(&self, key: TagKey) -> BoxFuture<'static, io::Result<Option<Bytes>>> {
        let path = self.record_path(&key);
        blocking(move || match fs_err::read(&path) {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
    }

    fn remove_record(&self, key: TagKey) -> BoxFuture<'static, io::Result<()>> {
        let path = self.record_path(&key);
        blocking(move || {
            not_found_ok(fs_err::remove_file(&path))?;
            if let Some(dir) = path.parent() {
                // Fails while other tags of the repository remain, which is the point.
                let _ = std::fs::remove_dir(dir);
            }
            Ok(())
        })
    }

    fn repair(&self) -> BoxFuture<'static, io::Result<()>> {
        let root = self.root.clone();
        blocking(move || create_tree(&root))
    }

    fn free_space(&self) -> BoxFuture<'static, io::Result<Option<u64>>> {
        let root = self.root.clone();
        blocking(move || {
            let st = rustix::fs::statvfs(root.as_path()).map_err(io::Error::from)?;
            Ok(Some(st.f_bavail.saturating_mul(st.f_frsize)))
        })
    }

    fn list_records(&self) -> BoxFuture<'static, io::Result<Vec<Bytes>>> {
        let tags = self.root.join("tags");
        blocking(move || {
            let mut out = Vec::new();
            for repo in fs_err::read_dir(&tags)? {
                let repo = repo?.path();
                if !repo.is_dir() {
                    remove_any(&repo)?;
                    continue;
                }
                for rec in fs_err::read_dir(&repo)? {
                    let rec = rec?.path();
                    if rec.is_file() {
                        out.push(Bytes::from(fs_err::read(&rec)?));
                    }
                }
            }
            Ok(out)
        })
    }
}

/// Positional read that leaves the shared file offset alone (readers share one handle).
pub(crate) fn read_at(file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, pos)?;
    Ok(Bytes::from(buf))
}
