//! Checks on the backend itself, through the [`Backend`] trait: each gets a
//! backend connected to a fresh subject.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;

use super::Subject;
use crate::backend::toolkit::{item_bytes, MAX_TTL};
use crate::backend::{Backend, Item, Op, Outcome, Record};
use crate::settings::DEFAULT_MAX_PAGE_BYTES;

/// Short enough to keep the suite fast, long enough that a put followed by a
/// read on a loaded 2-core machine still sees the key alive.
const SHORT_TTL: Duration = Duration::from_millis(300);

/// How long a poll-until waits before the test fails.
const PATIENCE: Duration = Duration::from_secs(10);

async fn get(b: &dyn Backend, ns: &str, key: &str) -> Option<Record> {
    match b.exec(ns, Op::Get { key: key.into() }).await {
        Ok(Outcome::Get(r)) => r,
        other => panic!("get {ns}/{key}: {other:?}"),
    }
}

async fn put(b: &dyn Backend, ns: &str, key: &str, value: impl Into<Bytes>, ttl: Option<Duration>) {
    let op = Op::Put {
        key: key.into(),
        value: value.into(),
        ttl,
    };
    match b.exec(ns, op).await {
        Ok(Outcome::Put) => {}
        other => panic!("put {ns}/{key}: {other:?}"),
    }
}

async fn delete(b: &dyn Backend, ns: &str, key: &str) -> bool {
    match b.exec(ns, Op::Delete { key: key.into() }).await {
        Ok(Outcome::Delete(existed)) => existed,
        other => panic!("delete {ns}/{key}: {other:?}"),
    }
}

async fn exists(b: &dyn Backend, ns: &str, key: &str) -> bool {
    match b.exec(ns, Op::Exists { key: key.into() }).await {
        Ok(Outcome::Exists(e)) => e,
        other => panic!("exists {ns}/{key}: {other:?}"),
    }
}

async fn scan(
    b: &dyn Backend,
    ns: &str,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
    keys_only: bool,
) -> (Vec<Item>, bool) {
    scan_within(
        b,
        ns,
        prefix,
        after,
        (limit, DEFAULT_MAX_PAGE_BYTES),
        keys_only,
    )
    .await
}

/// A scan page of at most `limit` items and `max_bytes` bytes.
async fn scan_within(
    b: &dyn Backend,
    ns: &str,
    prefix: &str,
    after: Option<&str>,
    (limit, max_bytes): (usize, usize),
    keys_only: bool,
) -> (Vec<Item>, bool) {
    let op = Op::Scan {
        prefix: prefix.into(),
        after: after.map(Into::into),
        limit,
        max_bytes,
        keys_only,
    };
    match b.exec(ns, op).await {
        Ok(Outcome::Scan { items, more }) => (items, more),
        other => panic!("scan {ns} {prefix:?} after {after:?}: {other:?}"),
    }
}

fn keys(items: &[Item]) -> Vec<&str> {
    items.iter().map(|i| i.key.as_str()).collect()
}

/// Walks every page of a scan with `after` = the last key of the previous
/// page; asserts `more` is false only on the last page.
async fn scan_all(b: &dyn Backend, ns: &str, prefix: &str, page: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let (items, more) = scan(b, ns, prefix, after.as_deref(), page, true).await;
        assert!(items.len() <= page, "page larger than its limit");
        if more {
            assert_eq!(items.len(), page, "a page before the last must be full");
        }
        out.extend(items.into_iter().map(|i| i.key));
        if !more {
            return out;
        }
        after = out.last().cloned();
    }
}

/// Polls until `key` is gone (Get answers not found), failing after [`PATIENCE`].
async fn wait_until_expired(b: &dyn Backend, ns: &str, key: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while get(b, ns, key).await.is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{ns}/{key} never expired"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn put_inserts_then_replaces_the_value(subject: Subject) {
    let backend = subject.connect().await;
    let b = &*backend;
    assert_eq!(get(b, "ns", "k").await, None);
    put(b, "ns", "k", "one", None).await;
    assert_eq!(
        get(b, "ns", "k").await,
        Some(Record {
            value: Bytes::from_static(b"one"),
            ttl: None
        })
    );
    put(b, "ns", "k", "two", None).await;
    assert_eq!(
        get(b, "ns", "k").await.map(|r| r.value),
        Some(Bytes::from_static(b"two"))
    );
    assert!(exists(b, "ns", "k").await);
    let (items, more) = scan(b, "ns", "", None, 10, false).await;
    assert_eq!(
        items,
        vec![Item {
            key: "k".into(),
            value: Bytes::from_static(b"two")
        }]
    );
    assert!(!more);
}

pub async fn get_reports_the_remaining_ttl(subject: Subject) {
    let backend = subject.connect().await;
    let b = &*backend;
    let hour = Duration::from_secs(3600);
    put(b, "ns", "k", "v", Some(hour)).await;
    let ttl = get(b, "ns", "k").await.and_then(|r| r.ttl).expect("a ttl");
    assert!(ttl <= hour, "{ttl:?}");
    assert!(ttl > hour - Duration::from_secs(60), "{ttl:?}");
}

pub async fn overwrite_resets_the_ttl(subject: Subject) {
    let backend = subject.connect().await;
    let b = &*backend;
    // A Put without TTL over a key that had one removes the expiry: `kept`
    // outlives `sentinel`, which was written with the same TTL.
    put(b, "ns", "kept", "v1", Some(SHORT_TTL)).await;
    put(b, "ns", "sentinel", "s", Some(SHORT_TTL)).await;
    put(b, "ns", "kept", "v2", None).await;
    wait_until_expired(b, "ns", "sentinel").await;
    assert_eq!(
        get(b, "ns", "kept").await,
        Some(Record {
            value: Bytes::from_static(b"v2"),
            ttl: None
        })
    );

    // A Put with a TTL replaces the previous TTL, longer or shorter.
    let hour = Duration::from_secs(3600);
    put(b, "ns", "longer", "v", Some(SHORT_TTL)).await;
    put(b, "ns", "longer", "v", Some(hour)).await;
    let ttl = get(b, "ns", "longer")
        .await
        .and_then(|r| r.ttl)
        .expect("a ttl");
    assert!(ttl > hour - Duration::from_secs(60), "{ttl:?}");

    put(b, "ns", "shorter", "v", None).await;
    put(b, "ns", "shorter", "v", Some(SHORT_TTL)).await;
    let ttl = get(b, "ns", "shorter")
        .await
        .and_then(|r| r.ttl)
        .expect("a ttl");
    assert!(ttl <= SHORT_TTL, "{ttl:?}");
    wait_until_expired(b, "ns", "shorter").await;
}

pub async fn expired_keys_are_absent_for_every_operation_before_purge(subject: Subject) {
    let backend = subject.connect().await;
    let b = &*backend;
    put(b, "ns", "a", "live", None).await;
    put(b, "ns", "b", "dies", Some(SHORT_TTL)).await;
    put(b, "ns", "c", "live", None).await;
    // Alive before its expiry, with a remaining TTL no longer than the one set.
    let r = get(b, "ns", "b").await.expect("alive before expiry");
    assert!(
        r.ttl.is_some_and(|t| t <= SHORT_TTL && !t.is_zero()),
        "{r:?}"
    );
    assert!(exists(b, "ns", "b").await);

    wait_until_expired(b, "ns", "b").await;
    assert!(!exists(b, "ns", "b").await);
    let (items, more) = scan(b, "ns", "", None, 10, false).await;
    assert_eq!(keys(&items), ["a", "c"]);
    assert!(!more);
    // A page that ends just before the expired key must not claim more
    // because of it.
    let (items, more) = scan(b, "ns", "", Some("a"), 1, false).await;
    assert_eq!(keys(&items), ["c"]);
    assert!(!more);
    let (items, more) = scan(b, "ns", "b", None, 1, false).await;
    assert!(items.is_empty() && !more, "{items:?}");
    assert!(!delete(b, "ns", "b").await, "an expired key did not exist");

    // A Put over an expired key starts afresh.
    put(b, "ns", "b", "again", None).await;
    assert_eq!(
        get(b, "ns", "b").await,
        Some(Record {
            value: Bytes::from_static(b"again"),
            ttl: None
        })
    );
}

pub async fn delete_reports_whether_a_live_key_existed_and_is_idempotent(subject: Subject) {
    let backend = subject.connect().await;
    let b = &*backend;
    assert!(!delete(b, "ns", "never").await);
    put(b, "ns", "k", "v", None).await;
    put(b, "ns", "other", "v", None).await;
    assert!(delete(b, "ns", "k").await);
    assert!(!delete(b, "ns", "k").await);
    assert!(!delete(b, "ns", "k").await);
    assert_eq!(get(b, "ns", "k").await, None);
    assert!(!exists(b, "ns", "k").await);
    assert!(exists(b, "ns", "other").await, "delete touched another key");
}

pub async fn values_are_binary_safe(subject: Subject) {
    let backend = subject.connect().await;
    let b = &*backend;
    let every_byte: Vec<u8> = (0..=255u8).collect();
    let mut big = vec![0u8; 1024 * 1024];
    // A cheap deterministic pattern that still covers every byte value and
    // has no long runs.
    let mut x: u32 = 0x9E37_79B9;
    for byte in &mut big {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *byte = (x >> 24) as u8;
    }
    let nul_heavy = vec![0u8; 100];
    let cases: [(&str, Vec<u8>); 4] = [
        ("every-byte", every_byte),
        ("empty", Vec::new()),
        ("one-mib", big),
        ("nul-only", nul_heavy),
    ];
    for (key, value) in &cases {
        put(b, "ns", key, value.clone(), None).await;
    }
    for (key, value) in &cases {
        let got = get(b, "ns", key).await.expect(key).value;
        assert_eq!(got.len(), value.len(), "{key}");
        assert!(got[..] == value[..], "{key} came back different");
    }
    let (items, _) = scan(b, "ns", "", None, 10, false).await;
    assert_eq!(items.len(), cases.len());
    for item in items {
        let (_, value) = cases
            .iter()
            .find(|(k, _)| *k == item.key)
            .expect("a written key");
        assert!(
            item.value[..] == value[..],
            "{} scanned back different",
            item.key
        );
    }
    // An empty value is a value: the key exists.
    assert!(exists(b, "ns", "empty").await);
}

pub async fn namespaces_are_isolated(subject: Subject) {
    let backend = subject.connect().await;
    let b = &*backend;
    // "a" is a prefix of "ab": a naive composite key would mix them.
    put(b, "a", "k", "in a", None).await;
    put(b, "ab", "k", "in ab", None).await;
    put(b, "a", "bk", "only in a", None).await;
    assert_eq!(
        get(b, "a", "k").await.map(|r| r.value),
        Some(Bytes::from_static(b"in a"))
    );
    assert_eq!(
        get(b, "ab", "k").await.map(|r| r.value),
        Some(Bytes::from_static(b"in ab"))
    );
    assert_eq!(get(b, "ab", "bk").await, None);
    assert!(!exists(b, "other", "k").await);

    let (items, more) = scan(b, "a", "", None, 10, true).await;
    assert_eq!(keys(&items), ["bk", "k"]);
    assert!(!more);
    let (items, more) = scan(b, "ab", "", None, 10, true).await;
    assert_eq!(keys(&items), ["k"]);
    assert!(!more);
    let (items, more) = scan(b, "empty", "", None, 10, true).await;
    assert!(items.is_empty() && !more);

    assert!(delete(b, "a", "k").await);
    assert_eq!(
        get(b, "ab", "k").await.map(|r| r.value),
        Some(Bytes::from_static(b"in ab"))
    );
    assert!(!delete(b, "other", "bk").await);
    assert!(exists(b, "a", "bk").await);
}

/// Keys whose byte order differs from naive char or UTF-16 order.
const TRICKY: &[&str] = &[
    "a",
    "a/",
    "a/b",
    "a0",
    "a\u{7F}",
    "a\u{80}",
    "a\u{FF}",
    "a\u{100}",
    "aé",
    "ae\u{301}",
    "a\u{FFFF}",
    "a\u{10000}",
    "a\u{10FFFF}",
    "b",
    "é",
    "日",
    "日本",
    "日本/1",
    "日本/2",
    "日本0",
    "日本\u{10FFFF}",
    "\u{D7FF}",
    "\u{E000}",
    "\u{FFFD}",
    "\u{10FFFF}",
    "\u{10FFFF}\u{10FFFF}",
    "\u{10FFFF}a",
    "Z",
    "~",
    " ",
];

pub async fn scan_pages_cover_every_key_once_in_byte_order(subject: Subject) {
    let backend = subject.connect().await;
    let b = &*backend;
    let mut expected: BTreeSet<String> = BTreeSet::new();
    for i in 0..2100u32 {
        // Mix widths so that numeric and byte order differ, and add
        // multi-byte characters in the middle of keys.
        let key = match i % 4 {
            0 => format!("p/{i}"),
            1 => format!("p/{i:05}"),
            2 => format!("p/é{i}"),
            _ => format!("p/日{}", 2100 - i),
        };
        expected.insert(key);
    }
    for key in &expected {
        put(b, "ns", key, key.clone(), None).await;
    }
    // Keys outside the prefix, on either side of it, and in another namespace.
    for key in ["p", "p.", "p0", "o/1", "q/1"] {
        put(b, "ns", key, "x", None).await;
    }
    put(b, "ns2", "p/1", "x", None).await;

    let expected: Vec<String> = expected.into_iter().collect();
    for page in [1, 7, 100, 2100, 5000] {
        let got = scan_all(b, "ns", "p/", page).await;
        assert_eq!(got.len(), expected.len(), "page {page}");
        assert!(got == expected, "page {page}: wrong keys or order");
    }
    // The values come back with their keys.
    let (items, more) = scan(b, "ns", "p/", None, 50, false).await;
    assert!(more);
    for item in items {
        assert_eq!(item.value, Bytes::from(item.key.clone()));
    }
}

/// Walks every page of a scan for `prefix` with at most `limit` items and
/// `max_bytes` bytes a page; asserts that each page holds at least one item,
/// stays within the budget unless it holds one item only, and that `more`
/// is false only on the last page. Returns the pages.
async fn pages_within(
    b: &dyn Backend,
    prefix: &str,
    (limit, max_bytes): (usize, usize),
    keys_only: bool,
) -> Vec<Vec<Item>> {
    let mut pages: Vec<Vec<Item>> = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let (items, more) = scan_within(
            b,
            "ns",
            prefix,
            after.as_deref(),
            (limit, max_bytes),
            keys_only,
        )
        .await;
        let bytes: usize = items.iter().map(item_bytes).sum();
        assert!(items.len() <= limit, "page larger than its limit");
        assert!(
            items.len() == 1 || bytes <= max_bytes,
            "a page of {} items holds {bytes} bytes, over its budget of {max_bytes}",
            items.len()
        );
        if more {
            assert!(!items.is_empty(), "an empty page says more follow");
        }
        after = items.last().map(|i| i.key.clone()).or(after);
        pages.push(items);
        if !more {
            return pages;
        }
        assert!(pages.len() <= 10_000, "the scan does not progress");
    }
}

pub async fn scan_pages_stop_at_their_byte_budget(subject: Subject) {
    let backend = subject.connect().await;
    let b = &*backend;
    let value = vec![b'v'; 16 * 1024];
    let expected: Vec<String> = (0..100).map(|i| format!("big/{i:03}")).collect();
    for key in &expected {
        put(b, "ns", key, value.clone(), None).await;
    }
    put(b, "ns", "big0", "outside", None).await;
    let item = expected[0].len() + value.len();
    // 100 KiB holds six 16 KiB values: a page of limit 1000 stops early.
    let pages = pages_within(b, "big/", (1000, 100 * 1024), false).await;
    assert!(pages.len() >= 100 / 6, "{} pages", pages.len());
    assert!(
        pages[0].len() == 6,
        "first page holds {} items",
        pages[0].len()
    );
    let keys: Vec<String> = pages.iter().flatten().map(|i| i.key.clone()).collect();
    assert!(
        keys == expected,
        "pages do not hold every key once, in order"
    );
    assert!(pages.iter().flatten().all(|i| i.value.len() == value.len()));
    // A budget smaller than one value still progresses: one item a page.
    let pages = pages_within(b, "big/", (1000, item - 1), false).await;
    assert_eq!(pages.len(), 100);
    assert!(pages.iter().all(|p| p.len() == 1));
    let keys: Vec<String> = pages.iter().flatten().map(|i| i.key.clone()).collect();
    assert!(keys == expected, "one-item pages skip or repeat keys");
    // Keys only: the keys count against the budget, the values do not.
    let (items, more) = scan_within(b, "ns", "big/", None, (1000, 100 * 1024), true).await;
    assert_eq!((items.len(), more), (100, false));
    // The item limit still holds within the budget.
    let (items, more) = scan_within(b, "ns", "big/", None, (2, 1 << 20), false).await;
    assert_eq!((items.len(), more), (2, true));
}

pub async fn scan_is_stable_under_concurrent_writes(subject: Subject) {
    let backend = subject.connect().await;
    let b = &*backend;
    let original: Vec<String> = (0..600).map(|i| format!("k/{i:04}")).collect();
    for key in &original {
        put(b, "ns", key, "v", None).await;
    }
    // Between pages, write and delete other keys all over the range: keys
    // that were there throughout must come back exactly once, in order.
    let mut seen: Vec<String> = Vec::new();
    let mut after: Option<String> = None;
    let mut round = 0u32;
    loop {
        let (items, more) = scan(b, "ns", "k/", after.as_deref(), 37, true).await;
        seen.extend(items.into_iter().map(|i| i.key));
        let spot = |round: u32, j: u32| (round * 97 + j * 131) % 600;
        for j in 0..5 {
            let n = spot(round, j);
            put(b, "ns", &format!("k/{n:04}/extra{round}"), "x", None).await;
            if let Some(prev) = round.checked_sub(1) {
                let n = spot(prev, j);
                assert!(delete(b, "ns", &format!("k/{n:04}/extra{prev}")).await);
            }
        }
        round += 1;
        if !more {
            break;
        }
        after = seen.last().cloned();
    }
    for pair in seen.windows(2) {
        assert!(
            pair[0].as_bytes() < pair[1].as_bytes(),
            "{pair:?} out of order or repeated"
        );
    }
    let seen: BTreeSet<&str> = seen.iter().map(String::as_str).collect();
    for key in &original {
        assert!(seen.contains(key.as_str()), "{key} skipped");
    }
}

pub async fn scan_respects_prefix_and_after_bounds_with_multibyte_keys(subject: Subject) {
    let backend = subject.connect().await;
    let b = &*backend;
    for key in TRICKY {
        put(b, "ns", key, *key, None).await;
    }
    let mut all: Vec<&str> = TRICKY.to_vec();
    all.sort_by(|x, y| x.as_bytes().cmp(y.as_bytes()));

    // Every char-boundary prefix of every key, plus prefixes no key has.
    let mut prefixes: BTreeSet<String> = [
        "",
        "c",
        "日本/",
        "日本/3",
        "\u{10FFFF}",
        "\u{D7FF}\u{10FFFF}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for key in TRICKY {
        for (i, _) in key.char_indices() {
            prefixes.insert(key[..i].to_string());
        }
        prefixes.insert(key.to_string());
    }
    let mut afters: Vec<Option<&str>> = vec![
        None,
        Some(""),
        Some("a\u{10FFFF}\u{10FFFF}"),
        Some("日本/1"),
    ];
    afters.extend(TRICKY.iter().map(|k| Some(*k)));

    for prefix in &prefixes {
        for after in &afters {
            let want: Vec<&str> = all
                .iter()
                .copied()
                .filter(|k| k.starts_with(prefix.as_str()))
                .filter(|k| after.is_none_or(|a| k.as_bytes() > a.as_bytes()))
                .collect();
            let (items, more) = scan(b, "ns", prefix, *after, TRICKY.len() + 1, false).await;
            assert_eq!(keys(&items), want, "prefix {prefix:?} after {after:?}");
            assert!(!more, "prefix {prefix:?} after {after:?}");
            for item in &items {
                assert_eq!(item.value, Bytes::from(item.key.clone()));
            }
            if !want.is_empty() {
                // One short of the matching keys: exactly one more follows.
                let (items, more) = scan(b, "ns", prefix, *after, want.len(), true).await;
                assert_eq!(keys(&items), want, "prefix {prefix:?} after {after:?}");
                assert!(!more);
                if want.len() > 1 {
                    let (items, more) = scan(b, "ns", prefix, *after, want.len() - 1, true).await;
                    assert_eq!(keys(&items), want[..want.len() - 1]);
                    assert!(more, "prefix {prefix:?} after {after:?}");
                }
            }
        }
    }
}

pub async fn scan_more_is_exact_and_keys_only_leaves_values_out(subject: Subject) {
    let backend = subject.connect().await;
    let b = &*backend;
    for i in 0..5 {
        put(b, "ns", &format!("k{i}"), format!("value {i}"), None).await;
    }
    let (items, more) = scan(b, "ns", "k", None, 5, false).await;
    assert_eq!(items.len(), 5);
    assert!(!more, "exactly `limit` keys match: no more");
    let (items, more) = scan(b, "ns", "k", None, 4, false).await;
    assert_eq!(keys(&items), ["k0", "k1", "k2", "k3"]);
    assert!(more);
    assert_eq!(items[3].value, Bytes::from_static(b"value 3"));
    let (items, more) = scan(b, "ns", "k", Some("k3"), 1, true).await;
    assert_eq!(
        items,
        vec![Item {
            key: "k4".into(),
            value: Bytes::new()
        }]
    );
    assert!(!more);
    let (items, more) = scan(b, "ns", "k", Some("k4"), 1, true).await;
    assert!(items.is_empty() && !more);
    let (items, more) = scan(b, "ns", "nothing", None, 3, false).await;
    assert!(items.is_empty() && !more);
}

pub async fn purge_removes_only_expired_keys(subject: Subject) {
    let backend = subject.connect().await;
    let b = &*backend;
    for i in 0..3 {
        put(b, "ns", &format!("dies{i}"), "v", Some(SHORT_TTL)).await;
    }
    put(b, "other", "dies", "v", Some(SHORT_TTL)).await;
    put(b, "ns", "lives", "v", None).await;
    put(b, "ns", "lives-long", "v", Some(Duration::from_secs(3600))).await;
    // Rewritten without a TTL: must not be purged.
    put(b, "ns", "rescued", "v", Some(SHORT_TTL)).await;
    put(b, "ns", "rescued", "v", None).await;

    for i in 0..3 {
        wait_until_expired(b, "ns", &format!("dies{i}")).await;
    }
    wait_until_expired(b, "other", "dies").await;
    assert_eq!(b.purge_expired().await.expect("purge"), 4);
    assert_eq!(b.purge_expired().await.expect("purge"), 0);
    for key in ["lives", "lives-long", "rescued"] {
        assert!(exists(b, "ns", key).await, "{key} was purged");
    }
    let (items, more) = scan(b, "ns", "", None, 10, true).await;
    assert_eq!(keys(&items), ["lives", "lives-long", "rescued"]);
    assert!(!more);
    b.health().await.expect("healthy");
}

pub async fn ttls_past_max_ttl_never_expire(subject: Subject) {
    let backend = subject.connect().await;
    let b = &*backend;
    for (key, ttl) in [
        ("twice-max", MAX_TTL * 2),
        ("huge", Duration::from_secs(u64::MAX / 2)),
        ("duration-max", Duration::MAX),
    ] {
        put(b, "ns", key, "v", Some(ttl)).await;
        assert_eq!(
            get(b, "ns", key).await,
            Some(Record {
                value: Bytes::from_static(b"v"),
                ttl: None
            }),
            "{key}: a ttl of {ttl:?} reads as an expiry"
        );
    }
    // Up to the bound, a TTL counts down.
    for below in [MAX_TTL - Duration::from_secs(3600), MAX_TTL] {
        put(b, "ns", "below", "v", Some(below)).await;
        let ttl = get(b, "ns", "below")
            .await
            .and_then(|r| r.ttl)
            .expect("a ttl up to MAX_TTL");
        assert!(ttl <= below, "{ttl:?}");
        assert!(ttl > below - Duration::from_secs(60), "{ttl:?}");
    }
}
