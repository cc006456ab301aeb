//! Handles on a supervisor: [`SupervisorRef`], its address, and
//! [`SupervisorHandle`], the owner of a running tree.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use super::spec::Slot;
use super::{Child, ChildExit, SlotExit, SupervisorError, SupervisorMsg, SupervisorSlot, TreeCtx};
use crate::addr::{Control, Envelope, Shared};
use crate::exit::ExitReason;
use crate::shutdown::{ActorReport, ShutdownReport, StopOutcome};
use crate::tree::ActorInfo;

fn refuse_envelope(env: Envelope<SupervisorMsg>, e: SupervisorError) {
    if let Envelope::Msg(msg) = env {
        msg.refuse(e);
    }
}

/// The address of a supervisor: add and remove children, take snapshots.
#[derive(Clone)]
pub struct SupervisorRef {
    pub(super) shared: Arc<Shared<SupervisorMsg>>,
    pub(super) tree: Arc<OnceLock<Arc<TreeCtx>>>,
}

impl std::fmt::Debug for SupervisorRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupervisorRef")
            .field("name", &self.shared.name)
            .field("id", &self.shared.id)
            .finish()
    }
}

impl SupervisorRef {
    /// The supervisor's id.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The supervisor's name.
    pub fn name(&self) -> &Arc<str> {
        &self.shared.name
    }

    async fn send(&self, msg: SupervisorMsg) -> Result<(), SupervisorError> {
        if self.shared.is_draining() {
            msg.refuse(SupervisorError::ShuttingDown);
            return Err(SupervisorError::ShuttingDown);
        }
        // Space is usually there (the supervisor takes its requests in
        // batches): try a plain send first, which skips the future and the
        // semaphore wait of `send`, and wait for space only when it is full.
        let env = match self.shared.tx.try_send(Envelope::Msg(msg)) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Full(env)) => env,
            Err(mpsc::error::TrySendError::Closed(env)) => {
                refuse_envelope(env, SupervisorError::Stopped);
                return Err(SupervisorError::Stopped);
            }
        };
        self.shared
            .tx
            .send(env)
            .await
            .map_err(|mpsc::error::SendError(env)| {
                refuse_envelope(env, SupervisorError::Stopped);
                SupervisorError::Stopped
            })
    }

    /// Sends `make(reply)` and waits for the supervisor's answer.
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, SupervisorError>>) -> SupervisorMsg,
    ) -> Result<T, SupervisorError> {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply)).await?;
        rx.await.map_err(|_| SupervisorError::Stopped)?
    }

    /// Adds a child at run time and starts it; it is stopped before the static
    /// children at shutdown, together with the other dynamic children.
    /// Returns the child's id.
    pub async fn add_child(&self, child: impl Into<Child>) -> Result<u64, SupervisorError> {
        let child = child.into();
        self.ask(|reply| SupervisorMsg::Add {
            child,
            reply: Some(reply),
        })
        .await
    }

    /// Like [`SupervisorRef::add_child`] without waiting for the child to
    /// start; the child's address works at once.
    pub async fn tell_add_child(&self, child: impl Into<Child>) -> Result<(), SupervisorError> {
        self.send(SupervisorMsg::Add {
            child: child.into(),
            reply: None,
        })
        .await
    }

    /// Adds many children at run time in one message and starts them in
    /// order, e.g. a pool of identical workers. Returns their ids. After a
    /// duplicate, the remaining children are refused too.
    pub async fn add_children(
        &self,
        children: impl IntoIterator<Item = Child>,
    ) -> Result<Vec<u64>, SupervisorError> {
        let children = children.into_iter().collect();
        self.ask(|reply| SupervisorMsg::AddMany { children, reply })
            .await
    }

    /// Drains and stops the child with this id and removes it from the tree.
    pub async fn remove_child(&self, id: u64) -> Result<ActorReport, SupervisorError> {
        self.ask(|reply| SupervisorMsg::Remove { id, reply }).await
    }

    /// A snapshot of this supervisor's subtree, read without messaging any
    /// actor. `None` until the tree is spawned.
    pub fn snapshot(&self) -> Option<ActorInfo> {
        self.tree.get()?.registry.snapshot(self.shared.id)
    }

    /// True once a shutdown of the tree has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.tree.get().is_some_and(|t| t.is_shutting_down())
    }
}

/// The root of a running supervision tree.
pub struct SupervisorHandle {
    pub(super) sup: SupervisorRef,
    pub(super) root: Arc<SupervisorSlot>,
    pub(super) tree: Arc<TreeCtx>,
    /// Where the root supervisor's task reports its end.
    pub(super) exits: mpsc::UnboundedReceiver<ChildExit>,
    pub(super) abort: AbortHandle,
    pub(super) exit: Option<SlotExit>,
}

impl SupervisorHandle {
    /// The root supervisor's address.
    pub fn supervisor_ref(&self) -> SupervisorRef {
        self.sup.clone()
    }

    /// A snapshot of the whole tree.
    pub fn snapshot(&self) -> Option<ActorInfo> {
        self.sup.snapshot()
    }

    /// Waits until the root supervisor ends by itself, which only happens when
    /// its restart intensity is exceeded; returns why.
    pub async fn wait(&mut self) -> ExitReason {
        if let Some(exit) = &self.exit {
            return exit.reason.clone();
        }
        let exit = match self.exits.recv().await {
            Some(ce) => ce.exit,
            // No task left: nothing runs any more.
            None => SlotExit::new(ExitReason::Aborted),
        };
        let reason = exit.reason.clone();
        self.exit = Some(exit);
        // Nothing restarts a root: fail every queued and later message.
        self.root.close();
        reason
    }

    /// Shuts the whole tree down: no restart happens from now on; every
    /// supervisor stops its children in reverse start order (dynamic children
    /// together, first); each actor rejects new messages, handles its queue and
    /// runs its stop hook. Whatever still runs after `grace` is aborted and its
    /// queued asks fail. Returns what happened to each actor.
    pub async fn shutdown(mut self, grace: Duration) -> ShutdownReport {
        let started = Instant::now();
        let deadline = started + grace;
        self.tree.begin_shutdown(deadline);
        let (name, id) = (self.sup.shared.name.clone(), self.sup.shared.id);
        info!(actor = %name, actor_id = id, grace_ms = grace.as_millis() as u64, "shutdown begun");
        self.sup.shared.request_stop(Control::Drain);
        let root = if let Some(exit) = self.exit.take() {
            exit
        } else {
            // Every supervisor enforces the deadline on its own children; the
            // margin only catches a supervisor that is itself stuck.
            let margin = Duration::from_secs(1);
            match tokio::time::timeout_at(deadline + margin, self.exits.recv()).await {
                Ok(Some(ce)) => ce.exit,
                Ok(None) => SlotExit::new(ExitReason::Aborted),
                Err(_) => {
                    warn!(actor = %name, actor_id = id, "grace period over, aborting the tree");
                    self.abort.abort();
                    // The task reports `Aborted` once it is dropped.
                    let _ = self.exits.recv().await;
                    SlotExit::new(ExitReason::Aborted)
                }
            }
        };
        self.root.close();
        let report = ShutdownReport {
            root: ActorReport {
                name: name.clone(),
                id,
                outcome: StopOutcome::of(root.reason),
                handled: root.drained,
                children: root.children,
            },
            elapsed: started.elapsed(),
        };
        info!(
            actor = %name,
            actor_id = id,
            elapsed_ms = report.elapsed.as_millis() as u64,
            clean = report.is_clean(),
            "shutdown finished"
        );
        report
    }
}
