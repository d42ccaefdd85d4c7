#![allow(missing_docs)]
use axum::extract::ConnectInfo;
use http::{Request, Response};
use palisade::clock::ClockSource;
use palisade::rate_limit::{KeySource, MemoryStore, Quota, RateLimitLayer, Rule};
use std::convert::Infallible;
use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use tower::{Layer, Service, service_fn};
#[inline(always)]
fn poll_now<F: std::future::Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!(),
    }
}
fn request(i: u64) -> Request<()> {
    let mut req = Request::new(());
    req.extensions_mut().insert(ConnectInfo(SocketAddr::new(
        IpAddr::from((0x0a00_0000u32 + (i % 10000) as u32).to_be_bytes()),
        4000,
    )));
    req
}
#[inline(never)]
fn run<S, B>(svc: &mut S, n: u64)
where
    S: Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    for i in 0..n {
        let res = poll_now(svc.call(request(i))).unwrap();
        black_box(res);
    }
}
fn main() {
    let n: u64 = std::env::args().nth(1).unwrap().parse().unwrap();
    let handler =
        |_req: Request<()>| async { Ok::<_, Infallible>(Response::new(axum::body::Body::empty())) };
    let rule = Rule::new("ip", Quota::per_second(u64::from(u32::MAX))).key(KeySource::PeerIp);
    let mut s = RateLimitLayer::builder()
        .store(
            MemoryStore::builder()
                .clock(ClockSource::Fast)
                .build()
                .unwrap(),
        )
        .rule(rule)
        .draft_headers(false)
        .build()
        .unwrap()
        .layer(service_fn(handler));
    run(&mut s, 10000);
    run(&mut s, n)
}
