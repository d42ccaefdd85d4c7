//! Authentication: `x-api-key` or `Authorization: Bearer`, hashed and compared in constant
//! time; every failure is an audit event (target `chat_gateway::audit`) that never holds
//! the key.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::extract::Request;
use axum::response::Response;
use http::Uri;
use http::header::HeaderName;
use palisade::key::{ApiKeyId, api_key_from_headers, constant_time_eq};
use palisade::rate_limit::Principal;
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
/// event; otherwise puts the [`Caller`] and its rate-limit [`Principal`] in the request
/// extensions (the handlers bill upstream calls to the caller), removes the headers that
/// name a user or a bot,
/// and audits the rate-limit and budget refusals the layers below it answer with.
#[derive(Clone)]
pub struct AuthLayer {
    state: AppState,
    strip: Arc<[HeaderName]>,
}

impl AuthLayer {
    /// Authenticates against `state`'s keys, auditing to its audit log.
    pub fn new(state: AppState) -> Self {
        let strip = attribution_headers(&state);
        Self { state, strip }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Authenticate<S> {
        Authenticate {
            inner,
            state: self.state.clone(),
            strip: Arc::clone(&self.strip),
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
        let Some(key) = api_key_from_headers(req.headers()) else {
            state
                .audit
                .record(audit(req, "auth_failed", "refused").detail("no key"));
            return Err(render(
                &Error::new(
                    ErrorKind::Unauthenticated,
                    "no API key: send it in the x-api-key header or as Authorization: Bearer <key>",
                ),
                format,
            ));
        };
        let Some(caller) = state.keys.authenticate(key) else {
            // Named by its hash: the key itself is never written anywhere.
            state.audit.record(
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
            state.audit.record(
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
            self.state.audit.record(
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
