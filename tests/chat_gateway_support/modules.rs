// The chat_gateway example's modules, for the test crates that build it in-process
// (`include!`d at their root, so that `crate::app` and the others resolve as in the example).
#[path = "../../examples/chat_gateway/app.rs"]
mod app;
#[path = "../../examples/chat_gateway/audit.rs"]
mod audit;
#[path = "../../examples/chat_gateway/auth.rs"]
mod auth;
#[path = "../../examples/chat_gateway/config.rs"]
mod config;
#[path = "../../examples/chat_gateway/dashboard/mod.rs"]
mod dashboard;
#[path = "../../examples/chat_gateway/error.rs"]
mod error;
#[path = "../../examples/chat_gateway/log.rs"]
mod log;
#[path = "../../examples/chat_gateway/metrics.rs"]
mod metrics;
#[path = "../../examples/chat_gateway/mock.rs"]
mod mock;
#[path = "../../examples/chat_gateway/routes/mod.rs"]
mod routes;
#[path = "../../examples/chat_gateway/schema.rs"]
mod schema;
#[path = "../../examples/chat_gateway/sentry.rs"]
mod sentry;
#[path = "../../examples/chat_gateway/serve.rs"]
mod serve;
#[path = "../../examples/chat_gateway/store.rs"]
mod store;
#[path = "../../examples/chat_gateway/tls.rs"]
mod tls;
#[path = "../../examples/chat_gateway/upstream.rs"]
mod upstream;
// The shared start-up and helpers of the gateway tests.
#[path = "fixture.rs"]
mod fixture;
// Streamed upstreams for the tests of streams and connections.
#[path = "sse_upstream.rs"]
mod sse_upstream;
