//! Every event inside an actor's handlers carries the actor's name and id
//! through the incarnation's span.
//!
//! One test in its own file on purpose: tracing caches per-callsite interest
//! process-wide, and a parallel test hitting the same callsites with no
//! subscriber set could make the scoped subscriber below miss events.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prism_actors::prelude::*;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The fields of a span, kept in its extensions.
#[derive(Debug, Clone, Default)]
struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

/// One captured event: its message and the fields of the spans around it,
/// innermost first.
#[derive(Debug, Clone)]
struct Captured {
    message: String,
    spans: Vec<(String, Fields)>,
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Captured>>>);

impl<S> Layer<S> for Capture
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: LayerContext<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: LayerContext<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let spans = ctx
            .event_scope(event)
            .map(|scope| {
                scope
                    .map(|s| {
                        let f = s.extensions().get::<Fields>().cloned().unwrap_or_default();
                        (s.name().to_owned(), f)
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.0.lock().unwrap().push(Captured {
            message: fields.0.remove("message").unwrap_or_default(),
            spans,
        });
    }
}

struct Chatty;

enum ChattyMsg {
    Hello { reply: Reply<()> },
}

impl Actor for Chatty {
    type Msg = ChattyMsg;

    async fn handle(&mut self, msg: ChattyMsg, _ctx: &mut Context<Self>) -> Result<(), BoxError> {
        let ChattyMsg::Hello { reply } = msg;
        tracing::info!("chatty says hello");
        let _ = reply.send(());
        Ok(())
    }
}

// The default `#[tokio::test]` runtime is single-threaded, so every actor task
// runs on this thread and sees the thread-local subscriber set here.
#[tokio::test]
async fn events_in_a_handler_carry_the_actor_name_and_id() {
    let capture = Capture::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    tracing::callsite::rebuild_interest_cache();

    let spec = ChildSpec::new("chatty", || Chatty);
    let addr = spec.addr();
    let root = Supervisor::new("root").child(spec).spawn();
    addr.ask(|reply| ChattyMsg::Hello { reply }).await.unwrap();

    let events = capture.0.lock().unwrap().clone();
    let hello = events
        .iter()
        .find(|e| e.message == "chatty says hello")
        .expect("the handler's event was captured");
    let (name, fields) = &hello.spans[0];
    assert_eq!(name, "actor");
    assert_eq!(fields.0.get("actor").map(String::as_str), Some("chatty"));
    assert_eq!(
        fields.0.get("actor_id").map(String::as_str),
        Some(addr.id().to_string().as_str())
    );
    // Incarnation spans are roots: a deep tree does not stack up a span per level.
    assert_eq!(hello.spans.len(), 1, "{hello:?}");

    assert!(root.shutdown(Duration::from_secs(5)).await.is_clean());
}
