//! One upstream request per key at a time: concurrent callers share its result and the
//! upstream notes (status, time) of the request that started it. The request runs on a
//! task of the given tracker, so a client that goes away does not cancel it for the
//! others.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Mutex, MutexGuard};

use futures_util::future::{BoxFuture, FutureExt as _, Shared};
use tokio_util::task::TaskTracker;

use crate::error::ApiError;
use crate::ops::notes::RequestContext;

/// A running flight and the context its task notes its upstream responses in; every
/// caller takes those notes over when the flight ends.
struct Flight<T> {
    result: Shared<BoxFuture<'static, Result<T, ApiError>>>,
    work: RequestContext,
}

impl<T> Clone for Flight<T> {
    fn clone(&self) -> Self {
        Self {
            result: self.result.clone(),
            work: self.work.clone(),
        }
    }
}

/// The flights running now, by key, and the tracker owning their tasks.
pub(crate) struct Flights<T> {
    running: Mutex<HashMap<String, Flight<T>>>,
    tasks: TaskTracker,
}

impl<T> Flights<T> {
    /// No flight yet; flights will run on `tasks`.
    pub(crate) fn new(tasks: TaskTracker) -> Self {
        Self {
            running: Mutex::new(HashMap::new()),
            tasks,
        }
    }
}

impl<T> std::fmt::Debug for Flights<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flights").finish_non_exhaustive()
    }
}

impl<T: Clone + Send + Sync + 'static> Flights<T> {
    fn running(&self) -> MutexGuard<'_, HashMap<String, Flight<T>>> {
        match self.running.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Joins the flight for `key`, or starts `start(work)` on a task as that flight; the
    /// work notes its upstream responses in `work`. When the flight ends, the caller's
    /// `ctx` takes those notes over, whether it started the flight or joined it, so its
    /// access log line names the upstream status and time of the work it waited for (and
    /// not a later response of another request). `what` names the work in the error when
    /// its task dies.
    pub(crate) async fn join<F>(
        &self,
        key: String,
        what: &'static str,
        ctx: &RequestContext,
        start: impl FnOnce(RequestContext) -> F,
    ) -> Result<T, ApiError>
    where
        F: Future<Output = Result<T, ApiError>> + Send + 'static,
    {
        let flight = {
            let mut running = self.running();
            if let Some(f) = running.get(&key) {
                f.clone()
            } else {
                let work = RequestContext::default();
                let task = self.tasks.spawn(start(work.clone()));
                let fut: BoxFuture<'static, Result<T, ApiError>> = async move {
                    match task.await {
                        Ok(r) => r,
                        Err(_) => Err(ApiError::internal(what)),
                    }
                }
                .boxed();
                let flight = Flight {
                    result: fut.shared(),
                    work,
                };
                running.insert(key.clone(), flight.clone());
                flight
            }
        };
        let result = flight.result.await;
        ctx.adopt_upstream(&flight.work);
        let mut running = self.running();
        // Only the entry of this flight; a newer one may have replaced it.
        if running.get(&key).and_then(|f| f.result.peek()).is_some() {
            running.remove(&key);
        }
        result
    }
}
