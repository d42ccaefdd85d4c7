//! Each retry is one tracing event. In a test binary of its own, with a global subscriber,
//! so that no test running in parallel can leave the callsite's interest cached as "off".

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use palisade::retry::{Jitter, ReplayBody, RetryLayer};
use tower::{Layer, ServiceExt, service_fn};

/// Keeps the fields of every "retrying upstream call" event.
#[derive(Default, Clone)]
struct RetryEvents(Arc<Mutex<Vec<String>>>);

impl tracing::Subscriber for RetryEvents {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Fields(String);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.push_str(&format!("{}={:?} ", field.name(), value));
            }
        }
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        if fields.0.contains("retrying upstream call") {
            self.0.lock().unwrap().push(fields.0);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test(start_paused = true)]
async fn each_retry_is_one_tracing_event_with_attempt_delay_and_reason() {
    let events = RetryEvents::default();
    tracing::subscriber::set_global_default(events.clone()).unwrap();

    let calls = Arc::new(AtomicU32::new(0));
    let svc = RetryLayer::builder()
        .jitter(Jitter::None)
        .base_delay(Duration::from_millis(100))
        .build()
        .unwrap()
        .layer(service_fn({
            let calls = calls.clone();
            move |_req: http::Request<ReplayBody<Full<Bytes>>>| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    let status = if n < 2 { 529 } else { 200 };
                    Ok::<_, palisade::BoxError>(
                        http::Response::builder().status(status).body(()).unwrap(),
                    )
                }
            }
        }));
    let request = http::Request::get("http://127.0.0.1/v1/models")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(svc.oneshot(request).await.unwrap().status(), 200);

    let events = events.0.lock().unwrap();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        events[0].contains("attempt=1 delay_ms=100 status=529"),
        "{}",
        events[0]
    );
    assert!(
        events[1].contains("attempt=2 delay_ms=200 status=529"),
        "{}",
        events[1]
    );
    assert!(events[1].contains("outcome=Failure"), "{}", events[1]);
}
