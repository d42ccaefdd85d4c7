//! Fuzzes the parsing of `retry-after` / `retry-after-ms` and the rate-limit headers.
//!
//! Properties:
//! - `retry-after` written as delay-seconds or as an HTTP-date reads back as the delay it
//!   says (parse(render(x)) = x); `retry-after-ms` wins over it; arbitrary values never
//!   panic, a past date is zero, and a value that is neither form is ignored;
//! - the `RateLimit-Policy` and `RateLimit` fields a layer with arbitrary rules writes are
//!   RFC 8941 lists that parse back to each rule's name, quota and window; `r` never
//!   exceeds the quota, a refusal carries `retry-after` = its `t` and `r=0`;
//! - `X-Forwarded-For` behind trusted proxies: whatever the header says, the client is the
//!   peer or an address written in the header.
#![no_main]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use palisade::classify::parse_retry_after_at;
use palisade::rate_limit::{Algorithm, Quota, RateLimitLayer, Rule, TrustedProxies};
use tower::{Layer, Service, ServiceExt};

#[derive(Debug, Arbitrary)]
enum Input {
    RetryAfter {
        seconds: u32,
        date_secs: u32,
        now_secs: u32,
        ms: Option<u32>,
        raw: Vec<u8>,
    },
    RateLimit {
        rules: Vec<(String, u16, u32, u8)>,
        requests: u8,
    },
    Forwarded {
        peer: [u8; 4],
        trusted: u8,
        values: Vec<Vec<u8>>,
    },
}

fn header(name: &'static str, v: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(name, HeaderValue::from_str(v).unwrap());
    h
}

fn retry_after(seconds: u32, date_secs: u32, now_secs: u32, ms: Option<u32>, raw: &[u8]) {
    let now = UNIX_EPOCH + Duration::from_secs(u64::from(now_secs));
    let h = header("retry-after", &seconds.to_string());
    assert_eq!(
        parse_retry_after_at(&h, now),
        Some(Duration::from_secs(u64::from(seconds)))
    );

    let when = UNIX_EPOCH + Duration::from_secs(u64::from(date_secs));
    let h = header("retry-after", &httpdate::fmt_http_date(when));
    let expected = when.duration_since(now).unwrap_or(Duration::ZERO);
    assert_eq!(parse_retry_after_at(&h, now), Some(expected));

    if let Some(ms) = ms {
        let mut h = h.clone();
        h.insert(
            "retry-after-ms",
            HeaderValue::from_str(&ms.to_string()).unwrap(),
        );
        assert_eq!(
            parse_retry_after_at(&h, now),
            Some(Duration::from_millis(u64::from(ms)))
        );
    }

    // Arbitrary bytes, in either header: no panic; a delay only from a value that is one.
    let Ok(value) = HeaderValue::from_bytes(raw) else {
        return;
    };
    for name in ["retry-after", "retry-after-ms"] {
        let mut h = HeaderMap::new();
        h.insert(name, value.clone());
        let got = parse_retry_after_at(&h, now);
        let Ok(text) = value.to_str() else {
            assert_eq!(got, None, "a value that is not text is ignored");
            continue;
        };
        let text = text.trim();
        if name == "retry-after" && got.is_some() {
            let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
            let date = httpdate::parse_http_date(text).is_ok();
            assert!(digits || date, "{text:?} read as a delay");
        }
        if name == "retry-after-ms" && got.is_some() {
            let ms: f64 = text.parse().expect("a delay only from a number");
            assert!(ms.is_finite() && ms >= 0.0);
        }
    }
    let _ = SystemTime::now();
}

/// An RFC 8941 list of sf-string items with integer parameters, read strictly: anything
/// else fails. (A string may hold `,` and `;`, so the list is tokenised, not split.)
fn parse_list(v: &str) -> Vec<(String, Vec<(String, u64)>)> {
    let b = v.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    loop {
        assert_eq!(b.get(i), Some(&b'"'), "{v}: an item is a string");
        i += 1;
        let start = i;
        while b.get(i).is_some_and(|&c| c != b'"') {
            let c = b[i];
            assert!((0x20..0x7f).contains(&c) && c != b'\\', "{v}");
            i += 1;
        }
        assert_eq!(b.get(i), Some(&b'"'), "{v}: an unterminated string");
        let name = v[start..i].to_owned();
        i += 1;
        let mut params = Vec::new();
        while b.get(i) == Some(&b';') {
            i += 1;
            let k = i;
            while b.get(i).is_some_and(u8::is_ascii_lowercase) {
                i += 1;
            }
            assert!(
                i > k && b.get(i) == Some(&b'='),
                "{v}: a parameter is key=value"
            );
            let key = v[k..i].to_owned();
            i += 1;
            let n = i;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            assert!(
                i > n && i - n <= 15,
                "{v}: an sf-integer has 1 to 15 digits"
            );
            params.push((key, v[n..i].parse().unwrap()));
        }
        out.push((name, params));
        while b.get(i) == Some(&b' ') {
            i += 1;
        }
        match b.get(i) {
            None => return out,
            Some(b',') => {
                i += 1;
                while b.get(i) == Some(&b' ') {
                    i += 1;
                }
            }
            Some(_) => panic!("{v}: junk after an item"),
        }
    }
}

fn rate_limit(rules: Vec<(String, u16, u32, u8)>, requests: u8) {
    let rules: Vec<Rule> = rules
        .into_iter()
        .take(4)
        .map(|(name, limit, window_ms, alg)| {
            let alg = [
                Algorithm::SlidingWindow,
                Algorithm::FixedWindow,
                Algorithm::Gcra,
            ][usize::from(alg % 3)];
            Rule::new(
                name,
                Quota::new(
                    u64::from(limit),
                    Duration::from_millis(u64::from(window_ms)),
                ),
            )
            .algorithm(alg)
        })
        .collect();
    let expected: Vec<(String, u64, u64)> = rules
        .iter()
        .map(|r| {
            let w = r.quota().window().as_micros().div_ceil(1_000_000).max(1) as u64;
            (r.name().to_owned(), r.quota().limit(), w)
        })
        .collect();
    // Bad names and quotas are refused when the layer is built, with a typed error.
    let Ok(layer) = RateLimitLayer::builder().rules(rules).build() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut svc = layer.layer(tower::service_fn(|_req: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new(()))
        }));
        for _ in 0..requests % 8 {
            let mut req = Request::new(());
            req.extensions_mut()
                .insert("192.0.2.1:9".parse::<SocketAddr>().unwrap());
            let res = svc.ready().await.unwrap().call(req).await.unwrap();
            let policies: Vec<_> = res
                .headers()
                .get_all("ratelimit-policy")
                .iter()
                .flat_map(|v| parse_list(v.to_str().unwrap()))
                .collect();
            let limits: Vec<_> = res
                .headers()
                .get_all("ratelimit")
                .iter()
                .flat_map(|v| parse_list(v.to_str().unwrap()))
                .collect();
            for (name, params) in &policies {
                let (_, q, w) = expected
                    .iter()
                    .find(|(n, ..)| n == name)
                    .expect("a rule's name");
                assert_eq!(params, &[("q".to_owned(), *q), ("w".to_owned(), *w)]);
            }
            for (name, params) in &limits {
                let (_, q, _) = expected
                    .iter()
                    .find(|(n, ..)| n == name)
                    .expect("a rule's name");
                assert_eq!(params.len(), 2);
                assert_eq!((params[0].0.as_str(), params[1].0.as_str()), ("r", "t"));
                assert!(params[0].1 <= *q, "r above the quota");
            }
            if res.status() == StatusCode::TOO_MANY_REQUESTS {
                let after: u64 = res.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(
                    limits.iter().any(|(_, p)| p[0].1 == 0 && p[1].1 == after),
                    "{limits:?} vs {after}"
                );
            }
        }
    });
}

fn forwarded(peer: [u8; 4], trusted: u8, values: Vec<Vec<u8>>) {
    let proxies: TrustedProxies = format!("10.0.0.0/{}", trusted % 33).parse().unwrap();
    let peer = IpAddr::from(peer);
    let mut req = Request::new(());
    req.extensions_mut().insert(SocketAddr::new(peer, 443));
    let mut written = String::new();
    for v in values.iter().take(4) {
        if let Ok(v) = HeaderValue::from_bytes(v) {
            written.push_str(&String::from_utf8_lossy(v.as_bytes()));
            written.push(',');
            req.headers_mut().append("x-forwarded-for", v);
        }
    }
    let client = proxies.client_ip(&req).expect("a peer address");
    if !proxies.is_trusted(peer) {
        assert_eq!(client, peer, "an untrusted peer is the client");
        return;
    }
    if client != peer {
        let hops: Vec<IpAddr> = written
            .split(',')
            .filter_map(|h| {
                let h = h.trim();
                h.parse::<IpAddr>()
                    .ok()
                    .or_else(|| h.parse::<SocketAddr>().ok().map(|s| s.ip()))
            })
            .collect();
        assert!(hops.contains(&client), "{client} is not in {written:?}");
    }
}

fuzz_target!(|input: Input| match input {
    Input::RetryAfter {
        seconds,
        date_secs,
        now_secs,
        ms,
        raw,
    } => {
        retry_after(seconds, date_secs, now_secs, ms, &raw);
    }
    Input::RateLimit { rules, requests } => rate_limit(rules, requests),
    Input::Forwarded {
        peer,
        trusted,
        values,
    } => forwarded(peer, trusted, values),
});
