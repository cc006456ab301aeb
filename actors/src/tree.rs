//! The live actor tree: a registry every supervisor writes to, and the
//! snapshot operators read from it.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};

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

struct Entry {
    parent: Option<u64>,
    /// The child's seq in its parent: lets a supervisor find a child by id
    /// here, with no id map of its own.
    seq: u64,
    supervisor: bool,
    probe: Arc<dyn Probe>,
}

/// Every actor of one supervision tree, by id. It is also how a supervisor
/// finds its children by id (for removals and duplicate checks): one hash
/// insert per child, not one here and one in the supervisor.
#[derive(Clone, Default)]
pub(crate) struct Registry {
    inner: Arc<Mutex<IdMap<u64, Entry>>>,
}

impl Registry {
    /// Registers actor `id` as child `seq` of `parent`; false (and nothing
    /// changed) if the tree has an actor with this id already.
    pub(crate) fn insert(
        &self,
        id: u64,
        parent: Option<u64>,
        seq: u64,
        supervisor: bool,
        probe: Arc<dyn Probe>,
    ) -> bool {
        match self.lock().entry(id) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Entry {
                    parent,
                    seq,
                    supervisor,
                    probe,
                });
                true
            }
        }
    }

    pub(crate) fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// True if the tree has an actor with this id.
    pub(crate) fn contains(&self, id: u64) -> bool {
        self.lock().contains_key(&id)
    }

    /// The seq of actor `id` if it is a child of `parent`.
    pub(crate) fn child_seq(&self, id: u64, parent: u64) -> Option<u64> {
        self.lock()
            .get(&id)
            .filter(|e| e.parent == Some(parent))
            .map(|e| e.seq)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IdMap<u64, Entry>> {
        // Entries are replaced whole, so a poisoned map is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The subtree rooted at `root`.
    pub(crate) fn snapshot(&self, root: u64) -> Option<ActorInfo> {
        let map = self.lock();
        // The map is unordered (an insert per spawned child is the hot path;
        // a snapshot is rare), so each child list is sorted here: ids are
        // creation order.
        let mut children: IdMap<u64, Vec<u64>> = IdMap::default();
        for (id, e) in map.iter() {
            if let Some(p) = e.parent {
                children.entry(p).or_default().push(*id);
            }
        }
        for ids in children.values_mut() {
            ids.sort_unstable();
        }
        fn build(
            id: u64,
            map: &IdMap<u64, Entry>,
            children: &IdMap<u64, Vec<u64>>,
        ) -> Option<ActorInfo> {
            let e = map.get(&id)?;
            Some(ActorInfo {
                name: String::from(&**e.probe.name()),
                id,
                parent: e.parent,
                supervisor: e.supervisor,
                state: e.probe.state(),
                restarts: e.probe.restarts(),
                mailbox_depth: e.probe.mailbox_depth(),
                mailbox_capacity: e.probe.mailbox_capacity(),
                children: children
                    .get(&id)
                    .map(|ids| {
                        ids.iter()
                            .filter_map(|c| build(*c, map, children))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        }
        build(root, &map, &children)
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
