//! Hostile clients at the connection level: caps on connections and responses in
//! flight, silent and idle connections reaped, h2c off by default, the ops port kept
//! alive while the API is saturated.

use std::time::Duration;

use registry_tests::{
    Blob, FakeUpstream, fake_upstream::UPSTREAM_REPO, proxy::passthrough, test_client,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PING: &[u8] = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n";

/// Reads until the end of one response head; `None` if nothing arrives within `wait`.
async fn read_head(s: &mut TcpStream, wait: Duration) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                return Some(String::from_utf8_lossy(&buf).into_owned());
            }
        }
    };
    tokio::time::timeout(wait, read).await.ok().flatten()
}

/// Waits for the server to close `s` (EOF or reset), discarding what it sends.
async fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    let mut chunk = [0u8; 4096];
    let drain = async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(wait, drain).await.is_ok()
}

#[tokio::test]
async fn connection_past_the_cap_waits_and_the_ops_port_still_answers() {
    let up = FakeUpstream::start().await;
    let px = passthrough(&up, &["--max-connections", "2"]).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(px.addr).await.unwrap();
        s.write_all(PING).await.unwrap();
        let head = read_head(&mut s, Duration::from_secs(5))
            .await
            .expect("answered");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        held.push(s);
    }
    // The kernel completes the handshake, but the proxy does not accept it.
    let mut third = TcpStream::connect(px.addr).await.unwrap();
    third.write_all(PING).await.unwrap();
    assert!(
        read_head(&mut third, Duration::from_millis(700))
            .await
            .is_none(),
        "connection 3 served past --max-connections 2"
    );
    let health = test_client()
        .get(px.metrics_url("/healthz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .expect("ops port answers while the API is at its cap");
    assert_eq!(health.status(), 200);
    drop(held.pop());
    let head = read_head(&mut third, Duration::from_secs(5))
        .await
        .expect("connection 3 served once a slot is free");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[tokio::test]
async fn responses_in_flight_are_capped_across_connections() {
    let up = FakeUpstream::start().await;
    // Bigger than every buffer between the proxy and a client that never reads.
    let blob = Blob::random(8 << 20);
    up.push_blob(&blob);
    let px = passthrough(&up, &["--max-streams", "1"]).await;
    let path = format!("/v2/system/deckhouse/blobs/{}", blob.digest);
    let mut stalled = TcpStream::connect(px.addr).await.unwrap();
    stalled
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut stalled, Duration::from_secs(5))
        .await
        .expect("head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The stalled body holds the only slot: the next request is refused, not queued
    // without bound.
    let r = test_client()
        .get(px.url("/v2/"))
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    drop(stalled);
    // The slot comes back when the stalled response is dropped.
    let mut ok = false;
    for _ in 0..50 {
        let r = test_client().get(px.url("/v2/")).send().await.unwrap();
        if r.status() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the response slot was not released");
    assert_eq!(
        up.requests("GET", &format!("/v2/{UPSTREAM_REPO}/blobs/{}", blob.digest)),
        1
    );
}

#[tokio::test]
async fn silent_connection_is_closed_after_the_header_timeout() {
    let up = FakeUpstream::start().await;
    let px = passthrough(&up, &["--header-read-timeout", "1s"]).await;
    let started = std::time::Instant::now();
    let mut s = TcpStream::connect(px.addr).await.unwrap();
    assert!(
        closed_within(&mut s, Duration::from_secs(5)).await,
        "a connection that sent nothing was kept open"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    // A partial request head is not a way around it.
    let mut s = TcpStream::connect(px.addr).await.unwrap();
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHo").await.unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed() {
    let up = FakeUpstream::start().await;
    let px = passthrough(&up, &["--idle-timeout", "1s"]).await;
    let mut s = TcpStream::connect(px.addr).await.unwrap();
    s.write_all(PING).await.unwrap();
    assert!(read_head(&mut s, Duration::from_secs(5)).await.is_some());
    // Still open shortly after the response: idleness counts from its end.
    tokio::time::sleep(Duration::from_millis(400)).await;
    s.write_all(PING).await.unwrap();
    assert!(read_head(&mut s, Duration::from_secs(5)).await.is_some());
    assert!(
        closed_within(&mut s, Duration::from_secs(5)).await,
        "an idle keep-alive connection was kept open"
    );
}

/// An h2 prior-knowledge client connection on `addr`.
async fn h2_connect(
    addr: std::net::SocketAddr,
) -> Result<
    (
        h2::client::SendRequest<bytes::Bytes>,
        h2::client::Connection<TcpStream, bytes::Bytes>,
    ),
    h2::Error,
> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    h2::client::handshake(tcp).await
}

async fn h2_get(send: &mut h2::client::SendRequest<bytes::Bytes>, uri: &str) -> u16 {
    let req = http::Request::get(uri).body(()).unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    status
}

#[tokio::test]
async fn h2c_is_refused_unless_enabled() {
    let up = FakeUpstream::start().await;
    let px = passthrough(&up, &[]).await;
    let refused = async {
        let (mut send, conn) = h2_connect(px.addr).await?;
        tokio::spawn(conn);
        let req = http::Request::get(px.url("/v2/")).body(()).unwrap();
        send.send_request(req, true)?.0.await
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(5), refused)
            .await
            .expect("answered")
            .is_err(),
        "prior-knowledge h2 served on the plain port without --h2c"
    );
}

#[tokio::test]
async fn h2_streams_are_capped_and_an_idle_connection_is_closed() {
    let up = FakeUpstream::start().await;
    let px = passthrough(
        &up,
        &["--h2c", "--h2-max-streams", "4", "--idle-timeout", "1s"],
    )
    .await;
    let (mut send, mut conn) = h2_connect(px.addr).await.unwrap();
    let url = px.url("/v2/");
    let work = async {
        assert_eq!(h2_get(&mut send, &url).await, 200);
        send
    };
    let send = tokio::select! {
        s = work => s,
        r = &mut conn => panic!("connection ended early: {r:?}"),
    };
    assert_eq!(conn.max_concurrent_send_streams(), 4);
    // Nothing in flight now: the proxy sends GOAWAY and the connection ends.
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), &mut conn)
        .await
        .expect("an idle h2 connection was kept open")
        .expect("closed cleanly with GOAWAY");
    assert!(started.elapsed() >= Duration::from_millis(500));
    drop(send);
}
