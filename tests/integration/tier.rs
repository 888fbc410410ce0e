//! The cluster tier (issue 13): replicas behind one Service share an S3 tier (real Garage,
//! three nodes on loopback) and fetch each blob from the upstream once per cluster through
//! its owner replica.
//!
//! - In-process, without Garage: the peer endpoint's refusals, and two replicas fetching
//!   a blob once through the owner.
//! - `cluster_tier_on_garage`: three proxy binaries (child processes, so one can be
//!   killed with SIGKILL) on one Garage cluster, phases (a) to (d) of the issue in order.
//!   Without the `garage` binary it fails; `scripts/install-test-deps.sh` installs it.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use registry_tests::{
    Action, Blob, FakeUpstream, ProxyHandle, Rule, bulk_client, fake_upstream::UPSTREAM_REPO,
    garage::Garage, proxy::parse_config, test_client,
};
use tempfile::TempDir;
use tokio::net::TcpListener;

use super::cache::{free_port, proxy_binary};

fn up_blob(b: &Blob) -> String {
    format!("/v2/{UPSTREAM_REPO}/blobs/{}", b.digest)
}

/// Upstream GETs of `path` that carried a token: the ones that fetched content. A GET
/// before the proxy holds a token is answered 401 and retried, and is not a fetch.
fn fetches(up: &FakeUpstream, path: &str) -> usize {
    up.request_log()
        .iter()
        .filter(|r| {
            r.method == "GET"
                && r.path == path
                && r.authorization
                    .as_deref()
                    .is_some_and(|a| a.starts_with("Bearer "))
        })
        .count()
}

fn client_blob(b: &Blob) -> String {
    format!("/v2/system/deckhouse/blobs/{}", b.digest)
}

fn token_key(dir: &Path) -> std::path::PathBuf {
    let key = rcgen::KeyPair::generate().expect("P-256 key");
    let p = dir.join("token-key.pem");
    std::fs::write(&p, key.serialize_pem()).expect("key file");
    p
}

/// Streams a GET and returns (status, sha256 digest of the body, length); never holds
/// the body.
async fn pull(url: &str) -> Result<(u16, String, u64), String> {
    let r = bulk_client()
        .get(url)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    let mut ctx = registry_oci::Sha256Hasher::new();
    let mut len = 0u64;
    let mut body = r.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| format!("body broke after {len} bytes: {e}"))?;
        len += chunk.len() as u64;
        ctx.update(&chunk);
    }
    Ok((status, ctx.finish_digest().to_string(), len))
}

/// Sum of every sample of `name` whose line starts with `name{labels…`/`name `.
async fn metric(metrics_addr: SocketAddr, name: &str) -> f64 {
    let text = test_client()
        .get(format!("http://{metrics_addr}/metrics"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn wait_for(what: &str, bound: Duration, mut ok: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !ok().await {
        assert!(started.elapsed() < bound, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts the proxy in-process on `listener` (whose address the caller already
/// advertised to the other replicas).
async fn start_on(listener: TcpListener, args: Vec<String>) -> ProxyHandle {
    registry_tests::proxy::start_proxy_on(listener, &args).await
}

#[tokio::test]
async fn peer_endpoint_refuses_without_a_valid_token_and_flags_are_checked() {
    let up = FakeUpstream::builder().bearer(None).start().await;
    let blob = Blob::random(4096);
    up.push_blob(&blob);
    let dir = TempDir::new().unwrap();
    let key = token_key(dir.path());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let me = format!("http://{}", l.local_addr().unwrap());
    let mut args = up.proxy_args();
    args.extend([
        "--client-auth".into(),
        "none".into(),
        "--cache-dir".into(),
        dir.path().join("c").display().to_string(),
        "--token-key-file".into(),
        key.display().to_string(),
        "--peers".into(),
        format!("{me},http://127.0.0.1:1"),
        "--advertise".into(),
        me.clone(),
    ]);
    let px = start_on(l, args.clone()).await;
    let c = test_client();
    let url = format!("{me}/_peer/v1/blobs/{}?repo={UPSTREAM_REPO}", blob.digest);
    for auth in [
        None,
        Some("Bearer abc".to_owned()),
        Some("RegistryPeer v1.99999999999.AAAA".to_owned()),
        Some("RegistryPeer garbage".to_owned()),
    ] {
        let mut req = c.get(&url);
        if let Some(a) = &auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
    }
    // A repository outside the upstream path is refused before any token check.
    let r = c
        .get(format!(
            "{me}/_peer/v1/blobs/{}?repo=other/repo",
            blob.digest
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        up.requests("GET", &up_blob(&blob)),
        0,
        "nothing reached the upstream"
    );
    px.stop(Duration::from_secs(10)).await.unwrap();

    // Peers without the shared key, or without --advertise, are configuration errors.
    let bad = |drop_flag: &str| {
        let mut a = args.clone();
        if let Some(i) = a.iter().position(|x| x == drop_flag) {
            a.drain(i..i + 2);
        }
        parse_config(&a).err()
    };
    assert!(bad("--token-key-file").is_some());
    assert!(bad("--advertise").is_some());
    let mut s3_without_keys = args.clone();
    s3_without_keys.extend([
        "--s3-endpoint".into(),
        "http://127.0.0.1:1".into(),
        "--s3-bucket".into(),
        "cache".into(),
    ]);
    assert!(parse_config(&s3_without_keys).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_fetch_a_blob_once_through_its_owner() {
    let up = FakeUpstream::builder().bearer(None).start().await;
    let blob = Blob::random(8 << 20);
    up.push_blob(&blob);
    // Slow enough that every client arrives while the fill runs.
    up.on(Rule::exact(
        up_blob(&blob),
        Action::SlowBody {
            chunk: 256 << 10,
            delay: Duration::from_millis(10),
        },
    ));
    let dir = TempDir::new().unwrap();
    let key = token_key(dir.path());
    let listeners = [
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    ];
    let urls: Vec<String> = listeners
        .iter()
        .map(|l| format!("http://{}", l.local_addr().unwrap()))
        .collect();
    let mut pxs = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let mut args = up.proxy_args();
        args.extend([
            "--client-auth".into(),
            "none".into(),
            "--cache-dir".into(),
            dir.path().join(format!("c{i}")).display().to_string(),
            "--token-key-file".into(),
            key.display().to_string(),
            "--peers".into(),
            urls.join(","),
            "--advertise".into(),
            urls[i].clone(),
        ]);
        pxs.push(start_on(l, args).await);
    }
    let owner = registry_proxy::rendezvous(&urls, &blob.digest)
        .unwrap()
        .to_owned();
    let mut clients = tokio::task::JoinSet::new();
    for px in &pxs {
        for _ in 0..4 {
            let url = px.url(&client_blob(&blob));
            clients.spawn(async move { pull(&url).await });
        }
    }
    while let Some(r) = clients.join_next().await {
        let (status, digest, len) = r.unwrap().expect("pull");
        assert_eq!((status, len), (200, blob.data.len() as u64));
        assert_eq!(digest, blob.digest);
    }
    assert_eq!(
        fetches(&up, &up_blob(&blob)),
        1,
        "one upstream GET for both replicas"
    );
    let other = pxs
        .iter()
        .find(|p| format!("http://{}", p.addr) != owner)
        .unwrap();
    assert!(
        metric(
            other.metrics_addr,
            "registry_proxy_peer_fetches_total{result=\"ok\"}"
        )
        .await
            >= 1.0
    );
    assert!(
        metric(
            other.metrics_addr,
            "registry_proxy_tier_fill_bytes_total{source=\"peer\"}"
        )
        .await
            >= blob.data.len() as f64
    );
    for px in pxs {
        px.stop(Duration::from_secs(10)).await.unwrap();
    }
}

/// One proxy binary of the Garage scenario.
struct Replica {
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
    _dir: TempDir,
}

impl Replica {
    async fn spawn(up: &FakeUpstream, addr: SocketAddr, extra: &[String]) -> Self {
        let dir = TempDir::new().unwrap();
        let metrics = free_port().await;
        let child = Command::new(proxy_binary())
            .args(up.proxy_args())
            .arg("--cache-dir")
            .arg(dir.path())
            .args([
                "--listen",
                &addr.to_string(),
                "--metrics-listen",
                &metrics.to_string(),
            ])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut r = Self {
            child,
            addr,
            metrics,
            _dir: dir,
        };
        let c = test_client();
        let started = Instant::now();
        loop {
            if let Ok(resp) = c.get(format!("http://{addr}/v2/")).send().await
                && resp.status().as_u16() < 500
            {
                return r;
            }
            if let Ok(Some(status)) = r.child.try_wait() {
                panic!("proxy exited at start-up: {status}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "proxy did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill9();
    }
}

async fn pull_all(urls: Vec<String>, blob: &Blob) {
    let mut set = tokio::task::JoinSet::new();
    for u in urls {
        set.spawn(async move { (pull(&u).await, u) });
    }
    while let Some(r) = set.join_next().await {
        let (r, u) = r.unwrap();
        let (status, digest, len) = r.unwrap_or_else(|e| panic!("{u}: {e}"));
        assert_eq!(status, 200, "{u}");
        assert_eq!(len, blob.data.len() as u64, "{u}");
        assert_eq!(digest, blob.digest, "{u}: wrong bytes");
    }
}

async fn uploads_ok(rs: &[&Replica]) -> f64 {
    let mut n = 0.0;
    for r in rs {
        n += metric(r.metrics, "registry_proxy_s3_uploads_total{result=\"ok\"}").await;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_tier_on_garage() {
    let mut garage = tokio::task::spawn_blocking(Garage::start).await.unwrap();
    let (ak, sk) = garage.key_files();
    let up = FakeUpstream::builder().bearer(None).start().await;
    let dir = TempDir::new().unwrap();
    let key = token_key(dir.path());
    let addrs = [free_port().await, free_port().await, free_port().await];
    let urls: Vec<String> = addrs.iter().map(|a| format!("http://{a}")).collect();
    let flags = |i: usize, endpoint: String, peers: &[String]| -> Vec<String> {
        [
            "--client-auth",
            "none",
            "--token-key-file",
            &key.display().to_string(),
            "--s3-endpoint",
            &endpoint,
            "--s3-bucket",
            registry_tests::garage::BUCKET,
            "--s3-prefix",
            "cluster",
            "--s3-access-key-file",
            &ak.display().to_string(),
            "--s3-secret-key-file",
            &sk.display().to_string(),
            "--s3-timeout",
            "1s",
            "--peer-timeout",
            "2s",
            "--peers",
            &peers.join(","),
            "--advertise",
            &peers[i],
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    };
    // Replica i talks to Garage node i, as each master would to its local node.
    let mut rs = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        rs.push(Replica::spawn(&up, *addr, &flags(i, garage.endpoint(i), &urls)).await);
    }

    // (a) 8 cold clients on each replica, one 200 MiB blob: one upstream GET.
    let big = Blob::random(200 << 20);
    up.push_blob(&big);
    let urls_a: Vec<String> = rs
        .iter()
        .flat_map(|r| std::iter::repeat_n(r.url(&client_blob(&big)), 8))
        .collect();
    let t = Instant::now();
    pull_all(urls_a, &big).await;
    eprintln!(
        "(a) 24 pulls of 200 MiB through 3 replicas: {:?}",
        t.elapsed()
    );
    assert_eq!(
        fetches(&up, &up_blob(&big)),
        1,
        "(a) one upstream GET per cluster"
    );
    wait_for(
        "(a) the upload of the big blob",
        Duration::from_secs(120),
        async || uploads_ok(&[&rs[0], &rs[1], &rs[2]]).await >= 1.0,
    )
    .await;
    assert_eq!(
        uploads_ok(&[&rs[0], &rs[1], &rs[2]]).await,
        1.0,
        "only the replica that read the upstream uploads"
    );

    // (b) pulled through replica 1, then served by replica 2 and a fresh replica 4
    // with an empty disk, with no upstream request.
    let b = Blob::random(24 << 20);
    up.push_blob(&b);
    pull_all(vec![rs[0].url(&client_blob(&b))], &b).await;
    assert_eq!(fetches(&up, &up_blob(&b)), 1);
    wait_for("(b) upload", Duration::from_secs(60), async || {
        uploads_ok(&[&rs[0], &rs[1], &rs[2]]).await >= 2.0
    })
    .await;
    pull_all(vec![rs[1].url(&client_blob(&b))], &b).await;
    let a4 = free_port().await;
    let mut peers4 = urls.clone();
    peers4.push(format!("http://{a4}"));
    let r4 = Replica::spawn(&up, a4, &flags(3, garage.endpoint(1), &peers4)).await;
    pull_all(vec![r4.url(&client_blob(&b))], &b).await;
    pull_all(vec![r4.url(&client_blob(&big))], &big).await;
    assert_eq!(
        fetches(&up, &up_blob(&b)),
        1,
        "(b) no upstream request after the first"
    );
    assert_eq!(fetches(&up, &up_blob(&big)), 1, "(b) the big blob neither");
    assert!(
        metric(
            r4.metrics,
            "registry_proxy_tier_fill_bytes_total{source=\"s3\"}"
        )
        .await
            >= (b.data.len() + big.data.len()) as f64,
        "(b) replica 4 filled from S3"
    );
    // Manifests too: stored by digest in S3 by the replica that fetched it, read back
    // (re-hashed) by a replica with an empty disk.
    let img = registry_tests::Image::random(&[1024]);
    up.push_image(UPSTREAM_REPO, Some("m1"), &img);
    let m_url = |r: &Replica| {
        r.url(&format!(
            "/v2/system/deckhouse/manifests/{}",
            img.manifest.digest
        ))
    };
    let (status, digest, _) = pull(&m_url(&rs[0])).await.unwrap();
    assert_eq!(
        (status, digest.as_str()),
        (200, img.manifest.digest.as_str())
    );
    wait_for("(b) manifest upload", Duration::from_secs(60), async || {
        uploads_ok(&[&rs[0], &rs[1], &rs[2]]).await >= 3.0
    })
    .await;
    let (status, digest, _) = pull(&m_url(&r4)).await.unwrap();
    assert_eq!(
        (status, digest.as_str()),
        (200, img.manifest.digest.as_str())
    );
    let up_manifest = format!("/v2/{UPSTREAM_REPO}/manifests/{}", img.manifest.digest);
    assert_eq!(
        fetches(&up, &up_manifest),
        1,
        "(b) the manifest came from S3"
    );
    drop(r4);

    // (c) one Garage node down: the tier still reads and writes (quorum 2 of 3).
    garage.stop_node(2);
    // Its owner must upload through a live node: not replica 3, whose node is down.
    let c1 = loop {
        let b = Blob::random(6 << 20);
        if registry_proxy::rendezvous(&urls, &b.digest) != Some(urls[2].as_str()) {
            break b;
        }
    };
    up.push_blob(&c1);
    pull_all(vec![rs[0].url(&client_blob(&c1))], &c1).await;
    wait_for(
        "(c) upload with a node down",
        Duration::from_secs(60),
        async || uploads_ok(&[&rs[0], &rs[1], &rs[2]]).await >= 4.0,
    )
    .await;
    let before = fetches(&up, &up_blob(&c1));
    // Replica 3's own node is down: it pulls from a peer or the upstream, never fails.
    pull_all(
        vec![rs[1].url(&client_blob(&c1)), rs[2].url(&client_blob(&c1))],
        &c1,
    )
    .await;
    assert!(fetches(&up, &up_blob(&c1)) <= before + 1);

    // All nodes down: local hits and new blobs still work; the tier reports degraded.
    garage.stop_node(0);
    garage.stop_node(1);
    let c2 = Blob::random(3 << 20);
    up.push_blob(&c2);
    pull_all(rs.iter().map(|r| r.url(&client_blob(&c2))).collect(), &c2).await;
    pull_all(rs.iter().map(|r| r.url(&client_blob(&big))).collect(), &big).await;
    for r in &rs {
        wait_for("(c) degraded gauge", Duration::from_secs(30), async || {
            metric(r.metrics, "registry_proxy_tier_degraded").await == 1.0
        })
        .await;
        let ready = test_client()
            .get(format!("http://{}/readyz", r.metrics))
            .send()
            .await
            .unwrap();
        assert_eq!(
            ready.status(),
            200,
            "/readyz stays ready with the tier down"
        );
    }

    // (d) the owner of a blob killed with SIGKILL mid-fill: every client of the other
    // replicas still gets the right bytes (from the upstream, at their offsets).
    let d = Blob::random(32 << 20);
    up.push_blob(&d);
    up.on(Rule::exact(
        up_blob(&d),
        Action::SlowBody {
            chunk: 256 << 10,
            delay: Duration::from_millis(25),
        },
    ));
    let owner = registry_proxy::rendezvous(&urls, &d.digest)
        .unwrap()
        .to_owned();
    let oi = rs.iter().position(|r| r.base() == owner).unwrap();
    let others: Vec<String> = rs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != oi)
        .flat_map(|(_, r)| std::iter::repeat_n(r.url(&client_blob(&d)), 4))
        .collect();
    let d2 = d.clone();
    let pulls = tokio::spawn(async move { pull_all(others, &d2).await });
    wait_for(
        "(d) the owner's fill to start",
        Duration::from_secs(20),
        async || fetches(&up, &up_blob(&d)) >= 1,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    rs[oi].kill9();
    tokio::time::timeout(Duration::from_secs(120), pulls)
        .await
        .expect("(d) pulls finish")
        .expect("(d) every client got the right bytes");
    let gets = fetches(&up, &up_blob(&d));
    assert!(
        (2..=3).contains(&gets),
        "(d) the survivors resumed from the upstream: {gets} GETs"
    );
}
