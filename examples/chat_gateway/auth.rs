//! Authentication: `x-api-key` or `Authorization: Bearer`, hashed and compared in constant
//! time; every failure is an audit event (target `chat_gateway::audit`) that never holds
//! the key.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::extract::Request;
use axum::response::Response;
use http::Uri;
use http::header::HeaderName;
use palisade::key::{ApiKeyId, api_key_from_headers, constant_time_eq};
use palisade::rate_limit::algorithm::{Params, Verdict};
use palisade::rate_limit::store::{CheckItem, RuleDecision};
use palisade::rate_limit::{
    Algorithm, MemoryStore, Principal, Quota, RateKey, RateLimitConfigError, TrustedProxies,
};
use palisade::{Error, ErrorKind};
use pin_project_lite::pin_project;
use tower_http::request_id::RequestId;

use crate::app::AppState;
use crate::audit::AuditEntry;
use crate::config::NamedKey;
use crate::error::render;
use crate::metrics::Refusal;
use crate::upstream::UpstreamTime;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Chat, bots, own usage.
    User,
    /// Everything, including `/admin` and everyone's usage.
    Admin,
}

/// The authenticated caller, in the request extensions.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The key's owner.
    pub user: Arc<str>,
    /// Its role.
    pub role: Role,
    /// The hashed key (safe to log and store).
    pub key_id: ApiKeyId,
}

impl Caller {
    /// Whether the caller holds an admin key.
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

struct Entry {
    hash: [u8; 16],
    user: Arc<str>,
    role: Role,
}

/// The known keys, hashed: the keys themselves are not kept.
pub struct KeyStore {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("keys", &self.entries.len())
            .finish()
    }
}

impl KeyStore {
    /// Hashes the configured keys.
    pub fn new(users: &[NamedKey], admins: &[NamedKey]) -> Self {
        let entry = |k: &NamedKey, role| Entry {
            hash: *ApiKeyId::from_key(&k.key).as_bytes(),
            user: Arc::from(k.name.as_str()),
            role,
        };
        let entries = users
            .iter()
            .map(|k| entry(k, Role::User))
            .chain(admins.iter().map(|k| entry(k, Role::Admin)))
            .collect();
        Self { entries }
    }

    /// The hashed keys `user` holds (what rules keyed by API key count against).
    pub fn key_ids(&self, user: &str) -> Vec<ApiKeyId> {
        self.entries
            .iter()
            .filter(|e| &*e.user == user)
            .map(|e| ApiKeyId::from_bytes(e.hash))
            .collect()
    }

    /// The caller holding `key`. Every entry is compared, in constant time, whatever matches.
    pub fn authenticate(&self, key: &str) -> Option<Caller> {
        let id = ApiKeyId::from_key(key);
        let mut found = None;
        for e in &self.entries {
            if constant_time_eq(&e.hash, id.as_bytes()) && found.is_none() {
                found = Some(Caller {
                    user: e.user.clone(),
                    role: e.role,
                    key_id: id,
                });
            }
        }
        found
    }
}

/// Authentication failures (no key, an unknown key) counted per client address, in a fixed
/// window of a minute (`PALISADE_GATEWAY_AUTH_FAILURES_PER_MINUTE`): past the limit, that
/// client's failures answer 429 with `retry-after` and `x-should-retry: false` and are not
/// audited one by one (the first refused one a minute is), so one client sending wrong keys
/// cannot fill the audit queue (each request still has its request log line); failures
/// from every address together are audited at most [`FailureLimit::AUDITED_PER_MINUTE`] a
/// minute. Requests
/// with a valid key are never counted nor refused here, whatever their address. The client
/// is the peer, or the address trusted proxies name in `X-Forwarded-For`
/// (`PALISADE_RATE_LIMIT_TRUSTED_PROXIES`), as the rate limits read it: an IPv6 client by
/// its /64. The counts are this process's own (not shared through Redis).
pub struct FailureLimit {
    counts: Minutes,
    per_minute: u64,
    proxies: TrustedProxies,
}

/// What a failure limit says of one more failure.
enum Failure {
    /// Under the limit: answer 401 and audit it.
    Counted,
    /// The first over the limit this window: answer 429 and audit it.
    FirstRefused(Duration),
    /// Over the limit: answer 429 quietly.
    Refused(Duration),
}

impl FailureLimit {
    /// `per_minute` failures a minute for each client address (0: no limit), with
    /// `proxies` trusted to name the client; at most `max_entries` addresses are tracked.
    pub fn new(
        per_minute: u64,
        proxies: TrustedProxies,
        max_entries: usize,
    ) -> Result<Option<Self>, RateLimitConfigError> {
        if per_minute == 0 {
            return Ok(None);
        }
        Ok(Some(Self {
            counts: Minutes::new(max_entries)?,
            per_minute,
            proxies,
        }))
    }

    /// Counts one failure of `req`'s client (a request with no client address, served in
    /// process, is not counted).
    fn count(&self, req: &Request) -> Failure {
        let Some(ip) = self.proxies.client_ip(req) else {
            return Failure::Counted;
        };
        let key = RateKey::ip(ip);
        let rule = self.counts.count(0, "auth_failures", &key, self.per_minute);
        let retry_after = match rule.verdict {
            Verdict::Allowed => return Failure::Counted,
            Verdict::Denied { retry_after } => retry_after,
            Verdict::Never => rule.reset_micros,
        };
        let retry_after = Duration::from_micros(retry_after).max(Duration::from_secs(1));
        // The refusals are counted under a second rule that admits one a minute: that
        // one is audited.
        if self
            .counts
            .count(1, "auth_failures_refused", &key, 1)
            .verdict
            .is_allowed()
        {
            Failure::FirstRefused(retry_after)
        } else {
            Failure::Refused(retry_after)
        }
    }

    /// Whether one more failure may be audited: at most [`Self::AUDITED_PER_MINUTE`] a
    /// minute over every address, since many addresses (an IPv6 /48 holds 65,536 /64s)
    /// could together fill the audit queue that admin actions share. The first failure
    /// past that each minute is audited as the others' stand-in (`Some(true)`).
    fn audit(&self) -> Option<bool> {
        self.counts.within_or_first_past(
            2,
            ["auth_failures_audited", "auth_failures_unaudited"],
            &RateKey::principal("*"),
            Self::AUDITED_PER_MINUTE,
        )
    }

    /// The most failed authentications audited a minute over all addresses.
    pub const AUDITED_PER_MINUTE: u64 = 600;
}

/// The audit events of one caller's refusals (a user key on an admin route, the caller's
/// own rate limits and budgets): at most [`RefusalAudit::PER_MINUTE`] a minute for each
/// user, then one `refusals_unaudited` event stands for the rest of that minute's, so that
/// a client looping past its limits cannot fill the audit queue the admin actions share
/// (every request still has its request log line, naming the user).
pub struct RefusalAudit {
    counts: Minutes,
}

impl RefusalAudit {
    /// The most refusals audited a minute for one user.
    pub const PER_MINUTE: u64 = 60;

    /// Tracks at most `max_entries` users.
    pub fn new(max_entries: usize) -> Result<Self, RateLimitConfigError> {
        Ok(Self {
            counts: Minutes::new(max_entries)?,
        })
    }

    /// Records `entry`, a refusal of `user`, unless `user`'s refusals have had their events
    /// this minute: then the first one past them is recorded as `refusals_unaudited`.
    fn record(&self, state: &AppState, user: &str, entry: AuditEntry) {
        let rules = ["refusals_audited", "refusals_unaudited"];
        let key = RateKey::principal(user);
        match self
            .counts
            .within_or_first_past(0, rules, &key, Self::PER_MINUTE)
        {
            Some(false) => state.audit.record(entry),
            Some(true) => state.audit.record(entry.unaudited_rest(Self::PER_MINUTE)),
            None => {}
        }
    }
}

/// Events counted per key in fixed windows of a minute, in palisade's memory store.
struct Minutes {
    store: MemoryStore,
}

impl Minutes {
    /// At most `max_entries` keys tracked.
    fn new(max_entries: usize) -> Result<Self, RateLimitConfigError> {
        Ok(Self {
            store: MemoryStore::builder().max_entries(max_entries).build()?,
        })
    }

    /// Counts one event of `key` under rule `index` (named `rule`), `limit` a minute.
    fn count(&self, index: u32, rule: &'static str, key: &RateKey, limit: u64) -> RuleDecision {
        let item = CheckItem {
            rule_index: index,
            rule,
            key,
            params: Params::new(Algorithm::FixedWindow, Quota::per_minute(limit)),
            cost: 1,
            shadow: false,
        };
        self.store.check_at(&[item], self.store.now_micros()).rules[0]
    }

    /// Counts one event of `key`: within `limit` a minute under rule `index`
    /// (`Some(false)`), the first past it this minute (`Some(true)`, counted under rule
    /// `index + 1`), or a later one (`None`).
    fn within_or_first_past(
        &self,
        index: u32,
        rules: [&'static str; 2],
        key: &RateKey,
        limit: u64,
    ) -> Option<bool> {
        if self.count(index, rules[0], key, limit).verdict.is_allowed() {
            return Some(false);
        }
        self.count(index + 1, rules[1], key, 1)
            .verdict
            .is_allowed()
            .then_some(true)
    }
}

/// Headers that name a user or a bot, which palisade's layers read when told to
/// (`x-bot-id` by default in the cost meter): removed from every request.
const ATTRIBUTION_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("x-bot-id"),
    HeaderName::from_static("x-user-id"),
];

/// The headers removed from every authenticated request: [`ATTRIBUTION_HEADERS`] and those
/// the cost meter is configured to read a user or a bot from (parsed once, here; a name
/// that is not a header name cannot be in a request).
fn attribution_headers(state: &AppState) -> Arc<[HeaderName]> {
    let cost = &state.config.cost;
    let mut names = ATTRIBUTION_HEADERS.to_vec();
    for name in [&cost.user_header, &cost.bot_header].into_iter().flatten() {
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes())
            && !names.contains(&name)
        {
            names.push(name);
        }
    }
    names.into()
}

/// Authentication as a tower layer over the authenticated routes: refuses without a key
/// (401), with an unknown key (401) and with a user key on `/admin` (403), each an audit
/// event (a client past its [`FailureLimit`] gets 429 instead of 401); otherwise puts the [`Caller`] and its rate-limit [`Principal`] in the request
/// extensions (the handlers bill upstream calls to the caller), removes the headers that
/// name a user or a bot,
/// and audits the rate-limit and budget refusals the layers below it answer with.
#[derive(Clone)]
pub struct AuthLayer {
    state: AppState,
    strip: Arc<[HeaderName]>,
    failures: Option<Arc<FailureLimit>>,
}

impl AuthLayer {
    /// Authenticates against `state`'s keys, auditing to its audit log.
    pub fn new(state: AppState) -> Self {
        let strip = attribution_headers(&state);
        let failures = state.auth_failures.clone();
        Self {
            state,
            strip,
            failures,
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Authenticate<S> {
        Authenticate {
            inner,
            state: self.state.clone(),
            strip: Arc::clone(&self.strip),
            failures: self.failures.clone(),
        }
    }
}

/// The service [`AuthLayer`] builds.
#[derive(Clone)]
pub struct Authenticate<S> {
    inner: S,
    state: AppState,
    /// The headers removed from every request it admits.
    strip: Arc<[HeaderName]>,
    /// Authentication failures counted per client address.
    failures: Option<Arc<FailureLimit>>,
}

/// An admitted request, kept until its response: who made it, to audit a refusal by the
/// layers below.
struct Admitted {
    state: AppState,
    user: Arc<str>,
    uri: Uri,
    request_id: Option<RequestId>,
}

impl<S> Authenticate<S> {
    /// Authenticates `req`, fills in its extensions, or answers the refusal.
    fn admit(&self, req: &mut Request) -> Result<Admitted, Response> {
        let state = &self.state;
        let format = state.config.error_format();
        let audit = |req: &Request, action, outcome| {
            AuditEntry::new(action, outcome)
                .target(req.uri().path().to_owned())
                .request_id(crate::app::request_id(req))
        };
        // A failure's audit event, unless failures from every address have had theirs
        // this minute (then one event stands for the rest).
        let audit_failure =
            |req: &Request, entry: AuditEntry| match self.failures.as_ref().map(|f| f.audit()) {
                None | Some(Some(false)) => state.audit.record(entry),
                Some(Some(true)) => {
                    state
                        .audit
                        .record(
                            audit(req, "auth_failures_unaudited", "refused").detail(format!(
                                "more than {} failed authentications this minute: the rest of this \
                     minute's are not audited one by one",
                                FailureLimit::AUDITED_PER_MINUTE
                            )),
                        )
                }
                Some(None) => {}
            };
        // A failure past the client's limit answers 429, audited once a minute.
        let throttled = |req: &Request| {
            let retry_after = match self.failures.as_ref()?.count(req) {
                Failure::Counted => return None,
                Failure::FirstRefused(after) => {
                    audit_failure(
                        req,
                        audit(req, "auth_throttled", "refused")
                            .detail("too many failed authentications from this address"),
                    );
                    after
                }
                Failure::Refused(after) => after,
            };
            // No retry of the same request can succeed (its key is still wrong or missing):
            // `x-should-retry: false` keeps the SDKs, which retry a 429, from sending it again.
            Some(render(
                &Error::rate_limited(
                    "too many requests without a valid API key from this address",
                    retry_after,
                )
                .with_should_retry(false),
                format,
            ))
        };
        let Some(key) = api_key_from_headers(req.headers()) else {
            if let Some(refusal) = throttled(req) {
                return Err(refusal);
            }
            audit_failure(req, audit(req, "auth_failed", "refused").detail("no key"));
            return Err(render(
                &Error::new(
                    ErrorKind::Unauthenticated,
                    "no API key: send it in the x-api-key header or as Authorization: Bearer <key>",
                ),
                format,
            ));
        };
        let Some(caller) = state.keys.authenticate(key) else {
            if let Some(refusal) = throttled(req) {
                return Err(refusal);
            }
            // Named by its hash: the key itself is never written anywhere.
            audit_failure(
                req,
                audit(req, "auth_failed", "refused")
                    .actor(format!("key:{}", ApiKeyId::from_key(key)))
                    .detail("unknown key"),
            );
            return Err(render(
                &Error::new(ErrorKind::Unauthenticated, "invalid x-api-key"),
                format,
            ));
        };
        if req.uri().path().starts_with("/admin") && !caller.is_admin() {
            state.refusal_audit.record(
                state,
                &caller.user,
                audit(req, "forbidden", "refused")
                    .actor(&*caller.user)
                    .detail("an admin route with a user key"),
            );
            return Err(render(
                &Error::new(ErrorKind::Forbidden, "this route needs an admin key"),
                format,
            ));
        }
        // The gateway attributes spend itself (the caller here, the bot from its route after
        // the ownership check): headers that name a user or a bot are the client's claim, and
        // no layer or handler below may see them.
        let h = req.headers_mut();
        for name in self.strip.iter() {
            h.remove(name);
        }
        let admitted = Admitted {
            state: state.clone(),
            user: caller.user.clone(),
            uri: req.uri().clone(),
            request_id: req.extensions().get::<RequestId>().cloned(),
        };
        let ext = req.extensions_mut();
        ext.insert(Principal::new(caller.user.clone()));
        ext.insert(caller);
        Ok(admitted)
    }
}

impl Admitted {
    /// Audits a refusal by the rate limits or the budgets (both answer below
    /// authentication) and names the caller for the request log.
    fn answered(self, res: &mut Response) {
        let refused = match Refusal::of(res) {
            // An upstream's own 429 carries the time it took; the gateway's limits answer
            // without calling it.
            Some(Refusal::RateLimited) if res.extensions().get::<UpstreamTime>().is_none() => {
                Some("rate_limited")
            }
            Some(Refusal::BudgetExceeded) => Some("budget_refused"),
            _ => None,
        };
        if let Some(action) = refused {
            let request_id = self
                .request_id
                .as_ref()
                .and_then(|id| id.header_value().to_str().ok())
                .unwrap_or("req_unknown")
                .to_owned();
            self.state.refusal_audit.record(
                &self.state,
                &self.user,
                AuditEntry::new(action, "refused")
                    .actor(&*self.user)
                    .target(self.uri.path().to_owned())
                    .request_id(request_id),
            );
        }
        res.extensions_mut()
            .insert(crate::log::LoggedUser(self.user));
    }
}

impl<S> tower::Service<Request> for Authenticate<S>
where
    S: tower::Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = AuthFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        match self.admit(&mut req) {
            Ok(admitted) => AuthFuture::Admitted {
                inner: self.inner.call(req),
                admitted: Some(admitted),
            },
            Err(refusal) => AuthFuture::Refused {
                refusal: Some(refusal),
            },
        }
    }
}

pin_project! {
    /// The response future of [`Authenticate`].
    #[project = AuthProj]
    pub enum AuthFuture<F> {
        /// Refused before the routes below were called.
        Refused { refusal: Option<Response> },
        /// Admitted: the routes' answer, audited when it is a refusal.
        Admitted {
            #[pin]
            inner: F,
            admitted: Option<Admitted>,
        },
    }
}

impl<F, E> Future for AuthFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AuthProj::Refused { refusal } => Poll::Ready(Ok(refusal
                .take()
                .expect("AuthFuture polled after it completed"))),
            AuthProj::Admitted { inner, admitted } => {
                let mut res = ready!(inner.poll(cx))?;
                if let Some(a) = admitted.take() {
                    a.answered(&mut res);
                }
                Poll::Ready(Ok(res))
            }
        }
    }
}
