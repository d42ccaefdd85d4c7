//! `Reservation`: quantities reserved before the call and settled after it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use smallvec::SmallVec;

use super::shared::Shared;
use crate::rate_limit::algorithm::Params;
use crate::rate_limit::error::StoreError;
use crate::rate_limit::key::RateKey;
use crate::rate_limit::store::{Settlement, Store};

/// A reservation for a quantity known only after the response (rules with
/// [`Cost::Settled`](super::Cost::Settled)), found in the request extensions of an admitted request.
///
/// Call [`Reservation::settle`] with the actual amount once it is known (for example the
/// tokens a completion used): the difference to the reserved estimate is debited or
/// credited. Settling twice does nothing (a settlement the store failed to apply may be
/// retried); dropping it without settling keeps the estimate.
#[derive(Clone)]
pub struct Reservation {
    pub(super) inner: Arc<ReservationInner>,
}

pub(super) struct ReservationInner {
    pub(super) target: Arc<dyn SettleTarget>,
    pub(super) items: SmallVec<[ReservedItem; 2]>,
    pub(super) settled: AtomicBool,
}

pub(super) struct ReservedItem {
    pub(super) index: u32,
    pub(super) key: RateKey,
    pub(super) params: Params,
    pub(super) window_start: u64,
    pub(super) generation: u32,
    pub(super) reservation_end: u64,
    pub(super) reserved: u64,
}

pub(super) trait SettleTarget: Send + Sync + 'static {
    fn settle_items(&self, s: &[Settlement<'_>])
    -> super::store::BoxFuture<Result<(), StoreError>>;
    fn rule_name(&self, index: u32) -> &str;
}

impl<St: Store> SettleTarget for Shared<St> {
    fn settle_items(
        &self,
        s: &[Settlement<'_>],
    ) -> super::store::BoxFuture<Result<(), StoreError>> {
        self.store.settle(s)
    }
    fn rule_name(&self, index: u32) -> &str {
        &self.rules[index as usize].rule.name
    }
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("reserved", &self.reserved())
            .field("settled", &self.inner.settled.load(Ordering::Relaxed))
            .finish()
    }
}

impl Reservation {
    /// The units reserved (the largest over the settled rules; they usually agree).
    pub fn reserved(&self) -> u64 {
        self.inner
            .items
            .iter()
            .map(|i| i.reserved)
            .max()
            .unwrap_or(0)
    }

    /// Settles the reservation with the `actual` amount. Only the first call that the
    /// store applies counts: after an error nothing was settled, and calling again retries.
    pub async fn settle(&self, actual: u64) -> Result<(), StoreError> {
        if self.inner.settled.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let target = &*self.inner.target;
        let settlements: SmallVec<[Settlement<'_>; 2]> = self
            .inner
            .items
            .iter()
            .map(|i| Settlement {
                rule_index: i.index,
                rule: target.rule_name(i.index),
                key: &i.key,
                params: i.params,
                window_start: i.window_start,
                generation: i.generation,
                reservation_end: i.reservation_end,
                delta: settlement_delta(actual, i.reserved),
            })
            .filter(|s| s.delta != 0)
            .collect();
        if settlements.is_empty() {
            return Ok(());
        }
        let result = target.settle_items(&settlements).await;
        if result.is_err() {
            // Not applied: a later call may try again.
            self.inner.settled.store(false, Ordering::Release);
        }
        result
    }
}

/// `actual − reserved` as a settlement delta, clamped to i64 on the side it falls (a refund
/// larger than `i64::MAX` units stays a refund).
pub(super) fn settlement_delta(actual: u64, reserved: u64) -> i64 {
    let delta = i128::from(actual) - i128::from(reserved);
    i64::try_from(delta).unwrap_or(if delta < 0 { i64::MIN } else { i64::MAX })
}

#[cfg(test)]
mod tests {
    use super::settlement_delta;

    #[test]
    fn settlement_deltas_keep_their_sign_when_clamped() {
        assert_eq!(settlement_delta(10, 3), 7);
        assert_eq!(settlement_delta(3, 10), -7);
        assert_eq!(settlement_delta(u64::MAX, 0), i64::MAX);
        assert_eq!(settlement_delta(0, u64::MAX), i64::MIN);
        assert_eq!(settlement_delta(0, 1 << 63), i64::MIN);
        assert_eq!(settlement_delta(5, 5), 0);
    }
}
