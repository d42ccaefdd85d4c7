//! One usage record per metered response, and who it is attributed to.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::pricing::Money;
use super::usage::Usage;
use crate::key::ApiKeyId;

/// Who a request belongs to. Put one in the request's extensions (for example from an
/// authentication layer) and [`CostMeterLayer`](super::CostMeterLayer) uses it; fields
/// left `None` are filled from headers as configured.
///
/// ```
/// use palisade::cost::Attribution;
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(Attribution::default().with_user("u-42").with_bot("support"));
/// assert_eq!(req.extensions().get::<Attribution>().unwrap().user.as_deref(), Some("u-42"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct Attribution {
    /// The end user.
    pub user: Option<String>,
    /// The hashed API key the request used.
    #[serde(with = "api_key_serde")]
    pub api_key: Option<ApiKeyId>,
    /// The bot or application.
    pub bot: Option<String>,
    /// The conversation.
    pub conversation: Option<String>,
}

impl Attribution {
    /// Sets the user.
    #[must_use]
    pub fn with_user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Sets the API key id.
    #[must_use]
    pub fn with_api_key(mut self, id: ApiKeyId) -> Self {
        self.api_key = Some(id);
        self
    }

    /// Sets the bot.
    #[must_use]
    pub fn with_bot(mut self, bot: impl Into<String>) -> Self {
        self.bot = Some(bot.into());
        self
    }

    /// Sets the conversation.
    #[must_use]
    pub fn with_conversation(mut self, conversation: impl Into<String>) -> Self {
        self.conversation = Some(conversation.into());
        self
    }
}

mod api_key_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::key::ApiKeyId;

    pub(super) fn serialize<S: Serializer>(id: &Option<ApiKeyId>, s: S) -> Result<S::Ok, S::Error> {
        match id {
            Some(id) => s.serialize_some(&id.to_string()),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<ApiKeyId>, D::Error> {
        let hex: Option<String> = Option::deserialize(d)?;
        let Some(hex) = hex else { return Ok(None) };
        if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(serde::de::Error::custom("api key id must be 32 hex digits"));
        }
        let mut bytes = [0u8; 16];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b =
                u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(serde::de::Error::custom)?;
        }
        Ok(Some(ApiKeyId::from_bytes(bytes)))
    }
}

/// How a metered response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Completion {
    /// The body was read to its end.
    Complete,
    /// The body stopped before its end (the client went away, the body failed, or a
    /// stream closed without its end marker: `message_stop`, `[DONE]`,
    /// `response.completed`): the usage is what was seen so far.
    Partial,
    /// The upstream answered with an error: an error status (4xx/5xx, including refusals
    /// rendered by layers inside this one) or an error inside the body (`event: error`).
    UpstreamError,
    /// The call failed without a response (a transport error, a timeout, or a refusal
    /// raised as an error, such as an open circuit breaker's). `status` is 0.
    Failed,
    /// The request was dropped before the response head arrived (the client went away
    /// while the upstream was still answering). `status` is 0.
    Cancelled,
}

impl Completion {
    /// Whether the call ended in an error (an upstream error or a failed call), as
    /// opposed to usage that is merely unpriced or incomplete.
    pub const fn is_error(self) -> bool {
        matches!(self, Completion::UpstreamError | Completion::Failed)
    }

    /// Whether the response was cut short (partial body or cancelled request).
    pub const fn is_incomplete(self) -> bool {
        matches!(self, Completion::Partial | Completion::Cancelled)
    }
}

/// A usage record's own identity: 128 bits made on the server when the record is built
/// (48 bits of Unix milliseconds, then 80 random bits, so ids sort roughly by time).
///
/// Sinks use it as the idempotency key: a batch delivered twice stores each record once,
/// and two records never share an id, whatever request id a client sent. Shown as 32
/// lowercase hex digits.
///
/// ```
/// use palisade::cost::RecordId;
/// let a = RecordId::generate();
/// assert_ne!(a, RecordId::generate());
/// assert_eq!(a.to_string().len(), 32);
/// assert_eq!(a.to_string().parse::<RecordId>().unwrap(), a);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordId(u128);

impl RecordId {
    /// A fresh id stamped with the current wall clock.
    pub fn generate() -> Self {
        Self::at(SystemTime::now())
    }

    /// A fresh id stamped with `time` (the random part still makes it unique).
    pub fn at(time: SystemTime) -> Self {
        use rand::Rng;
        let millis = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis()) & ((1 << 48) - 1);
        let mut random = [0u8; 16];
        rand::rng().fill_bytes(&mut random[6..]);
        Self((millis << 80) | u128::from_be_bytes(random))
    }

    /// The id as 16 bytes (big-endian: the time first).
    pub const fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// The id from 16 bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(u128::from_be_bytes(bytes))
    }
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordId({self})")
    }
}

/// The text is not 32 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a record id is 32 hex digits")]
#[non_exhaustive]
pub struct ParseRecordIdError;

impl FromStr for RecordId {
    type Err = ParseRecordIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ParseRecordIdError);
        }
        u128::from_str_radix(s, 16)
            .map(Self)
            .map_err(|_| ParseRecordIdError)
    }
}

impl Serialize for RecordId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RecordId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Says that a response came from a fallback (another model or another upstream standing
/// in for the one the request was meant for), and which. Whatever calls the fallback puts
/// it in the response's extensions, below the [`CostMeterLayer`](super::CostMeterLayer);
/// the meter copies it into the record's [`fallback`](UsageRecord::fallback), which every
/// sink stores.
///
/// ```
/// use palisade::cost::Fallback;
/// let mut res = http::Response::new(());
/// res.extensions_mut().insert(Fallback::new("model:claude-haiku-4-5"));
/// assert_eq!(res.extensions().get::<Fallback>().unwrap().as_str(), "model:claude-haiku-4-5");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fallback(String);

impl Fallback {
    /// A mark naming the fallback, e.g. `model:claude-haiku-4-5` or
    /// `upstream:https://backup.example`.
    pub fn new(label: impl Into<String>) -> Self {
        Self(label.into())
    }

    /// The fallback's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One metered response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "RecordWire")]
#[non_exhaustive]
pub struct UsageRecord {
    /// The record's server-made identity, the sinks' idempotency key.
    ///
    /// A record read without one (written by something other than the meter) gets an id
    /// derived from its content: its time's milliseconds, then 80 bits of a SHA-256 of
    /// its other fields. So reading the same record twice gives the same id, and a
    /// record replayed into a sink is stored once. Two such records equal in every field
    /// (durations to the nanosecond included) share that id and are stored once: give
    /// records that may be equal an id of their own ([`RecordId::generate`]).
    pub id: RecordId,
    /// When the request arrived (wall clock).
    #[serde(with = "unix_millis")]
    pub time: SystemTime,
    /// The request id (`x-request-id` of the request or response), if any. Chosen by the
    /// client when it sends one: kept as data, never used as a key.
    pub request_id: Option<String>,
    /// Who the request belongs to.
    pub attribution: Attribution,
    /// The request path.
    pub route: String,
    /// The model the response (or, failing that, the request) named.
    pub model: Option<String>,
    /// Token counts.
    pub usage: Usage,
    /// The cost; `None` when the model is not in the price table (never a silent 0).
    pub cost: Option<Money>,
    /// Upstream time: from the request to the end (or abandonment) of the response body.
    pub duration: Duration,
    /// Time to the response head (the first byte for a stream).
    pub time_to_headers: Duration,
    /// The response status code; 0 when no response arrived
    /// ([`Completion::Failed`], [`Completion::Cancelled`]).
    pub status: u16,
    /// Whether the response was a server-sent event stream.
    pub stream: bool,
    /// How the response ended.
    pub completion: Completion,
    /// The upstream's in-body error type, if any.
    pub upstream_error: Option<String>,
    /// The fallback the response came from ([`Fallback`]), if one stood in for the
    /// upstream the request was meant for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
}

/// A [`UsageRecord`] as read: the id may be missing.
#[derive(Deserialize)]
struct RecordWire {
    #[serde(default)]
    id: Option<RecordId>,
    #[serde(with = "unix_millis")]
    time: SystemTime,
    request_id: Option<String>,
    attribution: Attribution,
    route: String,
    model: Option<String>,
    usage: Usage,
    cost: Option<Money>,
    duration: Duration,
    time_to_headers: Duration,
    status: u16,
    stream: bool,
    completion: Completion,
    upstream_error: Option<String>,
    #[serde(default)]
    fallback: Option<String>,
}

impl From<RecordWire> for UsageRecord {
    fn from(w: RecordWire) -> Self {
        let mut record = UsageRecord {
            id: RecordId(0),
            time: w.time,
            request_id: w.request_id,
            attribution: w.attribution,
            route: w.route,
            model: w.model,
            usage: w.usage,
            cost: w.cost,
            duration: w.duration,
            time_to_headers: w.time_to_headers,
            status: w.status,
            stream: w.stream,
            completion: w.completion,
            upstream_error: w.upstream_error,
            fallback: w.fallback,
        };
        record.id = match w.id {
            Some(id) => id,
            None => RecordId::of_content(&record),
        };
        record
    }
}

impl RecordId {
    /// The id of a record read without one (its own id zero): its time's milliseconds,
    /// then 80 bits of a SHA-256 of its JSON.
    fn of_content(record: &UsageRecord) -> Self {
        use sha2::{Digest, Sha256};
        // serializing a record cannot fail: every field is plain data
        let json = serde_json::to_vec(record).unwrap_or_default();
        let digest = Sha256::digest(&json);
        let mut low = [0u8; 16];
        low[6..].copy_from_slice(&digest[..10]);
        let millis = record
            .time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
            & ((1 << 48) - 1);
        Self((millis << 80) | u128::from_be_bytes(low))
    }
}

impl UsageRecord {
    /// A record for `model` with `usage` at `time`; everything else empty. Useful for sinks'
    /// tests and for feeding usage seen elsewhere.
    pub fn new(time: SystemTime, model: Option<String>, usage: Usage, cost: Option<Money>) -> Self {
        Self {
            id: RecordId::at(time),
            time,
            request_id: None,
            attribution: Attribution::default(),
            route: String::new(),
            model,
            usage,
            cost,
            duration: Duration::ZERO,
            time_to_headers: Duration::ZERO,
            status: 200,
            stream: false,
            completion: Completion::Complete,
            upstream_error: None,
            fallback: None,
        }
    }

    /// Sets the attribution.
    #[must_use]
    pub fn with_attribution(mut self, attribution: Attribution) -> Self {
        self.attribution = attribution;
        self
    }

    /// Milliseconds since the Unix epoch (0 before it).
    pub fn unix_millis(&self) -> u64 {
        self.time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

mod unix_millis {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let ms = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        s.serialize_u64(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        Ok(UNIX_EPOCH + Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_through_json() {
        let r = UsageRecord::new(
            UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            Some("claude-haiku-4-5".into()),
            Usage {
                input_tokens: 1,
                ..Usage::default()
            },
            Some(Money::from_nanos(1000)),
        )
        .with_attribution(
            Attribution::default()
                .with_user("u")
                .with_api_key(ApiKeyId::from_key("sk-x")),
        );
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains("sk-x"));
        assert!(json.contains(&ApiKeyId::from_key("sk-x").to_string()));
        let back: UsageRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.unix_millis(), 1_700_000_000_123);
    }

    /// A record read without an id got a fresh random one on every read, so the same
    /// record replayed into a sink was stored again each time.
    #[test]
    fn a_record_read_without_an_id_gets_the_same_id_on_every_read() {
        let r = UsageRecord::new(
            UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            Some("claude-haiku-4-5".into()),
            Usage {
                input_tokens: 7,
                ..Usage::default()
            },
            Some(Money::from_picos(42)),
        );
        let mut json: serde_json::Value = serde_json::to_value(&r).unwrap();
        json.as_object_mut().unwrap().remove("id");
        let read = |json: &serde_json::Value| -> UsageRecord {
            serde_json::from_value(json.clone()).unwrap()
        };
        let (a, b) = (read(&json), read(&json));
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, r.id, "derived from the content, not the original id");
        // the time still leads the id
        assert_eq!(a.id.to_bytes()[..6], r.id.to_bytes()[..6]);
        // another record, another id
        json["usage"]["input_tokens"] = 8.into();
        assert_ne!(read(&json).id, a.id);
        // what was read, written and read again keeps its id
        let again: UsageRecord = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(again, a);
    }
}
