//! What the rate-limit benches share: the peers' keys and how a request is sent.

use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use axum::extract::ConnectInfo;
use http::Request;
use palisade::rate_limit::algorithm::Params;
use palisade::rate_limit::store::{CheckItem, Store};
use palisade::rate_limit::{MemoryStore, RateKey};
use tower_governor::governor::{GovernorConfig, GovernorConfigBuilder};
use tower_governor::key_extractor::PeerIpKeyExtractor;

/// tower_governor's middleware with and without its headers (governor's own types).
type Plain = governor::middleware::NoOpMiddleware<governor::clock::QuantaInstant>;
type WithHeaders = governor::middleware::StateInformationMiddleware;

/// tower_governor keyed by peer IP with a quota no bench exhausts, as palisade's rows are.
pub fn tower_governor_config() -> GovernorConfig<PeerIpKeyExtractor, Plain> {
    GovernorConfigBuilder::default()
        .per_nanosecond(1)
        .burst_size(u32::MAX)
        .finish()
        .unwrap()
}

/// The same with `use_headers` (which changes the builder's type, hence its own function).
pub fn tower_governor_headers_config() -> GovernorConfig<PeerIpKeyExtractor, WithHeaders> {
    GovernorConfigBuilder::default()
        .per_nanosecond(1)
        .burst_size(u32::MAX)
        .use_headers()
        .finish()
        .unwrap()
}

/// Distinct peer addresses (and so rate-limit keys) the requests cycle through.
pub const KEYS: usize = 10_000;

/// The `i`-th peer address.
pub fn ip(i: u64) -> IpAddr {
    IpAddr::from((0x0a00_0000u32 + (i % KEYS as u64) as u32).to_be_bytes())
}

/// A request from the `i`-th peer, with the peer address where axum puts it.
pub fn request(i: u64) -> Request<()> {
    let mut req = Request::new(());
    req.extensions_mut()
        .insert(ConnectInfo(SocketAddr::new(ip(i), 4000)));
    req
}

/// One allowed decision of cost 1 for `key` through `Store::check_now` (a list of one).
#[allow(dead_code)] // each bench file uses its own subset
pub fn decide(store: &MemoryStore, key: &RateKey, params: Params) -> bool {
    matches!(store.check_now(&[item(key, params)]), Some(Ok(d)) if d.admitted)
}

/// The same decision through `Store::check_one_now` (one item, no list).
pub fn decide_one(store: &MemoryStore, key: &RateKey, params: Params) -> bool {
    matches!(store.check_one_now(&item(key, params)), Some(Ok(d)) if d.debited)
}

fn item(key: &RateKey, params: Params) -> CheckItem<'_> {
    CheckItem {
        rule_index: 0,
        rule: "bench",
        key,
        params,
        cost: 1,
        shadow: false,
    }
}

/// Polls a future that is ready at once. Always inlined, so every bench row polls its
/// service the same way (left to itself the compiler inlined it into some rows only).
#[inline(always)]
pub fn poll_now<F: std::future::Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the bench services are always ready"),
    }
}
