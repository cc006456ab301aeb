//! The Redis backend checks the server's `maxmemory-policy` once at start:
//! anything but `noeviction` may evict a value apart from its scan index
//! entry, so the gateway warns, naming the backend and the policy. Each
//! test runs the real binary against a throwaway `redis-server` of its own.

#![cfg(unix)]

mod common;

use common::binary::{LogLine, Prism, STARTUP};
use common::http::Admin;
use common::settings_dir;
use common::throwaway::ThrowawayRedis;

const WARNING: &str = "redis may evict keys; set maxmemory-policy noeviction";
const CHECKED: &str = "redis eviction policy checked";
const UNCHECKED: &str = "cannot read the redis maxmemory-policy; eviction is not checked";

/// Serves a namespace `sessions` on backend `volatile`, the throwaway
/// Redis at `url`, with the Redis backend's debug lines on.
fn serve(url: &str) -> (Prism, tempfile::TempDir) {
    let dir = settings_dir(&format!(
        r#"
[server]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
shutdown_grace = "5s"
drain_delay = "0s"

[log]
level = "info,prism::backend::redis=debug"

[backends.volatile]
kind = "redis"
url = "{url}"

[namespaces.sessions]
backend = "volatile"
"#
    ));
    (Prism::serve(dir.path()), dir)
}

/// Waits until the admin plane reports every backend up, so the Redis
/// backend has connected (and checked the policy).
async fn ready(prism: &mut Prism) {
    let admin = Admin::new(format!("http://{}", prism.http_addr().await));
    assert!(
        admin.becomes_ready(STARTUP).await,
        "not ready; log:\n{}",
        prism.log_text()
    );
}

fn field(line: &LogLine, name: &str) -> String {
    line.field(name)
        .unwrap_or_else(|| panic!("no {name} in {:?}", line.text))
}

#[tokio::test]
async fn an_evicting_policy_is_warned_about_naming_the_backend_and_the_policy() {
    let redis = ThrowawayRedis::start_with(&["--maxmemory-policy", "allkeys-lru"])
        .await
        .expect("start redis-server");
    let (mut prism, _dir) = serve(&redis.url());
    let warning = prism.wait_for(WARNING, STARTUP).await;
    assert!(warning.text.contains("WARN"), "{}", warning.text);
    assert_eq!(field(&warning, "backend"), "volatile");
    assert_eq!(field(&warning, "maxmemory_policy"), "allkeys-lru");
    assert!(
        warning.text.contains("scan index"),
        "says why: {}",
        warning.text
    );
    // A warning, not a refusal: the namespace serves.
    ready(&mut prism).await;
    let warnings = prism.log().iter().filter(|l| l.is(WARNING)).count();
    assert_eq!(warnings, 1, "warned once; log:\n{}", prism.log_text());
}

#[tokio::test]
async fn noeviction_is_not_warned_about() {
    let redis = ThrowawayRedis::start_with(&["--maxmemory-policy", "noeviction"])
        .await
        .expect("start redis-server");
    let (mut prism, _dir) = serve(&redis.url());
    // The debug line proves the check ran before the absence is judged.
    let checked = prism.wait_for(CHECKED, STARTUP).await;
    assert_eq!(field(&checked, "maxmemory_policy"), "noeviction");
    ready(&mut prism).await;
    assert!(!prism.logged(WARNING), "log:\n{}", prism.log_text());
}

#[tokio::test]
async fn a_server_without_config_is_served_unchecked() {
    // An empty name disables the command, as managed Redis services do.
    let redis = ThrowawayRedis::start_with(&[
        "--maxmemory-policy",
        "allkeys-lru",
        "--rename-command",
        "CONFIG",
        "",
    ])
    .await
    .expect("start redis-server");
    let (mut prism, _dir) = serve(&redis.url());
    let unchecked = prism.wait_for(UNCHECKED, STARTUP).await;
    assert_eq!(field(&unchecked, "backend"), "volatile");
    ready(&mut prism).await;
    assert!(!prism.logged(WARNING), "log:\n{}", prism.log_text());
}
