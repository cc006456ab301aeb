//! The semantics every backend must give, written once: checks on the
//! backend itself ([`store`] checks: upsert, TTL, idempotent delete, ordered
//! prefix scans with a cursor, purge) and through a real gateway over gRPC
//! ([`gateway`] checks: the same behaviours as clients see them, with the
//! gateway's limits and errors).
//!
//! A backend is put under test as a [`Subject`]: a connector to a fresh,
//! empty store, and whatever must live as long as the check (a temporary
//! folder, a guard that drops a table). Tests get the whole suite with
//! [`conformance_suite!`](crate::conformance_suite), one `#[tokio::test]`
//! per check:
//!
//! ```ignore
//! use prism::testing::conformance::Subject;
//!
//! async fn subject() -> Subject {
//!     Subject::new(MyConnector::new())
//! }
//!
//! prism::conformance_suite!(subject);
//! ```
//!
//! A program can run it with [`run`] instead and report each check.

pub mod gateway;
pub mod store;

use std::any::Any;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use crate::backend::{Backend, BoxFuture, Connector};

pub use gateway::{
    errors_are_the_same_on_every_backend, scan_pages_of_large_values_fit_the_transport,
    scan_pages_through_2000_keys_with_concurrent_writers,
    ttl_expires_keys_and_an_overwrite_resets_it,
    two_hundred_concurrent_clients_each_see_their_own_writes,
    upsert_get_exists_and_idempotent_delete, values_are_binary_safe_up_to_the_max_size,
};
pub use store::{
    delete_reports_whether_a_live_key_existed_and_is_idempotent,
    expired_keys_are_absent_for_every_operation_before_purge, get_reports_the_remaining_ttl,
    namespaces_are_isolated, overwrite_resets_the_ttl, purge_removes_only_expired_keys,
    put_inserts_then_replaces_the_value, scan_is_stable_under_concurrent_writes,
    scan_more_is_exact_and_keys_only_leaves_values_out,
    scan_pages_cover_every_key_once_in_byte_order, scan_pages_stop_at_their_byte_budget,
    scan_respects_prefix_and_after_bounds_with_multibyte_keys, ttls_past_max_ttl_never_expire,
    values_are_binary_safe,
};

/// A backend under test: a connector to a fresh, empty store (each check
/// gets its own), and what must live until the check ends.
pub struct Subject {
    connector: Arc<dyn Connector>,
    backend_settings: String,
    /// In a mutex only so that a subject can be shared by reference
    /// across tasks; nothing locks it but `keep`.
    keep: Mutex<Vec<Box<dyn Any + Send>>>,
}

impl Subject {
    /// A subject served by `connector`.
    pub fn new(connector: impl Connector) -> Self {
        Self::from_arc(Arc::new(connector))
    }

    /// A subject served by a shared `connector`.
    pub fn from_arc(connector: Arc<dyn Connector>) -> Self {
        Subject {
            connector,
            backend_settings: String::new(),
            keep: Mutex::new(Vec::new()),
        }
    }

    /// Keeps `guard` until the check ends, after the backend is closed and
    /// the gateway stopped: a temporary folder, a [`Cleanup`](super::Cleanup).
    pub fn keep(self, guard: impl Send + 'static) -> Self {
        self.keep
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Box::new(guard));
        self
    }

    /// Adds TOML lines to the `[backends.subject]` table of the gateway
    /// checks, e.g. `pool_size = 8`.
    pub fn backend_settings(mut self, toml: &str) -> Self {
        self.backend_settings.push_str(toml);
        self.backend_settings.push('\n');
        self
    }

    /// The connector.
    pub fn connector(&self) -> &Arc<dyn Connector> {
        &self.connector
    }

    /// A backend connected to the subject's store.
    pub async fn connect(&self) -> Arc<dyn Backend> {
        match self.connector.connect().await {
            Ok(backend) => backend,
            Err(e) => panic!(
                "{} backend does not connect: {}",
                self.connector.kind(),
                e.chain()
            ),
        }
    }
}

/// One check of the suite.
#[derive(Clone, Copy)]
pub struct Check {
    /// The check's name, a guarantee such as `namespaces_are_isolated`.
    pub name: &'static str,
    /// Runs the check on a subject; panics when the backend fails it.
    pub run: fn(Subject) -> BoxFuture<'static, ()>,
}

/// Every check of the suite.
pub fn checks() -> &'static [Check] {
    crate::conformance_suite!(@list table)
}

/// How one check went when run by [`run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The check.
    pub name: &'static str,
    /// `Err` with the panic message when the check failed.
    pub result: Result<(), String>,
}

/// Runs every check, each on a subject from `subject()` in a task of its
/// own, one after the other, and tells how each went. For programs; tests
/// use [`conformance_suite!`](crate::conformance_suite).
pub async fn run<F, Fut>(mut subject: F) -> Vec<Verdict>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Subject>,
{
    let mut verdicts = Vec::new();
    for check in checks() {
        let subject = subject().await;
        let result = match tokio::spawn((check.run)(subject)).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_panic() => {
                let panic = e.into_panic();
                Err(panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "panicked".to_owned()))
            }
            Err(e) => Err(e.to_string()),
        };
        verdicts.push(Verdict {
            name: check.name,
            result,
        });
    }
    verdicts
}

/// Generates one `#[tokio::test]` per conformance check, each on a
/// [`Subject`] made by `$subject().await`. The calling crate needs tokio
/// (with `macros` and `rt`) as a dev-dependency.
///
/// ```ignore
/// async fn subject() -> prism::testing::conformance::Subject { ... }
/// prism::conformance_suite!(subject);
/// ```
#[macro_export]
macro_rules! conformance_suite {
    // The one list of checks.
    (@list $mode:ident $($arg:path)?) => {
        $crate::conformance_suite! { @$mode [$($arg)?]
            put_inserts_then_replaces_the_value,
            get_reports_the_remaining_ttl,
            overwrite_resets_the_ttl,
            expired_keys_are_absent_for_every_operation_before_purge,
            delete_reports_whether_a_live_key_existed_and_is_idempotent,
            values_are_binary_safe,
            namespaces_are_isolated,
            scan_pages_cover_every_key_once_in_byte_order,
            scan_is_stable_under_concurrent_writes,
            scan_respects_prefix_and_after_bounds_with_multibyte_keys,
            scan_more_is_exact_and_keys_only_leaves_values_out,
            scan_pages_stop_at_their_byte_budget,
            purge_removes_only_expired_keys,
            ttls_past_max_ttl_never_expire,
            upsert_get_exists_and_idempotent_delete,
            values_are_binary_safe_up_to_the_max_size,
            ttl_expires_keys_and_an_overwrite_resets_it,
            scan_pages_through_2000_keys_with_concurrent_writers,
            scan_pages_of_large_values_fit_the_transport,
            two_hundred_concurrent_clients_each_see_their_own_writes,
            errors_are_the_same_on_every_backend,
        }
    };
    (@tests [$subject:path] $($check:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $check() {
                $crate::testing::conformance::$check($subject().await).await
            }
        )*
    };
    (@table [] $($check:ident),* $(,)?) => {
        &[$(
            $crate::testing::conformance::Check {
                name: stringify!($check),
                run: |subject| ::std::boxed::Box::pin(
                    $crate::testing::conformance::$check(subject),
                ),
            },
        )*]
    };
    ($subject:path) => {
        $crate::conformance_suite!(@list tests $subject);
    };
}
