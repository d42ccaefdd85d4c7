//! `chat_gateway`: an Anthropic-compatible gateway for a bot-builder platform, built from
//! every palisade layer. Run it with `cargo run --example chat_gateway`: it serves on
//! 127.0.0.1:8080 with a built-in mock upstream, so it works offline.
//!
//! Server side: request id, request log, security headers, authentication, rate limits,
//! body limit, validation and budgets. Client side: cost meter, retry, circuit breaker per
//! upstream, pooled hyper-util client; a fallback when the primary is down.
//! `.env.example` beside this file lists the gateway's own variables and the layers' most
//! used ones (the README's Configuration section has every layer's).

mod app;
mod audit;
mod auth;
mod config;
mod dashboard;
mod error;
mod log;
mod metrics;
mod mock;
mod routes;
mod schema;
mod sentry;
mod serve;
mod store;
mod tls;
mod upstream;

use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

use crate::config::GatewayConfig;

/// The gateway allocates and frees many small, short-lived values on every request:
/// mimalloc does that with fewer instructions than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_logs(json: bool, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.compact().init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let config = match GatewayConfig::from_process() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chat_gateway: {e}");
            return ExitCode::from(2);
        }
    };
    init_logs(config.json_logs, &config.log_filter);
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "chat_gateway stopped");
            eprintln!("chat_gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: GatewayConfig) -> Result<(), palisade::BoxError> {
    let addr = config.addr;
    let grace = config.shutdown_grace;
    let demo = config.demo_keys;
    let layers = config.layers;
    let timeouts = serve::Timeouts::from_config(&config);
    let tls = match &config.tls {
        Some((cert, key)) => Some(tls::load(cert, key)?),
        None => None,
    };
    let app = app::build(config).await?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} (PALISADE_GATEWAY_ADDR): {e}"))?;
    let addr = listener.local_addr()?;

    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("chat_gateway listening on {scheme}://{addr}");
    match app.mock_addr {
        Some(mock) => println!(
            "  upstream: built-in mock on http://{mock} (set ANTHROPIC_BASE_URL and ANTHROPIC_API_KEY for a real one)"
        ),
        None => println!("  upstream: {:?}", app.state.upstreams.primary),
    }
    if app.mock_addr.is_some() && std::env::var_os("ANTHROPIC_API_KEY").is_some() {
        println!(
            "  note: ANTHROPIC_API_KEY is set but ANTHROPIC_BASE_URL is not, so the mock serves;"
        );
        println!("        set ANTHROPIC_BASE_URL=https://api.anthropic.com to call the real API");
    }
    if !layers {
        println!("  layers: OFF (PALISADE_GATEWAY_LAYERS=off): the bare pass-through floor");
    }
    if demo {
        println!("  demo user key:  {}", config::DEMO_USER_KEY);
        println!("  demo admin key: {}", config::DEMO_ADMIN_KEY);
        println!(
            "  dashboard:      http://{addr}/#key={}",
            config::DEMO_ADMIN_KEY
        );
        println!("  try:");
        println!(
            "    curl {scheme}://{addr}/v1/messages -H 'x-api-key: {}' -H 'anthropic-version: 2023-06-01' \\\n      -H 'content-type: application/json' \\\n      -d '{{\"model\":\"claude-sonnet-4-5\",\"max_tokens\":256,\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'",
            config::DEMO_USER_KEY
        );
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = serve::serve(listener, app.router, tls, timeouts, stop_rx);
    tokio::pin!(server);
    tokio::select! {
        () = &mut server => {}
        () = shutdown_signal() => {
            tracing::info!(grace = ?grace, "shutting down: no new connections; finishing requests and streams");
            let _ = stop_tx.send(true);
            if tokio::time::timeout(grace, &mut server).await.is_err() {
                tracing::warn!("in-flight requests outlived the shutdown grace period; closing them");
            }
        }
    }
    if let Some(sentry) = &app.sentry
        && !sentry.flush(grace)
    {
        tracing::warn!("error reports were still queued at shutdown");
    }
    if tokio::time::timeout(grace, app.state.audit.flush())
        .await
        .is_err()
    {
        tracing::error!("audit events were still queued at shutdown");
    }
    if let Some(recorder) = app.recorder {
        match recorder.shutdown_within(grace).await {
            Ok(stats) => tracing::info!(written = stats.written, "usage recorder flushed"),
            Err(stats) => tracing::error!(
                written = stats.written,
                queued = stats.queued,
                "usage recorder did not flush in time"
            ),
        }
    }
    Ok(())
}
