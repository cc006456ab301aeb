//! Children in start order, by seq: a supervisor's children
//! (`supervisor::run`) and the registry's roster of each supervisor's
//! children (`tree`).
//!
//! Seqs are handed out in increasing order and a child is only ever appended,
//! so the children live in one vector sorted by seq: an add is a push, a
//! lookup an index (or a binary search once removals were compacted away),
//! and the order needed by strategies and the shutdown is the vector's. A
//! removal leaves a hole that is compacted away once holes outnumber
//! children. A map keyed by seq did the same with a node allocation every
//! few children and a tree search for every lookup.

pub(crate) struct BySeq<T> {
    /// `(seq, entry)` sorted by seq; `None` is a removed child.
    slots: Vec<(u64, Option<T>)>,
    /// Children present (slots that are not holes).
    live: usize,
}

impl<T> Default for BySeq<T> {
    fn default() -> Self {
        BySeq {
            slots: Vec::new(),
            live: 0,
        }
    }
}

impl<T> BySeq<T> {
    fn index(&self, seq: u64) -> Option<usize> {
        let first = self.slots.first()?.0;
        // Without compaction inside the range, seq - first is the index.
        let guess = seq.checked_sub(first)? as usize;
        if self.slots.get(guess).is_some_and(|(s, _)| *s == seq) {
            return Some(guess);
        }
        self.slots.binary_search_by_key(&seq, |(s, _)| *s).ok()
    }

    /// Adds a child; `seq` must be greater than every seq added before.
    pub(crate) fn push(&mut self, seq: u64, entry: T) {
        debug_assert!(self.slots.last().is_none_or(|(s, _)| *s < seq));
        self.slots.push((seq, Some(entry)));
        self.live += 1;
    }

    pub(crate) fn get(&self, seq: &u64) -> Option<&T> {
        let i = self.index(*seq)?;
        self.slots[i].1.as_ref()
    }

    pub(crate) fn get_mut(&mut self, seq: &u64) -> Option<&mut T> {
        let i = self.index(*seq)?;
        self.slots[i].1.as_mut()
    }

    pub(crate) fn remove(&mut self, seq: &u64) -> Option<T> {
        let i = self.index(*seq)?;
        let entry = self.slots[i].1.take()?;
        self.live -= 1;
        let holes = self.slots.len() - self.live;
        if holes > 32 && holes > self.live {
            self.slots.retain(|(_, e)| e.is_some());
        }
        Some(entry)
    }

    pub(crate) fn len(&self) -> usize {
        self.live
    }

    /// The children in start order, with their seqs.
    pub(crate) fn iter(&self) -> impl DoubleEndedIterator<Item = (u64, &T)> {
        self.slots
            .iter()
            .filter_map(|(s, e)| e.as_ref().map(|e| (*s, e)))
    }

    /// The seqs in start order.
    pub(crate) fn seqs(&self) -> impl DoubleEndedIterator<Item = u64> + '_ {
        self.iter().map(|(s, _)| s)
    }

    /// The seqs from `seq` on (itself included, if present), in start order.
    pub(crate) fn seqs_from(&self, seq: u64) -> impl Iterator<Item = u64> + '_ {
        let start = self.slots.partition_point(|(s, _)| *s < seq);
        self.slots[start..]
            .iter()
            .filter(|(_, e)| e.is_some())
            .map(|(s, _)| *s)
    }

    pub(crate) fn values(&self) -> impl DoubleEndedIterator<Item = &T> {
        self.slots.iter().filter_map(|(_, e)| e.as_ref())
    }

    pub(crate) fn values_mut(&mut self) -> impl DoubleEndedIterator<Item = &mut T> {
        self.slots.iter_mut().filter_map(|(_, e)| e.as_mut())
    }
}
