//! Authentication: `x-api-key` or `Authorization: Bearer`, hashed and compared in constant
//! time; every failure is an audit event (target `chat_gateway::audit`) that never holds
//! the key.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use palisade::cost::Attribution;
use palisade::key::{ApiKeyId, api_key_from_headers, constant_time_eq};
use palisade::rate_limit::Principal;
use palisade::{Error, ErrorKind};

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
const ATTRIBUTION_HEADERS: [&str; 2] = ["x-bot-id", "x-user-id"];

/// The middleware: authenticates, then puts the [`Caller`], its rate-limit [`Principal`]
/// and its cost [`Attribution`] in the request extensions.
pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let format = state.config.error_format();
    let route = req.uri().path().to_owned();
    let audit = |action, outcome| {
        AuditEntry::new(action, outcome)
            .target(route.clone())
            .request_id(crate::app::request_id(&req))
    };
    let Some(key) = api_key_from_headers(req.headers()) else {
        state
            .audit
            .record(audit("auth_failed", "refused").detail("no key"));
        return render(
            &Error::new(
                ErrorKind::Unauthenticated,
                "no API key: send it in the x-api-key header or as Authorization: Bearer <key>",
            ),
            format,
        );
    };
    let Some(caller) = state.keys.authenticate(key) else {
        // Named by its hash: the key itself is never written anywhere.
        state.audit.record(
            audit("auth_failed", "refused")
                .actor(format!("key:{}", ApiKeyId::from_key(key)))
                .detail("unknown key"),
        );
        return render(
            &Error::new(ErrorKind::Unauthenticated, "invalid x-api-key"),
            format,
        );
    };
    if route.starts_with("/admin") && !caller.is_admin() {
        state.audit.record(
            audit("forbidden", "refused")
                .actor(&*caller.user)
                .detail("an admin route with a user key"),
        );
        return render(
            &Error::new(ErrorKind::Forbidden, "this route needs an admin key"),
            format,
        );
    }
    let request_id = crate::app::request_id(&req);
    // The gateway attributes spend itself (the caller here, the bot from its route after
    // the ownership check): headers that name a user or a bot are the client's claim, and
    // no layer or handler below may see them.
    let h = req.headers_mut();
    for name in ATTRIBUTION_HEADERS {
        h.remove(name);
    }
    let cost = &state.config.cost;
    for name in [&cost.user_header, &cost.bot_header].into_iter().flatten() {
        h.remove(name.as_str());
    }
    let ext = req.extensions_mut();
    ext.insert(Principal::new(caller.user.clone()));
    ext.insert(
        Attribution::default()
            .with_user(caller.user.to_string())
            .with_api_key(caller.key_id),
    );
    let user = caller.user.clone();
    ext.insert(caller);
    let mut res = next.run(req).await;
    // Refusals by the rate limits and the budgets (both answer inside this middleware).
    let refused = match Refusal::of(&res) {
        // An upstream's own 429 carries the time it took; the gateway's limits answer
        // without calling it.
        Some(Refusal::RateLimited) if res.extensions().get::<UpstreamTime>().is_none() => {
            Some("rate_limited")
        }
        Some(Refusal::BudgetExceeded) => Some("budget_refused"),
        _ => None,
    };
    if let Some(action) = refused {
        state.audit.record(
            AuditEntry::new(action, "refused")
                .actor(&*user)
                .target(route)
                .request_id(request_id),
        );
    }
    res.extensions_mut().insert(crate::log::LoggedUser(user));
    res
}
