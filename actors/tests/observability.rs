//! Restart tracing events.
//!
//! This file holds a single test on purpose: tracing caches per-callsite
//! interest process-wide, and a test running in parallel that hits the same
//! callsites while no subscriber is set can race the scoped subscriber below
//! and make it miss events.

mod common;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{incarnation, Opts, WorkerMsg};
use prism_actors::{Backoff, ChildSpec, Supervisor};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::Layer;

const GRACE: Duration = Duration::from_secs(5);

/// One captured tracing event: its level and every field as text.
#[derive(Debug, Clone)]
struct Captured {
    level: tracing::Level,
    fields: BTreeMap<String, String>,
}

impl Captured {
    fn get(&self, field: &str) -> &str {
        self.fields
            .get(field)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("event has no field {field}: {self:?}"))
    }
}

/// A layer that records every event it sees.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Captured>>>);

impl Capture {
    fn with_message(&self, message: &str) -> Vec<Captured> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.fields.get("message").map(String::as_str) == Some(message))
            .cloned()
            .collect()
    }
}

struct FieldText<'a>(&'a mut BTreeMap<String, String>);

impl Visit for FieldText<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: LayerContext<'_, S>) {
        let mut fields = BTreeMap::new();
        event.record(&mut FieldText(&mut fields));
        self.0.lock().unwrap().push(Captured {
            level: *event.metadata().level(),
            fields,
        });
    }
}

// The default `#[tokio::test]` runtime is single-threaded, so every actor task
// runs on this thread and sees the thread-local subscriber set here.
#[tokio::test(start_paused = true)]
async fn restart_emits_a_tracing_event_with_actor_attempt_and_backoff() {
    let capture = Capture::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    tracing::callsite::rebuild_interest_cache();

    let opts = Opts::default();
    let spec = ChildSpec::new("flaky", opts.factory("flaky"));
    let addr = spec.addr();
    let root = Supervisor::new("root")
        .backoff(Backoff {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(1),
            jitter: 0.0,
        })
        .child(spec)
        .spawn();

    for expected in 2..=3 {
        addr.tell(WorkerMsg::Fail).await.unwrap();
        assert_eq!(incarnation(&addr).await, expected);
    }

    let restarts = capture.with_message("actor restarting");
    assert_eq!(restarts.len(), 2, "events: {restarts:?}");
    for (event, (attempt, backoff_ms)) in restarts.iter().zip([("1", "250"), ("2", "500")]) {
        assert_eq!(event.level, tracing::Level::WARN);
        assert_eq!(event.get("actor"), "flaky");
        assert_eq!(event.get("actor_id"), addr.id().to_string());
        assert_eq!(event.get("attempt"), attempt);
        assert_eq!(event.get("backoff_ms"), backoff_ms);
        assert_eq!(event.get("supervisor"), "root");
        assert!(
            event.get("reason").contains("worker asked to fail"),
            "{event:?}"
        );
    }
    assert!(root.shutdown(GRACE).await.is_clean());
}
