//! The live actor tree: a registry every supervisor writes to, and the
//! snapshot operators read from it.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};

use crate::by_seq::BySeq;

/// Lifecycle state of an actor, as shown in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ActorState {
    /// Built, not yet handling messages.
    Starting = 0,
    /// Handling messages.
    Running = 1,
    /// Failed and waiting (backoff) for its next incarnation.
    Restarting = 2,
    /// Draining its mailbox or running its stop hook.
    Stopping = 3,
    /// Ended for good.
    Stopped = 4,
}

impl ActorState {
    pub(crate) fn from_u8(v: u8) -> Self {
        match v {
            0 => ActorState::Starting,
            1 => ActorState::Running,
            2 => ActorState::Restarting,
            3 => ActorState::Stopping,
            _ => ActorState::Stopped,
        }
    }

    /// Lowercase name: `starting`, `running`, `restarting`, `stopping`, `stopped`.
    pub fn as_str(self) -> &'static str {
        match self {
            ActorState::Starting => "starting",
            ActorState::Running => "running",
            ActorState::Restarting => "restarting",
            ActorState::Stopping => "stopping",
            ActorState::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for ActorState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A hasher for the engine's own integer keys (actor ids, child seqs, task
/// ids): they come from counters, not from callers, so the DoS resistance of
/// SipHash buys nothing, while it costs a good part of the per-child
/// bookkeeping when thousands of children come and go. A folded 128-bit
/// multiply spreads consecutive ids over both the low bits (bucket) and the
/// high bits (control byte) hashbrown uses.
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        let m = u128::from(self.0) * 0x9E37_79B9_7F4A_7C15_u128;
        (m as u64) ^ ((m >> 64) as u64)
    }
    fn write(&mut self, bytes: &[u8]) {
        // Not used by integer keys; kept correct for any other key.
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x100_0000_01B3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = self.0.rotate_left(32) ^ n;
    }
}

/// A map keyed by engine ids, hashed with [`IdHasher`].
pub(crate) type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// Live figures of one actor, read without messaging it.
pub(crate) trait Probe: Send + Sync {
    fn name(&self) -> &Arc<str>;
    fn state(&self) -> ActorState;
    fn restarts(&self) -> u32;
    fn mailbox_depth(&self) -> usize;
    fn mailbox_capacity(&self) -> usize;
}

/// One child in its supervisor's roster.
struct Member {
    id: u64,
    supervisor: bool,
    probe: Arc<dyn Probe>,
}

/// One supervisor in the registry: its own figures and its children.
struct Node {
    parent: Option<u64>,
    probe: Arc<dyn Probe>,
    /// Its children, by seq: registering one is a push, no hash insert.
    children: BySeq<Member>,
}

/// Every supervisor of one supervision tree, by id, each with the roster of
/// its children. Only supervisors are keyed by id: a child is registered
/// with a push onto its supervisor's roster, under the one lock, instead of
/// a hash insert per child.
#[derive(Clone, Default)]
pub(crate) struct Registry {
    inner: Arc<Mutex<IdMap<u64, Node>>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, IdMap<u64, Node>> {
        // Entries are replaced whole, so a poisoned map is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers supervisor `id` (its own node; children come with
    /// [`Registry::add_child`]). A child supervisor is also a member of its
    /// parent's roster.
    pub(crate) fn add_supervisor(&self, id: u64, parent: Option<u64>, probe: Arc<dyn Probe>) {
        self.lock().entry(id).or_insert_with(|| Node {
            parent,
            probe,
            children: BySeq::default(),
        });
    }

    /// Registers actor `id` as child `seq` of supervisor `parent`.
    pub(crate) fn add_child(
        &self,
        parent: u64,
        seq: u64,
        id: u64,
        supervisor: bool,
        probe: Arc<dyn Probe>,
    ) {
        if let Some(node) = self.lock().get_mut(&parent) {
            node.children.push(
                seq,
                Member {
                    id,
                    supervisor,
                    probe,
                },
            );
        }
    }

    /// Removes child `seq` of supervisor `parent`; a supervisor leaves with
    /// its whole subtree.
    pub(crate) fn remove_child(&self, parent: u64, seq: u64) {
        let mut map = self.lock();
        let Some(member) = map
            .get_mut(&parent)
            .and_then(|node| node.children.remove(&seq))
        else {
            return;
        };
        if member.supervisor {
            fn drop_subtree(map: &mut IdMap<u64, Node>, id: u64) {
                if let Some(node) = map.remove(&id) {
                    for m in node.children.values().filter(|m| m.supervisor) {
                        drop_subtree(map, m.id);
                    }
                }
            }
            drop_subtree(&mut map, member.id);
        }
    }

    /// The subtree rooted at supervisor `root`.
    pub(crate) fn snapshot(&self, root: u64) -> Option<ActorInfo> {
        let map = self.lock();
        fn info(
            id: u64,
            parent: Option<u64>,
            supervisor: bool,
            probe: &dyn Probe,
            map: &IdMap<u64, Node>,
        ) -> ActorInfo {
            // Children are listed by id, which is creation order; the roster
            // is in the order they were added.
            let mut children: Vec<ActorInfo> = if supervisor {
                map.get(&id).map_or_else(Vec::new, |node| {
                    node.children
                        .values()
                        .map(|m| info(m.id, Some(id), m.supervisor, &*m.probe, map))
                        .collect()
                })
            } else {
                Vec::new()
            };
            children.sort_unstable_by_key(|c| c.id);
            ActorInfo {
                name: String::from(&**probe.name()),
                id,
                parent,
                supervisor,
                state: probe.state(),
                restarts: probe.restarts(),
                mailbox_depth: probe.mailbox_depth(),
                mailbox_capacity: probe.mailbox_capacity(),
                children,
            }
        }
        let node = map.get(&root)?;
        Some(info(root, node.parent, true, &*node.probe, &map))
    }
}

/// One node of a tree snapshot. Children are listed in id order, which is
/// creation order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActorInfo {
    /// The actor's name.
    pub name: String,
    /// The actor's unique id.
    pub id: u64,
    /// The id of its supervisor, if any.
    pub parent: Option<u64>,
    /// True for supervisors.
    pub supervisor: bool,
    /// Lifecycle state.
    pub state: ActorState,
    /// How many times it has been restarted.
    pub restarts: u32,
    /// Messages waiting in its mailbox.
    pub mailbox_depth: usize,
    /// Its mailbox capacity.
    pub mailbox_capacity: usize,
    /// Its children, for a supervisor.
    pub children: Vec<ActorInfo>,
}

impl ActorInfo {
    /// Finds the first node named `name` in this subtree, depth first.
    pub fn find(&self, name: &str) -> Option<&ActorInfo> {
        if self.name == name {
            return Some(self);
        }
        self.children.iter().find_map(|c| c.find(name))
    }

    /// Every node of this subtree, depth first, this one included.
    pub fn iter(&self) -> Vec<&ActorInfo> {
        let mut out = vec![self];
        for c in &self.children {
            out.extend(c.iter());
        }
        out
    }
}
