//! Session actors: one per client, created on demand under the sessions
//! supervisor. A session admits a client's requests (in-flight and rate
//! limits) and hands them to the namespace's pool actor; it ends itself after
//! an idle period.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prism_actors::{
    Actor, Addr, BoxError, ChildSpec, Context, ExitReason, Reply, RestartPolicy, SendError,
    SupervisorRef,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::debug;

use crate::backend::{Op, Outcome};
use crate::error::{echo, ApiError};
use crate::pool::{Admission, BackendHealth, PoolActor, PoolMsg};
use crate::settings::SessionSettings;

/// Messages of a session actor.
pub enum SessionMsg {
    /// Admit a request and pass it to `pool`.
    Request(Request),
    /// Check for idleness (sent by the session's ticker).
    Tick,
}

/// One key-value request on its way to a pool actor.
pub struct Request {
    /// The pool actor of the namespace's backend.
    pub pool: Addr<PoolActor>,
    /// The backend's health and circuit breaker.
    pub health: Arc<BackendHealth>,
    /// The namespace.
    pub namespace: Arc<str>,
    /// The operation.
    pub op: Op,
    /// The request's deadline.
    pub deadline: Instant,
    /// True when `deadline` is the caller's own, shorter than the
    /// namespace's `timeout`: a request that runs into it says nothing
    /// about the backend, so the circuit breaker does not count it.
    pub caller_bound: bool,
    /// Where the outcome goes; the pool replies to it directly.
    pub reply: Reply<Result<Outcome, ApiError>>,
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

/// The session actor of one client.
pub struct Session {
    client: Arc<str>,
    settings: SessionSettings,
    in_flight: Arc<Semaphore>,
    bucket: Option<Bucket>,
    last_active: Instant,
    registry: Sessions,
}

impl Session {
    fn admit(&mut self, req: Request) {
        let Request {
            pool,
            health,
            namespace,
            op,
            deadline,
            caller_bound,
            reply,
        } = req;
        if reply.is_closed() {
            debug!(client = %echo(&self.client), "caller went away while queued, skipped");
            return;
        }
        let now = Instant::now();
        self.last_active = now;
        if now >= deadline {
            let _ = reply.send(Err(ApiError::DeadlineExceeded(
                "while queued in the session",
            )));
            return;
        }
        if let Some(bucket) = &mut self.bucket {
            if !bucket.take(now) {
                let _ = reply.send(Err(ApiError::ResourceExhausted(format!(
                    "client '{}' is over its rate limit of {} requests/s (sessions.rate_limit)",
                    echo(&self.client),
                    self.settings.rate_limit
                ))));
                return;
            }
        }
        // An open circuit answers at once instead of queueing behind a
        // backend that is down or a pool actor that is restarting.
        if health.admit() == Admission::Reject {
            let _ = reply.send(Err(ApiError::Unavailable(format!(
                "backend of namespace '{namespace}' is unavailable (circuit open)"
            ))));
            return;
        }
        let permit: OwnedSemaphorePermit = match self.in_flight.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let _ = reply.send(Err(ApiError::ResourceExhausted(format!(
                    "client '{}' has {} requests in flight (sessions.max_in_flight)",
                    echo(&self.client),
                    self.settings.max_in_flight
                ))));
                return;
            }
        };
        let owner = namespace.clone();
        let msg = PoolMsg::Exec {
            namespace,
            op,
            deadline,
            caller_bound,
            permit: Some(permit),
            reply,
        };
        if let Err(e) = pool.try_tell(msg) {
            let owner = format!("backend of namespace '{owner}'");
            let err = ApiError::rejected(&e, &owner, "its pool mailbox (backends.<name>.mailbox)");
            // The refused message still holds the caller's reply channel.
            if let PoolMsg::Exec { reply, .. } = e.into_inner() {
                let _ = reply.send(Err(err));
            }
        }
    }
}

impl Actor for Session {
    type Msg = SessionMsg;

    async fn started(&mut self, ctx: &mut Context<Self>) -> Result<(), BoxError> {
        let every = (self.settings.idle_timeout / 4).max(Duration::from_millis(10));
        ctx.send_interval(every, || SessionMsg::Tick);
        debug!(client = %echo(&self.client), "session started");
        Ok(())
    }

    async fn handle(&mut self, msg: SessionMsg, ctx: &mut Context<Self>) -> Result<(), BoxError> {
        match msg {
            SessionMsg::Request(req) => self.admit(req),
            SessionMsg::Tick => {
                let idle = self.last_active.elapsed() >= self.settings.idle_timeout;
                let busy =
                    self.in_flight.available_permits() < self.settings.max_in_flight as usize;
                if idle && !busy {
                    debug!(client = %echo(&self.client), "session idle, ending");
                    // Leave the registry first so that new requests create a
                    // new session instead of queueing behind this stop.
                    self.registry.forget(&self.client, ctx.id());
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
        self.registry.forget(&self.client, ctx.id());
        Ok(())
    }
}

/// The live sessions by client, and the supervisor they run under.
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<SessionsInner>,
}

struct SessionsInner {
    map: Mutex<HashMap<Arc<str>, Addr<Session>>>,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Addr<Session>>> {
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
        if map.get(client).is_some_and(|a| a.id() == id) {
            map.remove(client);
        }
    }

    /// The session of `client`, created when there is none.
    async fn session(&self, client: &str) -> Result<Addr<Session>, ApiError> {
        let spec = {
            let mut map = self.lock();
            if let Some(addr) = map.get(client) {
                return Ok(addr.clone());
            }
            if map.len() >= self.inner.settings.max_sessions as usize {
                return Err(ApiError::ResourceExhausted(format!(
                    "{} sessions are open (sessions.max_sessions)",
                    map.len()
                )));
            }
            let client: Arc<str> = client.into();
            let settings = self.inner.settings.clone();
            let registry = self.clone();
            let name = format!("session:{}", echo(&client));
            let factory_client = client.clone();
            let spec = ChildSpec::with_mailbox(name, settings.mailbox, move || {
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
                Session {
                    client: factory_client.clone(),
                    in_flight: Arc::new(Semaphore::new(settings.max_in_flight as usize)),
                    bucket,
                    last_active: Instant::now(),
                    registry: registry.clone(),
                    settings: settings.clone(),
                }
            })
            .restart(RestartPolicy::Temporary);
            map.insert(client, spec.addr());
            spec
        };
        let addr = spec.addr();
        // The map entry exists from here on. The add runs on its own task:
        // if this future is dropped (the caller went away, its deadline
        // passed) while the supervisor's mailbox is full, the session still
        // starts, and ends when idle, or its entry is removed; either way
        // the slot is not held by an actor that never runs.
        let registry = self.clone();
        let supervisor = self.inner.supervisor.clone();
        let id = addr.id();
        let owner: Arc<str> = client.into();
        let add = tokio::spawn(async move {
            let res = supervisor.tell_add_child(spec).await;
            if res.is_err() {
                registry.forget(&owner, id);
            }
            res.map_err(|e| e.to_string())
        });
        match add.await {
            Ok(Ok(())) => Ok(addr),
            Ok(Err(e)) => Err(ApiError::Unavailable(format!("cannot open a session: {e}"))),
            Err(e) => {
                self.forget(client, id);
                Err(ApiError::Unavailable(format!("cannot open a session: {e}")))
            }
        }
    }

    /// Passes a request to `client`'s session. The session replies through
    /// `req.reply`.
    pub async fn submit(&self, client: &str, req: Request) -> Result<(), ApiError> {
        let mut msg = SessionMsg::Request(req);
        // A session that has just ended by idleness gets replaced once.
        for _ in 0..2 {
            let addr = self.session(client).await?;
            match addr.try_tell(msg) {
                Ok(()) => return Ok(()),
                Err(SendError::Closed(m)) => {
                    self.forget(client, addr.id());
                    msg = m;
                }
                Err(e) => {
                    let owner = format!("the session of client '{}'", echo(client));
                    return Err(ApiError::rejected(
                        &e,
                        &owner,
                        "its mailbox (sessions.mailbox)",
                    ));
                }
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
}
