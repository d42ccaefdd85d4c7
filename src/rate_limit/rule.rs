//! Rules: which requests a limit applies to, whom it counts, and how much each costs.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use http::Method;
use http::Request;

use super::algorithm::Params;
use super::error::{ParseRouteError, RateLimitConfigError};
use super::key::KeySource;
use super::quota::{Algorithm, Quota};

/// Which paths a rule matches.
///
/// Paths are compared **normalised**, both the route and the request's path, so a client
/// cannot step around a rule by spelling the same resource differently: empty segments
/// (`//v1/messages`, `/v1/messages/`) and `.` segments are dropped, `..` removes the
/// segment before it (a rule also matches the path with `..` kept as a segment, as routers
/// that do not resolve it see it, so `/v1/messages/..` stays under `/v1/messages/*`), and
/// percent-encoded unreserved characters (letters, digits, `-`,
/// `.`, `_`, `~`) are decoded (`/v1/%6Dessages` is `/v1/messages`). Other escapes, `%2F`
/// among them, stay as they are. Matching is case-sensitive.
///
/// ```
/// use palisade::rate_limit::Route;
/// let r: Route = "/v1/messages".parse().unwrap();
/// for path in ["/v1/messages", "/v1/messages/", "//v1/messages", "/v1/./x/../messages", "/v1/%6Dessages"] {
///     assert!(r.matches(path), "{path}");
/// }
/// assert!(!r.matches("/v1/messages%2Fx"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Route {
    /// Every request.
    All,
    /// Exactly this path.
    Exact(Arc<str>),
    /// This path and everything below it (`/v1/` matches `/v1/messages`).
    Prefix(Arc<str>),
    /// A template with `{name}` segments matching any one segment and an optional final
    /// `{*rest}` matching the rest (`/v1/users/{id}/messages`).
    Template(Arc<[Segment]>),
}

/// One segment of a [`Route::Template`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Segment {
    /// A literal segment.
    Literal(Box<str>),
    /// `{name}`: any one non-empty segment.
    Param,
    /// `{*name}`: any remaining segments (last only).
    Rest,
}

impl Route {
    /// Parses a route: `*` (all), `/path` (exact), `/prefix/*` (prefix) or a template
    /// with `{param}` segments.
    ///
    /// ```
    /// use palisade::rate_limit::Route;
    /// let r: Route = "/v1/users/{id}/messages".parse().unwrap();
    /// assert!(r.matches("/v1/users/42/messages"));
    /// assert!(!r.matches("/v1/users/42/files"));
    /// let p: Route = "/v1/*".parse().unwrap();
    /// assert!(p.matches("/v1/messages") && !p.matches("/v2/messages"));
    /// ```
    pub fn parse(s: &str) -> Result<Self, ParseRouteError> {
        Self::parse_inner(s).map_err(ParseRouteError)
    }

    fn parse_inner(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "*" || s.is_empty() {
            return Ok(Route::All);
        }
        if !s.starts_with('/') {
            return Err(format!("route `{s}` must start with `/` (or be `*`)"));
        }
        if let Some(prefix) = s.strip_suffix('*') {
            if prefix.contains(['{', '}', '*']) {
                return Err(format!(
                    "route `{s}`: a prefix route cannot hold parameters"
                ));
            }
            // `/v1/*`: the normalised `/v1` and a `/` after it
            let mut normal = normalize_path(prefix).into_owned();
            if prefix.ends_with('/') && normal != "/" {
                normal.push('/');
            }
            return Ok(Route::Prefix(Arc::from(normal)));
        }
        let normal = normalize_path(s);
        let s = &*normal;
        if !s.contains(['{', '}']) {
            return Ok(Route::Exact(Arc::from(s)));
        }
        let pieces: Vec<&str> = s[1..].split('/').collect();
        let mut segments = Vec::with_capacity(pieces.len());
        for (i, piece) in pieces.iter().enumerate() {
            let seg = match piece.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                Some(name) if name.starts_with('*') => {
                    if i + 1 != pieces.len() {
                        return Err(format!(
                            "route `{s}`: `{{{name}}}` must be the last segment"
                        ));
                    }
                    Segment::Rest
                }
                Some(name) if !name.is_empty() && !name.contains(['{', '}']) => Segment::Param,
                Some(_) => return Err(format!("route `{s}`: empty or nested parameter")),
                None if piece.contains(['{', '}']) => {
                    return Err(format!(
                        "route `{s}`: a parameter must be a whole segment (`{piece}`)"
                    ));
                }
                None => Segment::Literal((*piece).into()),
            };
            segments.push(seg);
        }
        Ok(Route::Template(segments.into()))
    }

    /// Whether `path` matches, once normalised (see the type's docs).
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Route::All => return true,
            // An exact route is held normalised, and normalising is idempotent: a path
            // equal to it normalises to it (the common case, without a scan).
            Route::Exact(p) if path == &**p => return true,
            _ => {}
        }
        if self.matches_normal(&normalize_path(path)) {
            return true;
        }
        // A router that does not resolve `..` (axum's does not) sends
        // `/v1/messages/..` to a `/v1/messages/{*rest}` handler: match that form too.
        literal_path(path).is_some_and(|literal| self.matches_normal(&literal))
    }

    fn matches_normal(&self, path: &str) -> bool {
        match self {
            Route::All => true,
            Route::Exact(p) => path == &**p,
            // `/v1/*` also holds `/v1` itself (`/v1/` before normalisation)
            Route::Prefix(p) => {
                path.starts_with(&**p) || p.strip_suffix('/').is_some_and(|dir| path == dir)
            }
            Route::Template(segments) => {
                let Some(rest) = path.strip_prefix('/') else {
                    return false;
                };
                let mut parts = rest.split('/');
                for seg in segments.iter() {
                    match seg {
                        Segment::Rest => return true,
                        Segment::Param => match parts.next() {
                            Some(p) if !p.is_empty() => {}
                            _ => return false,
                        },
                        Segment::Literal(l) => {
                            if parts.next() != Some(&**l) {
                                return false;
                            }
                        }
                    }
                }
                parts.next().is_none()
            }
        }
    }
}

/// The path as rules compare it (see [`Route`]): borrowed as it is when it is already
/// normal, which is the common case and costs one scan.
pub(crate) fn normalize_path(path: &str) -> Cow<'_, str> {
    if is_normal(path) {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path);
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    if segments.is_empty() {
        return Cow::Borrowed("/");
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in segments {
        out.push('/');
        out.push_str(segment);
    }
    Cow::Owned(out)
}

/// The path with empty and `.` segments dropped and escapes of unreserved characters
/// decoded, but `..` kept as a segment; `None` when it has no `..` segment (then it is
/// the normal form).
fn literal_path(path: &str) -> Option<String> {
    let decoded = decode_unreserved(path);
    if !decoded.split('/').any(|s| s == "..") {
        return None;
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in decoded.split('/').filter(|s| !s.is_empty() && *s != ".") {
        out.push('/');
        out.push_str(segment);
    }
    Some(out)
}

/// Whether `path` is already normal: absolute, no escapes, no empty, `.` or `..` segments.
fn is_normal(path: &str) -> bool {
    if path == "/" {
        return true;
    }
    let Some(rest) = path.strip_prefix('/') else {
        // `*` (OPTIONS) or an empty path: nothing to normalise
        return !path.contains(['/', '%']);
    };
    !path.contains('%')
        && rest
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..")
}

/// [`decode_once`] until nothing changes: a `%` that starts no escape can form one with
/// what an escape decodes to (`%%34a` gives `%4a` once, then `J`), and normalising must give
/// the same path when applied twice.
fn decode_unreserved(path: &str) -> Cow<'_, str> {
    let mut decoded = decode_once(path);
    while let Cow::Owned(current) = &decoded {
        match decode_once(current) {
            Cow::Owned(next) if next != *current => decoded = Cow::Owned(next),
            _ => break,
        }
    }
    decoded
}

/// Decodes `%XX` escapes of unreserved characters (RFC 3986: letters, digits, `-`, `.`,
/// `_`, `~`), which name the same resource as the character itself; others stay encoded.
fn decode_once(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) {
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    out.push(c as char);
                    i += 3;
                    continue;
                }
            }
        }
        // `path` is a str: copy the whole character starting here
        let ch = path[i..].chars().next().unwrap_or('\u{fffd}');
        out.push(ch);
        i += ch.len_utf8();
    }
    Cow::Owned(out)
}

impl FromStr for Route {
    type Err = ParseRouteError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Route::parse(s)
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::All => f.write_str("*"),
            Route::Exact(p) => f.write_str(p),
            Route::Prefix(p) => write!(f, "{p}*"),
            Route::Template(segments) => {
                for seg in segments.iter() {
                    match seg {
                        Segment::Literal(l) => write!(f, "/{l}")?,
                        Segment::Param => f.write_str("/{param}")?,
                        Segment::Rest => f.write_str("/{*rest}")?,
                    }
                }
                Ok(())
            }
        }
    }
}

/// The cost of a request to a rule, set by an earlier layer or handler in the request
/// extensions (for example the estimated tokens of a chat request). Rules with
/// [`Cost::Extension`] or [`Cost::Settled`] read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestCost(pub u64);

/// How many units a request spends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Cost {
    /// A fixed number of units (1 for a plain request limit).
    Fixed(u64),
    /// The [`RequestCost`] extension, or `default` without one.
    Extension {
        /// Used when the request carries no [`RequestCost`].
        default: u64,
    },
    /// A quantity known only after the response (tokens): reserve the [`RequestCost`]
    /// extension (or `estimate`) before the call, then settle the actual amount with the
    /// [`Reservation`](super::Reservation) found in the request extensions.
    Settled {
        /// Reserved when the request carries no [`RequestCost`].
        estimate: u64,
    },
}

impl Cost {
    pub(crate) fn of<B>(&self, req: &Request<B>) -> u64 {
        match *self {
            Cost::Fixed(n) => n,
            Cost::Extension { default: n } | Cost::Settled { estimate: n } => {
                req.extensions().get::<RequestCost>().map_or(n, |c| c.0)
            }
        }
    }
}

impl Default for Cost {
    fn default() -> Self {
        Cost::Fixed(1)
    }
}

/// One limit: a name, the requests it matches, whom it counts, its quota and algorithm,
/// and the cost of a request.
///
/// ```
/// use palisade::rate_limit::{Algorithm, KeySource, Quota, Rule};
/// let rule = Rule::new("chat", Quota::per_minute(20))
///     .post("/v1/messages")
///     .key(KeySource::ApiKey)
///     .algorithm(Algorithm::Gcra);
/// assert_eq!(rule.name(), "chat");
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct Rule {
    pub(crate) name: Arc<str>,
    pub(crate) method: Option<Method>,
    pub(crate) route: Route,
    pub(crate) key: KeySource,
    pub(crate) quota: Quota,
    pub(crate) algorithm: Algorithm,
    pub(crate) strict: bool,
    pub(crate) cost: Cost,
    pub(crate) shadow: bool,
    pub(crate) skip_anonymous: bool,
    pub(crate) route_error: Option<String>,
}

impl Rule {
    /// A rule named `name` enforcing `quota` on every request, keyed globally, with the
    /// sliding window and a cost of 1.
    pub fn new(name: impl Into<Arc<str>>, quota: Quota) -> Self {
        Self {
            name: name.into(),
            method: None,
            route: Route::All,
            key: KeySource::Global,
            quota,
            algorithm: Algorithm::SlidingWindow,
            strict: false,
            cost: Cost::Fixed(1),
            shadow: false,
            skip_anonymous: false,
            route_error: None,
        }
    }

    /// Preset: `chat`, 20 requests a minute per API key ([`KeySource::ApiKey`]) on
    /// `POST /v1/messages` (Anthropic's Messages API path).
    ///
    /// ```
    /// use palisade::rate_limit::{RateLimitLayer, Rule};
    /// let layer = RateLimitLayer::new([
    ///     Rule::chat(),
    ///     Rule::bot_creation(),
    ///     Rule::orchestrator(),
    ///     Rule::global(),
    /// ])
    /// .unwrap();
    /// assert_eq!(layer.limiter().rules(), ["chat", "bot_creation", "orchestrator", "global"]);
    /// assert_eq!(Rule::chat().quota(), palisade::rate_limit::Quota::per_minute(20));
    /// ```
    pub fn chat() -> Self {
        Rule::new("chat", Quota::per_minute(20))
            .post("/v1/messages")
            .key(KeySource::ApiKey)
    }

    /// Preset: `bot_creation`, 10 a hour per user ([`KeySource::Principal`]) on
    /// `POST /v1/bots`.
    pub fn bot_creation() -> Self {
        Rule::new("bot_creation", Quota::per_hour(10))
            .post("/v1/bots")
            .key(KeySource::Principal)
    }

    /// Preset: `orchestrator`, 30 a minute per user ([`KeySource::Principal`]) on
    /// `POST /v1/orchestrator/*` (`/v1/orchestrator/parse-intent` and its siblings).
    pub fn orchestrator() -> Self {
        Rule::new("orchestrator", Quota::per_minute(30))
            .post("/v1/orchestrator/*")
            .key(KeySource::Principal)
    }

    /// Preset: `global`, 100 requests a minute per user, or per client IP for requests
    /// without a [`Principal`](super::Principal) ([`KeySource::PrincipalOrPeerIp`]), on
    /// every route and method.
    pub fn global() -> Self {
        Rule::new("global", Quota::per_minute(100)).key(KeySource::PrincipalOrPeerIp)
    }

    /// Matches only this method.
    pub fn method(mut self, method: Method) -> Self {
        self.method = Some(method);
        self
    }

    /// Matches only this route (see [`Route`]).
    pub fn route(mut self, route: Route) -> Self {
        self.route = route;
        self.route_error = None;
        self
    }

    /// `POST` to exactly `path` (a template if it holds `{param}` segments).
    /// A path that does not parse is reported by the layer's `build`.
    pub fn post(mut self, path: &str) -> Self {
        match Route::parse(path) {
            Ok(route) => self.route = route,
            Err(reason) => self.route_error = Some(reason.0),
        }
        self.method(Method::POST)
    }

    /// Counts against this key.
    pub fn key(mut self, key: KeySource) -> Self {
        self.key = key;
        self
    }

    /// Enforces with this algorithm.
    pub fn algorithm(mut self, algorithm: Algorithm) -> Self {
        self.algorithm = algorithm;
        self
    }

    /// Strict sliding window: never more than the limit in any span of one window (see
    /// [`algorithm`](super::algorithm)). Only valid with [`Algorithm::SlidingWindow`].
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// The cost of a matching request.
    pub fn cost(mut self, cost: Cost) -> Self {
        self.cost = cost;
        self
    }

    /// Shadow mode: decide, count and log, but never refuse.
    pub fn shadow(mut self, shadow: bool) -> Self {
        self.shadow = shadow;
        self
    }

    /// Skip the rule for requests where the key source finds nothing, instead of counting
    /// all of them against one shared `anonymous` key (the default).
    pub fn skip_anonymous(mut self, skip: bool) -> Self {
        self.skip_anonymous = skip;
        self
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The quota.
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// Whether the rule is in shadow mode.
    pub fn is_shadow(&self) -> bool {
        self.shadow
    }

    #[inline]
    pub(crate) fn matches<B>(&self, req: &Request<B>) -> bool {
        // `Route::All` needs no path (`Uri::path` is not free).
        self.method.as_ref().is_none_or(|m| req.method() == m)
            && (matches!(self.route, Route::All) || self.route.matches(req.uri().path()))
    }

    pub(crate) fn params(&self, quota: Quota) -> Params {
        Params::new(self.algorithm, quota).strict(self.strict)
    }

    pub(crate) fn validate(&self) -> Result<(), RateLimitConfigError> {
        let rule = self.name.to_string();
        if self.name.is_empty()
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        {
            return Err(RateLimitConfigError::InvalidName { rule });
        }
        if let Some(reason) = &self.route_error {
            return Err(RateLimitConfigError::Invalid {
                rule,
                field: "route",
                reason: reason.clone(),
            });
        }
        validate_quota(&rule, self.quota)?;
        if self.strict && self.algorithm != Algorithm::SlidingWindow {
            return Err(RateLimitConfigError::StrictNeedsSlidingWindow { rule });
        }
        Ok(())
    }
}

pub(crate) fn validate_quota(rule: &str, quota: Quota) -> Result<(), RateLimitConfigError> {
    if quota.limit() == 0 {
        return Err(RateLimitConfigError::ZeroLimit { rule: rule.into() });
    }
    if quota.window().as_micros() == 0 {
        return Err(RateLimitConfigError::ZeroWindow { rule: rule.into() });
    }
    if quota.burst() == 0 {
        return Err(RateLimitConfigError::ZeroBurst { rule: rule.into() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_the_normalised_path() {
        let exact: Route = "/v1/messages".parse().unwrap();
        for path in [
            "/v1/messages",
            "/v1/messages/",
            "//v1/messages",
            "/v1//messages",
            "/v1/./messages",
            "/v1/x/../messages",
            "/../v1/messages",
            "/v1/%6Dessages",
            "/v1/%6despages/../messages",
            "/%76%31/messages",
            "/v1/%2e/messages",
            "/v1/x/%2E%2E/messages",
        ] {
            assert!(exact.matches(path), "{path}");
        }
        for path in [
            "/v1/messages%2F",
            "/v1/messagesx",
            "/V1/messages",
            "/v1",
            "/v1/messages/x",
        ] {
            assert!(!exact.matches(path), "{path}");
        }
        let prefix: Route = "/v1/*".parse().unwrap();
        for path in [
            "/v1/messages",
            "//v1/messages",
            "/v1/",
            "/v1",
            "/x/../v1/a",
            "/%76%31/a",
        ] {
            assert!(prefix.matches(path), "{path}");
        }
        assert!(!prefix.matches("/v2/messages") && !prefix.matches("/v1x"));
        let template: Route = "/v1/users/{id}/messages".parse().unwrap();
        assert!(template.matches("/v1/users/42/messages/"));
        assert!(template.matches("/v1//users/42/messages"));
        assert!(!template.matches("/v1/users//messages"));
        // a route written unnormalised means the same
        let written: Route = "/v1//messages/".parse().unwrap();
        assert_eq!(written, exact);
        assert_eq!(normalize_path("/"), "/");
        assert_eq!(normalize_path("//"), "/");
        assert_eq!(normalize_path("/a/%zz/%"), "/a/%zz/%");
        assert_eq!(normalize_path("/é/%C3%A9"), "/é/%C3%A9");
        assert!(matches!(normalize_path("/v1/messages"), Cow::Borrowed(_)));
    }

    #[tokio::test]
    async fn a_rule_is_not_skipped_by_spelling_the_path_differently() {
        use tower::{Layer, ServiceExt, service_fn};
        let layer = crate::rate_limit::RateLimitLayer::new([Rule::new(
            "chat",
            crate::rate_limit::Quota::per_minute(1),
        )
        .post("/v1/messages")])
        .unwrap();
        let svc = layer.layer(service_fn(|_req: Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<
                bytes::Bytes,
            >::new()))
        }));
        let req = |path: &str| Request::post(path).body(()).unwrap();
        assert_eq!(
            svc.clone()
                .oneshot(req("/v1/messages"))
                .await
                .unwrap()
                .status(),
            200
        );
        for path in [
            "/v1/messages/",
            "//v1/messages",
            "/v1/%6Dessages",
            "/v1/./messages",
        ] {
            assert_eq!(
                svc.clone().oneshot(req(path)).await.unwrap().status(),
                429,
                "{path}"
            );
        }
    }
}

#[cfg(test)]
mod preset_tests {
    use std::net::SocketAddr;

    use http::Request;

    use super::*;
    use crate::rate_limit::key::{Principal, TrustedProxies};
    use crate::rate_limit::{RateKey, RateLimitLayer};

    #[test]
    fn presets_say_what_they_count() {
        let post = |path: &str| Request::post(path).body(()).unwrap();
        let chat = Rule::chat();
        assert_eq!((chat.name(), chat.quota()), ("chat", Quota::per_minute(20)));
        assert!(chat.matches(&post("/v1/messages")) && !chat.matches(&post("/v1/bots")));
        assert!(matches!(chat.key, KeySource::ApiKey));
        let bots = Rule::bot_creation();
        assert_eq!(bots.quota(), Quota::per_hour(10));
        assert!(bots.matches(&post("/v1/bots")));
        assert!(!bots.matches(&Request::get("/v1/bots").body(()).unwrap()));
        assert!(matches!(bots.key, KeySource::Principal));
        let orchestrator = Rule::orchestrator();
        assert_eq!(orchestrator.quota(), Quota::per_minute(30));
        assert!(orchestrator.matches(&post("/v1/orchestrator/parse-intent")));
        let global = Rule::global();
        assert_eq!(global.quota(), Quota::per_minute(100));
        assert!(global.matches(&Request::get("/anything").body(()).unwrap()));
        let layer = RateLimitLayer::new([
            Rule::chat(),
            Rule::bot_creation(),
            Rule::orchestrator(),
            Rule::global(),
        ])
        .unwrap();
        assert_eq!(layer.limiter().rules().len(), 4);

        // per user, or per IP without one
        let none = TrustedProxies::none();
        let mut req = post("/");
        req.extensions_mut()
            .insert("203.0.113.9:1".parse::<SocketAddr>().unwrap());
        assert_eq!(
            global.key.extract(&req, &none),
            Some(RateKey::ip("203.0.113.9".parse().unwrap()))
        );
        req.extensions_mut().insert(Principal::new("user-1"));
        assert_eq!(
            global.key.extract(&req, &none),
            Some(RateKey::principal("user-1"))
        );
        assert_eq!(global.key.extract(&post("/"), &none), None);
        assert_eq!(
            "principal_or_ip".parse::<KeySource>().unwrap().to_string(),
            "principal_or_ip"
        );
    }

    #[test]
    fn a_percent_sign_that_starts_no_escape_and_what_follows_decode_as_one() {
        assert_eq!(normalize_path("/%%34a"), "/J");
        assert_eq!(normalize_path("/%4%61"), "/J");
        assert_eq!(normalize_path("/a%"), "/a%");
        assert_eq!(normalize_path("/%2541"), "/%2541");
    }

    proptest::proptest! {
        /// `Route::matches` takes a path equal to an exact route as matching without
        /// normalising it; that is the answer of the full comparison because normalising
        /// is idempotent, whatever the path.
        #[test]
        fn normalising_twice_changes_nothing(path in "[/a-z.%0-9A-F~_-]{0,24}") {
            let once = normalize_path(&path).into_owned();
            proptest::prop_assert_eq!(normalize_path(&once), once.as_str());
            if let Ok(route @ Route::Exact(_)) = Route::parse(&path) {
                let Route::Exact(p) = &route else { unreachable!() };
                proptest::prop_assert!(route.matches_normal(&normalize_path(p)));
            }
        }
    }
}
