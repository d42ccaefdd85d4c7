//! Streaming 1 MiB of Anthropic SSE through `CostMeterLayer` vs straight passthrough, in
//! one run, plus a naive baseline that parses every event's JSON (what many gateways do).
//! A counting allocator reports the peak heap held while metering 1 MiB and 8 MiB streams:
//! constant memory means the two peaks are equal.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use palisade::cost::{
    CostMeterLayer, PriceTable, RecorderConfig, SinkError, UsageRecord, UsageRecorder, UsageSink,
};
use tower::{Layer, ServiceExt, service_fn};

struct Counting;

static CURRENT: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator; only counts sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let size = layout.size() as isize;
        let now = CURRENT.fetch_add(size, Ordering::Relaxed) + size;
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A body yielding pre-built frames.
struct Frames(VecDeque<Bytes>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

const START: &[u8] = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5-20250929\",\"content\":[],\"usage\":{\"input_tokens\":1200,\"cache_read_input_tokens\":5000,\"output_tokens\":1}}}\n\n";
const DELTA: &[u8] = b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"The quick brown fox jumps over the lazy dog, again and again. \"}}\n\n";
const END: &[u8] = b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":9000}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

/// One event per frame, as Anthropic sends them: `message_start`, deltas, `message_delta`.
fn stream(bytes: usize) -> Vec<Bytes> {
    let mut frames = vec![Bytes::from_static(START)];
    let mut total = START.len() + END.len();
    while total < bytes {
        total += DELTA.len();
        frames.push(Bytes::from_static(DELTA));
    }
    frames.push(Bytes::from_static(END));
    frames
}

/// Groups single-event frames into ~16 KiB frames (a proxy that buffers).
fn regroup(frames: &[Bytes]) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut cur = Vec::with_capacity(16 * 1024);
    for f in frames {
        cur.extend_from_slice(f);
        if cur.len() >= 16 * 1024 {
            out.push(Bytes::from(std::mem::take(&mut cur)));
        }
    }
    if !cur.is_empty() {
        out.push(Bytes::from(cur));
    }
    out
}

struct Discard;

impl UsageSink for Discard {
    async fn record_batch(&self, batch: &[UsageRecord]) -> Result<(), SinkError> {
        black_box(batch);
        Ok(())
    }
}

type Upstream<R> =
    tower::util::BoxCloneService<http::Request<R>, http::Response<Frames>, Infallible>;

fn upstream<R: Send + 'static>(frames: Vec<Bytes>) -> Upstream<R> {
    tower::util::BoxCloneService::new(service_fn(move |_req: http::Request<R>| {
        let frames = frames.clone();
        async move {
            Ok::<_, Infallible>(
                http::Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Frames(frames.into()))
                    .unwrap(),
            )
        }
    }))
}

async fn drain<B: Body<Data = Bytes>>(body: B) -> usize
where
    B::Error: std::fmt::Debug,
{
    let mut body = std::pin::pin!(body);
    let mut n = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.unwrap().into_data() {
            n += d.len();
        }
    }
    n
}

/// The naive way: parse every `data:` payload as JSON and read what looks like usage.
fn naive(frames: &[Bytes]) -> u64 {
    let mut out = 0;
    for f in frames {
        for line in f.split(|b| *b == b'\n') {
            if let Some(data) = line.strip_prefix(b"data: ") {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
                    out += v
                        .pointer("/usage/output_tokens")
                        .and_then(serde_json::Value::as_u64)
                        .unwrap_or(0);
                }
            }
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (recorder, _shutdown) = rt.block_on(async {
        UsageRecorder::spawn(
            Discard,
            RecorderConfig {
                capacity: 1 << 20,
                ..RecorderConfig::default()
            },
        )
    });
    let layer = CostMeterLayer::new(PriceTable::builtin(), recorder);
    let one_mib = stream(1 << 20);
    let total: usize = one_mib.iter().map(Bytes::len).sum();

    for (name, frames) in [
        ("per_event", one_mib.clone()),
        ("16k_frames", regroup(&one_mib)),
    ] {
        let mut g = c.benchmark_group(format!("sse_1mib_{name}"));
        g.throughput(Throughput::Bytes(total as u64));
        let plain = upstream(frames.clone());
        g.bench_function("passthrough", |b| {
            b.to_async(&rt).iter(|| async {
                let res = plain.clone().oneshot(http::Request::new(())).await.unwrap();
                black_box(drain(res.into_body()).await)
            })
        });
        let metered = layer.layer(upstream(frames.clone()));
        g.bench_function("cost_meter", |b| {
            b.to_async(&rt).iter(|| async {
                let res = metered
                    .clone()
                    .oneshot(http::Request::new(()))
                    .await
                    .unwrap();
                black_box(drain(res.into_body()).await)
            })
        });
        g.bench_function("naive_parse_every_event", |b| {
            b.iter(|| black_box(naive(&frames)))
        });
        g.finish();
    }

    // Over a real socket: a hyper server on 127.0.0.1 streams the 1 MiB (one event per
    // frame) to a hyper-util client, with and without the meter.
    {
        let mut g = c.benchmark_group("sse_1mib_over_loopback");
        g.throughput(Throughput::Bytes(total as u64));
        let plain_addr = rt.block_on(serve(upstream(one_mib.clone())));
        let metered_addr = rt.block_on(serve(layer.layer(upstream(one_mib.clone()))));
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<Bytes>>();
        let targets = [("passthrough", plain_addr), ("cost_meter", metered_addr)];
        // Warm both paths (connections, allocator, runtime) before measuring either, so
        // that the order of the two measurements does not decide the ratio.
        rt.block_on(async {
            for _ in 0..50 {
                for (_, addr) in &targets {
                    let uri: http::Uri = format!("http://{addr}/").parse().unwrap();
                    let res = client.get(uri).await.unwrap();
                    black_box(drain(res.into_body()).await);
                }
            }
        });
        // The machine is shared and its load drifts, so each measured iteration runs both
        // requests back to back (alternating which goes first) and counts only its own.
        let uris: Vec<(&str, http::Uri)> = targets
            .iter()
            .map(|(n, a)| (*n, format!("http://{a}/").parse().unwrap()))
            .collect();
        for (name, _) in targets {
            let (client, uris) = (&client, &uris);
            g.bench_function(name, |b| {
                b.to_async(&rt).iter_custom(|iters| async move {
                    let mut mine = std::time::Duration::ZERO;
                    for i in 0..iters {
                        for k in 0..2 {
                            let (which, uri) = &uris[(i as usize + k) % 2];
                            let t = std::time::Instant::now();
                            let res = client.get(uri.clone()).await.unwrap();
                            let n = drain(res.into_body()).await;
                            let took = t.elapsed();
                            assert_eq!(n, total);
                            if *which == name {
                                mine += took;
                            }
                        }
                    }
                    mine
                })
            });
        }
        g.finish();
    }

    // Constant memory: peak heap held while metering a 1 MiB and an 8 MiB stream (the
    // frames share one static buffer, so only the meter's own memory counts).
    for mib in [1usize, 8] {
        let frames = stream(mib << 20);
        let svc = layer.layer(upstream(frames));
        let peak = rt.block_on(async {
            let res = svc.oneshot(http::Request::new(())).await.unwrap();
            let before = CURRENT.load(Ordering::Relaxed);
            PEAK.store(before, Ordering::Relaxed);
            black_box(drain(res.into_body()).await);
            PEAK.load(Ordering::Relaxed) - before
        });
        println!("cost_meter: peak extra heap while streaming {mib} MiB: {peak} bytes");
    }
}

async fn serve<S, B>(svc: S) -> std::net::SocketAddr
where
    S: tower::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let svc = hyper_util::service::TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

criterion_group!(benches, bench);
criterion_main!(benches);
