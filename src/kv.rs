//! The request core: every rule a key-value request obeys, decided once for
//! every transport. The gRPC service ([`crate::grpc`]) and the REST API
//! ([`crate::http`]) only convert their types to and from the typed
//! operations here.
//!
//! One operation, in order: the request span opens; a draining gateway
//! refuses; the namespace is looked up; the fields are validated; the
//! deadline is fixed (the caller's, else the namespace's); the caller's
//! session admits it (rate, in-flight and circuit); it runs on the
//! namespace's backend, in the request's own task while the backend's pool
//! actor has it up, queued in that actor's mailbox while it restarts; the
//! request is counted and timed in the metrics and, when it failed, logged.

pub mod caller;
pub mod validate;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, error, Instrument};

pub use self::caller::{Api, Caller};
pub use self::validate::{ScanParams, ValueLimit};
use crate::auth::{Access, Authorizer, Credentials};
use crate::backend::{Item, Op, Outcome, Record};
use crate::error::{echo, ApiError};
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::session::Sessions;
use crate::settings::{AuthSettings, NamespaceSettings};

/// A configured namespace, resolved to its pool actor.
#[derive(Debug)]
pub struct Namespace {
    /// The namespace's name.
    pub name: Arc<str>,
    /// Its settings.
    pub settings: NamespaceSettings,
    /// The pool actor of its backend, and the way to its backend.
    pub pool: Pool,
}

/// One page of a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Keys in ascending byte order (values empty with `keys_only`).
    pub items: Vec<Item>,
    /// Where the next page starts; empty when this is the last one.
    pub next_cursor: String,
}

/// The drain as the request core and the probes see it, and the count of
/// requests in flight on every transport, which the drain waits for.
///
/// A drain has two steps: first it is *announced* (health and readiness say
/// NOT_SERVING while requests are still served, so load balancers stop
/// sending), then new requests are *refused* with UNAVAILABLE while those
/// in flight finish.
#[derive(Debug, Clone, Default)]
pub struct Draining(Arc<DrainState>);

#[derive(Debug, Default)]
struct DrainState {
    announced: AtomicBool,
    refusing: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
}

impl Draining {
    /// Announces the drain: readiness and health turn NOT_SERVING.
    pub fn announce(&self) {
        self.0.announced.store(true, Ordering::Release);
    }

    /// From now on new requests are refused.
    pub fn refuse(&self) {
        self.announce();
        self.0.refusing.store(true, Ordering::Release);
    }

    /// True once the drain has been announced.
    pub fn is_draining(&self) -> bool {
        self.0.announced.load(Ordering::Acquire)
    }

    /// True once new requests are refused.
    pub fn is_refusing(&self) -> bool {
        self.0.refusing.load(Ordering::Acquire)
    }

    /// Requests in flight now, on every transport.
    pub fn in_flight(&self) -> usize {
        self.0.in_flight.load(Ordering::Acquire)
    }

    /// Resolves once no request is in flight.
    pub async fn idle(&self) {
        loop {
            let notified = self.0.idle.notified();
            tokio::pin!(notified);
            // Registered before the count is read, so a request that ends
            // in between still wakes this waiter.
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    fn enter(&self) -> InFlight<'_> {
        self.0.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(&self.0)
    }
}

/// One request in flight; counted until dropped (also when the caller goes
/// away and its future is dropped).
struct InFlight<'a>(&'a DrainState);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// The request core of one gateway. Cheap to clone.
#[derive(Clone)]
pub struct Core {
    inner: Arc<Inner>,
}

struct Inner {
    namespaces: BTreeMap<String, Arc<Namespace>>,
    sessions: Sessions,
    metrics: Metrics,
    draining: Draining,
    auth: Authorizer,
}

impl Core {
    /// A core over `namespaces`, admitting requests through `sessions`,
    /// authorizing them by `auth`.
    pub fn new(
        namespaces: impl IntoIterator<Item = Namespace>,
        sessions: Sessions,
        draining: Draining,
        auth: &AuthSettings,
    ) -> Self {
        let metrics = Metrics::new();
        Core {
            inner: Arc::new(Inner {
                auth: Authorizer::new(auth, metrics.clone()),
                namespaces: namespaces
                    .into_iter()
                    .map(|ns| (ns.name.to_string(), Arc::new(ns)))
                    .collect(),
                sessions,
                metrics,
                draining,
            }),
        }
    }

    /// Every namespace, by name.
    pub fn namespaces(&self) -> impl Iterator<Item = &Namespace> {
        self.inner.namespaces.values().map(|ns| &**ns)
    }

    /// The metrics every request is recorded in.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The sessions.
    pub fn sessions(&self) -> &Sessions {
        &self.inner.sessions
    }

    /// Checks that `credentials` name an admin principal (always true with
    /// authentication off).
    pub fn authorize_admin(
        &self,
        credentials: &Credentials,
        endpoint: &'static str,
    ) -> Result<(), ApiError> {
        self.inner
            .auth
            .check(credentials, "", Access::Admin, endpoint)
            .map(drop)
    }

    /// The drain flag.
    pub fn draining(&self) -> &Draining {
        &self.inner.draining
    }

    /// Reads a key.
    pub async fn get(
        &self,
        caller: &Caller,
        namespace: &str,
        key: String,
    ) -> Result<Option<Record>, ApiError> {
        self.run(caller, namespace, "get", Access::Read, |_| async move {
            validate::key(&key)?;
            Ok(Op::Get { key })
        })
        .await
        .and_then(|o| match o {
            Outcome::Get(r) => Ok(r),
            other => Err(unexpected("get", other)),
        })
    }

    /// Inserts or replaces a key. `value` produces the value once the
    /// namespace (and so its size limit) is known, so that a transport can
    /// read a body under that limit; the size is checked here in any case.
    /// `ttl_ms` of 0 means the namespace's default TTL.
    pub async fn put<F, Fut>(
        &self,
        caller: &Caller,
        namespace: &str,
        key: String,
        ttl_ms: u64,
        value: F,
    ) -> Result<(), ApiError>
    where
        F: FnOnce(ValueLimit) -> Fut,
        Fut: Future<Output = Result<Bytes, ApiError>>,
    {
        self.run(caller, namespace, "put", Access::Write, |ns| async move {
            validate::key(&key)?;
            let limit = ValueLimit::new(ns.name.clone(), &ns.settings);
            let value = value(limit.clone()).await?;
            limit.check(value.len())?;
            let ttl = validate::put_ttl(&ns.settings, ttl_ms)?;
            Ok(Op::Put { key, value, ttl })
        })
        .await
        .and_then(|o| match o {
            Outcome::Put => Ok(()),
            other => Err(unexpected("put", other)),
        })
    }

    /// Removes a key; true when it existed.
    pub async fn delete(
        &self,
        caller: &Caller,
        namespace: &str,
        key: String,
    ) -> Result<bool, ApiError> {
        self.run(caller, namespace, "delete", Access::Write, |_| async move {
            validate::key(&key)?;
            Ok(Op::Delete { key })
        })
        .await
        .and_then(|o| match o {
            Outcome::Delete(existed) => Ok(existed),
            other => Err(unexpected("delete", other)),
        })
    }

    /// Tells whether a key exists.
    pub async fn exists(
        &self,
        caller: &Caller,
        namespace: &str,
        key: String,
    ) -> Result<bool, ApiError> {
        self.run(caller, namespace, "exists", Access::Read, |_| async move {
            validate::key(&key)?;
            Ok(Op::Exists { key })
        })
        .await
        .and_then(|o| match o {
            Outcome::Exists(exists) => Ok(exists),
            other => Err(unexpected("exists", other)),
        })
    }

    /// One page of keys with a prefix, in ascending byte order.
    pub async fn scan(
        &self,
        caller: &Caller,
        namespace: &str,
        params: ScanParams,
    ) -> Result<Page, ApiError> {
        self.run(caller, namespace, "scan", Access::Read, |ns| async move {
            validate::scan_op(params, &ns.settings)
        })
        .await
        .and_then(|o| match o {
            Outcome::Scan { items, more } => {
                let next_cursor = match (more, items.last()) {
                    (true, Some(last)) => validate::encode_cursor(&last.key),
                    _ => String::new(),
                };
                Ok(Page { items, next_cursor })
            }
            other => Err(unexpected("scan", other)),
        })
    }

    /// Records a request that its transport refused before it reached an
    /// operation (a path or query that does not decode), like any failed
    /// request, and gives the error back.
    pub fn refuse(
        &self,
        caller: &Caller,
        namespace: &str,
        op: &'static str,
        e: ApiError,
    ) -> ApiError {
        self.finish::<()>(
            caller,
            namespace,
            op,
            std::time::Instant::now(),
            &Err(e.clone()),
        );
        e
    }

    /// The steps every operation shares; `build` validates the request's
    /// fields against its namespace and returns the operation. The deadline
    /// is fixed once the namespace is known and bounds `build` too, so that
    /// a body that arrives slowly ends with DEADLINE_EXCEEDED.
    async fn run<F, Fut>(
        &self,
        caller: &Caller,
        namespace: &str,
        op: &'static str,
        access: Access,
        build: F,
    ) -> Result<Outcome, ApiError>
    where
        F: FnOnce(Arc<Namespace>) -> Fut,
        Fut: Future<Output = Result<Op, ApiError>>,
    {
        let started = std::time::Instant::now();
        let _in_flight = self.inner.draining.enter();
        let span = tracing::info_span!("request", namespace = %echo(namespace), op, session = %echo(&caller.client), api = caller.api.as_str());
        let res = async {
            if self.inner.draining.is_refusing() {
                return Err(ApiError::Unavailable("server is draining".into()));
            }
            // Before the lookup: an unknown namespace is NOT_FOUND only to a
            // principal whose grant covers its name.
            let principal = self
                .inner
                .auth
                .check(&caller.credentials, namespace, access, op)?;
            // With authentication on, the principal is the session: the
            // limits hold per principal, whatever `x-client-id` says.
            let session = principal.as_ref().map_or(&*caller.client, |p| &*p.name);
            let ns = self
                .inner
                .namespaces
                .get(namespace)
                .cloned()
                .ok_or_else(|| ApiError::UnknownNamespace(namespace.to_owned()))?;
            let deadline = Deadline::of(caller, &ns);
            let operation = tokio::time::timeout_at(deadline.at, build(ns.clone()))
                .await
                .map_err(|_| ApiError::DeadlineExceeded("while reading the request"))??;
            self.call(session, &ns, operation, deadline).await
        }
        .instrument(span)
        .await;
        self.finish(caller, namespace, op, started, &res);
        res
    }

    /// Counts and times a finished request; logs it when it failed.
    fn finish<T>(
        &self,
        caller: &Caller,
        namespace: &str,
        op: &'static str,
        started: std::time::Instant,
        res: &Result<T, ApiError>,
    ) {
        let code = match res {
            Ok(_) => tonic::Code::Ok,
            Err(e) => {
                debug!(namespace = %echo(namespace), op, session = %echo(&caller.client), api = caller.api.as_str(), code = ?e.code(), error = %e, "request failed");
                e.code()
            }
        };
        // A namespace that is not configured is counted under one label.
        let known = self
            .inner
            .namespaces
            .get(namespace)
            .map(|ns| ns.name.clone());
        self.inner
            .metrics
            .request(known, op, code, started.elapsed());
    }

    /// Admits `op` in the caller's session and runs it on the namespace's
    /// backend, by the deadline.
    async fn call(
        &self,
        session: &str,
        ns: &Namespace,
        op: Op,
        deadline: Deadline,
    ) -> Result<Outcome, ApiError> {
        let permit = self
            .inner
            .sessions
            .admit(session, &ns.pool.health, &ns.name, deadline.at)
            .await?;
        ns.pool
            .exec(&ns.name, op, deadline.at, deadline.caller_bound, permit)
            .await
    }
}

/// The deadline of a request, and whose it is.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: Instant,
    /// The caller's timeout is shorter than the namespace's: running out
    /// of time is the caller's choice, not a slow backend (see
    /// [`Pool::exec`]).
    caller_bound: bool,
}

impl Deadline {
    /// The caller's timeout, else the namespace's, from now.
    fn of(caller: &Caller, ns: &Namespace) -> Deadline {
        let now = Instant::now();
        let timeout = caller.timeout.unwrap_or(ns.settings.timeout);
        Deadline {
            // A client may send any deadline; a year is as good as forever.
            at: now
                .checked_add(timeout)
                .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600)),
            caller_bound: timeout < ns.settings.timeout,
        }
    }
}

/// A remaining TTL as the API reports it: milliseconds, -1 for no expiry.
/// A live key with under 1 ms left still reads as live (1), and a TTL too
/// long for the field saturates instead of wrapping.
pub fn ttl_ms(ttl: Option<Duration>) -> i64 {
    match ttl {
        Some(t) => i64::try_from(t.as_millis()).unwrap_or(i64::MAX).max(1),
        None => -1,
    }
}

/// A backend that answered an operation with another one's outcome: a bug,
/// logged, answered INTERNAL.
fn unexpected(op: &'static str, _outcome: Outcome) -> ApiError {
    error!(op, "backend answered with the outcome of another operation");
    ApiError::Internal
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_ttls_saturate_instead_of_wrapping() {
        assert_eq!(ttl_ms(None), -1);
        assert_eq!(ttl_ms(Some(Duration::from_micros(10))), 1);
        assert_eq!(ttl_ms(Some(validate::MAX_TTL)), 3_153_600_000_000);
        assert_eq!(ttl_ms(Some(Duration::MAX)), i64::MAX);
    }
}
