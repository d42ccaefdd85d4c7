//! Who a limit applies to: the rate-limit key of a request.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use http::HeaderName;
use http::Request;

use super::error::{ParseIpNetError, ParseKeySourceError};
use crate::key::ApiKeyId;

/// The identity a rule counts against.
///
/// Keys never hold an API key in clear ([`RateKey::ApiKey`] is its hash), and IPv6 peers
/// are grouped by their /64 network.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum RateKey {
    /// One counter for everybody.
    Global,
    /// A peer address (an IPv6 address by its /64 network; see [`IpKey`]).
    Ip(IpKey),
    /// A hashed API key.
    ApiKey(ApiKeyId),
    /// An authenticated principal (see [`Principal`]); like a header value, an id longer
    /// than 64 bytes is kept as its hash.
    Principal(Arc<str>),
    /// The value of a header, as it is up to 64 bytes; a longer value is kept as its hash
    /// (`sha256:` and 32 hex digits), so a key costs the same bounded memory whatever a
    /// client sends (see [`MemoryStore`](super::MemoryStore)).
    Header(Arc<str>),
    /// Requests for which the rule's key source found nothing (shared by all of them).
    Anonymous,
}

/// One hasher write for an IP key (the common case on the hot path), where the derived
/// impl would make several (discriminants and words). Equal keys hash equally, as `Eq`
/// requires.
impl Hash for RateKey {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            RateKey::Global => state.write_u8(0),
            // One of the two words is zero for every grouped address (see `IpKey`).
            RateKey::Ip(ip) => state.write_u64(ip.hi ^ ip.lo),
            RateKey::ApiKey(id) => {
                state.write_u8(3);
                id.hash(state);
            }
            RateKey::Principal(p) => {
                state.write_u8(4);
                p.hash(state);
            }
            RateKey::Header(h) => {
                state.write_u8(5);
                h.hash(state);
            }
            RateKey::Anonymous => state.write_u8(6),
        }
    }
}

impl RateKey {
    /// The key for an IP address: IPv4 (and IPv4-mapped IPv6) as is, IPv6 by /64.
    ///
    /// ```
    /// use palisade::rate_limit::RateKey;
    /// let a = RateKey::ip("2001:db8:1:2:aaaa::1".parse().unwrap());
    /// let b = RateKey::ip("2001:db8:1:2:bbbb::2".parse().unwrap());
    /// assert_eq!(a, b);
    /// assert_eq!(a.to_string(), "ip:2001:db8:1:2::");
    /// ```
    #[inline]
    pub fn ip(ip: IpAddr) -> Self {
        RateKey::Ip(IpKey::new(ip))
    }

    /// A principal key (an id longer than [`MAX_HEADER_KEY_LEN`] bytes is hashed).
    pub fn principal(id: impl Into<Arc<str>>) -> Self {
        RateKey::Principal(bounded(id.into()))
    }

    /// The key of a header value: the value itself up to [`MAX_HEADER_KEY_LEN`] bytes, a
    /// hash of it beyond (as [`KeySource::Header`] reads it).
    ///
    /// ```
    /// use palisade::rate_limit::RateKey;
    /// assert_eq!(RateKey::header("user-42"), RateKey::Header("user-42".into()));
    /// let long = "x".repeat(16 * 1024);
    /// let RateKey::Header(kept) = RateKey::header(&long) else { unreachable!() };
    /// assert_eq!(kept.len(), 39); // "sha256:" and 32 hex digits
    /// assert_eq!(RateKey::header(&long), RateKey::header(&long));
    /// ```
    pub fn header(value: &str) -> Self {
        if value.len() <= MAX_HEADER_KEY_LEN {
            return RateKey::Header(Arc::from(value));
        }
        RateKey::Header(hashed(value))
    }

    /// The key of a header value given as bytes, as [`KeySource::Header`] reads it: a value
    /// that is not visible ASCII (`josé`, raw bytes) is a key of its own, kept as its hash,
    /// never the shared [`RateKey::Anonymous`].
    ///
    /// ```
    /// use palisade::rate_limit::RateKey;
    /// assert_eq!(RateKey::header_bytes(b"user-42"), RateKey::header("user-42"));
    /// let raw = RateKey::header_bytes(b"\xff\xfe");
    /// assert_ne!(raw, RateKey::header_bytes(b"\xff\xfd"));
    /// assert_ne!(raw, RateKey::Anonymous);
    /// ```
    pub fn header_bytes(value: &[u8]) -> Self {
        match std::str::from_utf8(value) {
            Ok(text)
                if value
                    .iter()
                    .all(|b| (0x20..0x7f).contains(b) || *b == b'\t') =>
            {
                Self::header(text)
            }
            // Not visible ASCII: hashed whatever its length, so a key never holds bytes a
            // log line or a store key could not carry.
            _ => RateKey::Header(hashed_bytes(value)),
        }
    }

    /// The key of an API key (hashed at once).
    pub fn api_key(key: &str) -> Self {
        RateKey::ApiKey(ApiKeyId::from_key(key))
    }
}

/// `text` itself when it is short, else its hash (see [`RateKey::header`]).
fn bounded(text: Arc<str>) -> Arc<str> {
    if text.len() <= MAX_HEADER_KEY_LEN {
        text
    } else {
        hashed(&text)
    }
}

fn hashed(text: &str) -> Arc<str> {
    hashed_bytes(text.as_bytes())
}

fn hashed_bytes(bytes: &[u8]) -> Arc<str> {
    Arc::from(format!("sha256:{}", ApiKeyId::from_key_bytes(bytes)))
}

/// The longest header value a [`RateKey::Header`] keeps as it is; longer ones are hashed.
pub const MAX_HEADER_KEY_LEN: usize = 64;

/// Shows the key for logs and store keys. Header values are redacted (they may be
/// secrets); principals and hashed API keys are shown as they are.
impl fmt::Display for RateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RateKey::Global => f.write_str("global"),
            RateKey::Ip(ip) => write!(f, "ip:{ip}"),
            RateKey::ApiKey(id) => write!(f, "key:{id}"),
            RateKey::Principal(p) => write!(f, "principal:{p}"),
            RateKey::Header(v) => write!(f, "header:{}", crate::key::redact(v)),
            RateKey::Anonymous => f.write_str("anonymous"),
        }
    }
}

/// The address a [`RateKey::Ip`] counts against: an IPv4 address as it is (IPv4-mapped
/// IPv6 addresses count as IPv4), an IPv6 address by its /64 network (one subscriber
/// usually holds a whole /64, so counting single addresses would be trivial to dodge).
///
/// It is kept as two aligned 64-bit words (the IPv4-mapped IPv6 form), not as an
/// `IpAddr`, whose bytes sit at odd offsets: building and copying a key on the request
/// path then costs plain register moves.
///
/// ```
/// use palisade::rate_limit::IpKey;
/// let v4 = IpKey::new("203.0.113.9".parse().unwrap());
/// assert_eq!(v4.addr().to_string(), "203.0.113.9");
/// assert_eq!(v4, IpKey::new("::ffff:203.0.113.9".parse().unwrap()));
/// let v6 = IpKey::new("2001:db8:1:2:aaaa::1".parse().unwrap());
/// assert_eq!(v6.to_string(), "2001:db8:1:2::");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct IpKey {
    hi: u64,
    lo: u64,
}

/// The upper half of the low word of an IPv4-mapped address (`::ffff:a.b.c.d`).
const MAPPED: u64 = 0xffff << 32;

impl IpKey {
    /// The key of `ip`, grouped as described on the type.
    #[inline]
    pub fn new(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::v4(v4.to_bits()),
            IpAddr::V6(v6) => Self::v6(v6.to_bits()),
        }
    }

    /// The key of a socket address's IP, read in place (no `IpAddr` copied on the way).
    #[inline(always)]
    fn of_socket(addr: &SocketAddr) -> Self {
        match addr {
            SocketAddr::V4(a) => Self::v4(a.ip().to_bits()),
            SocketAddr::V6(a) => Self::v6(a.ip().to_bits()),
        }
    }

    #[inline]
    const fn v4(bits: u32) -> Self {
        Self {
            hi: 0,
            lo: MAPPED | bits as u64,
        }
    }

    #[inline]
    const fn v6(bits: u128) -> Self {
        let (hi, lo) = ((bits >> 64) as u64, bits as u64);
        if hi == 0 && lo >> 32 == 0xffff {
            Self { hi, lo } // IPv4-mapped: the IPv4 key
        } else {
            Self { hi, lo: 0 }
        }
    }

    /// The key as one word and whether it is an IPv6 network: one of the two words is
    /// always zero, so `(hi ^ lo, hi != 0)` loses nothing (an IPv4 key's word carries the
    /// mapped prefix, so it never equals the zero word of the `::/64` network). The memory
    /// store keeps IP keys in this form; [`RateKey`]'s hash writes the same word.
    #[inline]
    pub(crate) const fn packed(&self) -> (u64, bool) {
        (self.hi ^ self.lo, self.hi != 0)
    }

    /// The address counted: the IPv4 address, or the IPv6 /64 network's first address.
    pub fn addr(&self) -> IpAddr {
        if self.hi == 0 && self.lo >> 32 == 0xffff {
            IpAddr::V4(Ipv4Addr::from_bits(self.lo as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from_bits(
                u128::from(self.hi) << 64 | u128::from(self.lo),
            ))
        }
    }
}

impl From<IpAddr> for IpKey {
    fn from(ip: IpAddr) -> Self {
        Self::new(ip)
    }
}

impl fmt::Display for IpKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.addr().fmt(f)
    }
}

impl fmt::Debug for IpKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IpKey({})", self.addr())
    }
}

/// The authenticated caller, put in the request extensions by an authentication layer;
/// rules keyed by [`KeySource::Principal`] count against it. It is the one type
/// [`crate::key::Principal`]: the budgets and the cost meter charge the same caller.
///
/// ```
/// use palisade::rate_limit::Principal;
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(Principal::new("user-42"));
/// assert!(req.extensions().get::<palisade::key::Principal>().is_some());
/// ```
pub use crate::key::Principal;

/// Where a rule finds its key.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum KeySource {
    /// One key for all requests.
    Global,
    /// The [`Principal`] request extension.
    Principal,
    /// The value of a header (for example `x-user-id`).
    Header(HeaderName),
    /// The API key in `x-api-key` or `authorization: Bearer`, hashed.
    ApiKey,
    /// The client's IP address (see [`TrustedProxies`] for `X-Forwarded-For`), read from
    /// axum's `ConnectInfo<SocketAddr>` (with the `axum` feature) or a [`SocketAddr`]
    /// request extension. A request with neither shares the `anonymous` key: the layer
    /// counts it in [`RuleCounters::no_key`](super::RuleCounters::no_key) and logs the
    /// first at `error`, since it means the server does not pass the address on.
    PeerIp,
    /// The [`Principal`] when the request has one, else the client's IP address (as
    /// [`KeySource::PeerIp`]): one limit for signed-in users and anonymous clients alike.
    PrincipalOrPeerIp,
}

impl KeySource {
    /// Finds the key of a request; `None` when the source is absent (no header, no key,
    /// no principal, no peer address).
    #[inline(always)]
    pub fn extract<B>(&self, req: &Request<B>, proxies: &TrustedProxies) -> Option<RateKey> {
        // The peer address and the global key in the caller's frame: returning a key
        // through memory from an out-of-line call stalls store forwarding when the caller
        // reads it back in wider words. The other sources cost far more than that.
        match self {
            KeySource::Global => Some(RateKey::Global),
            KeySource::PeerIp => proxies.client_key(req).map(RateKey::Ip),
            _ => self.extract_other(req, proxies),
        }
    }

    #[inline(never)]
    fn extract_other<B>(&self, req: &Request<B>, proxies: &TrustedProxies) -> Option<RateKey> {
        match self {
            KeySource::Global => Some(RateKey::Global),
            KeySource::Principal => req
                .extensions()
                .get::<Principal>()
                .map(|p| RateKey::Principal(bounded(p.shared_id().clone()))),
            KeySource::Header(name) => {
                let value = req.headers().get(name)?.as_bytes().trim_ascii();
                (!value.is_empty()).then(|| RateKey::header_bytes(value))
            }
            KeySource::ApiKey => ApiKeyId::from_headers(req.headers()).map(RateKey::ApiKey),
            KeySource::PeerIp => proxies.client_ip(req).map(RateKey::ip),
            KeySource::PrincipalOrPeerIp => KeySource::Principal
                .extract_other(req, proxies)
                .or_else(|| proxies.client_key(req).map(RateKey::Ip)),
        }
    }
}

impl FromStr for KeySource {
    type Err = ParseKeySourceError;

    /// `global`, `principal`, `api_key`, `ip`, `principal_or_ip`, or `header:<name>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s {
            "global" => Ok(KeySource::Global),
            "principal" => Ok(KeySource::Principal),
            "api_key" => Ok(KeySource::ApiKey),
            "ip" | "peer_ip" => Ok(KeySource::PeerIp),
            "principal_or_ip" => Ok(KeySource::PrincipalOrPeerIp),
            _ => match s.strip_prefix("header:") {
                Some(name) => HeaderName::from_str(name.trim())
                    .map(KeySource::Header)
                    .map_err(|_| {
                        ParseKeySourceError(format!("`{name}` is not a valid header name"))
                    }),
                None => Err(ParseKeySourceError(format!(
                    "unknown key source `{s}`: expected global, principal, api_key, ip, principal_or_ip or header:<name>"
                ))),
            },
        }
    }
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Global => f.write_str("global"),
            KeySource::Principal => f.write_str("principal"),
            KeySource::Header(h) => write!(f, "header:{h}"),
            KeySource::ApiKey => f.write_str("api_key"),
            KeySource::PeerIp => f.write_str("ip"),
            KeySource::PrincipalOrPeerIp => f.write_str("principal_or_ip"),
        }
    }
}

/// An IP network such as `10.0.0.0/8` or `2001:db8::/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Whether `ip` is inside the network. IPv4 and IPv4-mapped IPv6 (`::ffff:10.0.0.1`)
    /// are the same address both ways: `10.0.0.0/8` holds `::ffff:10.0.0.1`, and
    /// `::ffff:10.0.0.0/104` holds `10.0.0.1`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        // Both in the IPv6 space, an IPv4 network as its mapped form (`/8` is `/104`).
        let (net, prefix) = match self.addr {
            IpAddr::V4(v4) => (v4.to_ipv6_mapped().to_bits(), u32::from(self.prefix) + 96),
            IpAddr::V6(v6) => (v6.to_bits(), u32::from(self.prefix)),
        };
        let ip = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().to_bits(),
            IpAddr::V6(v6) => v6.to_bits(),
        };
        let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
        net & mask == ip & mask
    }
}

impl FromStr for IpNet {
    type Err = ParseIpNetError;

    /// `addr/prefix`, or a bare address (a single host).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| ParseIpNetError(format!("`{s}` is not an IP address or network")))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| {
                ParseIpNetError(format!("`{s}` has an invalid prefix length (0..={max})"))
            })?,
            None => max,
        };
        Ok(IpNet { addr, prefix })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The proxies whose `X-Forwarded-For` is believed.
///
/// The peer address comes from axum's `ConnectInfo<SocketAddr>` (with the `axum` feature)
/// or a [`SocketAddr`] request extension. When the peer is a trusted proxy, the client is
/// the **rightmost** address in `X-Forwarded-For` that is not itself a trusted proxy: the
/// entries to its left were written by the client and prove nothing, so a spoofed leftmost
/// entry never changes the key. With no trusted proxies, `X-Forwarded-For` is ignored.
///
/// ```
/// use std::net::SocketAddr;
/// use palisade::rate_limit::TrustedProxies;
///
/// let proxies: TrustedProxies = "10.0.0.0/8".parse().unwrap();
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert("10.0.0.5:443".parse::<SocketAddr>().unwrap());
/// req.headers_mut().insert("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.0.0.7".parse().unwrap());
/// assert_eq!(proxies.client_ip(&req), Some("203.0.113.9".parse().unwrap()));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    /// Whether no proxy is trusted (the peer address is always the client).
    pub(crate) fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// No trusted proxies: the peer address is the client.
    pub fn none() -> Self {
        Self::default()
    }

    /// Trusts these networks.
    pub fn new(nets: impl IntoIterator<Item = IpNet>) -> Self {
        Self {
            nets: nets.into_iter().collect(),
        }
    }

    /// The trusted networks.
    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }

    /// Whether `ip` is a trusted proxy.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|n| n.contains(ip))
    }

    /// The key of the client's address: [`TrustedProxies::client_ip`] grouped into an
    /// [`IpKey`], read straight from the peer address when no proxy is trusted.
    ///
    /// ```
    /// use std::net::SocketAddr;
    /// use palisade::rate_limit::{IpKey, TrustedProxies};
    ///
    /// let mut req = http::Request::new(());
    /// req.extensions_mut().insert("[2001:db8:1:2::7]:443".parse::<SocketAddr>().unwrap());
    /// let key = TrustedProxies::none().client_key(&req).unwrap();
    /// assert_eq!(key, IpKey::new("2001:db8:1:2::".parse().unwrap()));
    /// assert_eq!(key.to_string(), "2001:db8:1:2::");
    /// ```
    #[inline(always)]
    pub fn client_key<B>(&self, req: &Request<B>) -> Option<IpKey> {
        if self.nets.is_empty() {
            return peer_key(req);
        }
        self.client_ip(req).map(IpKey::new)
    }

    /// The client's address for a request, as described on the type.
    #[inline]
    pub fn client_ip<B>(&self, req: &Request<B>) -> Option<IpAddr> {
        let peer = peer_addr(req)?;
        if self.nets.is_empty() {
            return Some(peer);
        }
        Some(self.behind_proxies(peer, req))
    }

    /// The client behind `peer` when `peer` is a trusted proxy (else `peer`).
    #[inline(never)]
    fn behind_proxies<B>(&self, peer: IpAddr, req: &Request<B>) -> IpAddr {
        if !self.is_trusted(peer) {
            return peer;
        }
        let mut client = peer;
        for value in req.headers().get_all("x-forwarded-for").iter().rev() {
            // Hop by hop from the right, as bytes: unreadable bytes the client wrote to the
            // left do not hide the hops the proxies appended.
            for hop in value.as_bytes().rsplit(|&b| b == b',') {
                let Some(ip) = std::str::from_utf8(hop).ok().and_then(parse_hop) else {
                    // Garbage from an untrusted writer: stop at the last good hop.
                    return client;
                };
                client = ip;
                if !self.is_trusted(ip) {
                    return ip;
                }
            }
        }
        client
    }
}

impl FromStr for TrustedProxies {
    type Err = ParseIpNetError;

    /// A comma-separated list of networks (`10.0.0.0/8, 192.168.0.1`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(IpNet::from_str)
            .collect::<Result<Vec<_>, _>>()
            .map(|nets| TrustedProxies { nets })
    }
}

fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    // `[v6]:port` or `v4:port`
    hop.parse::<SocketAddr>().ok().map(|s| s.ip())
}

/// The peer's socket address: axum's `ConnectInfo<SocketAddr>` (with the `axum` feature) or
/// a `SocketAddr` extension.
#[inline(always)]
fn peer_socket<B>(req: &Request<B>) -> Option<&SocketAddr> {
    #[cfg(feature = "axum")]
    if let Some(info) = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some(&info.0);
    }
    req.extensions().get::<SocketAddr>()
}

/// The peer address's key, read in place (see [`IpKey`]).
#[inline(always)]
pub(crate) fn peer_key<B>(req: &Request<B>) -> Option<IpKey> {
    peer_socket(req).map(IpKey::of_socket)
}

#[inline]
fn peer_addr<B>(req: &Request<B>) -> Option<IpAddr> {
    peer_socket(req).map(SocketAddr::ip)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::hash::BuildHasher;

    use super::*;

    #[test]
    fn equal_keys_hash_equally_and_kinds_stay_apart() {
        let hasher = foldhash::fast::FixedState::with_seed(7);
        let h = |k: &RateKey| hasher.hash_one(k);
        let a = RateKey::ip("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = RateKey::ip("2001:db8:1:2:bbbb::2".parse().unwrap());
        assert_eq!(a, b);
        assert_eq!(h(&a), h(&b));
        let v4 = RateKey::ip("10.0.0.1".parse().unwrap());
        assert_eq!(h(&v4), h(&RateKey::ip("10.0.0.1".parse().unwrap())));
        let keys = [
            RateKey::Global,
            RateKey::Anonymous,
            v4,
            RateKey::ip("10.0.0.2".parse().unwrap()),
            a,
            RateKey::ApiKey(ApiKeyId::from_key("sk-test")),
            RateKey::Principal(Arc::from("alice")),
            RateKey::Header(Arc::from("alice")),
        ];
        let hashes: HashSet<u64> = keys.iter().map(h).collect();
        assert_eq!(
            hashes.len(),
            keys.len(),
            "distinct keys, distinct hashes here"
        );
    }

    #[test]
    fn ip_keys_round_trip_and_never_mix_families() {
        let zero_v4 = IpKey::new("0.0.0.0".parse().unwrap());
        let zero_v6 = IpKey::new("::".parse().unwrap());
        assert_ne!(zero_v4, zero_v6);
        assert_eq!(zero_v4.addr().to_string(), "0.0.0.0");
        assert_eq!(zero_v6.addr().to_string(), "::");
        // loopback v6 groups into `::/64`, not into an IPv4 key
        assert_eq!(IpKey::new("::1".parse().unwrap()), zero_v6);
        assert_eq!(
            RateKey::ip("::ffff:10.1.2.3".parse().unwrap()).to_string(),
            "ip:10.1.2.3"
        );
        assert_eq!(format!("{zero_v4:?}"), "IpKey(0.0.0.0)");
    }

    #[test]
    fn long_principals_and_header_values_are_kept_as_hashes() {
        let long = "p".repeat(10_000);
        let mut req = Request::new(());
        req.extensions_mut().insert(Principal::new(long.as_str()));
        req.headers_mut().insert("x-user-id", long.parse().unwrap());
        let none = TrustedProxies::none();
        for (source, key) in [
            (KeySource::Principal, RateKey::principal(long.as_str())),
            (
                KeySource::Header(HeaderName::from_static("x-user-id")),
                RateKey::header(&long),
            ),
        ] {
            let got = source.extract(&req, &none).unwrap();
            assert_eq!(got, key);
            let (RateKey::Principal(text) | RateKey::Header(text)) = &got else {
                unreachable!()
            };
            assert_eq!(text.len(), 39, "{got}");
        }
        assert_eq!(
            RateKey::principal("user-42"),
            RateKey::Principal("user-42".into())
        );
        assert_eq!(
            RateKey::header(&"h".repeat(64)),
            RateKey::Header("h".repeat(64).into())
        );
    }

    #[test]
    fn trusted_proxies_in_ipv4_mapped_form_match_both_ways() {
        let mapped: TrustedProxies = "::ffff:10.0.0.1".parse().unwrap();
        assert!(mapped.is_trusted("10.0.0.1".parse().unwrap()));
        assert!(mapped.is_trusted("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!mapped.is_trusted("10.0.0.2".parse().unwrap()));
        let mapped_net: TrustedProxies = "::ffff:10.0.0.0/104".parse().unwrap();
        assert!(mapped_net.is_trusted("10.200.0.9".parse().unwrap()));
        assert!(!mapped_net.is_trusted("11.0.0.1".parse().unwrap()));
        let v4: TrustedProxies = "10.0.0.0/8".parse().unwrap();
        assert!(v4.is_trusted("::ffff:10.1.2.3".parse().unwrap()));
        assert!(v4.is_trusted("10.1.2.3".parse().unwrap()));
        assert!(
            !v4.is_trusted("::10.1.2.3".parse().unwrap()),
            "IPv4-compatible is not mapped"
        );
        assert!(!v4.is_trusted("2001:db8::1".parse().unwrap()));
        let everything: TrustedProxies = "0.0.0.0/0".parse().unwrap();
        assert!(everything.is_trusted("::ffff:1.2.3.4".parse().unwrap()));
        assert!(
            !everything.is_trusted("2001:db8::1".parse().unwrap()),
            "IPv4 only"
        );
        let all_v6: TrustedProxies = "::/0".parse().unwrap();
        assert!(all_v6.is_trusted("2001:db8::1".parse().unwrap()));

        // over a request: a proxy at ::ffff:10.0.0.1 (a dual-stack socket) is believed
        let mut req = Request::new(());
        req.extensions_mut()
            .insert("[::ffff:10.0.0.1]:443".parse::<SocketAddr>().unwrap());
        req.headers_mut()
            .insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
        assert_eq!(mapped.client_ip(&req), Some("203.0.113.9".parse().unwrap()));
        assert_eq!(v4.client_ip(&req), Some("203.0.113.9".parse().unwrap()));
    }

    proptest::proptest! {
        #[test]
        fn ip_keys_keep_v4_whole_and_v6_by_64(v4 in proptest::prelude::any::<u32>(), v6 in proptest::prelude::any::<u128>()) {
            let a = IpAddr::V4(Ipv4Addr::from_bits(v4));
            proptest::prop_assert_eq!(IpKey::new(a).addr(), a);
            let b = Ipv6Addr::from_bits(v6);
            let expected = match b.to_ipv4_mapped() {
                Some(m) => IpAddr::V4(m),
                None => IpAddr::V6(Ipv6Addr::from_bits(v6 & !((1u128 << 64) - 1))),
            };
            proptest::prop_assert_eq!(IpKey::new(IpAddr::V6(b)).addr(), expected);
            proptest::prop_assert_eq!(IpKey::new(IpAddr::V6(b)) == IpKey::new(a), expected == a);
        }
    }
}
