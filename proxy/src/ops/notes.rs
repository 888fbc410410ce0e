//! What a handler learns about one request (cache result, upstream status) for its
//! access log line: a task-local slot written deep down and read by the router.

/// What the handler learned about one request, for its access log line.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Notes {
    /// Cache result (`hit`, `miss`, `coalesced`, `stale`, `bypass`).
    pub cache: Option<&'static str>,
    /// Status of the last upstream response (0 = transport error).
    pub upstream_status: Option<u16>,
}

tokio::task_local! {
    static NOTES: std::cell::Cell<Notes>;
}

/// Runs a handler with a fresh [`Notes`] slot and returns what it noted.
pub(crate) async fn with_notes<F: std::future::Future>(f: F) -> (F::Output, Notes) {
    NOTES
        .scope(std::cell::Cell::new(Notes::default()), async move {
            let out = f.await;
            let notes = NOTES.try_with(std::cell::Cell::get).unwrap_or_default();
            (out, notes)
        })
        .await
}

/// Records the cache result of the current request (no-op outside a request task).
pub(crate) fn note_cache(result: &'static str) {
    let _ = NOTES.try_with(|n| {
        let mut v = n.get();
        v.cache = Some(result);
        n.set(v);
    });
}

/// Records the status of an upstream response for the current request.
pub(crate) fn note_upstream(status: u16) {
    let _ = NOTES.try_with(|n| {
        let mut v = n.get();
        v.upstream_status = Some(status);
        n.set(v);
    });
}
