//! One upstream request per key at a time: concurrent callers share its result. The
//! request runs on a task of the given tracker, so a client that goes away does not
//! cancel it for the others.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Mutex, MutexGuard};

use futures_util::future::{BoxFuture, FutureExt as _, Shared};
use tokio_util::task::TaskTracker;

use crate::error::ApiError;

type Flight<T> = Shared<BoxFuture<'static, Result<T, ApiError>>>;

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

    /// Joins the flight for `key`, or starts `start()` on a task as that flight.
    /// `what` names the work in the error when its task dies.
    pub(crate) async fn join<F>(
        &self,
        key: String,
        what: &'static str,
        start: impl FnOnce() -> F,
    ) -> Result<T, ApiError>
    where
        F: Future<Output = Result<T, ApiError>> + Send + 'static,
    {
        let shared = {
            let mut running = self.running();
            if let Some(s) = running.get(&key) {
                s.clone()
            } else {
                let task = self.tasks.spawn(start());
                let fut: BoxFuture<'static, Result<T, ApiError>> = async move {
                    match task.await {
                        Ok(r) => r,
                        Err(_) => Err(ApiError::internal(what)),
                    }
                }
                .boxed();
                let shared = fut.shared();
                running.insert(key.clone(), shared.clone());
                shared
            }
        };
        let result = shared.await;
        let mut running = self.running();
        // Only the entry of this flight; a newer one may have replaced it.
        if running.get(&key).and_then(|s| s.peek()).is_some() {
            running.remove(&key);
        }
        result
    }
}
