//! Integer money and model prices: a built-in table and LiteLLM-style JSON price maps.
//!
//! Money is a count of **pico-dollars** (10⁻¹² $) in a `u128`, so every published per-token
//! price (LiteLLM lists some at 3.75e-8 $) is an exact integer and sums never drift. Prices
//! are parsed from their decimal text, never through float arithmetic.
//!
//! ```
//! use palisade::cost::pricing::{Money, PriceTable};
//! use palisade::cost::usage::Usage;
//!
//! let table = PriceTable::builtin();
//! let usage = Usage { input_tokens: 3, cache_write_5m_tokens: 12_304, output_tokens: 550, ..Usage::default() };
//! let cost = table.cost("claude-3-7-sonnet-20250219", &usage).unwrap();
//! assert_eq!(cost, Money::from_nanos(54_399_000));
//! assert_eq!(cost.to_string(), "$0.054399");
//! assert!(table.cost("my-own-model", &usage).is_none()); // unknown: None, never 0
//! ```

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::usage::Usage;

/// An amount of money in pico-dollars (10⁻¹² US dollars).
///
/// With serde, money is an exact decimal string of dollars (`"1.660825"`, `"0"`), so no
/// JSON reader loses precision (a JavaScript number holds integers exactly only up to
/// 2⁵³). Reading also accepts a JSON integer, taken as pico-dollars.
///
/// ```
/// use palisade::cost::Money;
/// let m: Money = "1.660825".parse().unwrap();
/// assert_eq!(serde_json::to_string(&m).unwrap(), r#""1.660825""#);
/// assert_eq!(serde_json::from_str::<Money>(r#""1.660825""#).unwrap(), m);
/// assert_eq!(serde_json::from_str::<Money>("1660825000000").unwrap(), m);
/// assert!("-1".parse::<Money>().is_err());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(u128);

impl Serialize for Money {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.dollars().as_str())
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Money;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a decimal string of dollars, or an integer of pico-dollars")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Money, E> {
                Money::parse_dollars(v).map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Money, E> {
                Ok(Money(u128::from(v)))
            }
            fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<Money, E> {
                Ok(Money(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Money, E> {
                u128::try_from(v)
                    .map(Money)
                    .map_err(|_| E::custom("money cannot be negative"))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl std::str::FromStr for Money {
    type Err = PriceError;

    /// Parses a dollar amount (`"1.660825"`, an optional leading `$`), exactly.
    fn from_str(s: &str) -> Result<Self, PriceError> {
        let t = s.trim();
        Money::parse_dollars(t.strip_prefix('$').unwrap_or(t))
    }
}

impl Money {
    /// Nothing.
    pub const ZERO: Money = Money(0);
    /// Pico-dollars per dollar.
    pub const PICOS_PER_DOLLAR: u128 = 1_000_000_000_000;

    /// From pico-dollars.
    pub const fn from_picos(picos: u128) -> Self {
        Money(picos)
    }

    /// From nano-dollars.
    pub const fn from_nanos(nanos: u128) -> Self {
        Money(nanos * 1000)
    }

    /// In pico-dollars.
    pub const fn picos(self) -> u128 {
        self.0
    }

    /// In nano-dollars, rounded down.
    pub const fn nanos(self) -> u128 {
        self.0 / 1000
    }

    /// Parses a dollar amount written in decimal (`"1.06376125"`, `"3e-6"`), exactly.
    pub fn parse_dollars(text: &str) -> Result<Self, PriceError> {
        parse_scaled(text, 12).map(Money)
    }

    /// Saturating sum.
    #[must_use]
    pub const fn saturating_add(self, other: Money) -> Money {
        Money(self.0.saturating_add(other.0))
    }

    /// The amount in dollars as a plain decimal without trailing zeros (`"0.054399"`).
    pub fn dollars_string(self) -> String {
        self.dollars().as_str().to_owned()
    }

    /// [`dollars_string`](Self::dollars_string) written on the stack, for headers,
    /// comments and serialisers that copy it anyway.
    pub(crate) fn dollars(self) -> Dollars {
        let mut out = Dollars {
            buf: [0; Dollars::CAP],
            len: 0,
        };
        let mut whole = self.0 / Self::PICOS_PER_DOLLAR;
        let mut digits = [0u8; 39]; // u128::MAX has 39 digits
        let mut n = 0;
        loop {
            digits[n] = b'0' + (whole % 10) as u8;
            n += 1;
            whole /= 10;
            if whole == 0 {
                break;
            }
        }
        for d in digits[..n].iter().rev() {
            out.push(*d);
        }
        let mut frac = self.0 % Self::PICOS_PER_DOLLAR;
        if frac != 0 {
            out.push(b'.');
            let mut places = [b'0'; 12];
            for p in places.iter_mut().rev() {
                *p = b'0' + (frac % 10) as u8;
                frac /= 10;
            }
            let end = places.iter().rposition(|d| *d != b'0').map_or(0, |i| i + 1);
            for d in &places[..end] {
                out.push(*d);
            }
        }
        out
    }
}

/// A dollar amount in decimal, held on the stack (see [`Money::dollars`]).
pub(crate) struct Dollars {
    buf: [u8; Dollars::CAP],
    len: usize,
}

impl Dollars {
    /// 39 digits of whole dollars at most (u128 pico-dollars), a point and 12 places.
    const CAP: usize = 52;

    fn push(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    /// The text.
    pub(crate) fn as_str(&self) -> &str {
        // Only ASCII digits and '.' are pushed.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("$")?;
        f.write_str(self.dollars().as_str())
    }
}

impl std::iter::Sum for Money {
    fn sum<I: Iterator<Item = Money>>(iter: I) -> Money {
        iter.fold(Money::ZERO, Money::saturating_add)
    }
}

/// A problem with a price or a price map.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PriceError {
    /// Not a decimal number.
    #[error("`{0}` is not a decimal number")]
    NotANumber(String),
    /// Negative prices make no sense.
    #[error("`{0}` is negative")]
    Negative(String),
    /// More precision than a pico-dollar per token.
    #[error("`{0}` has more precision than one pico-dollar")]
    TooPrecise(String),
    /// Too large to hold.
    #[error("`{0}` is too large")]
    TooLarge(String),
    /// The price map is not a JSON object of objects.
    #[error("price map is not valid JSON: {0}")]
    InvalidJson(String),
}

/// Parses a decimal (optionally with an exponent) and multiplies it by 10^`scale`,
/// requiring an exact non-negative integer result.
fn parse_scaled(text: &str, scale: i32) -> Result<u128, PriceError> {
    let t = text.trim();
    let err = || PriceError::NotANumber(t.to_owned());
    if let Some(rest) = t.strip_prefix('-') {
        return if rest.bytes().all(|b| b == b'0' || b == b'.') && !rest.is_empty() {
            Ok(0)
        } else {
            Err(PriceError::Negative(t.to_owned()))
        };
    }
    let t2 = t.strip_prefix('+').unwrap_or(t);
    let (mantissa, exp) = match t2.find(['e', 'E']) {
        Some(i) => (&t2[..i], t2[i + 1..].parse::<i32>().map_err(|_| err())?),
        None => (t2, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(err());
    }
    let digits: String = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    // value = digits × 10^(exp - frac.len()); scaled by 10^scale
    let mut shift = exp
        .checked_sub(frac.len() as i32)
        .and_then(|e| e.checked_add(scale))
        .ok_or_else(err)?;
    let mut digits = digits.to_owned();
    while shift < 0 {
        match digits.pop() {
            None => return Ok(0),
            Some('0') => shift += 1,
            Some(_) => return Err(PriceError::TooPrecise(t.to_owned())),
        }
    }
    if digits.is_empty() {
        return Ok(0);
    }
    let too_large = || PriceError::TooLarge(t.to_owned());
    let mut value: u128 = digits.parse().map_err(|_| too_large())?;
    for _ in 0..shift {
        value = value.checked_mul(10).ok_or_else(too_large)?;
    }
    Ok(value)
}

/// Pico-dollars per token for a `$ per million tokens` decimal. Used for the built-in
/// table, where the text is a compile-time constant known to be valid.
fn per_mtok(text: &str) -> u64 {
    parse_scaled(text, 6)
        .ok()
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or_default()
}

/// Per-token prices of one tier, in pico-dollars per token (plain integers in serde: a
/// price per token stays far below 2⁵³).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenPrices {
    /// Uncached input.
    pub input: u64,
    /// Output.
    pub output: u64,
    /// 5-minute cache write.
    pub cache_write_5m: u64,
    /// 1-hour cache write.
    pub cache_write_1h: u64,
    /// Cache read.
    pub cache_read: u64,
}

impl TokenPrices {
    /// Prices from `$ per million tokens` decimals: input, output, 5-minute cache write,
    /// 1-hour cache write, cache read.
    ///
    /// ```
    /// use palisade::cost::pricing::TokenPrices;
    /// let p = TokenPrices::per_million("3", "15", "3.75", "6", "0.30").unwrap();
    /// assert_eq!(p.input, 3_000_000); // pico-dollars per token
    /// assert_eq!(p.cache_read, 300_000);
    /// ```
    pub fn per_million(
        input: &str,
        output: &str,
        cache_write_5m: &str,
        cache_write_1h: &str,
        cache_read: &str,
    ) -> Result<Self, PriceError> {
        let p = |s: &str| -> Result<u64, PriceError> {
            let v = parse_scaled(s, 6)?;
            u64::try_from(v).map_err(|_| PriceError::TooLarge(s.to_owned()))
        };
        Ok(Self {
            input: p(input)?,
            output: p(output)?,
            cache_write_5m: p(cache_write_5m)?,
            cache_write_1h: p(cache_write_1h)?,
            cache_read: p(cache_read)?,
        })
    }

    fn builtin(i: &str, o: &str, w5: &str, w1: &str, r: &str) -> Self {
        Self {
            input: per_mtok(i),
            output: per_mtok(o),
            cache_write_5m: per_mtok(w5),
            cache_write_1h: per_mtok(w1),
            cache_read: per_mtok(r),
        }
    }

    fn cost(&self, u: &Usage) -> u128 {
        let m = |n: u64, p: u64| u128::from(n) * u128::from(p);
        // Each product fits a u128; their sum may not (a price map may hold any price
        // below 2^64 pico-dollars): saturate, as every other sum of money does.
        m(u.input_tokens, self.input)
            .saturating_add(m(u.output_tokens, self.output))
            .saturating_add(m(u.cache_write_5m_tokens, self.cache_write_5m))
            .saturating_add(m(u.cache_write_1h_tokens, self.cache_write_1h))
            .saturating_add(m(u.cache_read_tokens, self.cache_read))
    }
}

/// The prices of one model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelPrice {
    /// The standard tier.
    pub base: TokenPrices,
    /// A long-context tier: when the request's input tokens (cache included) exceed the
    /// threshold, every token of the request is priced at this tier.
    pub long_context: Option<(u64, TokenPrices)>,
    /// Price of one server-side web search, in pico-dollars.
    pub web_search: u64,
    /// Where the prices come from.
    pub source: Cow<'static, str>,
}

impl ModelPrice {
    /// A model with one tier and no web-search price.
    pub fn new(base: TokenPrices, source: impl Into<Cow<'static, str>>) -> Self {
        Self {
            base,
            long_context: None,
            web_search: 0,
            source: source.into(),
        }
    }

    /// Adds a long-context tier above `threshold` input tokens.
    #[must_use]
    pub fn with_long_context(mut self, threshold: u64, tier: TokenPrices) -> Self {
        self.long_context = Some((threshold, tier));
        self
    }

    /// Sets the price of one web search, in pico-dollars.
    #[must_use]
    pub fn with_web_search(mut self, picos: u64) -> Self {
        self.web_search = picos;
        self
    }

    /// The cost of `usage` at these prices.
    pub fn cost(&self, usage: &Usage) -> Money {
        let tier = match self.long_context {
            Some((threshold, ref tier)) if usage.total_input_tokens() > threshold => tier,
            _ => &self.base,
        };
        let searches = u128::from(usage.web_search_requests) * u128::from(self.web_search);
        Money(tier.cost(usage).saturating_add(searches))
    }
}

/// The outcome of merging a LiteLLM price map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MergeReport {
    /// Models loaded (added or replaced).
    pub loaded: usize,
    /// Entries skipped, with why (no token prices, an invalid number).
    pub skipped: Vec<(String, String)>,
}

/// Model prices by name. Names match case-insensitively, with or without a provider
/// prefix (`anthropic/`), an Amazon Bedrock form (`anthropic.claude-…-v1:0`, with or
/// without a `us.` / `eu.` / `apac.` / `global.` inference-profile prefix), a date suffix
/// (`-20250219`, `-2024-08-06`, `@20250219`) or `-latest`.
///
/// A name's own entry always wins: a dated model with a price of its own
/// (`gpt-4o-2024-05-13`) is never priced as its undated family, and the undated name
/// falls back to a dated entry only when it has no entry itself.
#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    models: Names,
    /// Undated names reached only through dated entries (the latest inserted wins).
    aliases: Names,
}

/// Prices by model name. Looked up on every metered response (twice or more, with the
/// name's variants): foldhash rather than SipHash, as the names come from the price table
/// and the upstream's answers, not from a client choosing them to collide.
type Names = HashMap<String, Arc<ModelPrice>, foldhash::fast::RandomState>;

/// Claude prices: the official pricing page and the models' own pages, read 2026-12-06.
/// Cache writes cost 1.25× (5 minutes) and 2× (1 hour) the input price, cache reads 0.1×,
/// as the pricing page states.
const ANTHROPIC_SOURCE: &str =
    "https://platform.claude.com/docs/en/about-claude/pricing (2026-12-06)";
/// OpenAI prices: the official pricing and model pages, read 2026-12-06 (older entries
/// 2025-11).
const OPENAI_SOURCE: &str = "https://developers.openai.com/api/docs/pricing (2026-12-06)";
/// Anthropic web search: $10 per 1,000 searches.
const ANTHROPIC_WEB_SEARCH: u64 = 10_000_000_000;

impl PriceTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// The built-in table: current and recent Claude models (with long-context tiers
    /// where Anthropic has them) and OpenAI models, each with its source. Models whose
    /// prices could not be checked against the official pages are left out: merge a
    /// LiteLLM price map ([`merge_litellm_json`](Self::merge_litellm_json)) for them.
    pub fn builtin() -> Self {
        let mut t = Self::new();
        let tp = TokenPrices::builtin;
        let claude = |p: TokenPrices| {
            ModelPrice::new(p, ANTHROPIC_SOURCE).with_web_search(ANTHROPIC_WEB_SEARCH)
        };
        // https://platform.claude.com/docs/en/about-claude/pricing, "Model pricing"
        let fable_1 = tp("10", "50", "12.50", "20", "0.25");
        for name in ["claude-fable-5-1", "claude-mythos-5-1"] {
            t.insert(name, claude(fable_1));
        }
        let fable = tp("10", "50", "12.50", "20", "1");
        for name in ["claude-fable-5", "claude-mythos-5"] {
            t.insert(name, claude(fable));
        }
        let opus_new = tp("5", "25", "6.25", "10", "0.50");
        for name in [
            "claude-opus-5",
            "claude-opus-4-8",
            "claude-opus-4-7",
            "claude-opus-4-6",
            "claude-opus-4-5",
            "claude-opus-4-5-20251101",
        ] {
            t.insert(name, claude(opus_new));
        }
        let opus_old = tp("15", "75", "18.75", "30", "1.50");
        for name in [
            "claude-opus-4-1",
            "claude-opus-4-1-20250805",
            "claude-opus-4",
            "claude-opus-4-0",
            "claude-opus-4-20250514",
            "claude-4-opus",
            "claude-3-opus",
        ] {
            t.insert(name, claude(opus_old));
        }
        // https://platform.claude.com/docs/en/models/sonnet-5/overview
        t.insert(
            "claude-sonnet-5",
            claude(tp("2", "10", "2.50", "4", "0.20")),
        );
        let sonnet = tp("3", "15", "3.75", "6", "0.30");
        // https://platform.claude.com/docs/en/models/sonnet-4-6/overview: $3 / $15, 1M
        // context at the standard rate.
        t.insert("claude-sonnet-4-6", claude(sonnet));
        let sonnet_long = tp("6", "22.50", "7.50", "12", "0.60");
        for name in [
            "claude-sonnet-4-5",
            "claude-sonnet-4-5-20250929",
            "claude-sonnet-4",
            "claude-sonnet-4-0",
            "claude-sonnet-4-20250514",
            "claude-4-sonnet",
        ] {
            t.insert(name, claude(sonnet).with_long_context(200_000, sonnet_long));
        }
        for name in [
            "claude-3-7-sonnet",
            "claude-sonnet-3-7",
            "claude-3-7-sonnet-20250219",
            "claude-3-5-sonnet",
        ] {
            t.insert(name, claude(sonnet));
        }
        for name in ["claude-haiku-4-5", "claude-haiku-4-5-20251001"] {
            t.insert(name, claude(tp("1", "5", "1.25", "2", "0.10")));
        }
        for name in [
            "claude-3-5-haiku",
            "claude-haiku-3-5",
            "claude-3-5-haiku-20241022",
        ] {
            t.insert(name, claude(tp("0.80", "4", "1", "1.6", "0.08")));
        }
        for name in ["claude-3-haiku", "claude-3-haiku-20240307"] {
            t.insert(name, claude(tp("0.25", "1.25", "0.30", "0.50", "0.03")));
        }
        // OpenAI has no cache writes: writes are priced as input.
        let openai = |i: &str, o: &str, r: &str| ModelPrice::new(tp(i, o, i, i, r), OPENAI_SOURCE);
        t.insert("gpt-4o", openai("2.50", "10", "1.25"));
        t.insert("gpt-4o-2024-05-13", openai("5", "15", "5"));
        t.insert("gpt-4o-mini", openai("0.15", "0.60", "0.075"));
        t.insert("gpt-4.1", openai("2", "8", "0.50"));
        t.insert("gpt-4.1-mini", openai("0.40", "1.60", "0.10"));
        // https://developers.openai.com/api/docs/models/gpt-5-nano and …/gpt-5.4-nano
        t.insert("gpt-5-nano", openai("0.05", "0.40", "0.005"));
        // https://developers.openai.com/api/docs/models/gpt-5-mini, …/gpt-5.1 (whose
        // comparison lists GPT-5 at the same $1.25 input) and …/gpt-5-codex, read 2026-12-06
        t.insert("gpt-5", openai("1.25", "10", "0.125"));
        t.insert("gpt-5.1", openai("1.25", "10", "0.125"));
        t.insert("gpt-5-mini", openai("0.25", "2", "0.025"));
        t.insert("gpt-5.4-nano", openai("0.20", "1.25", "0.02"));
        t
    }

    /// Adds or replaces `model`'s prices (the name is matched as described on the type).
    pub fn insert(&mut self, model: &str, price: ModelPrice) {
        let full = model.trim().to_ascii_lowercase();
        let price = Arc::new(price);
        let base = base_name(&full);
        if base != full {
            self.aliases.insert(base.to_owned(), Arc::clone(&price));
        }
        self.models.insert(full, price);
    }

    /// How many names the table holds.
    pub fn len(&self) -> usize {
        self.models.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// The prices of `model`, if known.
    pub fn get(&self, model: &str) -> Option<&ModelPrice> {
        // Model names arrive in lower case nearly always: copied only when they are not.
        let model = model.trim();
        let lower = if model.bytes().any(|b| b.is_ascii_uppercase()) {
            std::borrow::Cow::Owned(model.to_ascii_lowercase())
        } else {
            std::borrow::Cow::Borrowed(model)
        };
        let mut name = &*lower;
        if let Some(p) = self.models.get(name) {
            return Some(p);
        }
        if let Some(i) = name.rfind('/') {
            name = &name[i + 1..];
            if let Some(p) = self.models.get(name) {
                return Some(p);
            }
        }
        let name = bedrock_name(name);
        if let Some(p) = self.models.get(name) {
            return Some(p);
        }
        let base = base_name(name);
        self.models
            .get(base)
            .or_else(|| self.aliases.get(base))
            .map(Arc::as_ref)
    }

    /// The cost of `usage` on `model`; `None` when the model is unknown.
    pub fn cost(&self, model: &str, usage: &Usage) -> Option<Money> {
        self.get(model).map(|p| p.cost(usage))
    }

    /// Merges a JSON price map with LiteLLM's field names (`input_cost_per_token`,
    /// `output_cost_per_token`, `cache_creation_input_token_cost`,
    /// `cache_creation_input_token_cost_above_1hr`, `cache_read_input_token_cost`, the
    /// `*_above_200k_tokens` variants; dollars per token). Entries replace existing ones of
    /// the same name; entries without token prices (`sample_spec`, image models) are
    /// skipped and reported.
    ///
    /// ```
    /// use palisade::cost::pricing::PriceTable;
    /// let mut table = PriceTable::new();
    /// let report = table.merge_litellm_json(r#"{
    ///     "my-model": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
    ///                  "cache_read_input_token_cost": 3.75e-08, "litellm_provider": "x"}
    /// }"#).unwrap();
    /// assert_eq!(report.loaded, 1);
    /// let p = table.get("my-model").unwrap();
    /// assert_eq!((p.base.input, p.base.output, p.base.cache_read), (3_000_000, 15_000_000, 37_500));
    /// ```
    pub fn merge_litellm_json(&mut self, json: &str) -> Result<MergeReport, PriceError> {
        let map: HashMap<String, Value> =
            serde_json::from_str(json).map_err(|e| PriceError::InvalidJson(e.to_string()))?;
        let mut report = MergeReport::default();
        let mut names: Vec<_> = map.keys().cloned().collect();
        names.sort();
        for name in names {
            match litellm_entry(&map[&name]) {
                Ok(Some(mut price)) => {
                    // LiteLLM has no per-search price in our terms: keep the one we know.
                    if price.web_search == 0 {
                        if let Some(old) = self.get(&name) {
                            price.web_search = old.web_search;
                        }
                    }
                    self.insert(&name, price);
                    report.loaded += 1;
                }
                Ok(None) => report
                    .skipped
                    .push((name, "no per-token input and output prices".to_owned())),
                Err(e) => report.skipped.push((name, e.to_string())),
            }
        }
        Ok(report)
    }
}

fn litellm_entry(v: &Value) -> Result<Option<ModelPrice>, PriceError> {
    let field = |name: &str| -> Result<Option<u64>, PriceError> {
        let text = match v.get(name) {
            None | Some(Value::Null) => return Ok(None),
            // serde_json prints a float in its shortest round-trip form, which is the
            // decimal text the file held (for up to 17 significant digits).
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(PriceError::NotANumber(other.to_string())),
        };
        let picos = parse_scaled(&text, 12)?;
        u64::try_from(picos)
            .map(Some)
            .map_err(|_| PriceError::TooLarge(text))
    };
    let (Some(input), Some(output)) = (
        field("input_cost_per_token")?,
        field("output_cost_per_token")?,
    ) else {
        return Ok(None);
    };
    let w5 = field("cache_creation_input_token_cost")?.unwrap_or(input);
    let base = TokenPrices {
        input,
        output,
        cache_write_5m: w5,
        // Anthropic prices a 1-hour cache write at twice the input price.
        cache_write_1h: field("cache_creation_input_token_cost_above_1hr")?
            .unwrap_or(input.saturating_mul(2)),
        cache_read: field("cache_read_input_token_cost")?.unwrap_or(input),
    };
    let source = match v.get("source").and_then(Value::as_str) {
        Some(s) => Cow::Owned(format!("LiteLLM price map ({s})")),
        None => Cow::Borrowed("LiteLLM price map"),
    };
    let mut price = ModelPrice::new(base, source);
    if let Some(li) = field("input_cost_per_token_above_200k_tokens")? {
        let lo = field("output_cost_per_token_above_200k_tokens")?.unwrap_or(base.output);
        let lw5 = field("cache_creation_input_token_cost_above_200k_tokens")?.unwrap_or(li);
        let tier = TokenPrices {
            input: li,
            output: lo,
            cache_write_5m: lw5,
            cache_write_1h: field("cache_creation_input_token_cost_above_1hr_above_200k_tokens")?
                .unwrap_or(li.saturating_mul(2)),
            cache_read: field("cache_read_input_token_cost_above_200k_tokens")?.unwrap_or(li),
        };
        price = price.with_long_context(200_000, tier);
    }
    Ok(Some(price))
}

/// An Amazon Bedrock model id (`us.anthropic.claude-sonnet-4-5-20250929-v1:0`) as the
/// provider names it (`claude-sonnet-4-5-20250929`); other names unchanged.
fn bedrock_name(name: &str) -> &str {
    let mut n = name;
    for region in ["us.", "eu.", "apac.", "global.", "jp.", "au.", "us-gov."] {
        if let Some(rest) = n.strip_prefix(region) {
            n = rest;
            break;
        }
    }
    let Some(rest) = n.strip_prefix("anthropic.") else {
        return name;
    };
    // `-v1:0`, `-v2:0`, `-v1`
    let b = rest.as_bytes();
    let mut end = rest.len();
    if let Some(colon) = rest.rfind(':') {
        if b[colon + 1..].iter().all(u8::is_ascii_digit) {
            end = colon;
        }
    }
    let head = &rest[..end];
    // The trailing `-v1` is Bedrock's revision (after a dated id, or an undated one such
    // as `claude-opus-4-6-v1`); in `claude-v2` and `claude-instant-v1` it is part of the
    // model's name.
    match head.rfind("-v") {
        Some(v)
            if v + 2 < head.len()
                && head.as_bytes()[v + 2..].iter().all(u8::is_ascii_digit)
                && !matches!(&head[..v], "claude" | "claude-instant") =>
        {
            &head[..v]
        }
        _ => head,
    }
}

/// The name without `-latest` and without a date suffix.
fn base_name(name: &str) -> &str {
    let name = name.strip_suffix("-latest").unwrap_or(name);
    let b = name.as_bytes();
    let digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    let n = b.len();
    // -YYYYMMDD or @YYYYMMDD
    if n > 9 && (b[n - 9] == b'-' || b[n - 9] == b'@') && digits(&b[n - 8..]) {
        return &name[..n - 9];
    }
    // -YYYY-MM-DD
    if n > 11
        && b[n - 11] == b'-'
        && b[n - 6] == b'-'
        && b[n - 3] == b'-'
        && digits(&b[n - 10..n - 6])
        && digits(&b[n - 5..n - 3])
        && digits(&b[n - 2..])
    {
        return &name[..n - 11];
    }
    name
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The dollars written on the stack read as the plain decimal format would
        /// write them, for every amount.
        #[test]
        fn dollars_on_the_stack_match_the_decimal_format(picos in prop_oneof![
            any::<u128>(),
            any::<u64>().prop_map(u128::from),
            (0u128..1_000_000, 0u32..20).prop_map(|(m, e)| m * 10u128.pow(e)),
        ]) {
            let whole = picos / Money::PICOS_PER_DOLLAR;
            let frac = picos % Money::PICOS_PER_DOLLAR;
            let want = if frac == 0 {
                whole.to_string()
            } else {
                format!("{whole}.{}", format!("{frac:012}").trim_end_matches('0'))
            };
            prop_assert_eq!(Money(picos).dollars_string(), want.clone());
            prop_assert_eq!(Money(picos).to_string(), format!("${want}"));
        }
    }

    #[test]
    fn model_lookup_ignores_case_and_surrounding_space() {
        let t = PriceTable::builtin();
        let want = t.get("claude-sonnet-4-5").unwrap();
        for name in [
            " Claude-Sonnet-4-5 ",
            "CLAUDE-SONNET-4-5",
            "anthropic/Claude-Sonnet-4-5",
        ] {
            assert_eq!(t.get(name), Some(want), "{name}");
        }
    }

    fn usage(input: u64, w5: u64, out: u64) -> Usage {
        Usage {
            input_tokens: input,
            cache_write_5m_tokens: w5,
            output_tokens: out,
            ..Usage::default()
        }
    }

    #[test]
    fn golden_costs() {
        let t = PriceTable::builtin();
        let c = t
            .cost("claude-3-7-sonnet-20250219", &usage(3, 12_304, 550))
            .unwrap();
        assert_eq!(c.dollars_string(), "0.054399");
        let c = t
            .cost("claude-opus-4-7", &usage(6, 159_217, 2_745))
            .unwrap();
        assert_eq!(c.dollars_string(), "1.06376125");
        assert_eq!(c, Money::parse_dollars("1.06376125").unwrap());
        // the same request with 217 of the cache-write tokens on the 1-hour cache
        let mut u = usage(6, 159_000, 2_745);
        u.cache_write_1h_tokens = 217;
        let c = t.cost("claude-opus-4-7", &u).unwrap();
        // 30000 + 159000 × 6250 + 217 × 10000 + 2745 × 25000 nano-dollars
        assert_eq!(
            c,
            Money::from_nanos(30_000 + 993_750_000 + 2_170_000 + 68_625_000)
        );
        assert_eq!(c.dollars_string(), "1.064575");
    }

    #[test]
    fn name_matching() {
        let t = PriceTable::builtin();
        for name in [
            "claude-3-7-sonnet-latest",
            "Claude-3-7-Sonnet-20250219",
            "anthropic/claude-3-7-sonnet-20250219",
            "claude-3-7-sonnet@20250219",
        ] {
            assert!(t.get(name).is_some(), "{name}");
        }
        assert_eq!(t.get("gpt-4o-mini-2024-07-18").unwrap().base.input, 150_000);
        assert_eq!(t.get("gpt-4o-2024-08-06").unwrap().base.input, 2_500_000);
        assert!(t.get("claude-opus-4-1-20250805").is_some());
        assert!(t.get("claude-opus-9").is_none());
        assert!(t.get("").is_none());
    }

    #[test]
    fn long_context_and_web_search() {
        let t = PriceTable::builtin();
        let mut u = usage(150_000, 60_000, 1_000);
        let long = t.cost("claude-sonnet-4-5", &u).unwrap();
        // 150k × $6 + 60k × $7.50 + 1k × $22.50 per MTok
        assert_eq!(long.dollars_string(), "1.3725");
        u.input_tokens = 100_000;
        let short = t.cost("claude-sonnet-4-5", &u).unwrap();
        assert_eq!(short.dollars_string(), "0.54"); // 0.3 + 0.225 + 0.015
        u.web_search_requests = 3;
        assert_eq!(
            t.cost("claude-sonnet-4-5", &u).unwrap().dollars_string(),
            "0.57"
        );
        // Sonnet 3.7 has no long-context tier
        let u = usage(300_000, 0, 0);
        assert_eq!(
            t.cost("claude-3-7-sonnet", &u).unwrap().dollars_string(),
            "0.9"
        );
    }

    #[test]
    fn decimal_parsing_is_exact() {
        assert_eq!(parse_scaled("3e-06", 12), Ok(3_000_000));
        assert_eq!(parse_scaled("3.75e-8", 12), Ok(37_500));
        assert_eq!(parse_scaled("0.0000001", 12), Ok(100_000));
        assert_eq!(parse_scaled("1.5E-5", 12), Ok(15_000_000));
        assert_eq!(parse_scaled("0", 12), Ok(0));
        assert_eq!(parse_scaled("2", 6), Ok(2_000_000));
        assert!(matches!(
            parse_scaled("1e-13", 12),
            Err(PriceError::TooPrecise(_))
        ));
        assert!(matches!(
            parse_scaled("-1", 12),
            Err(PriceError::Negative(_))
        ));
        assert!(matches!(
            parse_scaled("abc", 12),
            Err(PriceError::NotANumber(_))
        ));
        assert!(matches!(
            parse_scaled(".", 12),
            Err(PriceError::NotANumber(_))
        ));
        assert!(matches!(
            parse_scaled("1e40", 12),
            Err(PriceError::TooLarge(_))
        ));
        // a price that f64 arithmetic would get wrong: 0.1 + 0.2 style drift
        let a = Money::parse_dollars("0.1").unwrap();
        let b = Money::parse_dollars("0.2").unwrap();
        assert_eq!(a.saturating_add(b), Money::parse_dollars("0.3").unwrap());
    }

    #[test]
    fn litellm_merge() {
        let mut t = PriceTable::builtin();
        let report = t
            .merge_litellm_json(
                r#"{
            "sample_spec": {"max_tokens": "LEGACY", "input_cost_per_token": 0.0},
            "claude-3-7-sonnet-20250219": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
                "cache_creation_input_token_cost": 3.75e-06, "cache_read_input_token_cost": 3e-07},
            "claude-sonnet-4-5": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
                "input_cost_per_token_above_200k_tokens": 6e-06, "output_cost_per_token_above_200k_tokens": 2.25e-05},
            "tiny": {"input_cost_per_token": 1e-15, "output_cost_per_token": 1e-6},
            "image": {"output_cost_per_image": 0.04}
        }"#,
            )
            .unwrap();
        assert_eq!(report.loaded, 2);
        assert_eq!(report.skipped.len(), 3);
        assert!(
            report
                .skipped
                .iter()
                .any(|(n, e)| n == "tiny" && e.contains("precision"))
        );
        let p = t.get("claude-3-7-sonnet-20250219").unwrap();
        assert!(p.source.contains("LiteLLM"));
        let c = p.cost(&usage(3, 12_304, 550));
        assert_eq!(c.dollars_string(), "0.054399");
        let p = t.get("claude-sonnet-4-5").unwrap();
        assert_eq!(p.long_context.unwrap().1.output, 22_500_000);
        assert!(t.merge_litellm_json("[1]").is_err());
    }

    #[test]
    fn litellm_merge_keeps_the_builtin_web_search_price() {
        let mut t = PriceTable::builtin();
        t.merge_litellm_json(
            r#"{"claude-sonnet-4-5": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05}}"#,
        )
        .unwrap();
        let p = t.get("claude-sonnet-4-5").unwrap();
        assert!(p.source.contains("LiteLLM"));
        assert_eq!(p.web_search, ANTHROPIC_WEB_SEARCH);
    }

    #[test]
    fn litellm_entry_without_one_hour_price_is_twice_input() {
        let mut t = PriceTable::new();
        t.merge_litellm_json(
            r#"{"m": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
                "cache_creation_input_token_cost": 3.75e-06,
                "input_cost_per_token_above_200k_tokens": 6e-06}}"#,
        )
        .unwrap();
        let p = t.get("m").unwrap();
        assert_eq!(p.base.cache_write_5m, 3_750_000);
        assert_eq!(p.base.cache_write_1h, 6_000_000);
        assert_eq!(p.long_context.unwrap().1.cache_write_1h, 12_000_000);
    }

    #[test]
    fn date_suffix_never_overrides_a_dated_models_own_price() {
        let t = PriceTable::builtin();
        assert_eq!(t.get("gpt-4o-2024-05-13").unwrap().base.input, 5_000_000);
        assert_eq!(t.get("gpt-4o-2024-05-13").unwrap().base.output, 15_000_000);
        assert_eq!(t.get("gpt-4o").unwrap().base.input, 2_500_000);
        assert_eq!(t.get("gpt-4o-2024-11-20").unwrap().base.input, 2_500_000);
        // A dated entry merged into a table without its family does not become the
        // family's price once the family has one.
        let mut t = PriceTable::new();
        let p = |i: u64| {
            ModelPrice::new(
                TokenPrices {
                    input: i,
                    ..TokenPrices::default()
                },
                "t",
            )
        };
        t.insert("gpt-x-2024-05-13", p(5));
        assert_eq!(t.get("gpt-x").unwrap().base.input, 5, "alias while alone");
        t.insert("gpt-x", p(2));
        assert_eq!(t.get("gpt-x").unwrap().base.input, 2);
        assert_eq!(t.get("gpt-x-2024-05-13").unwrap().base.input, 5);
        t.insert("gpt-x-2024-08-06", p(3));
        assert_eq!(
            t.get("gpt-x").unwrap().base.input,
            2,
            "own entry wins over aliases"
        );
    }

    #[test]
    fn current_models_and_bedrock_ids_are_priced() {
        let t = PriceTable::builtin();
        for (name, input) in [
            ("claude-sonnet-4-6", 3_000_000),
            ("claude-sonnet-5", 2_000_000),
            ("claude-opus-5", 5_000_000),
            ("claude-opus-4-8", 5_000_000),
            ("claude-fable-5-1", 10_000_000),
            ("anthropic.claude-sonnet-4-5-20250929-v1:0", 3_000_000),
            ("us.anthropic.claude-haiku-4-5-20251001-v1:0", 1_000_000),
            ("eu.anthropic.claude-3-7-sonnet-20250219-v1:0", 3_000_000),
            ("apac.anthropic.claude-opus-4-1-20250805-v1:0", 15_000_000),
            ("global.anthropic.claude-opus-4-5-20251101-v1:0", 5_000_000),
            ("anthropic.claude-3-haiku-20240307-v1:0", 250_000),
            ("gpt-5-nano-2025-08-07", 50_000),
            ("gpt-5.4-nano", 200_000),
            ("gpt-5", 1_250_000),
            ("gpt-5-2025-08-07", 1_250_000),
            ("gpt-5-mini-2025-08-07", 250_000),
            ("gpt-5.1", 1_250_000),
        ] {
            assert_eq!(t.get(name).map(|p| p.base.input), Some(input), "{name}");
        }
        assert_eq!(bedrock_name("anthropic.claude-v2:1"), "claude-v2");
        assert_eq!(bedrock_name("claude-3-haiku"), "claude-3-haiku");
        assert!(t.get("us.meta.llama3-70b-instruct-v1:0").is_none());
    }

    #[test]
    fn cost_saturates_instead_of_overflowing_on_extreme_prices_and_counts() {
        // A merged price map may hold any price below 2^64 pico-dollars, and an upstream
        // may report any count below 2^64: the sum must saturate, never wrap or panic.
        let max = TokenPrices {
            input: u64::MAX,
            output: u64::MAX,
            cache_write_5m: u64::MAX,
            cache_write_1h: u64::MAX,
            cache_read: u64::MAX,
        };
        let p = ModelPrice::new(max, "t").with_long_context(u64::MAX, max);
        let u = Usage {
            input_tokens: u64::MAX,
            output_tokens: u64::MAX,
            cache_write_5m_tokens: u64::MAX,
            cache_write_1h_tokens: u64::MAX,
            cache_read_tokens: u64::MAX,
            web_search_requests: u64::MAX,
        };
        assert_eq!(p.cost(&u), Money::from_picos(u128::MAX));
        let mut t = PriceTable::new();
        t.merge_litellm_json(
            r#"{"m": {"input_cost_per_token": "18446744.073709551615", "output_cost_per_token": "18446744.073709551615"}}"#,
        )
        .unwrap();
        let two = Usage {
            input_tokens: u64::MAX,
            output_tokens: u64::MAX,
            ..Usage::default()
        };
        assert_eq!(t.cost("m", &two), Some(Money::from_picos(u128::MAX)));
    }

    #[test]
    fn bedrock_ids_without_a_date_are_priced() {
        // Newer Bedrock ids carry the revision without a date (`…-opus-4-6-v1`).
        let t = PriceTable::builtin();
        for (name, input) in [
            ("anthropic.claude-opus-4-6-v1", 5_000_000),
            ("global.anthropic.claude-opus-4-6-v1", 5_000_000),
            ("us.anthropic.claude-sonnet-4-5-v1:0", 3_000_000),
            ("eu.anthropic.claude-haiku-4-5-v1:0", 1_000_000),
        ] {
            assert_eq!(t.get(name).map(|p| p.base.input), Some(input), "{name}");
        }
        assert_eq!(bedrock_name("anthropic.claude-v2:1"), "claude-v2");
        assert_eq!(
            bedrock_name("anthropic.claude-instant-v1"),
            "claude-instant-v1"
        );
    }

    #[test]
    fn money_display() {
        assert_eq!(Money::ZERO.to_string(), "$0");
        assert_eq!(Money::from_picos(1).to_string(), "$0.000000000001");
        assert_eq!(Money::from_nanos(2_500_000_000).to_string(), "$2.5");
        assert_eq!(Money::from_picos(1500).nanos(), 1);
    }
}
