//! A directory laid out like a mounted Kubernetes Secret, swapped the way the kubelet
//! swaps one (`..data -> ..data_N`, `file -> ..data/file`), for live-reload tests.

use std::path::PathBuf;

/// A flag naming a file of a [`SecretDir`]: `(flag, file name, content)`.
pub type SecretFlag<'a> = (&'a str, &'a str, &'a [u8]);

/// A directory laid out like a mounted Kubernetes Secret. `path(name)` is the stable
/// symlink a flag points at; `swap` replaces every file at once by retargeting `..data`.
pub struct SecretDir {
    dir: tempfile::TempDir,
    generation: u32,
}

impl SecretDir {
    /// A Secret directory holding `files`, each behind its stable symlink.
    pub fn new(files: &[(&str, &[u8])]) -> Self {
        let mut s = Self {
            dir: tempfile::tempdir().unwrap(),
            generation: 0,
        };
        s.swap(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), s.dir.path().join(name)).unwrap();
        }
        s
    }

    /// A Secret directory holding the file of each `(flag, file name, content)`, and the
    /// arguments naming them (`flag <stable path>`, in order): the setup of a proxy whose
    /// secrets arrive as files.
    pub fn for_flags(flags: &[SecretFlag<'_>]) -> (Self, Vec<String>) {
        let files: Vec<(&str, &[u8])> = flags.iter().map(|&(_, f, c)| (f, c)).collect();
        let dir = Self::new(&files);
        let args = flags
            .iter()
            .flat_map(|&(flag, f, _)| [flag.to_owned(), dir.arg(f)])
            .collect();
        (dir, args)
    }

    /// The stable path of `name` (what a flag points at).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// [`SecretDir::path`] as a flag value.
    pub fn arg(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_owned()
    }

    /// The kubelet's atomic writer: new `..data_N`, `..data_tmp -> ..data_N`, rename over
    /// `..data`, remove the old generation.
    pub fn swap(&mut self, files: &[(&str, &[u8])]) {
        self.generation += 1;
        let root = self.dir.path();
        let gen_name = format!("..data_{}", self.generation);
        std::fs::create_dir(root.join(&gen_name)).unwrap();
        for (name, data) in files {
            std::fs::write(root.join(&gen_name).join(name), data).unwrap();
        }
        let tmp = root.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&gen_name, &tmp).unwrap();
        std::fs::rename(&tmp, root.join("..data")).unwrap();
        if self.generation > 1 {
            std::fs::remove_dir_all(root.join(format!("..data_{}", self.generation - 1))).unwrap();
        }
    }
}
