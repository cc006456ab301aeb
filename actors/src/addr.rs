//! Typed addresses: `tell`, `try_tell`, `ask` and `ask_timeout` over a bounded mailbox.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::actor::Actor;
use crate::supervisor::Spawner;
use crate::tree::{ActorState, Probe};

/// The sending half of a reply: put it in a message as `reply: Reply<T>`.
pub type Reply<T> = oneshot::Sender<T>;

/// What travels in a mailbox: a message, or a nudge that makes an idle actor
/// look at its control flag.
pub(crate) enum Envelope<M> {
    Msg(M),
    Wake,
}

/// What a supervisor asks of the running incarnation. The variants are
/// ordered by strength: a stronger request replaces a weaker one, never the
/// reverse, so a drain requested during a sibling restart is not lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub(crate) enum Control {
    /// Keep handling messages.
    Run = 0,
    /// Stop after the current message, keep the mailbox (restart of a sibling).
    Yield = 1,
    /// Close the mailbox, handle what is queued, then stop (shutdown, removal).
    Drain = 2,
}

impl Control {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Control::Run,
            1 => Control::Yield,
            _ => Control::Drain,
        }
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub(crate) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// State shared by every address of one actor, its running incarnation and its
/// supervisor. It outlives incarnations: this is what keeps an address valid
/// across restarts.
pub(crate) struct Shared<M> {
    pub(crate) id: u64,
    pub(crate) name: Arc<str>,
    pub(crate) tx: mpsc::Sender<Envelope<M>>,
    /// The receiving half, parked here while no incarnation runs. A running
    /// incarnation holds it in a [`MailboxLease`], which puts it back on drop,
    /// even when the incarnation's task is aborted.
    mailbox: Mutex<Option<mpsc::Receiver<Envelope<M>>>>,
    capacity: usize,
    /// A [`Control`]; an atomic so senders and the incarnation read it without a lock.
    control: AtomicU8,
    /// An [`ActorState`], read by snapshots without messaging the actor.
    state: AtomicU8,
    restarts: AtomicU32,
    /// Set once a supervisor has taken this actor as its child: a mailbox is
    /// supervised at most once.
    claimed: AtomicBool,
    /// How a supervisor starts an incarnation of this actor (its factory
    /// inside): set for the children of [`crate::ChildSpec`], so the
    /// supervisor holds the child as this very allocation.
    pub(crate) spawner: Option<Spawner<M>>,
}

impl<M: Send + 'static> Shared<M> {
    pub(crate) fn new(name: Arc<str>, capacity: usize) -> Arc<Self> {
        Self::with_spawner(name, capacity, None)
    }

    pub(crate) fn with_spawner(
        name: Arc<str>,
        capacity: usize,
        spawner: Option<Spawner<M>>,
    ) -> Arc<Self> {
        let capacity = capacity.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        Arc::new(Shared {
            id: next_id(),
            name,
            tx,
            mailbox: Mutex::new(Some(rx)),
            capacity,
            control: AtomicU8::new(Control::Run as u8),
            state: AtomicU8::new(ActorState::Starting as u8),
            restarts: AtomicU32::new(0),
            claimed: AtomicBool::new(false),
            spawner,
        })
    }

    fn lock_mailbox(&self) -> MutexGuard<'_, Option<mpsc::Receiver<Envelope<M>>>> {
        // The lock is only held to move the receiver in or out; a poisoned lock
        // still holds a valid Option.
        self.mailbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn lease(self: &Arc<Self>) -> Option<MailboxLease<M>> {
        let rx = self.lock_mailbox().take()?;
        Some(MailboxLease {
            rx: Some(rx),
            shared: self.clone(),
        })
    }

    #[inline]
    pub(crate) fn control(&self) -> Control {
        Control::from_u8(self.control.load(Ordering::Acquire))
    }

    /// True once a drain has begun: the check on every send, kept to one load
    /// and one compare.
    #[inline]
    pub(crate) fn is_draining(&self) -> bool {
        self.control.load(Ordering::Acquire) == Control::Drain as u8
    }

    /// Asks the running incarnation to stop ([`Control::Yield`] or
    /// [`Control::Drain`]) and wakes it if it is idle.
    pub(crate) fn request_stop(&self, mode: Control) {
        let prev = Control::from_u8(self.control.fetch_max(mode as u8, Ordering::AcqRel));
        if prev < mode {
            // A full mailbox means the actor is busy and will see the flag after
            // its current message, so a failed nudge is fine.
            let _ = self.tx.try_send(Envelope::Wake);
        }
    }

    pub(crate) fn reset_control(&self) {
        self.control.store(Control::Run as u8, Ordering::Release);
    }

    pub(crate) fn set_state(&self, s: ActorState) {
        self.state.store(s as u8, Ordering::Release);
    }

    pub(crate) fn add_restart(&self) -> u32 {
        self.restarts.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Marks the actor as supervised; false if a supervisor had taken it
    /// already.
    pub(crate) fn claim(&self) -> bool {
        !self.claimed.swap(true, Ordering::AcqRel)
    }

    pub(crate) fn is_claimed(&self) -> bool {
        self.claimed.load(Ordering::Acquire)
    }

    /// Closes the mailbox for good and drops every queued message, so each
    /// queued `ask` gets [`AskError::NoReply`] and later sends get
    /// [`SendError::Closed`].
    pub(crate) fn close_mailbox(&self) {
        self.state
            .store(ActorState::Stopped as u8, Ordering::Release);
        // Dropping the receiver closes the channel and drops every queued
        // message (tokio's `Receiver` does both on drop), outside the lock.
        let rx = self.lock_mailbox().take();
        drop(rx);
    }
}

impl<M: Send + 'static> Probe for Shared<M> {
    fn name(&self) -> &Arc<str> {
        &self.name
    }
    fn state(&self) -> ActorState {
        ActorState::from_u8(self.state.load(Ordering::Acquire))
    }
    fn restarts(&self) -> u32 {
        self.restarts.load(Ordering::Acquire)
    }
    fn mailbox_depth(&self) -> usize {
        self.capacity.saturating_sub(self.tx.capacity())
    }
    fn mailbox_capacity(&self) -> usize {
        self.capacity
    }
}

/// The part of [`Shared`] a supervisor drives, whatever the message type:
/// lets one supervisor hold children of different actor types.
pub(crate) trait Lifecycle: Send + Sync {
    fn id(&self) -> u64;
    fn name(&self) -> &Arc<str>;
    fn request_stop(&self, mode: Control);
    fn set_state(&self, state: ActorState);
    fn add_restart(&self) -> u32;
    fn close_mailbox(&self);
    fn is_claimed(&self) -> bool;
}

impl<M: Send + 'static> Lifecycle for Shared<M> {
    fn id(&self) -> u64 {
        self.id
    }
    fn name(&self) -> &Arc<str> {
        &self.name
    }
    fn request_stop(&self, mode: Control) {
        Shared::request_stop(self, mode);
    }
    fn set_state(&self, state: ActorState) {
        Shared::set_state(self, state);
    }
    fn add_restart(&self) -> u32 {
        Shared::add_restart(self)
    }
    fn close_mailbox(&self) {
        Shared::close_mailbox(self);
    }
    fn is_claimed(&self) -> bool {
        Shared::is_claimed(self)
    }
}

/// The receiving half of a mailbox while an incarnation runs.
pub(crate) struct MailboxLease<M> {
    pub(crate) rx: Option<mpsc::Receiver<Envelope<M>>>,
    shared: Arc<Shared<M>>,
}

impl<M> MailboxLease<M> {
    pub(crate) fn rx(&mut self) -> &mut mpsc::Receiver<Envelope<M>> {
        self.parts().1
    }

    /// The actor's shared state and its receiver, borrowed together.
    pub(crate) fn parts(&mut self) -> (&Arc<Shared<M>>, &mut mpsc::Receiver<Envelope<M>>) {
        // Invariant: `rx` is only taken by `release`, when the lease ends.
        let rx = self.rx.as_mut().expect("mailbox lease holds its receiver");
        (&self.shared, rx)
    }
}

impl<M> MailboxLease<M> {
    /// Parks the receiver back in [`Shared`] now, for the next incarnation;
    /// the lease is empty afterwards. A closed receiver (a drain closed it)
    /// never takes a message again and no incarnation follows a drain, so it
    /// is dropped here instead, which fails what is still queued: the
    /// incarnation's own task does that work, not its supervisor's close.
    pub(crate) fn release(&mut self) {
        if let Some(rx) = self.rx.take() {
            if rx.is_closed() {
                drop(rx);
                return;
            }
            *self
                .shared
                .mailbox
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(rx);
        }
    }
}

impl<M> Drop for MailboxLease<M> {
    fn drop(&mut self) {
        self.release();
    }
}

/// Why a message was not delivered. Every variant gives the message back.
#[derive(thiserror::Error)]
pub enum SendError<M> {
    /// The mailbox is full (only from [`Addr::try_tell`]).
    #[error("mailbox full")]
    Full(M),
    /// The actor is shutting down and accepts no new messages.
    #[error("actor stopping")]
    Stopping(M),
    /// The actor has stopped for good.
    #[error("actor closed")]
    Closed(M),
}

impl<M> SendError<M> {
    /// The undelivered message.
    pub fn into_inner(self) -> M {
        match self {
            SendError::Full(m) | SendError::Stopping(m) | SendError::Closed(m) => m,
        }
    }
}

impl<M> fmt::Debug for SendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Full(_) => f.write_str("Full(..)"),
            SendError::Stopping(_) => f.write_str("Stopping(..)"),
            SendError::Closed(_) => f.write_str("Closed(..)"),
        }
    }
}

/// Why an `ask` got no answer.
#[derive(thiserror::Error)]
pub enum AskError<M> {
    /// The request was not delivered; the message is inside.
    #[error(transparent)]
    Send(#[from] SendError<M>),
    /// The actor dropped the reply: it failed or stopped before replying.
    #[error("actor failed or stopped before replying")]
    NoReply,
    /// No reply arrived within the timeout.
    #[error("ask timed out")]
    Timeout,
}

impl<M> fmt::Debug for AskError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AskError::Send(e) => write!(f, "Send({e:?})"),
            AskError::NoReply => f.write_str("NoReply"),
            AskError::Timeout => f.write_str("Timeout"),
        }
    }
}

/// A typed, cloneable address of an actor. It stays valid across restarts:
/// messages sent while the actor restarts wait in its mailbox for the next
/// incarnation.
pub struct Addr<A: Actor> {
    pub(crate) shared: Arc<Shared<A::Msg>>,
}

impl<A: Actor> Clone for Addr<A> {
    fn clone(&self) -> Self {
        Addr {
            shared: self.shared.clone(),
        }
    }
}

impl<A: Actor> fmt::Debug for Addr<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Addr")
            .field("name", &self.shared.name)
            .field("id", &self.shared.id)
            .finish()
    }
}

impl<A: Actor> Addr<A> {
    /// The actor's unique id.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The actor's name.
    pub fn name(&self) -> &Arc<str> {
        &self.shared.name
    }

    /// The actor's lifecycle state.
    pub fn state(&self) -> ActorState {
        self.shared.state()
    }

    /// Messages waiting in the mailbox.
    pub fn mailbox_depth(&self) -> usize {
        self.shared.mailbox_depth()
    }

    /// True when `self` and `other` address the same actor.
    pub fn same_actor(&self, other: &Addr<A>) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    #[inline]
    fn rejected(&self, msg: A::Msg) -> SendError<A::Msg> {
        if self.shared.is_draining() {
            SendError::Stopping(msg)
        } else {
            SendError::Closed(msg)
        }
    }

    /// Sends a message, waiting for mailbox space.
    #[inline]
    pub async fn tell(&self, msg: A::Msg) -> Result<(), SendError<A::Msg>> {
        if self.shared.is_draining() {
            return Err(SendError::Stopping(msg));
        }
        // `reserve` then `send` is what `Sender::send` does inside; doing it
        // here keeps the message in this future only, instead of moving it
        // into a second one (measurable at millions of messages a second).
        match self.shared.tx.reserve().await {
            Ok(permit) => {
                permit.send(Envelope::Msg(msg));
                Ok(())
            }
            Err(mpsc::error::SendError(())) => Err(self.rejected(msg)),
        }
    }

    /// Sends a message if there is space now, else returns it in
    /// [`SendError::Full`]: the backpressure signal.
    #[inline]
    pub fn try_tell(&self, msg: A::Msg) -> Result<(), SendError<A::Msg>> {
        if self.shared.is_draining() {
            return Err(SendError::Stopping(msg));
        }
        match self.shared.tx.try_send(Envelope::Msg(msg)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(env)) => Err(SendError::Full(unwrap_msg(env))),
            Err(mpsc::error::TrySendError::Closed(env)) => Err(self.rejected(unwrap_msg(env))),
        }
    }

    /// Sends the message built by `make` around a fresh reply channel and waits
    /// for the reply.
    ///
    /// ```ignore
    /// let n = addr.ask(|reply| CounterMsg::Get { reply }).await?;
    /// ```
    #[inline]
    pub async fn ask<R>(
        &self,
        make: impl FnOnce(Reply<R>) -> A::Msg,
    ) -> Result<R, AskError<A::Msg>> {
        let (reply, rx) = oneshot::channel();
        self.tell(make(reply)).await?;
        rx.await.map_err(|_| AskError::NoReply)
    }

    /// Like [`Addr::ask`], but fails with [`AskError::Timeout`] when no reply
    /// arrived within `timeout` (waiting for mailbox space included).
    pub async fn ask_timeout<R>(
        &self,
        make: impl FnOnce(Reply<R>) -> A::Msg,
        timeout: Duration,
    ) -> Result<R, AskError<A::Msg>> {
        match tokio::time::timeout(timeout, self.ask(make)).await {
            Ok(r) => r,
            Err(_) => Err(AskError::Timeout),
        }
    }

    /// Like [`Addr::ask`], but fails at once with [`SendError::Full`] when the
    /// mailbox is full instead of waiting for space.
    pub async fn try_ask<R>(
        &self,
        make: impl FnOnce(Reply<R>) -> A::Msg,
    ) -> Result<R, AskError<A::Msg>> {
        let (reply, rx) = oneshot::channel();
        self.try_tell(make(reply))?;
        rx.await.map_err(|_| AskError::NoReply)
    }
}

fn unwrap_msg<M>(env: Envelope<M>) -> M {
    match env {
        Envelope::Msg(m) => m,
        // Only `Shared::request_stop` sends `Wake`, and never through `Addr`.
        Envelope::Wake => unreachable!("addresses never send wake envelopes"),
    }
}
