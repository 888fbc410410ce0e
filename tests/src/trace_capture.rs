//! A proxy on its own thread whose every span and event (trace level) is captured as
//! text, for log-hygiene tests.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::start_proxy;

/// Everything every span and event recorded, as text.
#[derive(Clone, Default)]
pub struct Captured(pub Arc<Mutex<String>>);
struct CaptureAll {
    out: Captured,
    next_id: AtomicU64,
}
struct Fields<'a>(&'a mut String);
impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        let _ = write!(self.0, " {}={value}", field.name());
    }
    fn record_error(
        &mut self,
        field: &tracing::field::Field,
        value: &(dyn std::error::Error + 'static),
    ) {
        let _ = write!(self.0, " {}={value} ({value:?})", field.name());
    }
}
impl tracing::Subscriber for CaptureAll {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
    fn new_span(&self, attrs: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut line = format!(
            "SPAN {} {}",
            attrs.metadata().target(),
            attrs.metadata().name()
        );
        attrs.record(&mut Fields(&mut line));
        line.push('\n');
        self.out.0.lock().unwrap().push_str(&line);
        tracing::span::Id::from_u64(self.next_id.fetch_add(1, Ordering::Relaxed) + 1)
    }
    fn record(&self, _: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        let mut line = String::from("RECORD");
        values.record(&mut Fields(&mut line));
        line.push('\n');
        self.out.0.lock().unwrap().push_str(&line);
    }
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let m = event.metadata();
        let mut line = format!("{} {}", m.level(), m.target());
        event.record(&mut Fields(&mut line));
        line.push('\n');
        self.out.0.lock().unwrap().push_str(&line);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}
/// Runs a proxy on its own thread and runtime with a trace-level capture of everything it
/// logs (the test client and the fake upstream run elsewhere, so they cannot pollute it).
pub fn traced_proxy(
    args: Vec<String>,
) -> (
    Captured,
    tokio::sync::oneshot::Receiver<(SocketAddr, SocketAddr)>,
    tokio_util::sync::CancellationToken,
    std::thread::JoinHandle<()>,
) {
    let captured = Captured::default();
    let out = captured.clone();
    let stop = tokio_util::sync::CancellationToken::new();
    let stop2 = stop.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let th = std::thread::spawn(move || {
        let _guard = tracing::subscriber::set_default(CaptureAll {
            out,
            next_id: AtomicU64::new(0),
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let px = start_proxy(&args).await;
            let _ = tx.send((px.addr, px.metrics_addr));
            stop2.cancelled().await;
            px.stop(Duration::from_secs(10)).await.unwrap();
        });
    });
    (captured, rx, stop, th)
}
