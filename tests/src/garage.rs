//! A three-node Garage cluster (the S3 engine of Deckhouse's `sds-object`) on loopback,
//! for the cluster-tier tests: own ports and data dirs under a temp dir, replication
//! factor 3, layout applied, one bucket and one key created with Garage's CLI. Nodes
//! are stopped by pid (SIGKILL) on [`Garage::stop_node`] and on drop.
//!
//! The binary is `$GARAGE_BIN`, else `garage` on `PATH`, else `~/.cargo/bin/garage`
//! (`scripts/install-test-deps.sh` installs it). A missing binary panics: these tests
//! never skip.

use std::{
    fmt::Write as _,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Bucket created for the proxy.
pub const BUCKET: &str = "cache";

/// One node.
#[derive(Debug)]
struct Node {
    config: PathBuf,
    s3_port: u16,
    child: Option<Child>,
}

/// A running cluster.
#[derive(Debug)]
pub struct Garage {
    dir: tempfile::TempDir,
    bin: PathBuf,
    nodes: Vec<Node>,
    /// Access key id of the proxy's key.
    pub key_id: String,
    /// Its secret.
    pub secret: String,
}

/// The Garage binary (see the module docs); panics when there is none.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("GARAGE_BIN") {
        return PathBuf::from(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join("garage");
            if p.is_file() {
                return p;
            }
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        let p = Path::new(&home).join(".cargo/bin/garage");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "garage not found (GARAGE_BIN, PATH, ~/.cargo/bin): run scripts/install-test-deps.sh \
         (cargo install garage --locked)"
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn random_hex(n: usize) -> String {
    crate::random_bytes(n)
        .iter()
        .fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

impl Garage {
    /// Starts three nodes and sets up the layout, the bucket and the key. Blocking
    /// (a few seconds); panics with Garage's output on failure.
    pub fn start() -> Self {
        let bin = binary();
        let dir = tempfile::tempdir().expect("garage dir");
        let secret = random_hex(32);
        let mut nodes = Vec::new();
        for i in 1..=3 {
            let (s3_port, rpc_port, admin_port) = (free_port(), free_port(), free_port());
            let n = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(n.join("meta")).expect("meta dir");
            std::fs::create_dir_all(n.join("data")).expect("data dir");
            let config = n.join("garage.toml");
            std::fs::write(
                &config,
                format!(
                    "metadata_dir = \"{m}\"\ndata_dir = \"{d}\"\ndb_engine = \"sqlite\"\n\
                     replication_factor = 3\nrpc_bind_addr = \"127.0.0.1:{rpc_port}\"\n\
                     rpc_public_addr = \"127.0.0.1:{rpc_port}\"\nrpc_secret = \"{secret}\"\n\
                     [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3_port}\"\n\
                     root_domain = \".s3.garage.localhost\"\n\
                     [admin]\napi_bind_addr = \"127.0.0.1:{admin_port}\"\nadmin_token = \"admin-{i}\"\n",
                    m = n.join("meta").display(),
                    d = n.join("data").display(),
                ),
            )
            .expect("garage config");
            nodes.push(Node {
                config,
                s3_port,
                child: None,
            });
        }
        let mut g = Self {
            dir,
            bin,
            nodes,
            key_id: String::new(),
            secret: String::new(),
        };
        for i in 0..3 {
            g.spawn(i);
        }
        let ids: Vec<String> = (0..3)
            .map(|i| g.retry(i, &["node", "id", "-q"]).trim().to_owned())
            .collect();
        for id in &ids[1..] {
            g.retry(0, &["node", "connect", id]);
        }
        for (i, id) in ids.iter().enumerate() {
            let short = id.split('@').next().unwrap_or(id);
            let short = &short[..16.min(short.len())];
            let zone = format!("dc{}", i + 1);
            g.retry(0, &["layout", "assign", "-z", &zone, "-c", "1G", short]);
        }
        g.retry(0, &["layout", "apply", "--version", "1"]);
        g.retry(0, &["bucket", "create", BUCKET]);
        let out = g.retry(0, &["key", "create", "proxy"]);
        let field = |name: &str| {
            out.lines()
                .find(|l| l.trim_start().starts_with(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
                .unwrap_or_else(|| panic!("no {name:?} in `garage key create` output:\n{out}"))
        };
        g.key_id = field("Key ID");
        g.secret = field("Secret key");
        g.retry(
            0,
            &[
                "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "proxy",
            ],
        );
        g
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = std::fs::File::create(node.config.with_file_name("log")).expect("garage log");
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&node.config)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start garage");
        node.child = Some(child);
    }

    /// Runs the CLI against node `i` until it succeeds (the cluster settles for a few
    /// seconds after start and after the layout change); returns stdout.
    fn retry(&self, i: usize, args: &[&str]) -> String {
        let started = Instant::now();
        loop {
            let out = Command::new(&self.bin)
                .arg("-c")
                .arg(&self.nodes[i].config)
                .args(args)
                .output()
                .expect("run garage cli");
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "garage {args:?} kept failing: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// `http://127.0.0.1:<s3 port>` of node `i` (0-based).
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].s3_port)
    }

    /// Writes the key pair to two files under the cluster's dir: (access key, secret).
    pub fn key_files(&self) -> (PathBuf, PathBuf) {
        let a = self.dir.path().join("access-key");
        let s = self.dir.path().join("secret-key");
        std::fs::write(&a, format!("{}\n", self.key_id)).expect("key file");
        std::fs::write(&s, format!("{}\n", self.secret)).expect("key file");
        (a, s)
    }

    /// SIGKILLs node `i` and reaps it.
    pub fn stop_node(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.stop_node(i);
        }
    }
}
