use proptest::prelude::*;

use super::*;

const SEC: u64 = 1_000_000;

fn run(params: &Params, state: &mut State, now: u64, cost: u64) -> Decided {
    let d = decide(params, state, now, cost);
    if d.verdict.is_allowed() {
        *state = d.state;
    }
    d
}

fn sliding(limit: u64, window_secs: u64) -> Params {
    Params::new(
        Algorithm::SlidingWindow,
        Quota::new(limit, std::time::Duration::from_secs(window_secs)),
    )
}

#[test]
fn sliding_window_weights_the_previous_window() {
    let p = sliding(10, 60);
    let mut s = State::default();
    for _ in 0..10 {
        assert!(run(&p, &mut s, 30 * SEC, 1).verdict.is_allowed());
    }
    let d = run(&p, &mut s, 30 * SEC, 1);
    // in the next window the 10 weigh (60 - e)/60; one fits once 10 × (60 − e) ≤ 9 × 60,
    // at e = 6 s, i.e. 36 s after t = 30 s.
    assert_eq!(
        d.verdict,
        Verdict::Denied {
            retry_after: 36 * SEC
        }
    );
    assert!(!run(&p, &mut s, 66 * SEC - 1, 1).verdict.is_allowed());
    let d = run(&p, &mut s, 66 * SEC, 1);
    assert!(d.verdict.is_allowed());
    assert_eq!(d.remaining, 0);
    // half-way through, half of the previous window still counts
    let d = decide(&p, &s, 90 * SEC, 0);
    assert_eq!(d.remaining, 10 - 5 - 1);
}

#[test]
fn sliding_window_counts_costs_and_never_counts_refusals() {
    let p = sliding(20, 60);
    let mut s = State::default();
    assert!(run(&p, &mut s, 0, 15).verdict.is_allowed());
    let d = run(&p, &mut s, SEC, 6);
    assert!(matches!(d.verdict, Verdict::Denied { .. }));
    assert_eq!(s.count, 15, "a refusal is not counted");
    assert!(run(&p, &mut s, SEC, 5).verdict.is_allowed());
    assert_eq!(s.count, 20);
    // cost above the limit is never admissible
    assert_eq!(run(&p, &mut s, 2 * SEC, 21).verdict, Verdict::Never);
    assert_eq!(s.count, 20);
}

#[test]
fn sliding_window_retry_after_is_exact() {
    let p = sliding(7, 10);
    let mut s = State::default();
    for t in [0, 2, 4, 6, 8, 9, 9] {
        assert!(run(&p, &mut s, t * SEC, 1).verdict.is_allowed());
    }
    for cost in 1..=7 {
        for now in [9 * SEC, 9 * SEC + 1, 12 * SEC, 15 * SEC + 7] {
            if let Verdict::Denied { retry_after } = decide(&p, &s, now, cost).verdict {
                assert!(
                    !decide(&p, &s, now + retry_after - 1, cost)
                        .verdict
                        .is_allowed()
                );
                assert!(decide(&p, &s, now + retry_after, cost).verdict.is_allowed());
            }
        }
    }
}

#[test]
fn strict_sliding_window_never_exceeds_the_limit_at_the_edge() {
    let p = sliding(10, 60).strict(true);
    let mut s = State::default();
    for _ in 0..10 {
        assert!(run(&p, &mut s, 59 * SEC, 1).verdict.is_allowed());
    }
    // non-strict would admit 1 at t = 60 s + 6 s; strict waits for the previous window to
    // slide out entirely.
    let d = run(&p, &mut s, 66 * SEC, 1);
    assert_eq!(
        d.verdict,
        Verdict::Denied {
            retry_after: 54 * SEC
        }
    );
    assert!(run(&p, &mut s, 120 * SEC, 1).verdict.is_allowed());
    let loose = sliding(10, 60);
    let mut s = State::default();
    for _ in 0..10 {
        run(&loose, &mut s, 59 * SEC, 1);
    }
    assert!(run(&loose, &mut s, 66 * SEC, 1).verdict.is_allowed());
}

#[test]
fn fixed_window_resets_at_the_edge() {
    let p = Params::new(Algorithm::FixedWindow, Quota::per_minute(3));
    let mut s = State::default();
    for _ in 0..3 {
        assert!(run(&p, &mut s, 59 * SEC, 1).verdict.is_allowed());
    }
    let d = run(&p, &mut s, 59 * SEC, 1);
    assert_eq!(d.verdict, Verdict::Denied { retry_after: SEC });
    // the documented 2 × limit at the edge
    for _ in 0..3 {
        assert!(run(&p, &mut s, 60 * SEC, 1).verdict.is_allowed());
    }
    assert!(!run(&p, &mut s, 60 * SEC, 1).verdict.is_allowed());
    assert_eq!(run(&p, &mut s, 61 * SEC, 4).verdict, Verdict::Never);
    let d = run(&p, &mut s, 200 * SEC, 2);
    assert!(d.verdict.is_allowed());
    assert_eq!((d.remaining, d.reset), (1, 40 * SEC));
}

#[test]
fn gcra_spaces_requests_after_the_burst() {
    let p = Params::new(Algorithm::Gcra, Quota::per_second(10).with_burst(2));
    let mut s = State::default();
    assert!(run(&p, &mut s, 0, 1).verdict.is_allowed());
    let d = run(&p, &mut s, 0, 1);
    assert!(d.verdict.is_allowed());
    assert_eq!(d.remaining, 0);
    let d = run(&p, &mut s, 0, 1);
    assert_eq!(
        d.verdict,
        Verdict::Denied {
            retry_after: 100_000
        }
    );
    assert!(run(&p, &mut s, 100_000, 1).verdict.is_allowed());
    assert!(!run(&p, &mut s, 150_000, 1).verdict.is_allowed());
    assert_eq!(run(&p, &mut s, 150_000, 3).verdict, Verdict::Never);
    // after a quiet second the bucket is full again
    let d = decide(&p, &s, 2 * SEC, 0);
    assert_eq!(d.remaining, 2);
    assert_eq!(
        d.expires_at,
        2 * SEC,
        "an idle bucket may be forgotten at once"
    );
}

#[test]
fn gcra_costs_take_several_intervals() {
    let p = Params::new(Algorithm::Gcra, Quota::per_minute(60));
    let mut s = State::default();
    assert!(run(&p, &mut s, 0, 60).verdict.is_allowed());
    let d = run(&p, &mut s, 0, 30);
    assert_eq!(
        d.verdict,
        Verdict::Denied {
            retry_after: 30 * SEC
        }
    );
    assert!(run(&p, &mut s, 30 * SEC, 30).verdict.is_allowed());
}

/// A settlement can push a count to u64::MAX; every window algorithm then refuses (no
/// overflow, so no wrap-around into an admission) until the count slides out.
#[test]
fn saturated_counts_refuse_without_overflow() {
    for p in [
        sliding(10, 1),
        sliding(10, 1).strict(true),
        Params::new(Algorithm::FixedWindow, Quota::per_second(10)),
        sliding(u64::MAX, 1),
        sliding(u64::MAX, 1).strict(true),
    ] {
        let mut s = State::default();
        assert!(run(&p, &mut s, 0, 1).verdict.is_allowed());
        s = settle(&p, &s, 0, i64::MAX);
        s = settle(&p, &s, 0, i64::MAX);
        assert_eq!(s.count, u64::MAX, "{p:?}");
        let d = decide(&p, &s, SEC / 2, 1);
        assert!(
            matches!(d.verdict, Verdict::Denied { retry_after } if retry_after > 0),
            "{p:?} {d:?}"
        );
        assert_eq!(d.remaining, 0);
        // Three windows later nothing is left of it.
        assert!(decide(&p, &s, 3 * SEC, 1).verdict.is_allowed(), "{p:?}");
    }
}

/// A burst so large that its tolerance reaches past u64 neither overflows nor refuses.
#[test]
fn gcra_with_a_huge_burst_does_not_overflow() {
    let p = Params::new(Algorithm::Gcra, Quota::per_day(1).with_burst(u64::MAX));
    let mut s = State::default();
    for now in [5, 5, u64::MAX / 2] {
        let d = run(&p, &mut s, now, 1_000);
        assert!(d.verdict.is_allowed(), "{d:?}");
        assert!(d.remaining > 0);
    }
}

/// The longest window a `Quota` can hold (`Duration::MAX`, u64::MAX µs) decides without
/// overflow and still limits.
#[test]
fn the_longest_window_does_not_overflow() {
    let q = Quota::new(3, std::time::Duration::MAX);
    for p in [
        Params::new(Algorithm::SlidingWindow, q),
        Params::new(Algorithm::SlidingWindow, q).strict(true),
        Params::new(Algorithm::FixedWindow, q),
        Params::new(Algorithm::Gcra, q),
    ] {
        assert_eq!(p.window, u64::MAX);
        let mut s = State::default();
        for now in [0, 7, 7] {
            assert!(run(&p, &mut s, now, 1).verdict.is_allowed(), "{p:?} {now}");
        }
        let d = run(&p, &mut s, 7, 1);
        assert!(
            matches!(d.verdict, Verdict::Denied { retry_after } if retry_after > 0),
            "{p:?} {d:?}"
        );
    }
}

#[test]
fn settle_adjusts_the_window_it_was_reserved_in() {
    let p = sliding(100, 60);
    let mut s = State::default();
    let d = run(&p, &mut s, SEC, 10);
    s = settle(&p, &s, d.window_start, 25);
    assert_eq!(s.count, 35);
    s = settle(&p, &s, d.window_start, -40);
    assert_eq!(s.count, 0);
    // after the window rolls, the correction lands in `prev`
    let d2 = run(&p, &mut s, SEC, 10);
    run(&p, &mut s, 61 * SEC, 1);
    s = settle(&p, &s, d2.window_start, 5);
    assert_eq!((s.prev, s.count), (15, 1));
    // two windows later it is dropped
    run(&p, &mut s, 125 * SEC, 1);
    let before = s;
    assert_eq!(settle(&p, &s, d2.window_start, 5), before);

    let g = Params::new(Algorithm::Gcra, Quota::per_second(10));
    let mut s = State::default();
    run(&g, &mut s, 0, 1);
    let tat = s.start;
    s = settle(&g, &s, 0, 2);
    assert_eq!(s.start, tat + 200_000);
}

#[test]
fn sliding_window_reset_is_when_the_quota_is_restored() {
    // Used up at 30 s into the first window: those units weigh until the end of the second
    // window, so that is when the quota is whole again (not the first window's end).
    let p = sliding(2, 60);
    let mut s = State::default();
    run(&p, &mut s, 30 * SEC, 1);
    let d = run(&p, &mut s, 30 * SEC, 1);
    assert_eq!((d.remaining, d.reset), (0, 90 * SEC));
    assert!(decide(&p, &s, 30 * SEC + d.reset, 2).verdict.is_allowed());
    assert!(
        !decide(&p, &s, 60 * SEC, 1).verdict.is_allowed(),
        "the old end of window"
    );
    // only the previous window left: restored at the current window's end
    let d = decide(&p, &s, 70 * SEC, 0);
    assert_eq!(d.reset, 50 * SEC);
    // nothing counted: whole now
    assert_eq!(decide(&p, &State::default(), 5 * SEC, 0).reset, 0);
    let f = Params::new(Algorithm::FixedWindow, Quota::per_minute(3));
    assert_eq!(decide(&f, &State::default(), 5 * SEC, 0).reset, 0);
}

#[test]
fn a_peek_is_allowed_after_a_settlement_overshoots() {
    for p in [
        sliding(10, 60),
        sliding(10, 60).strict(true),
        Params::new(Algorithm::FixedWindow, Quota::per_minute(10)),
        Params::new(Algorithm::Gcra, Quota::per_minute(10)),
    ] {
        let mut s = State::default();
        let d = run(&p, &mut s, SEC, 5);
        // the actual amount was far above the estimate
        s = settle(&p, &s, d.window_start, 1_000);
        assert!(!decide(&p, &s, 2 * SEC, 1).verdict.is_allowed(), "{p:?}");
        let peek = decide(&p, &s, 2 * SEC, 0);
        assert_eq!(peek.verdict, Verdict::Allowed, "{p:?}");
        assert_eq!(peek.remaining, 0, "{p:?}");
        assert!(peek.reset > 0, "{p:?}");
    }
}

/// Counts admitted units in every span `[t − W, t]` (ending at an arrival).
fn max_in_any_window(admitted: &[(u64, u64)], w: u64) -> u64 {
    let mut best = 0;
    for (i, &(t, _)) in admitted.iter().enumerate() {
        let sum: u64 = admitted[..=i]
            .iter()
            .filter(|(u, _)| *u + w > t)
            .map(|(_, c)| c)
            .sum();
        best = best.max(sum);
    }
    best
}

fn arrivals() -> impl Strategy<Value = Vec<(u64, u64)>> {
    prop::collection::vec((0u64..3_000_000, 1u64..4), 1..120).prop_map(|mut v| {
        v.sort_unstable();
        v
    })
}

proptest! {
    #[test]
    fn sliding_window_never_admits_twice_the_limit(arrivals in arrivals(), limit in 1u64..12) {
        let p = Params { window: SEC, ..sliding(limit, 1) };
        let mut s = State::default();
        let mut admitted = Vec::new();
        for &(t, cost) in &arrivals {
            if run(&p, &mut s, t, cost).verdict.is_allowed() {
                admitted.push((t, cost));
            }
        }
        prop_assert!(max_in_any_window(&admitted, SEC) < 2 * limit);
        // and within any aligned window, never more than the limit
        for k in 0..4 {
            let sum: u64 = admitted.iter().filter(|(t, _)| t / SEC == k).map(|(_, c)| c).sum();
            prop_assert!(sum <= limit);
        }
    }

    #[test]
    fn strict_sliding_window_never_admits_more_than_the_limit(arrivals in arrivals(), limit in 1u64..12) {
        let p = sliding(limit, 1).strict(true);
        let mut s = State::default();
        let mut admitted = Vec::new();
        for &(t, cost) in &arrivals {
            if run(&p, &mut s, t, cost).verdict.is_allowed() {
                admitted.push((t, cost));
            }
        }
        prop_assert!(max_in_any_window(&admitted, SEC) <= limit);
    }

    #[test]
    fn gcra_never_admits_more_than_limit_plus_burst(arrivals in arrivals(), limit in 1u64..12) {
        let p = Params::new(Algorithm::Gcra, Quota::per_second(limit));
        let mut s = State::default();
        let mut admitted = Vec::new();
        for &(t, cost) in &arrivals {
            if run(&p, &mut s, t, cost).verdict.is_allowed() {
                admitted.push((t, cost));
            }
        }
        prop_assert!(max_in_any_window(&admitted, SEC) <= 2 * limit);
    }

    #[test]
    fn retry_after_is_the_first_admitting_instant(arrivals in arrivals(), limit in 1u64..12, strict: bool) {
        let p = sliding(limit, 1).strict(strict);
        let mut s = State::default();
        for &(t, cost) in &arrivals {
            let d = run(&p, &mut s, t, cost);
            if let Verdict::Denied { retry_after } = d.verdict {
                prop_assert!(retry_after > 0);
                prop_assert!(decide(&p, &s, t + retry_after, cost).verdict.is_allowed());
                if !strict {
                    prop_assert!(!decide(&p, &s, t + retry_after - 1, cost).verdict.is_allowed());
                }
            }
        }
    }

    /// `t` of the `RateLimit` header is honest: after an admission that leaves nothing
    /// (`r=0`), waiting `t` whole seconds (the reset, rounded up as the header is) admits
    /// the same request, and in fact the largest request the rule can ever admit.
    #[test]
    fn waiting_the_reset_after_r0_admits_the_same_request(
        arrivals in arrivals(),
        limit in 1u64..12,
        algorithm in prop_oneof![
            Just(Algorithm::SlidingWindow),
            Just(Algorithm::FixedWindow),
            Just(Algorithm::Gcra),
        ],
        strict: bool,
        burst in 1u64..12,
    ) {
        let strict = strict && algorithm == Algorithm::SlidingWindow;
        let p = Params::new(algorithm, Quota::per_second(limit).with_burst(burst)).strict(strict);
        let mut s = State::default();
        for &(t, cost) in &arrivals {
            let d = run(&p, &mut s, t, cost);
            if d.verdict.is_allowed() && d.remaining == 0 {
                let t_secs = crate::rate_limit::headers::ceil_secs(d.reset);
                let later = t + t_secs * SEC;
                prop_assert!(decide(&p, &s, later, cost).verdict.is_allowed(), "{:?} {:?} at {}", p, d, t);
                prop_assert!(decide(&p, &s, later, p.capacity()).verdict.is_allowed(), "{:?} {:?} at {}", p, d, t);
                prop_assert!(decide(&p, &s, t + d.reset, cost).verdict.is_allowed(), "{:?} {:?} at {}", p, d, t);
            }
        }
    }

    /// `remaining` is the sliding estimate's room, computed here in u128 from the state the
    /// decision leaves: `limit − ceil(prev × (W − e) / W) − count` (strict: `limit − prev −
    /// count`), never below 0, for admissions and refusals alike, with limits and windows
    /// large enough to take the u128 path.
    #[test]
    fn sliding_window_remaining_is_the_estimates_room(
        limit in prop_oneof![1u64..50, 1u64..u64::MAX],
        w in prop_oneof![1u64..100, 1u64..u64::MAX / 4],
        prev in 0u64..60,
        count in 0u64..60,
        now_in in 0u64..u64::MAX / 4,
        cost in 0u64..60,
        strict: bool,
        scale: bool,
    ) {
        let p = Params { limit, window: w, ..sliding(1, 1) }.strict(strict);
        // counts near the limit when it is large, so every branch is reached
        let (prev, count) = if scale { (limit / 64 * prev, limit / 64 * count) } else { (prev, count) };
        let start = now_in - now_in % w;
        let state = State { start, prev, count };
        let now = start + now_in % w;
        let d = decide(&p, &state, now, cost);
        let e = u128::from(now - d.state.start).min(u128::from(w) - 1);
        let (wd, left_prev) = (u128::from(w), u128::from(d.state.prev));
        let weighted = if strict { left_prev } else { (left_prev * (wd - e)).div_ceil(wd) };
        let want = u128::from(limit).saturating_sub(weighted).saturating_sub(u128::from(d.state.count));
        prop_assert_eq!(u128::from(d.remaining), want, "{:?} {:?}", p, d);
    }

    /// No input panics (tests run with overflow checks): any quota, any stored state, any
    /// time and cost, any settlement. A state the store could not have written (a window
    /// start after `now`, say) still gets an answer.
    #[test]
    fn no_input_overflows(
        algorithm in prop_oneof![
            Just(Algorithm::SlidingWindow),
            Just(Algorithm::FixedWindow),
            Just(Algorithm::Gcra),
        ],
        limit in prop_oneof![1u64..100, 1u64..=u64::MAX],
        window in prop_oneof![1u64..100, 1u64..=u64::MAX],
        burst in prop_oneof![1u64..100, 1u64..=u64::MAX],
        strict: bool,
        start: u64,
        prev: u64,
        count: u64,
        now: u64,
        cost in prop_oneof![0u64..4, any::<u64>()],
        delta: i64,
    ) {
        let strict = strict && algorithm == Algorithm::SlidingWindow;
        let p = Params { algorithm, limit, window, burst, strict };
        let state = State { start, prev, count };
        let d = decide(&p, &state, now, cost);
        if let Verdict::Denied { retry_after } = d.verdict {
            prop_assert!(retry_after > 0, "{:?}", d);
        }
        let settled = settle(&p, &d.state, d.window_start, delta);
        let _ = decide(&p, &settled, now, cost);
    }
}
