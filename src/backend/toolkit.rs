//! The rules every backend shares, each written once: the key range a scan
//! reads, the page it answers, the longest TTL that still expires, the
//! batched purge loop and the password-free form of a URL. The SQL backends
//! also share the schema migration runner and the row decoding.
//!
//! A backend of your own can use the public items, so that it agrees with
//! the built-in ones on the edge cases the conformance suite checks.

use std::future::Future;
use std::ops::Bound;
use std::time::Duration;

use super::{BoxFuture, Error, Item, Outcome};

/// TTLs at or above this (100 years) are stored as no expiry: for every
/// practical purpose they are never, and storing them as such keeps every
/// backend away from the edge of its clock or timestamp range.
pub const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The TTL a backend stores for a requested `ttl`: `None` (no expiry) for no
/// TTL and for TTLs past [`MAX_TTL`] (the request core refuses those; a
/// backend used directly treats them as forever rather than overflowing).
pub fn stored_ttl(ttl: Option<Duration>) -> Option<Duration> {
    ttl.filter(|ttl| *ttl <= MAX_TTL)
}

/// The keys one scan page may come from: those with the prefix, strictly
/// after the cursor, in ascending byte order.
///
/// The range starts at whichever bound is higher, the prefix (included) or
/// the cursor (excluded), so that an index range scan begins at the cursor
/// rather than walking the keys before it; it ends before the prefix's
/// [successor](prefix_successor), when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange<'a> {
    lower: &'a str,
    exclusive: bool,
    upper: Option<String>,
}

impl<'a> KeyRange<'a> {
    /// The range of a scan for `prefix` continuing after `after`.
    pub fn new(prefix: &'a str, after: Option<&'a str>) -> Self {
        let (lower, exclusive) = match after {
            Some(after) if after >= prefix => (after, true),
            _ => (prefix, false),
        };
        KeyRange {
            lower,
            exclusive,
            upper: prefix_successor(prefix),
        }
    }

    /// The lowest key of the range, or the key just below it when
    /// [`lower_is_exclusive`](Self::lower_is_exclusive).
    pub fn lower(&self) -> &'a str {
        self.lower
    }

    /// True when the range starts after [`lower`](Self::lower) (a cursor)
    /// rather than at it (the prefix).
    pub fn lower_is_exclusive(&self) -> bool {
        self.exclusive
    }

    /// The start of the range as a [`Bound`], for ordered maps.
    pub fn start(&self) -> Bound<&'a str> {
        if self.exclusive {
            Bound::Excluded(self.lower)
        } else {
            Bound::Included(self.lower)
        }
    }

    /// The exclusive upper bound, `None` when the range runs to the end.
    pub fn upper(&self) -> Option<&str> {
        self.upper.as_deref()
    }

    /// The end of the range as a [`Bound`], for ordered maps.
    pub fn end(&self) -> Bound<&str> {
        self.upper().map_or(Bound::Unbounded, Bound::Excluded)
    }

    /// True when no key can be in the range: the cursor lies at or past the
    /// last key with the prefix. (An ordered map refuses such a range.)
    pub fn is_empty(&self) -> bool {
        self.upper().is_some_and(|upper| self.lower >= upper)
    }

    /// True when `key` is in the range.
    pub fn contains(&self, key: &str) -> bool {
        let above = if self.exclusive {
            key > self.lower
        } else {
            key >= self.lower
        };
        above && self.upper().is_none_or(|upper| key < upper)
    }
}

/// The smallest string greater than every string that starts with `prefix`,
/// or `None` when no such bound exists (empty prefix, or only `char::MAX`).
/// Used as the exclusive upper bound of an index range scan.
pub fn prefix_successor(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let mut next = last as u32 + 1;
        // Skip the surrogate range, which no `char` occupies.
        if (0xD800..=0xDFFF).contains(&next) {
            next = 0xE000;
        }
        if let Some(c) = char::from_u32(next) {
            chars.push(c);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// How many items to read for a page of `limit`: one more, whose presence
/// tells whether more follow the page.
pub fn fetch_count(limit: usize) -> usize {
    limit.saturating_add(1)
}

/// The bytes an item counts against a page's byte budget: its key and its
/// value (empty with keys only).
pub fn item_bytes(item: &Item) -> usize {
    item.key.len().saturating_add(item.value.len())
}

/// A scan page as it fills, item by item in range order: at most `limit`
/// items and at most `max_bytes` of keys and values, except that the first
/// item is always taken (so that a scan progresses whatever the size of one
/// value). The first item refused marks the page as followed by more; a
/// backend stops reading there, so a scan holds at most the page and one
/// item in memory.
#[derive(Debug)]
pub struct PageBuilder {
    items: Vec<Item>,
    bytes: usize,
    limit: usize,
    max_bytes: usize,
    more: bool,
}

impl PageBuilder {
    /// An empty page of at most `limit` items and `max_bytes` bytes.
    pub fn new(limit: usize, max_bytes: usize) -> Self {
        PageBuilder {
            items: Vec::new(),
            bytes: 0,
            limit,
            max_bytes,
            more: false,
        }
    }

    /// Offers the next item of the range. True when it was taken and the
    /// next may be offered; false when the page is complete (the item is
    /// dropped, and the page says more follow).
    pub fn offer(&mut self, item: Item) -> bool {
        if self.more {
            return false;
        }
        let size = item_bytes(&item);
        let over_budget =
            !self.items.is_empty() && self.bytes.saturating_add(size) > self.max_bytes;
        if self.items.len() >= self.limit || over_budget {
            self.more = true;
            return false;
        }
        self.bytes = self.bytes.saturating_add(size);
        self.items.push(item);
        true
    }

    /// True once an item was refused: nothing more needs to be read.
    pub fn is_complete(&self) -> bool {
        self.more
    }

    /// Key and value bytes taken so far.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Items taken so far.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when no item was taken.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The most items the page takes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The page's byte budget.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// The page: its items, and `more` when an item was refused.
    pub fn finish(self) -> Outcome {
        Outcome::Scan {
            items: self.items,
            more: self.more,
        }
    }
}

/// The page of a scan from its items in range order: the first items up to
/// `limit` and `max_bytes` (see [`PageBuilder`]), and `more` when another
/// follows. Reads at most one item past the page, so a lazy iterator over
/// an ordered map stops there.
pub fn scan_page<E>(
    items: impl IntoIterator<Item = Result<Item, E>>,
    limit: usize,
    max_bytes: usize,
) -> Result<Outcome, E> {
    let mut page = PageBuilder::new(limit, max_bytes);
    for item in items {
        if !page.offer(item?) {
            break;
        }
    }
    Ok(page.finish())
}

/// [`scan_page`] over a stream of rows (an SQL driver's `fetch`): rows are
/// decoded and dropped one by one, and the stream is dropped at the first
/// row past the page, so that no more than the page and one row is held.
pub async fn scan_page_stream<R, E>(
    rows: impl tokio_stream::Stream<Item = Result<R, E>>,
    mut item: impl FnMut(&R) -> Result<Item, E>,
    limit: usize,
    max_bytes: usize,
) -> Result<Outcome, E> {
    use tokio_stream::StreamExt;
    let mut page = PageBuilder::new(limit, max_bytes);
    let mut rows = std::pin::pin!(rows);
    while let Some(row) = rows.next().await {
        if !page.offer(item(&row?)?) {
            break;
        }
    }
    Ok(page.finish())
}

/// What one batch of a purge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    /// Entries the batch deleted.
    pub removed: u64,
    /// True when nothing is left for another batch.
    pub last: bool,
}

impl Batch {
    /// A batch of at most `size` deletions that deleted `removed`: a short
    /// batch means no more expired entries (or only ones that others hold,
    /// which wait for the next purge).
    pub fn of(removed: u64, size: u64) -> Batch {
        Batch {
            removed,
            last: removed < size,
        }
    }
}

/// Runs `batch` on `state` until a batch says it was the last; returns how
/// many entries were deleted in all. Purging in short batches keeps each
/// statement, transaction or script short, so requests never queue behind
/// a large purge.
pub async fn purge_in_batches<S>(
    state: &mut S,
    mut batch: impl for<'s> FnMut(&'s mut S) -> BoxFuture<'s, Result<Batch, Error>>,
) -> Result<u64, Error> {
    let mut purged = 0u64;
    loop {
        let done = batch(state).await?;
        purged = purged.saturating_add(done.removed);
        if done.last {
            return Ok(purged);
        }
    }
}

/// This Prism instance's id: host name, process id and a random part, made
/// once per process (and logged then). Purge leases are held in its name,
/// so the logs and the lease keys tell which instance purges.
pub fn instance_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_owned());
        // A randomly keyed hasher is the standard library's source of
        // randomness; mixed with the clock, two processes that reuse a pid
        // still differ.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        hasher.write_u128(nanos);
        let id = format!(
            "{host}-{}-{:08x}",
            std::process::id(),
            hasher.finish() & 0xffff_ffff
        );
        tracing::info!(instance_id = %id, "instance id chosen");
        id
    })
}

/// `url` with the password of its user info, if any, replaced by `***`, for
/// logs, errors and debug output.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

/// One step of an SQL backend's schema. Applied steps are recorded in a
/// version table; a new step is appended with the next version and never
/// edits an applied one.
pub(crate) struct Migration {
    pub(crate) version: i64,
    pub(crate) name: &'static str,
    pub(crate) statements: &'static [&'static str],
}

/// How one SQL backend keeps its schema history: its steps, the statements
/// that keep the version table, and how its step statements are written out.
pub(crate) struct Schema<'a> {
    /// The backend kind, for logs.
    pub(crate) kind: &'static str,
    /// What errors call the migrated object, e.g. `table public.prism_kv`.
    pub(crate) label: &'a str,
    /// Creates the version table when missing.
    pub(crate) create_versions: &'a str,
    /// Reads the applied version, 0 for none.
    pub(crate) current_version: &'a str,
    /// Records a step; binds the version and the name.
    pub(crate) record_version: &'a str,
    /// The steps, in version order.
    pub(crate) migrations: &'a [Migration],
    /// Writes out a step's statement (fills in names).
    pub(crate) render: &'a (dyn Fn(&str) -> String + Sync),
    /// Maps the driver's errors.
    pub(crate) map_err: fn(sqlx::Error) -> Error,
}

impl Schema<'_> {
    /// The last version of this build.
    pub(crate) fn latest(&self) -> i64 {
        self.migrations.last().map_or(0, |m| m.version)
    }
}

/// Brings the schema up to its last step, on a connection the caller has
/// put in a transaction (and serialised against other processes as its
/// database requires) and commits afterwards: so each step is applied
/// exactly once, and a failed step leaves no half-applied schema. A schema
/// newer than this build is refused rather than used.
pub(crate) async fn migrate<DB>(conn: &mut DB::Connection, schema: &Schema<'_>) -> Result<(), Error>
where
    DB: sqlx::Database + sqlx::database::HasStatementCache,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> i64: sqlx::Type<DB> + sqlx::Encode<'q, DB>,
    for<'q> &'q str: sqlx::Type<DB> + sqlx::Encode<'q, DB>,
    (i64,): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let map_err = schema.map_err;
    // Every statement runs once per start: not worth a prepared statement.
    sqlx::query::<DB>(schema.create_versions)
        .persistent(false)
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
    let current: i64 = sqlx::query_scalar::<DB, i64>(schema.current_version)
        .persistent(false)
        .fetch_one(&mut *conn)
        .await
        .map_err(map_err)?;
    let latest = schema.latest();
    if current > latest {
        return Err(Error::internal(format!(
            "schema version {current} of {} is newer than this build supports ({latest})",
            schema.label
        )));
    }
    for migration in schema.migrations.iter().filter(|m| m.version > current) {
        for statement in migration.statements {
            sqlx::query::<DB>(&(schema.render)(statement))
                .persistent(false)
                .execute(&mut *conn)
                .await
                .map_err(map_err)?;
        }
        sqlx::query::<DB>(schema.record_version)
            .persistent(false)
            .bind(migration.version)
            .bind(migration.name)
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
        tracing::info!(
            backend = schema.kind,
            target = %schema.label,
            version = migration.version,
            name = migration.name,
            "schema migrated"
        );
    }
    Ok(())
}

/// A scan row, `(key)` or `(key, value)`, as an [`Item`].
pub(crate) fn sql_item<R>(row: &R, keys_only: bool) -> Result<Item, sqlx::Error>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let key: String = row.try_get(0)?;
    let value = if keys_only {
        bytes::Bytes::new()
    } else {
        bytes::Bytes::from(row.try_get::<Vec<u8>, _>(1)?)
    };
    Ok(Item { key, value })
}

/// Runs `work` until `deadline`, answering [`Error::Timeout`] when it passes.
pub fn until<T, F>(deadline: tokio::time::Instant, work: F) -> Until<F>
where
    F: Future<Output = Result<T, Error>>,
{
    Until {
        timed: tokio::time::timeout_at(deadline, work),
    }
}

pin_project_lite::pin_project! {
    /// The future of [`until`]. Not an `async fn`: one would hold `work`
    /// twice (as its argument and inside the timer), and an operation's
    /// future is copied whole wherever it is moved or boxed.
    pub struct Until<F> {
        #[pin]
        timed: tokio::time::Timeout<F>,
    }
}

impl<T, F> Future for Until<F>
where
    F: Future<Output = Result<T, Error>>,
{
    type Output = Result<T, Error>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        self.project()
            .timed
            .poll(cx)
            .map(|out| out.unwrap_or(Err(Error::Timeout)))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::ops::Bound;

    use bytes::Bytes;

    use super::{
        instance_id, prefix_successor, redact_url, scan_page, stored_ttl, Batch, KeyRange,
        PageBuilder, MAX_TTL,
    };
    use crate::backend::{Item, Outcome};

    #[test]
    fn prefix_successor_bounds_every_key_with_the_prefix() {
        assert_eq!(prefix_successor("ab").as_deref(), Some("ac"));
        assert_eq!(prefix_successor(""), None);
        assert_eq!(prefix_successor("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_successor("\u{D7FF}").as_deref(), Some("\u{E000}"));
        let p = "user/";
        let s = prefix_successor(p).unwrap();
        for k in [
            "user/",
            "user/\u{10FFFF}\u{10FFFF}",
            "user/zzz",
            "user/\u{7F}",
        ] {
            assert!(
                k.as_bytes() >= p.as_bytes() && k.as_bytes() < s.as_bytes(),
                "{k}"
            );
        }
        assert!("user0".as_bytes() >= s.as_bytes());
    }

    #[test]
    fn a_key_range_starts_at_the_higher_of_prefix_and_cursor() {
        let r = KeyRange::new("b/", None);
        assert_eq!((r.lower(), r.lower_is_exclusive()), ("b/", false));
        assert_eq!(r.start(), Bound::Included("b/"));
        assert_eq!(r.end(), Bound::Excluded("b0"));
        // A cursor before the prefix is overtaken by it.
        let r = KeyRange::new("b/", Some("a"));
        assert_eq!(r.start(), Bound::Included("b/"));
        let r = KeyRange::new("b/", Some("b/x"));
        assert_eq!(r.start(), Bound::Excluded("b/x"));
        assert!(r.contains("b/y") && !r.contains("b/x") && !r.contains("b0"));
        assert!(!r.is_empty());
        // A cursor past the prefix's keys leaves nothing.
        for after in ["b0", "c"] {
            assert!(KeyRange::new("b/", Some(after)).is_empty(), "{after}");
        }
        let all = KeyRange::new("", Some("zz"));
        assert_eq!(all.end(), Bound::Unbounded);
        assert!(!all.is_empty() && all.contains("zzz") && !all.contains("zz"));
    }

    #[test]
    fn a_page_reads_one_item_past_its_limit() {
        let item = |k: &str| Item {
            key: k.into(),
            value: Bytes::new(),
        };
        let mut read = 0;
        let items = ["a", "b", "c", "d"].into_iter().map(|k| {
            read += 1;
            Ok::<_, Infallible>(item(k))
        });
        let Ok(page) = scan_page(items, 2, usize::MAX);
        assert_eq!(
            page,
            Outcome::Scan {
                items: vec![item("a"), item("b")],
                more: true
            }
        );
        assert_eq!(read, 3);
        let Ok(page) = scan_page([Ok::<_, Infallible>(item("a"))], 1, usize::MAX);
        assert_eq!(
            page,
            Outcome::Scan {
                items: vec![item("a")],
                more: false
            }
        );
    }

    #[test]
    fn a_page_stops_at_its_byte_budget_but_always_holds_one_item() {
        let item = |k: &str, n: usize| Item {
            key: k.into(),
            value: Bytes::from(vec![b'v'; n]),
        };
        let items = || {
            [item("a", 9), item("b", 9), item("c", 9), item("d", 9)]
                .into_iter()
                .map(Ok::<_, Infallible>)
        };
        // 10 bytes an item: 25 bytes hold two, and the third is "more".
        let Ok(Outcome::Scan { items: page, more }) = scan_page(items(), 10, 25) else {
            unreachable!()
        };
        assert_eq!(page.len(), 2);
        assert!(more);
        // Exactly at the budget still fits.
        let Ok(Outcome::Scan { items: page, more }) = scan_page(items(), 10, 40) else {
            unreachable!()
        };
        assert_eq!((page.len(), more), (4, false));
        // A first item over the whole budget is still returned alone.
        let Ok(Outcome::Scan { items: page, more }) = scan_page(items(), 10, 1) else {
            unreachable!()
        };
        assert_eq!((page.len(), more), (1, true));
        let mut b = PageBuilder::new(1, 100);
        assert!(b.offer(item("a", 1)) && !b.offer(item("b", 1)) && b.is_complete());
    }

    #[test]
    fn ttls_of_max_ttl_or_more_are_stored_as_no_expiry() {
        let hour = std::time::Duration::from_secs(3600);
        assert_eq!(stored_ttl(Some(hour)), Some(hour));
        assert_eq!(stored_ttl(None), None);
        assert_eq!(stored_ttl(Some(MAX_TTL)), Some(MAX_TTL));
        assert_eq!(stored_ttl(Some(MAX_TTL * 2)), None);
        assert_eq!(stored_ttl(Some(std::time::Duration::MAX)), None);
        assert_eq!(
            Batch::of(10, 10),
            Batch {
                removed: 10,
                last: false
            }
        );
        assert!(Batch::of(9, 10).last);
    }

    #[test]
    fn the_instance_id_names_the_host_and_process_and_stays_the_same() {
        let id = instance_id();
        assert!(id.contains(&format!("-{}-", std::process::id())), "{id}");
        assert_eq!(instance_id(), id);
    }

    #[test]
    fn urls_are_shown_without_their_password() {
        assert_eq!(
            redact_url("postgres://u:pw@h:5432/db?x=1"),
            "postgres://u:***@h:5432/db?x=1"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("redis://:pw@h:6379"), "redis://:***@h:6379");
        assert_eq!(redact_url("redis://h:6379/0"), "redis://h:6379/0");
    }
}
