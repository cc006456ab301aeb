//! Client-side balancing over several gateway instances.
//!
//! Requests go through tonic's balanced channel (`Channel::balance_channel`,
//! power of two choices over the instances it holds). Which instances it
//! holds is decided here: every address has a watcher that asks the
//! instance's gRPC health service (`grpc.health.v1.Health/Check`, on a
//! connection of its own) every [`PROBE_INTERVAL`], removes an instance
//! that does not answer SERVING from the channel and inserts it again once
//! it does. A call that fails because its instance could not be reached
//! wakes the watchers, so a dead instance leaves the channel within
//! milliseconds rather than at the next interval, and the call is retried
//! on another instance (see `Client::call`). The last instance in the
//! channel is never left out.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::{describe, Error};

/// How often each instance is asked whether it serves.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// The longest a health probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The instances of a balanced client and their watchers. Shared by the
/// clones of a client; dropping the last stops the watchers.
#[derive(Debug)]
pub(super) struct Balanced {
    /// Instances the channel holds now (never fewer than one).
    up: Arc<AtomicUsize>,
    /// Wakes every watcher for an immediate probe.
    wake: Arc<Notify>,
    watchers: Vec<JoinHandle<()>>,
}

impl Drop for Balanced {
    fn drop(&mut self) {
        for watcher in &self.watchers {
            watcher.abort();
        }
    }
}

impl Balanced {
    /// How many instances are in the channel now.
    pub(super) fn up(&self) -> usize {
        self.up.load(Ordering::Relaxed)
    }

    /// Asks every watcher to probe its instance now.
    pub(super) fn wake(&self) {
        self.wake.notify_waiters();
    }
}

/// Probes every endpoint at once (each within `connect_timeout`), builds
/// the balanced channel over those that answer, and starts the watchers.
/// Fails when none answers.
pub(super) async fn connect(
    endpoints: Vec<(String, Endpoint)>,
    connect_timeout: Duration,
) -> Result<(Channel, Balanced), Error> {
    let list = endpoints
        .iter()
        .map(|(addr, _)| addr.as_str())
        .collect::<Vec<_>>()
        .join(",");
    // Room for every instance to leave and come back without blocking.
    let (channel, changes) = Channel::balance_channel::<usize>(endpoints.len() * 4);
    let mut probes = JoinSet::new();
    let mut health = Vec::with_capacity(endpoints.len());
    for (i, (_, endpoint)) in endpoints.iter().enumerate() {
        let client = HealthClient::new(endpoint.connect_lazy());
        health.push(client.clone());
        probes.spawn(async move { (i, probe(client, connect_timeout).await) });
    }
    let mut up = vec![false; endpoints.len()];
    let mut failures = vec![String::new(); endpoints.len()];
    while let Some(done) = probes.join_next().await {
        let Ok((i, result)) = done else { continue };
        match result {
            Ok(()) => up[i] = true,
            Err(why) => failures[i] = why,
        }
    }
    if !up.iter().any(|u| *u) {
        let message = endpoints
            .iter()
            .zip(&failures)
            .map(|((addr, _), why)| format!("{addr}: {why}"))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(Error::Connect {
            addr: list,
            message: format!("no instance answered: {message}"),
        });
    }
    let shared_up = Arc::new(AtomicUsize::new(0));
    for (i, (_, endpoint)) in endpoints.iter().enumerate() {
        if up[i] {
            // The receiver lives in the channel; the capacity covers this.
            let _ = changes.try_send(Change::Insert(i, endpoint.clone()));
            shared_up.fetch_add(1, Ordering::Relaxed);
        }
    }
    let wake = Arc::new(Notify::new());
    let watchers = endpoints
        .into_iter()
        .zip(health)
        .enumerate()
        .map(|(i, ((_, endpoint), health))| {
            let watcher = Watcher {
                key: i,
                endpoint,
                health,
                changes: changes.clone(),
                up: up[i],
                shared_up: shared_up.clone(),
                wake: wake.clone(),
            };
            tokio::spawn(watcher.run())
        })
        .collect();
    Ok((
        channel,
        Balanced {
            up: shared_up,
            wake,
            watchers,
        },
    ))
}

/// Keeps one instance in the channel while it serves, out while it does not.
struct Watcher {
    key: usize,
    endpoint: Endpoint,
    health: HealthClient<Channel>,
    changes: mpsc::Sender<Change<usize, Endpoint>>,
    up: bool,
    shared_up: Arc<AtomicUsize>,
    wake: Arc<Notify>,
}

impl Watcher {
    async fn run(mut self) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(PROBE_INTERVAL) => {}
                _ = self.wake.notified() => {}
            }
            let serving = probe(self.health.clone(), PROBE_TIMEOUT).await.is_ok();
            if serving == self.up {
                continue;
            }
            let change = if serving {
                self.shared_up.fetch_add(1, Ordering::Relaxed);
                Change::Insert(self.key, self.endpoint.clone())
            } else {
                // The last instance stays: a channel without any could
                // only hold calls until their deadline, and a probe that
                // timed out under load is no proof that it is gone.
                let left_out =
                    self.shared_up
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                            (n > 1).then(|| n - 1)
                        });
                if left_out.is_err() {
                    continue;
                }
                Change::Remove(self.key)
            };
            if self.changes.send(change).await.is_err() {
                // The channel is gone: so is every client of it.
                return;
            }
            self.up = serving;
        }
    }
}

/// Asks an instance whether it serves: Ok when it answers SERVING (or has
/// no health service), else why not.
async fn probe(mut health: HealthClient<Channel>, within: Duration) -> Result<(), String> {
    let request = HealthCheckRequest {
        service: String::new(),
    };
    match tokio::time::timeout(within, health.check(request)).await {
        Err(_) => Err(format!(
            "no health answer within {}",
            humantime::format_duration(within)
        )),
        Ok(Ok(answer)) if answer.get_ref().status == ServingStatus::Serving as i32 => Ok(()),
        Ok(Ok(_)) => Err("health check answers NOT_SERVING (draining?)".into()),
        // A gateway without the health service still serves.
        Ok(Err(status)) if status.code() == Code::Unimplemented => Ok(()),
        Ok(Err(status)) => Err(describe(&status)),
    }
}

/// Whether a failed call never reached a gateway: the transport could not
/// connect (or lost the connection), as opposed to a status the gateway
/// sent. A gateway's statuses carry its response headers as metadata
/// (`content-type` at least); the transport's own carry none.
pub(super) fn unreached(status: &Status) -> bool {
    status.code() == Code::Unavailable && status.metadata().get("content-type").is_none()
}
