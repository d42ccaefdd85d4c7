//! The memory the budget estimate takes for a body that is one long list of tools: no
//! more than a few kilobytes beside the body, however many tools (a counting allocator
//! measures it, so this file holds this one test alone).
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use palisade::cost::Money;
use palisade::cost::budget::{Budget, BudgetLayer, Period, Scope};
use tower::{Layer, ServiceExt, service_fn};

/// The system allocator, counting the bytes live and the most live at once.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
        PEAK.fetch_max(live, Ordering::SeqCst);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// A 4 MiB body of a million tools took 176 MB to estimate (each tool kept in a list,
/// and kept again to say why when the estimate could not read it): a few such requests
/// at once could exhaust a gateway's memory.
#[tokio::test]
async fn a_million_tools_take_no_more_memory_to_estimate_than_one() {
    let layer = BudgetLayer::builder()
        .budget(Budget::new(
            "daily",
            Scope::Global,
            Period::Day,
            Money::parse_dollars("1000").unwrap(),
        ))
        .build()
        .unwrap();
    let list = |first: &str| {
        let n = (4 << 20) / 3 - 40;
        let tools = std::iter::once(first)
            .chain(std::iter::repeat_n("{}", n))
            .collect::<Vec<_>>()
            .join(",");
        format!(r#"{{"model":"claude-sonnet-4-5","max_tokens":10,"tools":[{tools}]}}"#)
    };
    let last_unreadable = {
        let body = list("{}");
        body.replacen("{}]", r#"{"max_uses":-1}]"#, 1)
    };
    for (body, status) in [
        (list("{}"), 200),
        (list(r#"{"max_uses":-1}"#), 400),
        (last_unreadable, 400),
    ] {
        let svc = layer.layer(service_fn(|_req: Request<Full<Bytes>>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }));
        let req = Request::post("/v1/messages")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let before = LIVE.load(Ordering::SeqCst);
        PEAK.store(before, Ordering::SeqCst);
        let res = svc.oneshot(req).await.unwrap();
        let peak = PEAK.load(Ordering::SeqCst) - before;
        assert_eq!(res.status(), status);
        assert!(peak < 64 << 10, "{peak} bytes to estimate a 4 MiB body");
    }
}
