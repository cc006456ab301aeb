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

// Edge cases of the settings files themselves, each checked through the
// loader and through `prism check-config`, which must exit 64 naming the
// key and the file or variable.

mod edge_cases {
    use std::os::unix::fs::PermissionsExt as _;
    use std::process::Command;

    use super::common::binary::{prism, run, stderr};
    use super::*;

    /// `prism check-config --settings <dir>` with `vars` set: its exit code
    /// and stderr. Nothing may be printed on stdout when it fails.
    fn check_config(mut cmd: Command, dir: &Path, vars: &[(&str, &str)]) -> (Option<i32>, String) {
        cmd.args(["check-config", "--settings"]).arg(dir);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let out = run(&mut cmd);
        let err = stderr(&out);
        if out.status.code() != Some(0) {
            assert!(out.stdout.is_empty(), "stdout on error: {err}");
        }
        (out.status.code(), err)
    }

    /// How a message names `dir`'s default.toml: the `config` crate may
    /// shorten the path to a relative one, which ends with this.
    fn file_in(dir: &Path) -> String {
        let name = dir.file_name().expect("dir name").to_string_lossy();
        format!("{name}/default.toml")
    }

    fn assert_refused(code: Option<i32>, err: &str, expected: &[&str]) {
        assert_eq!(code, Some(64), "stderr: {err}");
        assert!(err.starts_with("error: "), "{err}");
        for e in expected {
            assert!(err.contains(e), "stderr lacks {e:?}: {err}");
        }
    }

    #[test]
    fn an_empty_settings_file_names_the_file_and_the_first_missing_key() {
        let dir = settings_dir("# nothing set yet\n\n");
        let file = file_in(dir.path());
        let err = load(dir.path()).expect_err("an empty file is refused");
        assert!(matches!(err, Error::Missing { .. }), "{err:?}");
        assert_eq!(err.key(), Some("server"), "{err}");
        assert!(err.origin().is_some_and(|o| o.ends_with(&file)), "{err}");
        assert!(err.to_string().contains("sets any key"), "{err}");

        let (code, err) = check_config(prism(), dir.path(), &[]);
        assert_refused(code, &err, &["`server`", &file]);
    }

    #[test]
    fn a_directory_in_place_of_the_settings_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("default.toml")).expect("mkdir");
        let file = dir.path().join("default.toml").display().to_string();
        let err = load(dir.path()).expect_err("a directory is no file");
        assert!(matches!(err, Error::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("is a directory"), "{err}");
        let (code, err) = check_config(prism(), dir.path(), &[]);
        assert_refused(code, &err, &[&file, "is a directory"]);

        // The other way round: the file named where the directory belongs.
        let dir = settings_dir(&default_toml());
        let file = dir.path().join("default.toml");
        let err = load(&file).expect_err("a file is no directory");
        assert!(matches!(err, Error::NotADirectory { .. }), "{err:?}");
        let (code, err) = check_config(prism(), &file, &[]);
        assert_refused(
            code,
            &err,
            &[&file.display().to_string(), "not a directory", "--settings"],
        );
    }

    /// Root reads any file whatever its mode, so as root the binary runs
    /// as `nobody`, which may enter the directory but not read the file.
    #[test]
    fn an_unreadable_settings_file_is_named() {
        let dir = settings_dir(&default_toml());
        let file = dir.path().join("default.toml");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod dir");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o000))
            .expect("chmod file");
        let as_root = nix_is_root();
        let cmd = if as_root {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "nobody", "--", env!("CARGO_BIN_EXE_prism")])
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .stdin(std::process::Stdio::null());
            cmd
        } else {
            let err = load(dir.path()).expect_err("an unreadable file is refused");
            assert!(matches!(err, Error::Read { .. }), "{err:?}");
            prism()
        };
        let (code, err) = check_config(cmd, dir.path(), &[]);
        assert_refused(
            code,
            &err,
            &[&file.display().to_string(), "Permission denied"],
        );
    }

    fn nix_is_root() -> bool {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
    }

    const ORDERS: &str = r#"
[server]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"

[backends.mem]
kind = "memory"

[namespaces.orders]
backend = "mem"
"#;

    #[test]
    fn a_misspelt_namespace_in_a_variable_names_the_variable_and_the_namespace_meant() {
        let dir = settings_dir(ORDERS);
        let file = file_in(dir.path());
        let var = ("PRISM__NAMESPACES__ORDRES__TIMEOUT", "1s");
        let err = load_env(dir.path(), &[var]).expect_err("a half-defined namespace");
        assert_eq!(err.key(), Some("namespaces.ordres.backend"), "{err}");
        let message = err.to_string();
        for expected in [
            "PRISM__NAMESPACES__ORDRES__TIMEOUT",
            "`namespaces.orders`",
            &file,
        ] {
            assert!(message.contains(expected), "lacks {expected:?}: {message}");
        }
        let (code, err) = check_config(prism(), dir.path(), &[var]);
        assert_refused(
            code,
            &err,
            &[
                "`namespaces.ordres.backend`",
                "PRISM__NAMESPACES__ORDRES__TIMEOUT",
                "namespaces.orders",
            ],
        );

        // Spelt right, the same variable overrides the file's namespace.
        let var = ("PRISM__NAMESPACES__ORDERS__TIMEOUT", "1s");
        let s = load_env(dir.path(), &[var]).expect("an override loads");
        assert_eq!(s.namespaces["orders"].timeout, Duration::from_secs(1));
        let (code, err) = check_config(prism(), dir.path(), &[var]);
        assert_eq!(code, Some(0), "{err}");
    }

    #[test]
    fn a_misspelt_backend_in_a_variable_names_the_variable_and_the_backend_meant() {
        let dir = settings_dir(ORDERS);
        let err = load_env(dir.path(), &[("PRISM__BACKENDS__MEMM__POOL_SIZE", "4")])
            .expect_err("a half-defined backend");
        assert_eq!(err.key(), Some("backends.memm.kind"), "{err}");
        let message = err.to_string();
        assert!(
            message.contains("PRISM__BACKENDS__MEMM__POOL_SIZE")
                && message.contains("`backends.mem`"),
            "{message}"
        );
    }

    #[test]
    fn a_section_of_a_text_without_a_file_is_not_blamed_on_the_environment() {
        let text = format!("{ORDERS}\n[backends.memm]\npool_size = 4\n");
        let err = Settings::from_toml(&text).expect_err("no kind");
        assert_eq!(err.key(), Some("backends.memm.kind"), "{err}");
        assert_eq!(err.origin(), None, "{err}");
        assert!(!err.to_string().contains("environment"), "{err}");
    }

    #[test]
    fn a_missing_key_names_the_file_of_its_section() {
        let dir = settings_dir(&ORDERS.replace("grpc_addr = \"127.0.0.1:0\"\n", ""));
        let file = file_in(dir.path());
        let err = load(dir.path()).expect_err("no grpc_addr");
        assert_eq!(err.key(), Some("server.grpc_addr"), "{err}");
        assert!(err.origin().is_some_and(|o| o.ends_with(&file)), "{err}");
        let (code, err) = check_config(prism(), dir.path(), &[]);
        assert_refused(code, &err, &["`server.grpc_addr`", &file]);
    }
}

#[test]
fn whole_number_keys_refuse_booleans_fractions_and_stray_text() {
    for bad in ["true", "2.7", "-1", "\"12x\"", "\"\""] {
        let message = error_for_edit(
            "max_sessions = 10000",
            &format!("max_sessions = {bad}"),
            "sessions.max_sessions",
        );
        assert!(message.contains("whole number"), "{bad}: {message}");
    }
    // Digits in a string load: every environment variable is a string.
    let dir = settings_dir(&default_toml());
    let s = load_env(dir.path(), &[("PRISM__SESSIONS__MAX_SESSIONS", "300")]).expect("loads");
    assert_eq!(s.sessions.max_sessions, 300);
    let err = load_env(dir.path(), &[("PRISM__SESSIONS__MAX_SESSIONS", "2.5")])
        .expect_err("a fraction in a variable");
    assert_eq!(err.key(), Some("sessions.max_sessions"), "{err}");
    assert!(
        err.to_string().contains("PRISM__SESSIONS__MAX_SESSIONS"),
        "{err}"
    );
}
