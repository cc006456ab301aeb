//! Checks through a real gateway over gRPC: each starts a gateway whose
//! namespace `subject` (and its twins `subject_ttl`, with a 150 ms default
//! TTL, and `subject_pages`, with 64 KiB scan pages) is served by a fresh
//! subject.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tonic::transport::Channel;
use tonic::Code;

use super::Subject;
use crate::proto::key_value_client::KeyValueClient;
use crate::proto::{DeleteRequest, ExistsRequest, GetRequest, Item, PutRequest, ScanRequest};
use crate::settings::Loader;
use crate::testing::{eventually, TestServer};

/// The namespace the checks use.
const NAMESPACE: &str = "subject";

/// A gateway serving a subject.
struct Served {
    server: Option<TestServer>,
    /// Dropped after the gateway stops: its guards clean up the store.
    _subject: Subject,
}

impl Served {
    async fn start(subject: Subject) -> Self {
        // The subject's connector replaces the store of the backend's
        // settings; the pool settings still come from them.
        let toml = format!(
            r#"
[server]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
shutdown_grace = "10s"
drain_delay = "0s"

[backends.subject]
kind = "subject"
{backend}
[namespaces.{ns}]
backend = "subject"

[namespaces.{ns}_ttl]
backend = "subject"
default_ttl = "150ms"

[namespaces.{ns}_pages]
backend = "subject"
max_page_bytes = 65536
"#,
            backend = subject.backend_settings,
            ns = NAMESPACE,
        );
        // A kind of its own: the subject's connector is the backend.
        let settings = Loader::new()
            .kind("subject")
            .from_toml(&toml)
            .unwrap_or_else(|e| panic!("conformance settings: {e}"));
        let server =
            TestServer::start_with(settings, vec![("subject", Arc::clone(&subject.connector))])
                .await
                .expect("gateway starts");
        Served {
            server: Some(server),
            _subject: subject,
        }
    }

    async fn client(&self) -> KeyValueClient<Channel> {
        self.server
            .as_ref()
            .expect("running")
            .client()
            .await
            .expect("client")
    }

    /// Stops the gateway, then lets the subject clean up.
    async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await.expect("clean stop");
        }
    }
}

/// A request with `x-client-id` set.
fn as_client<T>(client: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("x-client-id", client.parse().expect("ascii client id"));
    r
}

fn put(ns: &str, key: &str, value: &[u8], ttl_ms: u64) -> PutRequest {
    PutRequest {
        namespace: ns.into(),
        key: key.into(),
        value: Bytes::copy_from_slice(value),
        ttl_ms,
    }
}

fn get(ns: &str, key: &str) -> GetRequest {
    GetRequest {
        namespace: ns.into(),
        key: key.into(),
    }
}

fn exists(ns: &str, key: &str) -> ExistsRequest {
    ExistsRequest {
        namespace: ns.into(),
        key: key.into(),
    }
}

fn delete(ns: &str, key: &str) -> DeleteRequest {
    DeleteRequest {
        namespace: ns.into(),
        key: key.into(),
    }
}

pub async fn upsert_get_exists_and_idempotent_delete(subject: Subject) {
    let ns = NAMESPACE;
    let gw = Served::start(subject).await;
    let mut c = gw.client().await;
    c.put(put(ns, "a", b"hi", 0)).await.unwrap();
    let r = c.get(get(ns, "a")).await.unwrap().into_inner();
    assert!(r.found);
    assert_eq!(&r.value[..], b"hi");
    assert_eq!(r.ttl_ms, -1, "no expiry reads as -1");
    c.put(put(ns, "a", b"there", 0)).await.unwrap();
    assert_eq!(
        &c.get(get(ns, "a")).await.unwrap().into_inner().value[..],
        b"there"
    );
    assert!(c.exists(exists(ns, "a")).await.unwrap().into_inner().exists);
    assert!(
        c.delete(delete(ns, "a"))
            .await
            .unwrap()
            .into_inner()
            .existed
    );
    assert!(
        !c.delete(delete(ns, "a"))
            .await
            .unwrap()
            .into_inner()
            .existed
    );
    let r = c.get(get(ns, "a")).await.unwrap().into_inner();
    assert!(!r.found);
    assert_eq!(r.ttl_ms, 0);
    assert!(r.value.is_empty());
    assert!(!c.exists(exists(ns, "a")).await.unwrap().into_inner().exists);
    // A key never written is absent and deleting it is fine.
    assert!(
        !c.delete(delete(ns, "never"))
            .await
            .unwrap()
            .into_inner()
            .existed
    );
    // Namespaces on one backend are separate keyspaces.
    c.put(put(ns, "shared", b"1", 0)).await.unwrap();
    assert!(
        !c.get(get(&format!("{ns}_ttl"), "shared"))
            .await
            .unwrap()
            .into_inner()
            .found
    );
    gw.stop().await;
}

pub async fn values_are_binary_safe_up_to_the_max_size(subject: Subject) {
    let ns = NAMESPACE;
    let gw = Served::start(subject).await;
    let mut c = gw.client().await;
    let all: Vec<u8> = (0..=255u8).collect();
    let max = vec![0xA5u8; 1024 * 1024];
    let nuls = [0u8; 64];
    for (key, value) in [
        ("all", &all[..]),
        ("empty", &[][..]),
        ("max", &max[..]),
        ("nuls", &nuls[..]),
    ] {
        c.put(put(ns, key, value, 0)).await.unwrap();
        let r = c.get(get(ns, key)).await.unwrap().into_inner();
        assert!(r.found, "{ns}/{key}");
        assert_eq!(&r.value[..], value, "{ns}/{key}");
    }
    let over = vec![1u8; 1024 * 1024 + 1];
    let e = c.put(put(ns, "over", &over, 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("max_value_size"), "{}", e.message());
    assert!(!c.get(get(ns, "over")).await.unwrap().into_inner().found);
    // The longest key, multi-byte UTF-8 included.
    let long = format!("{}é", "k".repeat(1022));
    c.put(put(ns, &long, b"x", 0)).await.unwrap();
    assert!(c.get(get(ns, &long)).await.unwrap().into_inner().found);
    gw.stop().await;
}

pub async fn ttl_expires_keys_and_an_overwrite_resets_it(subject: Subject) {
    let ns = NAMESPACE;
    let gw = Served::start(subject).await;
    let mut c = gw.client().await;
    c.put(put(ns, "t", b"v", 150)).await.unwrap();
    let r = c.get(get(ns, "t")).await.unwrap().into_inner();
    assert!(r.found);
    assert!(r.ttl_ms > 0 && r.ttl_ms <= 150, "ttl {}", r.ttl_ms);
    c.put(put(ns, "keep", b"v", 150)).await.unwrap();
    c.put(put(ns, "keep", b"v2", 0)).await.unwrap();
    c.put(put(ns, "renew", b"v", 150)).await.unwrap();
    c.put(put(ns, "renew", b"v", 60_000)).await.unwrap();
    let ttl_ns = format!("{ns}_ttl");
    c.put(put(&ttl_ns, "d", b"v", 0)).await.unwrap();
    let r = c.get(get(&ttl_ns, "d")).await.unwrap().into_inner();
    assert!(
        r.found && r.ttl_ms > 0 && r.ttl_ms <= 150,
        "default ttl {}",
        r.ttl_ms
    );

    let expired = eventually(Duration::from_secs(5), || {
        let mut c = c.clone();
        async move { !c.get(get(ns, "t")).await.unwrap().into_inner().found }
    })
    .await;
    assert!(expired, "{ns}: key with ttl never expired");
    assert!(!c.exists(exists(ns, "t")).await.unwrap().into_inner().exists);
    assert!(
        !c.delete(delete(ns, "t"))
            .await
            .unwrap()
            .into_inner()
            .existed
    );
    let scan = c
        .scan(ScanRequest {
            namespace: ns.into(),
            prefix: "t".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(scan.items.is_empty(), "{ns}: scan shows an expired key");
    let defaulted = eventually(Duration::from_secs(5), || {
        let mut c = c.clone();
        let ttl_ns = ttl_ns.clone();
        async move { !c.get(get(&ttl_ns, "d")).await.unwrap().into_inner().found }
    })
    .await;
    assert!(
        defaulted,
        "{ns}: the namespace default TTL did not expire the key"
    );

    let keep = c.get(get(ns, "keep")).await.unwrap().into_inner();
    assert!(keep.found);
    assert_eq!(
        keep.ttl_ms, -1,
        "an overwrite without TTL clears the expiry"
    );
    let renew = c.get(get(ns, "renew")).await.unwrap().into_inner();
    assert!(renew.found);
    assert!(renew.ttl_ms > 1000, "an overwrite restarts the TTL");
    gw.stop().await;
}

pub async fn scan_pages_through_2000_keys_with_concurrent_writers(subject: Subject) {
    let ns = NAMESPACE;
    let gw = Served::start(subject).await;
    let c = gw.client().await;
    let mut expected = BTreeSet::new();
    let mut writers = Vec::new();
    for w in 0..8 {
        let mut c = c.clone();
        let ns = ns.to_owned();
        writers.push(tokio::spawn(async move {
            for i in 0..260 {
                let key = format!("scan/{:05}", w * 1000 + i);
                c.put(put(&ns, &key, key.as_bytes(), 0)).await.unwrap();
            }
        }));
        for i in 0..260 {
            expected.insert(format!("scan/{:05}", w * 1000 + i));
        }
    }
    for w in writers {
        w.await.unwrap();
    }
    let mut c = c.clone();
    for outside in ["scam", "scan0", "scan", "sc"] {
        c.put(put(ns, outside, b"x", 0)).await.unwrap();
    }
    let mut noise_client = c.clone();
    let noise_ns = ns.to_owned();
    let noise = tokio::spawn(async move {
        for i in 0..300 {
            let key = format!("other/{i}");
            noise_client
                .put(put(&noise_ns, &key, b"n", 0))
                .await
                .unwrap();
            // Also churn the scanned range's neighbours.
            let _ = noise_client.delete(delete(&noise_ns, "scan0")).await;
        }
    });

    let mut seen = Vec::new();
    let mut cursor = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .scan(ScanRequest {
                namespace: ns.into(),
                prefix: "scan/".into(),
                limit: 97,
                cursor: cursor.clone(),
                keys_only: false,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.items.len() <= 97);
        for item in &page.items {
            assert_eq!(
                item.value,
                Bytes::from(item.key.clone()),
                "value matches key"
            );
        }
        seen.extend(page.items.into_iter().map(|i| i.key));
        if page.next_cursor.is_empty() {
            break;
        }
        cursor = page.next_cursor;
        assert!(pages < 100, "scan does not terminate");
    }
    noise.await.unwrap();
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    assert_eq!(seen, sorted, "{ns}: pages are in ascending byte order");
    let unique: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "{ns}: no duplicates");
    assert_eq!(
        unique, expected,
        "{ns}: no gaps, nothing outside the prefix"
    );

    let page = c
        .scan(ScanRequest {
            namespace: ns.into(),
            prefix: "scan/".into(),
            keys_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.items.len(), 100, "limit 0 means 100");
    assert!(page.items.iter().all(|i| i.value.is_empty()));
    assert!(!page.next_cursor.is_empty());
    let page = c
        .scan(ScanRequest {
            namespace: ns.into(),
            prefix: "scan/".into(),
            limit: 50_000,
            keys_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.items.len(), 1000, "large limits are capped at 1000");
    // An empty prefix scans the whole namespace in order.
    let page = c
        .scan(ScanRequest {
            namespace: ns.into(),
            limit: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let keys: Vec<&str> = page.items.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, ["other/0", "other/1", "other/10"]);
    gw.stop().await;
}

/// Every page of a scan over gRPC, with `limit`.
async fn scan_pages(c: &mut KeyValueClient<Channel>, ns: &str, limit: u32) -> Vec<Vec<Item>> {
    let mut pages = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = c
            .scan(ScanRequest {
                namespace: ns.into(),
                prefix: "big/".into(),
                limit,
                cursor: cursor.clone(),
                keys_only: false,
            })
            .await
            .unwrap_or_else(|e| panic!("scan of {ns} after {cursor:?}: {e:?}"))
            .into_inner();
        pages.push(page.items);
        if page.next_cursor.is_empty() {
            return pages;
        }
        assert!(pages.len() <= 1000, "the scan does not progress");
        cursor = page.next_cursor;
    }
}

pub async fn scan_pages_of_large_values_fit_the_transport(subject: Subject) {
    let gw = Served::start(subject).await;
    let mut c = gw.client().await;
    let value = vec![7u8; 16 * 1024];
    let expected: Vec<String> = (0..100).map(|i| format!("big/{i:03}")).collect();
    let pages_ns = format!("{NAMESPACE}_pages");
    for ns in [NAMESPACE, pages_ns.as_str()] {
        for key in &expected {
            c.put(put(ns, key, &value, 0)).await.unwrap();
        }
    }
    // 1.6 MiB of values: over the 1 MiB value limit, within the default
    // 4 MiB page, so one page of limit 1000 holds them all.
    let pages = scan_pages(&mut c, NAMESPACE, 1000).await;
    assert_eq!(pages.len(), 1, "default page budget");
    let keys: Vec<&str> = pages[0].iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, expected);
    assert!(pages[0].iter().all(|i| i.value.len() == value.len()));
    // 64 KiB pages: three values each, every key once, in order.
    let pages = scan_pages(&mut c, &pages_ns, 1000).await;
    assert!(pages.len() >= 100 / 3, "{} pages", pages.len());
    for page in &pages {
        let bytes: usize = page.iter().map(|i| i.key.len() + i.value.len()).sum();
        assert!(page.len() == 1 || bytes <= 65536, "page of {bytes} bytes");
    }
    let keys: Vec<&str> = pages.iter().flatten().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, expected);
    gw.stop().await;
}

pub async fn two_hundred_concurrent_clients_each_see_their_own_writes(subject: Subject) {
    let ns = NAMESPACE;
    let gw = Served::start(subject).await;
    let c = gw.client().await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut c = c.clone();
        let ns = ns.to_owned();
        tasks.push(tokio::spawn(async move {
            let client = format!("client-{i}");
            for j in 0..10 {
                let key = format!("c{i}/{j}");
                c.put(as_client(&client, put(&ns, &key, key.as_bytes(), 0)))
                    .await
                    .unwrap();
                let r = c
                    .get(as_client(&client, get(&ns, &key)))
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(r.value, Bytes::from(key));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut c = c.clone();
    let page = c
        .scan(ScanRequest {
            namespace: ns.into(),
            prefix: "c19".into(),
            limit: 1000,
            keys_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // c19/ and c190/..c199/: 11 clients, 10 keys each.
    assert_eq!(page.items.len(), 110);
    assert!(page.next_cursor.is_empty());
    gw.stop().await;
}

pub async fn errors_are_the_same_on_every_backend(subject: Subject) {
    let ns = NAMESPACE;
    let gw = Served::start(subject).await;
    let mut c = gw.client().await;
    for key in ["", "a\0b"] {
        let e = c.put(put(ns, key, b"x", 0)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
    }
    let e = c.get(get(ns, &"k".repeat(1025))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .scan(ScanRequest {
            namespace: ns.into(),
            cursor: "%%%".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // A deadline shorter than any round trip ends as DEADLINE_EXCEEDED
    // (or CANCELLED when the transport's own timer fires first).
    let mut req = tonic::Request::new(get(ns, "a"));
    req.set_timeout(Duration::from_micros(1));
    if let Err(e) = c.get(req).await {
        assert!(
            matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{e:?}"
        );
    }
    gw.stop().await;
}
