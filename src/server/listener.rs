//! The gRPC listener: the accept loop (with backoff when accepting fails)
//! and the tonic server with its connection limits, health and reflection.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tokio_stream::Stream;
use tonic::transport::server::Router;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tracing::warn;

use super::Error;
use crate::grpc::KvService;
use crate::kv::Core;
use crate::proto::key_value_server::KeyValueServer;
use crate::settings::{GrpcLimits, MAX_VALUE_SIZE_LIMIT};

/// Room above the largest value or scan page for the rest of a request or
/// response: a key (1 KiB), and a page's framing (about 15 bytes an item,
/// at most 1000 items) and cursor.
const MESSAGE_OVERHEAD: usize = 64 * 1024;

/// The first pause after a failed accept; it doubles up to
/// [`ACCEPT_BACKOFF_MAX`] while accepting keeps failing.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepted connections of a listener, with `TCP_NODELAY` set. When
/// accepting fails (out of file descriptors, out of memory) it logs, pauses
/// with exponential backoff and tries again, instead of spinning on the
/// error; the listener is never given up.
pub struct Incoming {
    listener: TcpListener,
    backoff: Duration,
    pause: Option<Pin<Box<Sleep>>>,
}

impl Incoming {
    /// The connections of `listener`.
    pub fn new(listener: TcpListener) -> Self {
        Incoming {
            listener,
            backoff: ACCEPT_BACKOFF_MIN,
            pause: None,
        }
    }
}

impl Stream for Incoming {
    type Item = Result<TcpStream, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(pause) = self.pause.as_mut() {
                std::task::ready!(pause.as_mut().poll(cx));
                self.pause = None;
            }
            match self.listener.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok((stream, _))) => {
                    self.backoff = ACCEPT_BACKOFF_MIN;
                    // Small unary calls: latency matters more than packing.
                    let _ = stream.set_nodelay(true);
                    return Poll::Ready(Some(Ok(stream)));
                }
                Poll::Ready(Err(e)) => {
                    let backoff = self.backoff;
                    warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "accepting a grpc connection failed");
                    self.backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    self.pause = Some(Box::pin(tokio::time::sleep(backoff)));
                }
            }
        }
    }
}

/// The gRPC services of a gateway on a tonic server with `limits`, and the
/// reporter of their health.
pub async fn router(
    core: Core,
    limits: &GrpcLimits,
    max_value_size: usize,
) -> Result<(Router, HealthReporter), Error> {
    // Requests carry at most one value. A response holds one value (Get) or
    // a scan page: at most `max_page_bytes` of keys and values, or one item.
    // An item stored while a namespace allowed larger values (up to the
    // absolute limit) must still be served, so responses are capped by that
    // limit, not by today's `max_value_size`: a Get or Scan never fails in
    // encoding after the request core counted it OK.
    let max_page_bytes = core
        .namespaces()
        .map(|ns| ns.settings.max_page_bytes)
        .max()
        .unwrap_or(0);
    let max_request = max_value_size + MESSAGE_OVERHEAD;
    let max_response = MAX_VALUE_SIZE_LIMIT.max(max_page_bytes) + MESSAGE_OVERHEAD;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<KeyValueServer<KvService>>().await;
    // Both reflection versions: grpcurl and older tools still ask v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| Error::Start(format!("grpc reflection: {e}")))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| Error::Start(format!("grpc reflection: {e}")))?;
    let kv = crate::grpc::server(core, max_request, max_response);
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_max_pending_accept_reset_streams(Some(limits.max_pending_reset_streams))
        .http2_max_local_error_reset_streams(Some(limits.max_local_reset_streams))
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .max_connection_age(limits.max_connection_age)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(kv);
    Ok((router, health))
}

/// Health turns NOT_SERVING for the whole server (`""`) and for
/// `prism.kv.v1.KeyValue`.
pub async fn set_not_serving(health: &HealthReporter) {
    health.set_not_serving::<KeyValueServer<KvService>>().await;
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
}
