//! The rate limiter's view of the client under hostile input: its address as a
//! `SocketAddr` extension (IPv6, IPv4-mapped, spoofed `X-Forwarded-For`), and the memory
//! store's IP table against the generic key path.

use std::net::SocketAddr;

use palisade::rate_limit::algorithm::Params;
use palisade::rate_limit::store::{CheckItem, Settlement};
use palisade::rate_limit::{Algorithm, IpKey, KeySource, MemoryStore, RateKey, TrustedProxies};
use proptest::prelude::*;

fn request(peer: &str, xff: &[&str]) -> http::Request<()> {
    let mut req = http::Request::new(());
    req.extensions_mut()
        .insert(peer.parse::<SocketAddr>().unwrap());
    for v in xff {
        req.headers_mut()
            .append("x-forwarded-for", v.parse().unwrap());
    }
    req
}

fn ip_key(req: &http::Request<()>, proxies: &TrustedProxies) -> Option<RateKey> {
    KeySource::PeerIp.extract(req, proxies)
}

#[test]
fn an_ipv4_mapped_peer_keys_like_its_ipv4_address_with_or_without_proxies() {
    let v4 = RateKey::ip("1.2.3.4".parse().unwrap());
    let proxies: TrustedProxies = "10.0.0.0/8".parse().unwrap();
    for p in [TrustedProxies::none(), proxies] {
        let mapped = request("[::ffff:1.2.3.4]:5555", &[]);
        assert_eq!(ip_key(&mapped, &p), Some(v4.clone()));
        let plain = request("1.2.3.4:5555", &[]);
        assert_eq!(ip_key(&plain, &p), Some(v4.clone()));
        assert_eq!(
            KeySource::PrincipalOrPeerIp.extract(&mapped, &p),
            Some(v4.clone())
        );
    }
}

#[test]
fn a_spoofed_forwarded_for_from_an_untrusted_peer_changes_nothing() {
    let proxies: TrustedProxies = "10.0.0.0/8, ::ffff:192.168.0.1".parse().unwrap();
    for peer in ["203.0.113.9:1", "[::ffff:203.0.113.9]:1"] {
        let req = request(peer, &["10.0.0.1", "1.1.1.1, 10.0.0.2"]);
        assert_eq!(
            ip_key(&req, &proxies),
            Some(RateKey::ip("203.0.113.9".parse().unwrap()))
        );
    }
    // A v6 peer in the same /64 as another: one key, whatever it forwards.
    let a = request("[2001:db8:1:2::1]:1", &["9.9.9.9"]);
    let b = request("[2001:db8:1:2:ffff::9]:1", &["8.8.8.8"]);
    assert_eq!(ip_key(&a, &proxies), ip_key(&b, &proxies));
    assert_eq!(
        ip_key(&a, &proxies).unwrap().to_string(),
        "ip:2001:db8:1:2::"
    );
}

#[test]
fn a_trusted_mapped_proxy_forwards_the_rightmost_untrusted_client() {
    let proxies: TrustedProxies = "10.0.0.0/8".parse().unwrap();
    // The proxy reaches a dual-stack socket as ::ffff:10.0.0.5; the chain names a mapped
    // client, a v6 client with a port, and spoofed entries to their left.
    let req = request(
        "[::ffff:10.0.0.5]:443",
        &["6.6.6.6", "::ffff:198.51.100.7, 10.0.0.9"],
    );
    assert_eq!(
        ip_key(&req, &proxies),
        Some(RateKey::ip("198.51.100.7".parse().unwrap()))
    );
    let req = request("10.0.0.5:443", &["6.6.6.6, [2001:db8:9:9::1]:443"]);
    assert_eq!(
        ip_key(&req, &proxies),
        Some(RateKey::Ip(IpKey::new("2001:db8:9:9::".parse().unwrap())))
    );
}

/// A client behind a trusted proxy writes the left of `X-Forwarded-For`; the proxy appends
/// the address it saw to the same value. Bytes that are not visible ASCII on the client's
/// side made the whole value unreadable, and the client was keyed as the proxy itself:
/// out of its own bucket and into the one every such client shares.
#[test]
fn unreadable_bytes_written_by_the_client_do_not_hide_the_hop_the_proxy_appended() {
    let proxies: TrustedProxies = "10.0.0.0/8".parse().unwrap();
    let mut req = http::Request::new(());
    req.extensions_mut()
        .insert("10.0.0.5:443".parse::<SocketAddr>().unwrap());
    req.headers_mut().insert(
        "x-forwarded-for",
        http::HeaderValue::from_bytes(b"\xff\xfe, 203.0.113.9").unwrap(),
    );
    assert_eq!(
        proxies.client_ip(&req),
        Some("203.0.113.9".parse().unwrap())
    );
    assert_eq!(
        ip_key(&req, &proxies),
        Some(RateKey::ip("203.0.113.9".parse().unwrap()))
    );
    // Unreadable bytes in the proxy's own hop still stop the walk at the proxy.
    req.headers_mut().insert(
        "x-forwarded-for",
        http::HeaderValue::from_bytes(b"203.0.113.9, \xff").unwrap(),
    );
    assert_eq!(proxies.client_ip(&req), Some("10.0.0.5".parse().unwrap()));
}

/// Addresses a flood would bring: IPv4, the same as IPv4-mapped IPv6, IPv6 in one /64 and
/// in others, and the IPv6 network whose word equals an IPv4 key's.
fn pool() -> Vec<RateKey> {
    [
        "10.0.0.1",
        "::ffff:10.0.0.1",
        "10.0.0.2",
        "0.0.0.0",
        "::",
        "::1",
        "2001:db8::1",
        "2001:db8::2",
        "2001:db8:0:1::1",
        "0:ffff:a00:1::",
        "255.255.255.255",
        "ffff:ffff:ffff:ffff::1",
    ]
    .iter()
    .map(|s| RateKey::ip(s.parse().unwrap()))
    .collect()
}

fn params(which: u8) -> Params {
    let window = 1_000_000;
    let (algorithm, strict) = match which % 4 {
        0 => (Algorithm::SlidingWindow, false),
        1 => (Algorithm::SlidingWindow, true),
        2 => (Algorithm::FixedWindow, false),
        _ => (Algorithm::Gcra, false),
    };
    // Half the rules count past 32 bits (an IP key's small slot moves to the wide table).
    let limit = if which >= 4 { 1 << 34 } else { 5 };
    Params {
        algorithm,
        limit,
        window,
        burst: limit,
        strict,
    }
}

/// A rule index whose IP keys live in the small table, and the first whose IP keys the
/// memory store keeps in the generic (wide) table (it and the next one, for groups).
const SMALL_RULE: u32 = 0;
const WIDE_RULE: u32 = (1 << 31) - 1;

#[derive(Debug, Clone)]
enum Op {
    Check { key: usize, cost: u64, advance: u64 },
    Group { a: usize, b: usize, cost: u64 },
    Settle { key: usize, delta: i64 },
    Reset { key: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..12, prop_oneof![0u64..3, Just(1u64 << 32)], 0u64..700_000)
            .prop_map(|(key, cost, advance)| Op::Check { key, cost, advance }),
        2 => (0usize..12, 0usize..12, 0u64..3).prop_map(|(a, b, cost)| Op::Group { a, b, cost }),
        1 => (0usize..12, -2i64..3).prop_map(|(key, delta)| Op::Settle { key, delta }),
        1 => (0usize..12).prop_map(|key| Op::Reset { key }),
    ]
}

/// Three ways to hold the same keys: IP keys in the small table, the same IP keys in the
/// wide table (a rule index past the small table's), and each key as a header value (the
/// generic path). Each answers every operation alike.
struct Paths {
    stores: [MemoryStore; 3],
    rules: [u32; 3],
}

impl Paths {
    fn new(max_entries: usize) -> Self {
        let build = || {
            MemoryStore::builder()
                .max_entries(max_entries)
                .shards(1)
                .build()
                .unwrap()
        };
        Self {
            stores: [build(), build(), build()],
            rules: [SMALL_RULE, WIDE_RULE, SMALL_RULE],
        }
    }

    fn key(path: usize, ip: &RateKey) -> RateKey {
        if path == 2 {
            RateKey::header(&ip.to_string())
        } else {
            ip.clone()
        }
    }

    fn evictions(&self) -> u64 {
        self.stores.iter().map(MemoryStore::evictions).sum()
    }
}

/// A decision but its generation: a key whose state has expired may be dropped as idle by
/// one table and not yet by the other (an IP slot's expiry is rounded up to about a
/// second), so a reset finds it resident in one and bumps its generation there only.
/// Settlements follow each path's own generation.
fn without_generation(
    mut r: palisade::rate_limit::store::RuleDecision,
) -> palisade::rate_limit::store::RuleDecision {
    r.generation = 0;
    r
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The IP table decides as the generic key path does, for the same sequence of
    /// decisions, groups, settlements and resets, over IPv4, mapped and IPv6 keys, with
    /// counts past 32 bits and (while nothing is evicted) keys dropped as idle when the
    /// store is full: the same verdicts, remaining units, resets and window starts.
    #[test]
    fn the_ip_table_decides_as_the_generic_key_path(
        which in 0u8..8,
        max_entries in prop_oneof![Just(4usize), Just(1_000usize)],
        ops in proptest::collection::vec(op(), 1..200),
    ) {
        let p = params(which);
        let keys = pool();
        let paths = Paths::new(max_entries);
        let mut now = 0u64;
        // Per key, per path: the last admitted decision's window start, generation and end.
        let mut last: Vec<[Option<(u64, u32, u64)>; 3]> = vec![[None; 3]; keys.len()];
        for op in ops {
            if paths.evictions() > 0 {
                // Which key is evicted first is table order; past that the paths may
                // differ by design.
                break;
            }
            match op {
                Op::Check { key, cost, advance } => {
                    now += advance;
                    let mut got = Vec::new();
                    for (i, store) in paths.stores.iter().enumerate() {
                        let k = Paths::key(i, &keys[key]);
                        let item = CheckItem { rule_index: paths.rules[i], rule: "r", key: &k, params: p, cost, shadow: false };
                        let d = store.check_at(&[item], now);
                        if d.admitted {
                            last[key][i] = Some((d.rules[0].window_start, d.rules[0].generation, d.rules[0].reservation_end));
                        }
                        got.push((d.admitted, without_generation(d.rules[0])));
                    }
                    prop_assert_eq!(got[0], got[1], "small vs wide at {:?}", keys[key]);
                    prop_assert_eq!(got[0], got[2], "small vs header at {:?}", keys[key]);
                }
                Op::Group { a, b, cost } => {
                    let mut got = Vec::new();
                    for (i, store) in paths.stores.iter().enumerate() {
                        let (ka, kb) = (Paths::key(i, &keys[a]), Paths::key(i, &keys[b]));
                        let item = |k| CheckItem { rule_index: paths.rules[i], rule: "r", key: k, params: p, cost, shadow: false };
                        // Two rules on two keys (the second rule's index is its own).
                        let mut second = item(&kb);
                        second.rule_index += 1;
                        let mut d = store.check_at(&[item(&ka), second], now);
                        d.rules.iter_mut().for_each(|r| *r = without_generation(*r));
                        got.push(d);
                    }
                    prop_assert_eq!(&got[0], &got[1], "group small vs wide");
                    prop_assert_eq!(&got[0], &got[2], "group small vs header");
                }
                Op::Settle { key, delta } => {
                    for (i, store) in paths.stores.iter().enumerate() {
                        let Some((window_start, generation, reservation_end)) = last[key][i] else { continue };
                        let k = Paths::key(i, &keys[key]);
                        store.settle_at(&[Settlement { rule_index: paths.rules[i], rule: "r", key: &k, params: p, window_start, generation, reservation_end, delta }], now);
                    }
                }
                Op::Reset { key } => {
                    for (i, store) in paths.stores.iter().enumerate() {
                        store.reset_now(paths.rules[i], &Paths::key(i, &keys[key]));
                    }
                }
            }
            let lens: Vec<usize> = paths.stores.iter().map(MemoryStore::len).collect();
            prop_assert!(lens.iter().all(|&n| n <= max_entries), "{lens:?}");
        }
    }
}
