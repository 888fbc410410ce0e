//! The `run` binary against the fake API server: SIGTERM and SIGINT stop it within 5 s and
//! the Lease is handed back on the way out.

mod fake;

use std::time::{Duration, Instant};

use fake::FakeApi;

const LEASE: &str = "apis/coordination.k8s.io/v1/namespaces/d8-system/leases/registry-controller";

fn holder(api: &FakeApi) -> Option<String> {
    api.get(LEASE)
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
}

async fn stops_on(signal: &str) {
    let api = FakeApi::default();
    let url = api.start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\nclusters:\n- name: fake\n  cluster:\n    server: {url}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\nusers:\n- name: fake\n  user:\n    token: replica-a\n"
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_registry-controller"))
        .args(["run", "--identity", "replica-a", "--interval", "1s"])
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while holder(&api).as_deref() != Some("replica-a") {
        assert!(Instant::now() < deadline, "never took the lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let it reach its reconcile loop's sleep or be mid-pass; both must stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = child.id().unwrap().to_string();
    let sent = Instant::now();
    let st = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .unwrap();
    assert!(st.success());
    let exit = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .unwrap_or_else(|_| panic!("still running 5 s after SIG{signal}"))
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(sent.elapsed() < Duration::from_secs(5));
    assert_eq!(holder(&api), None, "lease released on exit");
    let who: Vec<String> = api.log().iter().map(|l| l.who.clone()).collect();
    assert!(who.iter().all(|w| w == "replica-a"), "{who:?}");
}

#[tokio::test]
async fn sigterm_stops_within_five_seconds_and_releases_the_lease() {
    stops_on("TERM").await;
}

#[tokio::test]
async fn sigint_stops_within_five_seconds_and_releases_the_lease() {
    stops_on("INT").await;
}
