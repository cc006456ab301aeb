//! Settings loading and validation: layers apply in order, and every bad
//! setting is reported with its dotted key and the file it came from.
//!
//! Tests use `load_with`, never the process environment, so they can run in
//! parallel.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{repo_settings, settings_dir};
use prism::settings::{self, BackendKind, Error, Settings};

fn default_toml() -> String {
    std::fs::read_to_string(repo_settings().join("default.toml"))
        .expect("read settings/default.toml")
}

/// A settings directory holding the repository's default.toml with `from`
/// replaced by `to` (which must be present, so an edit cannot silently miss).
fn dir_with_edit(from: &str, to: &str) -> tempfile::TempDir {
    let text = default_toml();
    assert!(text.contains(from), "default.toml has no {from:?}");
    settings_dir(&text.replacen(from, to, 1))
}

fn load(dir: &Path) -> Result<Settings, Error> {
    settings::load_with(dir, None, Vec::new())
}

fn load_env(dir: &Path, vars: &[(&str, &str)]) -> Result<Settings, Error> {
    let vars = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    settings::load_with(dir, None, vars)
}

/// Loads an edited default.toml, expects an error about `key`, and checks
/// that the message names the key and the file.
fn error_for_edit(from: &str, to: &str, key: &str) -> String {
    let dir = dir_with_edit(from, to);
    let err = load(dir.path()).expect_err("the edit should be rejected");
    assert_eq!(err.key(), Some(key), "wrong key in: {err}");
    let message = err.to_string();
    assert!(
        message.contains(&format!("`{key}`")),
        "message does not name `{key}`: {message}"
    );
    assert!(
        message.contains("default.toml"),
        "message does not name the file: {message}"
    );
    message
}

#[test]
fn repository_defaults_load_and_validate() {
    let s = load(&repo_settings()).expect("settings/default.toml loads");
    assert_eq!(s.server.grpc_addr.to_string(), "127.0.0.1:8980");
    assert_eq!(s.server.shutdown_grace, Duration::from_secs(30));
    assert_eq!(s.log.level, "info");
    let BackendKind::Sqlite(sqlite) = &s.backends["embedded"].kind else {
        panic!("backend embedded is not sqlite");
    };
    assert_eq!(sqlite.path, PathBuf::from("./data/prism.db"));
    assert!(matches!(s.backends["memory"].kind, BackendKind::Memory));
    assert_eq!(s.namespaces["default"].backend, "embedded");
    assert_eq!(s.namespaces["cache"].backend, "memory");
}

#[test]
fn environment_variables_override_single_keys() {
    let s = load_env(
        &repo_settings(),
        &[
            ("PRISM__SERVER__GRPC_ADDR", "127.0.0.1:9000"),
            ("PRISM__NAMESPACES__DEFAULT__TIMEOUT", "2s"),
            ("PRISM__SESSIONS__MAX_IN_FLIGHT", "7"),
            ("PRISM__NAMESPACES__EXTRA__BACKEND", "memory"),
            // Not ours: no double-underscore prefix.
            ("PRISM_SERVER__GRPC_ADDR", "garbage"),
            ("SERVER__GRPC_ADDR", "garbage"),
        ],
    )
    .expect("overrides load");
    assert_eq!(s.server.grpc_addr.to_string(), "127.0.0.1:9000");
    assert_eq!(s.namespaces["default"].timeout, Duration::from_secs(2));
    assert_eq!(s.sessions.max_in_flight, 7);
    assert_eq!(s.namespaces["extra"].backend, "memory");
    // Untouched keys keep the file's values.
    assert_eq!(s.namespaces["default"].backend, "embedded");
}

#[test]
fn environment_layer_overrides_default_file() {
    let dir = settings_dir(&default_toml());
    std::fs::write(
        dir.path().join("staging.toml"),
        "[server]\ngrpc_addr = \"0.0.0.0:7000\"\n[namespaces.cache]\ntimeout = \"3s\"\n\
         [auth]\nallow_unauthenticated_remote = true\n",
    )
    .expect("write staging.toml");
    let s = settings::load_with(dir.path(), Some("staging"), Vec::new()).expect("staging loads");
    assert_eq!(s.server.grpc_addr.to_string(), "0.0.0.0:7000");
    assert_eq!(s.namespaces["cache"].timeout, Duration::from_secs(3));
    assert_eq!(
        s.namespaces["cache"].backend, "memory",
        "keys the layer leaves out keep their defaults"
    );

    // Variables win over the environment file.
    let vars = vec![(
        "PRISM__SERVER__GRPC_ADDR".to_string(),
        "127.0.0.1:7001".to_string(),
    )];
    let s = settings::load_with(dir.path(), Some("staging"), vars).expect("staging + vars load");
    assert_eq!(s.server.grpc_addr.to_string(), "127.0.0.1:7001");
}

#[test]
fn environment_without_a_file_uses_the_defaults() {
    let s = settings::load_with(&repo_settings(), Some("no-such-env"), Vec::new()).expect("loads");
    assert_eq!(s.server.grpc_addr.to_string(), "127.0.0.1:8980");
}

#[test]
fn environment_name_that_is_not_a_plain_name_is_rejected() {
    let err =
        settings::load_with(&repo_settings(), Some("../etc/x"), Vec::new()).expect_err("rejected");
    assert_eq!(err.key(), Some("PRISM_ENV"));
}

#[test]
fn missing_default_file_is_reported_with_its_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = load(dir.path()).expect_err("no default.toml");
    assert!(matches!(err, Error::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("default.toml"), "{err}");
}

#[test]
fn unknown_key_in_server_names_the_key() {
    let message = error_for_edit(
        "shutdown_grace =",
        "grpc_adr = \"x\"\nshutdown_grace =",
        "server.grpc_adr",
    );
    assert!(
        message.contains("grpc_addr"),
        "lists the allowed keys: {message}"
    );
}

#[test]
fn unknown_key_in_a_namespace_names_the_key() {
    error_for_edit(
        "[namespaces.default]\n",
        "[namespaces.default]\nttl = \"5s\"\n",
        "namespaces.default.ttl",
    );
}

#[test]
fn unknown_section_names_the_key() {
    error_for_edit("[server]\n", "[servr]\nport = 1\n\n[server]\n", "servr");
}

#[test]
fn bad_duration_names_the_key_and_the_value() {
    let message = error_for_edit(
        "timeout = \"5s\"\nmax_value_size",
        "timeout = \"5 parsecs\"\nmax_value_size",
        "namespaces.default.timeout",
    );
    assert!(message.contains("5 parsecs"), "{message}");
}

#[test]
fn duration_without_unit_names_the_key() {
    error_for_edit(
        "shutdown_grace = \"30s\"",
        "shutdown_grace = 30",
        "server.shutdown_grace",
    );
}

#[test]
fn bad_address_names_the_key_and_the_value() {
    let message = error_for_edit("\"127.0.0.1:8980\"", "\"localhost\"", "server.grpc_addr");
    assert!(message.contains("localhost"), "{message}");
}

#[test]
fn wrong_type_names_the_key() {
    error_for_edit(
        "max_in_flight = 256",
        "max_in_flight = \"many\"",
        "sessions.max_in_flight",
    );
}

#[test]
fn unknown_enum_value_lists_the_choices() {
    let message = error_for_edit("format = \"text\"", "format = \"xml\"", "log.format");
    assert!(message.contains("text, json"), "{message}");
}

#[test]
fn misspelt_log_level_names_the_key() {
    error_for_edit("level = \"info\"", "level = \"inf\"", "log.level");
}

#[test]
fn namespace_naming_a_missing_backend_names_the_key() {
    let message = error_for_edit(
        "backend = \"embedded\"",
        "backend = \"postgres\"",
        "namespaces.default.backend",
    );
    assert!(message.contains("postgres"), "{message}");
}

#[test]
fn sqlite_only_keys_on_a_memory_backend_name_the_key() {
    error_for_edit(
        "kind = \"memory\"",
        "kind = \"memory\"\npath = \"./x.db\"",
        "backends.memory.path",
    );
    error_for_edit(
        "kind = \"memory\"",
        "kind = \"memory\"\nbusy_timeout = \"1s\"",
        "backends.memory.busy_timeout",
    );
}

#[test]
fn out_of_range_values_name_the_key() {
    error_for_edit(
        "pool_size = 8",
        "pool_size = 0",
        "backends.embedded.pool_size",
    );
    error_for_edit(
        "kind = \"memory\"",
        "kind = \"memory\"\nmailbox = 0",
        "backends.memory.mailbox",
    );
    error_for_edit(
        "max_in_flight = 256",
        "max_in_flight = 0",
        "sessions.max_in_flight",
    );
    error_for_edit(
        "max_sessions = 10000",
        "max_sessions = 0",
        "sessions.max_sessions",
    );
    error_for_edit(
        "max_restarts = 10",
        "max_restarts = 0",
        "supervisor.max_restarts",
    );
    error_for_edit(
        "backoff_initial = \"100ms\"",
        "backoff_initial = \"10s\"",
        "supervisor.backoff_initial",
    );
    error_for_edit(
        "timeout = \"1s\"",
        "timeout = \"0s\"",
        "namespaces.cache.timeout",
    );
    error_for_edit(
        "max_value_size = 1048576\n\n[namespaces.cache]",
        "max_value_size = 67108865\n\n[namespaces.cache]",
        "namespaces.default.max_value_size",
    );
    error_for_edit(
        "max_value_size = 1048576\n\n[namespaces.cache]",
        "max_value_size = 0\n\n[namespaces.cache]",
        "namespaces.default.max_value_size",
    );
}

#[test]
fn bad_names_are_rejected() {
    let dir = dir_with_edit(
        "[namespaces.cache]",
        "[namespaces.\"a b\"]\nbackend = \"memory\"\n\n[namespaces.cache]",
    );
    let err = load(dir.path()).expect_err("bad namespace name");
    assert!(err.to_string().contains("namespaces.\"a b\""), "{err}");
}

#[test]
fn settings_without_namespaces_are_rejected() {
    let dir =
        settings_dir("[server]\ngrpc_addr = \"127.0.0.1:0\"\n[backends.m]\nkind = \"memory\"\n");
    let err = load(dir.path()).expect_err("no namespaces");
    assert_eq!(err.key(), Some("namespaces"));
}

#[test]
fn missing_required_key_names_the_key() {
    let dir = settings_dir(
        "[server]\n[backends.m]\nkind = \"memory\"\n[namespaces.n]\nbackend = \"m\"\n",
    );
    let err = load(dir.path()).expect_err("no grpc_addr");
    assert_eq!(err.key(), Some("server.grpc_addr"), "{err}");
}

#[test]
fn bad_value_from_the_environment_names_the_variable() {
    let err = load_env(
        &repo_settings(),
        &[("PRISM__NAMESPACES__DEFAULT__TIMEOUT", "soon")],
    )
    .expect_err("rejected");
    assert_eq!(err.key(), Some("namespaces.default.timeout"));
    assert!(
        err.to_string()
            .contains("PRISM__NAMESPACES__DEFAULT__TIMEOUT"),
        "{err}"
    );

    let err = load_env(&repo_settings(), &[("PRISM__SERVER__PORT", "1")]).expect_err("rejected");
    assert_eq!(err.key(), Some("server.port"));
    assert!(err.to_string().contains("PRISM__SERVER__PORT"), "{err}");
}

#[test]
fn invalid_toml_names_the_file_and_line() {
    let dir = settings_dir("[server\ngrpc_addr = 1\n");
    let err = load(dir.path()).expect_err("bad toml");
    let message = err.to_string();
    assert!(
        message.contains("default.toml") && message.contains("line 1"),
        "{message}"
    );
}

#[test]
fn unauthenticated_listeners_off_loopback_are_refused_unless_allowed() {
    let dir = settings_dir(&default_toml().replacen("127.0.0.1:8980", "0.0.0.0:8980", 1));
    let err = settings::load_with(dir.path(), None, Vec::new()).expect_err("protected mode");
    assert_eq!(err.key(), Some("auth.mode"), "{err}");
    let message = err.to_string();
    assert!(message.contains("0.0.0.0:8980"), "{message}");
    assert!(message.contains("server.grpc_addr"), "{message}");

    let vars = vec![(
        "PRISM__AUTH__ALLOW_UNAUTHENTICATED_REMOTE".to_string(),
        "true".to_string(),
    )];
    settings::load_with(dir.path(), None, vars).expect("allowed explicitly");
}

#[test]
fn principals_are_checked_when_loaded() {
    let base = default_toml();
    for (auth, key) in [
        (
            "[auth]\nmode = \"token\"\n",
            "auth.mode",
        ),
        (
            "[auth]\nmode = \"tokens\"\n",
            "auth.mode",
        ),
        (
            "[auth]\nmode = \"token\"\n[auth.principals.a]\ntoken_sha256 = \"abc\"\n",
            "auth.principals.a.token_sha256",
        ),
        (
            "[auth]\nmode = \"token\"\n[auth.principals.a]\nclient_cert_cn = \"a\"\nread = [\"nope\"]\n",
            "auth.principals.a.read",
        ),
        (
            "[auth]\nmode = \"token\"\n[auth.principals.a]\nread = [\"*\"]\n",
            "auth.principals.a",
        ),
    ] {
        let dir = settings_dir(&format!("{base}\n{auth}"));
        let err = settings::load_with(dir.path(), None, Vec::new()).expect_err(auth);
        assert_eq!(err.key(), Some(key), "{auth}: {err}");
        assert!(err.to_string().contains("default.toml"), "{err}");
    }
}
