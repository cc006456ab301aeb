//! Session actors: one per client, created on demand under the sessions
//! supervisor. A session holds a client's admission state (in-flight and
//! rate limits) and ends itself after an idle period.
//!
//! Requests do not pass through the session's mailbox: the caller's own task
//! takes the admission decision on the session's shared state
//! ([`Sessions::admit`]), which saves a cross-thread wake-up per request.
//! The actor owns the session's life: it is supervised, listed in the tree,
//! and decides when the session has been idle long enough to end. That
//! decision and every admission take the same lock, so a request is never
//! admitted by a session that has already decided to end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prism_actors::{
    Actor, Addr, BoxError, ChildSpec, Context, ExitReason, RestartPolicy, SupervisorRef,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::debug;

use crate::error::{echo, ApiError};
use crate::pool::{Admission, BackendHealth};
use crate::settings::SessionSettings;

/// Messages of a session actor.
pub enum SessionMsg {
    /// Check for idleness (sent by the session's ticker).
    Tick,
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, now: Instant) -> bool {
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What admission and the idle check share, under one lock.
struct Gate {
    bucket: Option<Bucket>,
    last_active: Instant,
    /// The session decided to end: it admits nothing more.
    ended: bool,
}

/// The state of one client's session that its requests share.
struct Shared {
    client: Arc<str>,
    settings: SessionSettings,
    in_flight: Arc<Semaphore>,
    gate: Mutex<Gate>,
}

impl Shared {
    fn new(client: Arc<str>, settings: SessionSettings) -> Self {
        let bucket = (settings.rate_limit > 0).then(|| {
            let burst = if settings.rate_burst > 0 {
                settings.rate_burst
            } else {
                settings.rate_limit
            } as f64;
            Bucket {
                rate: settings.rate_limit as f64,
                burst,
                tokens: burst,
                at: Instant::now(),
            }
        });
        Shared {
            client,
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight as usize)),
            settings,
            gate: Mutex::new(Gate {
                bucket,
                last_active: Instant::now(),
                ended: false,
            }),
        }
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        // Every field is updated in one step: a poisoned gate is consistent.
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits one request, or says why not; `None` when the session has
    /// ended and a new one must be asked.
    fn admit(
        &self,
        health: &BackendHealth,
        namespace: &str,
        deadline: Instant,
    ) -> Option<Result<OwnedSemaphorePermit, ApiError>> {
        let now = Instant::now();
        let mut gate = self.gate();
        if gate.ended {
            return None;
        }
        gate.last_active = now;
        if now >= deadline {
            return Some(Err(ApiError::DeadlineExceeded(
                "while admitted by the session",
            )));
        }
        if let Some(bucket) = &mut gate.bucket {
            if !bucket.take(now) {
                return Some(Err(ApiError::ResourceExhausted(format!(
                    "client '{}' is over its rate limit of {} requests/s (sessions.rate_limit)",
                    echo(&self.client),
                    self.settings.rate_limit
                ))));
            }
        }
        // An open circuit answers at once instead of queueing behind a
        // backend that is down or a pool actor that is restarting.
        if health.admit() == Admission::Reject {
            return Some(Err(ApiError::Unavailable(format!(
                "backend of namespace '{namespace}' is unavailable (circuit open)"
            ))));
        }
        Some(self.in_flight.clone().try_acquire_owned().map_err(|_| {
            ApiError::ResourceExhausted(format!(
                "client '{}' has {} requests in flight (sessions.max_in_flight)",
                echo(&self.client),
                self.settings.max_in_flight
            ))
        }))
    }

    /// Ends the session when it has been idle for `idle_timeout` with
    /// nothing in flight; true when it did.
    fn end_if_idle(&self) -> bool {
        let mut gate = self.gate();
        let idle = gate.last_active.elapsed() >= self.settings.idle_timeout;
        let busy = self.in_flight.available_permits() < self.settings.max_in_flight as usize;
        if idle && !busy {
            gate.ended = true;
        }
        gate.ended
    }

    fn end(&self) {
        self.gate().ended = true;
    }
}

/// The session actor of one client.
pub struct Session {
    shared: Arc<Shared>,
    registry: Sessions,
}

impl Actor for Session {
    type Msg = SessionMsg;

    async fn started(&mut self, ctx: &mut Context<Self>) -> Result<(), BoxError> {
        let every = (self.shared.settings.idle_timeout / 4).max(Duration::from_millis(10));
        ctx.send_interval(every, || SessionMsg::Tick);
        debug!(client = %echo(&self.shared.client), "session started");
        Ok(())
    }

    async fn handle(&mut self, msg: SessionMsg, ctx: &mut Context<Self>) -> Result<(), BoxError> {
        match msg {
            SessionMsg::Tick => {
                if self.shared.end_if_idle() {
                    debug!(client = %echo(&self.shared.client), "session idle, ending");
                    // Leave the registry first so that new requests create a
                    // new session instead of finding this one ended.
                    self.registry.forget(&self.shared.client, ctx.id());
                    ctx.stop();
                }
            }
        }
        Ok(())
    }

    async fn stopped(
        &mut self,
        _reason: &ExitReason,
        ctx: &mut Context<Self>,
    ) -> Result<(), BoxError> {
        self.shared.end();
        self.registry.forget(&self.shared.client, ctx.id());
        Ok(())
    }
}

/// A live session: its actor and the state its requests share.
#[derive(Clone)]
struct Entry {
    addr: Addr<Session>,
    shared: Arc<Shared>,
}

/// The live sessions by client, and the supervisor they run under.
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<SessionsInner>,
}

struct SessionsInner {
    map: Mutex<HashMap<Arc<str>, Entry>>,
    supervisor: SupervisorRef,
    settings: SessionSettings,
}

impl Sessions {
    /// Sessions created under `supervisor` with `settings`.
    pub fn new(supervisor: SupervisorRef, settings: SessionSettings) -> Self {
        Sessions {
            inner: Arc::new(SessionsInner {
                map: Mutex::new(HashMap::new()),
                supervisor,
                settings,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Entry>> {
        // Entries are inserted and removed whole: a poisoned map is consistent.
        self.inner.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sessions alive now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no session is alive.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn forget(&self, client: &str, id: u64) {
        let mut map = self.lock();
        if map.get(client).is_some_and(|e| e.addr.id() == id) {
            map.remove(client);
        }
    }

    /// The session of `client`, created when there is none.
    async fn session(&self, client: &str) -> Result<Entry, ApiError> {
        let (spec, entry) = {
            let mut map = self.lock();
            if let Some(entry) = map.get(client) {
                return Ok(entry.clone());
            }
            if map.len() >= self.inner.settings.max_sessions as usize {
                return Err(ApiError::ResourceExhausted(format!(
                    "{} sessions are open (sessions.max_sessions)",
                    map.len()
                )));
            }
            let client: Arc<str> = client.into();
            let shared = Arc::new(Shared::new(client.clone(), self.inner.settings.clone()));
            let registry = self.clone();
            let name = format!("session:{}", echo(&client));
            let actor_shared = shared.clone();
            // Sessions are temporary: the factory runs once.
            let spec =
                ChildSpec::with_mailbox(name, self.inner.settings.mailbox, move || Session {
                    shared: actor_shared.clone(),
                    registry: registry.clone(),
                })
                .restart(RestartPolicy::Temporary);
            let entry = Entry {
                addr: spec.addr(),
                shared,
            };
            map.insert(client, entry.clone());
            (spec, entry)
        };
        // The map entry exists from here on. The add runs on its own task:
        // if this future is dropped (the caller went away, its deadline
        // passed) while the supervisor's mailbox is full, the session still
        // starts, and ends when idle, or its entry is removed; either way
        // the slot is not held by an actor that never runs.
        let registry = self.clone();
        let supervisor = self.inner.supervisor.clone();
        let id = entry.addr.id();
        let owner: Arc<str> = client.into();
        let add = tokio::spawn(async move {
            let res = supervisor.tell_add_child(spec).await;
            if res.is_err() {
                registry.forget(&owner, id);
            }
            res.map_err(|e| e.to_string())
        });
        match add.await {
            Ok(Ok(())) => Ok(entry),
            Ok(Err(e)) => Err(ApiError::Unavailable(format!("cannot open a session: {e}"))),
            Err(e) => {
                self.forget(client, id);
                Err(ApiError::Unavailable(format!("cannot open a session: {e}")))
            }
        }
    }

    /// Admits one request of `client` to `namespace` (whose backend is
    /// `health`): its deadline, the client's rate and in-flight limits and
    /// the backend's circuit. The permit is the client's in-flight slot,
    /// held until the request ends.
    pub async fn admit(
        &self,
        client: &str,
        health: &BackendHealth,
        namespace: &str,
        deadline: Instant,
    ) -> Result<OwnedSemaphorePermit, ApiError> {
        // A session that has just ended by idleness gets replaced once.
        for _ in 0..2 {
            let entry = self.session(client).await?;
            match entry.shared.admit(health, namespace, deadline) {
                Some(res) => return res,
                None => self.forget(client, entry.addr.id()),
            }
        }
        Err(ApiError::Unavailable("session unavailable".into()))
    }
}

#[cfg(test)]
mod tests {
    use prism_actors::{ActorInfo, Supervisor, DEFAULT_MAILBOX};

    use super::*;

    fn settings() -> SessionSettings {
        crate::settings::Settings::from_toml(
            "[server]\ngrpc_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\n\
             [backends.m]\nkind = \"memory\"\n[namespaces.n]\nbackend = \"m\"\n",
        )
        .expect("settings")
        .sessions
    }

    fn has_child(tree: &ActorInfo, name: &str) -> bool {
        tree.children.iter().any(|c| c.name == name)
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_while_its_session_is_added_leaks_no_slot() {
        let sup = Supervisor::new("sessions");
        let sessions = Sessions::new(sup.supervisor_ref(), settings());
        // The supervisor does not run yet, so its mailbox fills up and the
        // next add waits for room.
        for i in 0..DEFAULT_MAILBOX {
            sessions
                .session(&format!("c{i}"))
                .await
                .expect("queued add");
        }
        let gone = tokio::time::timeout(Duration::from_millis(50), sessions.session("victim"));
        assert!(gone.await.is_err(), "the add should wait for room");
        // Once the supervisor runs, the session whose caller went away
        // starts too: its map entry names an actor that exists.
        let tree = sup.spawn();
        let started = tokio::time::Instant::now();
        while !tree
            .snapshot()
            .is_some_and(|t| has_child(&t, "session:victim"))
        {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the session of the caller that went away never started"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(sessions.len(), DEFAULT_MAILBOX + 1);
        tree.shutdown(Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn a_session_that_ended_admits_nothing_and_is_replaced() {
        let tree = Supervisor::new("sessions").spawn();
        let sessions = Sessions::new(tree.supervisor_ref(), settings());
        let health = BackendHealth::new("m".into(), crate::pool::BreakerConfig::default());
        let deadline = Instant::now() + Duration::from_secs(5);
        let first = sessions.session("c").await.expect("session");
        drop(
            sessions
                .admit("c", &health, "n", deadline)
                .await
                .expect("admitted"),
        );
        // The session decides to end (as its idle check would): nothing
        // more is admitted through it, and the next request gets a new one.
        first.shared.end();
        assert!(first.shared.admit(&health, "n", deadline).is_none());
        drop(
            sessions
                .admit("c", &health, "n", deadline)
                .await
                .expect("admitted"),
        );
        let second = sessions.session("c").await.expect("session");
        assert_ne!(first.addr.id(), second.addr.id());
        tree.shutdown(Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn admission_holds_the_clients_in_flight_limit() {
        let tree = Supervisor::new("sessions").spawn();
        let mut settings = settings();
        settings.max_in_flight = 2;
        let sessions = Sessions::new(tree.supervisor_ref(), settings);
        let health = BackendHealth::new("m".into(), crate::pool::BreakerConfig::default());
        let deadline = Instant::now() + Duration::from_secs(5);
        let a = sessions
            .admit("c", &health, "n", deadline)
            .await
            .expect("first");
        let _b = sessions
            .admit("c", &health, "n", deadline)
            .await
            .expect("second");
        match sessions.admit("c", &health, "n", deadline).await {
            Err(ApiError::ResourceExhausted(m)) => assert!(m.contains("max_in_flight"), "{m}"),
            other => panic!("unexpected {:?}", other.map(|_| ())),
        }
        // Another client has its own limit; a finished request frees a slot.
        drop(
            sessions
                .admit("d", &health, "n", deadline)
                .await
                .expect("other client"),
        );
        drop(a);
        drop(
            sessions
                .admit("c", &health, "n", deadline)
                .await
                .expect("freed"),
        );
        tree.shutdown(Duration::from_secs(5)).await;
    }
}
