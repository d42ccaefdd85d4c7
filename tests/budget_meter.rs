//! The budget layer and the cost meter together: the meter settles each reservation with
//! the cost it measured — whole, partial (a stream cut short) or nothing (an error).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use palisade::cost::budget::{Budget, BudgetLayer, Period, Scope};
use palisade::cost::{
    Completion, CostMeterLayer, Money, PriceTable, RecorderConfig, SinkError, UsageRecord,
    UsageRecorder, UsageSink,
};
use tokio::sync::mpsc;
use tower::{ServiceBuilder, ServiceExt, service_fn};

const SONNET_37: &str = include_str!("cost_data/anthropic_sonnet37.sse");
/// A request with a long prompt (the golden responses cache-write 12 304 tokens of it).
fn request_body() -> String {
    let prompt = "lorem ipsum ".repeat(3_500);
    format!(
        r#"{{"model":"claude-3-7-sonnet-20250219","max_tokens":2000,"stream":true,"messages":[{{"role":"user","content":"{prompt}"}}]}}"#
    )
}

/// A response body fed by a channel: it stays open until the sender is dropped.
struct ChanBody(mpsc::Receiver<Bytes>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

/// Forwards records to the test, so it can wait for them without sleeping.
struct Forward(mpsc::UnboundedSender<UsageRecord>);

impl UsageSink for Forward {
    async fn record_batch(&self, batch: &[UsageRecord]) -> Result<(), SinkError> {
        for r in batch {
            let _ = self.0.send(r.clone());
        }
        Ok(())
    }
}

fn layers() -> (
    BudgetLayer,
    CostMeterLayer,
    mpsc::UnboundedReceiver<UsageRecord>,
) {
    let budget = BudgetLayer::builder()
        .budget(Budget::new(
            "daily",
            Scope::User,
            Period::Day,
            Money::parse_dollars("1").unwrap(),
        ))
        .build()
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let (recorder, _shutdown) = UsageRecorder::spawn(Forward(tx), RecorderConfig::default());
    let meter = CostMeterLayer::new(PriceTable::builtin(), recorder);
    (budget, meter, rx)
}

fn request() -> Request<Full<Bytes>> {
    let mut req = Request::post("/v1/messages")
        .body(Full::new(Bytes::from(request_body())))
        .unwrap();
    req.extensions_mut()
        .insert(palisade::cost::Principal::new("carol"));
    req
}

#[tokio::test]
async fn a_streamed_response_cut_short_settles_its_partial_cost() {
    let (budget, meter, mut records) = layers();
    let (tx, rx) = mpsc::channel(8);
    let start_end = SONNET_37.find("event: content_block_start").unwrap();
    tx.send(Bytes::copy_from_slice(&SONNET_37.as_bytes()[..start_end]))
        .await
        .unwrap();
    let body = Arc::new(Mutex::new(Some(ChanBody(rx))));
    let upstream = service_fn(move |_req: Request<Full<Bytes>>| {
        let body = body.lock().unwrap().take().unwrap();
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(body)
                    .unwrap(),
            )
        }
    });
    let svc = ServiceBuilder::new()
        .layer(budget.clone())
        .layer(meter)
        .service(upstream);
    let res = svc.oneshot(request()).await.unwrap();
    let mut body = res.into_body();
    let frame = body.frame().await.unwrap().unwrap();
    assert!(
        frame
            .data_ref()
            .unwrap()
            .starts_with(b"event: message_start")
    );
    // while the stream is open, the reservation holds the budget
    let (spent, reserved) = budget.spend("daily", "carol").unwrap();
    assert_eq!(spent, Money::ZERO);
    assert!(reserved > Money::ZERO);
    drop(body); // the client goes away
    let record = records.recv().await.unwrap();
    assert_eq!(record.completion, Completion::Partial);
    let cost = record.cost.unwrap();
    assert!(cost > Money::ZERO && cost < reserved);
    assert_eq!(budget.spend("daily", "carol"), Some((cost, Money::ZERO)));
    drop(tx);
}

#[tokio::test]
async fn a_complete_json_response_settles_its_cost_and_an_error_refunds() {
    let (budget, meter, mut records) = layers();
    let upstream = service_fn(|req: Request<Full<Bytes>>| async move {
        let fail = req.headers().contains_key("x-fail");
        let (status, body) = if fail {
            (
                529,
                r#"{"type":"error","error":{"type":"overloaded_error","message":"busy"}}"#,
            )
        } else {
            (
                200,
                r#"{"type":"message","model":"claude-3-7-sonnet-20250219","content":[],
                "usage":{"input_tokens":3,"cache_creation_input_tokens":12304,"output_tokens":550}}"#,
            )
        };
        Ok::<_, Infallible>(
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .unwrap(),
        )
    });
    let svc = ServiceBuilder::new()
        .layer(budget.clone())
        .layer(meter)
        .service(upstream);
    let res = svc.clone().oneshot(request()).await.unwrap();
    res.into_body().collect().await.unwrap();
    let record = records.recv().await.unwrap();
    assert_eq!(record.cost, Some(Money::from_nanos(54_399_000)));
    assert_eq!(
        budget.spend("daily", "carol"),
        Some((Money::from_nanos(54_399_000), Money::ZERO))
    );
    let mut failing = request();
    failing.headers_mut().insert("x-fail", "1".parse().unwrap());
    let res = svc.oneshot(failing).await.unwrap();
    assert_eq!(res.status(), 529);
    res.into_body().collect().await.unwrap();
    // the upstream's error used no tokens: the reservation is refunded
    assert_eq!(
        budget.spend("daily", "carol"),
        Some((Money::from_nanos(54_399_000), Money::ZERO))
    );
}

/// An OpenAI request, streamed.
fn openai_request() -> Request<Full<Bytes>> {
    let mut req = Request::post("/v1/chat/completions")
        .body(Full::new(Bytes::from(
            r#"{"model":"gpt-4o-2024-08-06","max_tokens":2000,"stream":true,"messages":[]}"#,
        )))
        .unwrap();
    req.extensions_mut()
        .insert(palisade::cost::Principal::new("dave"));
    req
}

#[tokio::test]
async fn a_stream_that_reports_no_usage_is_charged_its_reservation_not_refunded() {
    // Without `stream_options.include_usage` an OpenAI stream never reports usage; cut
    // short, it stops before the usage chunk. Tokens were generated either way: unknown
    // is not free, so the reservation is charged, not refunded.
    let (budget, meter, mut records) = layers();
    let without_usage: String = include_str!("cost_data/openai_gpt4o.sse")
        .split("\r\r")
        .filter(|ev| !ev.contains("\"usage\":{"))
        .map(|ev| format!("{ev}\r\r"))
        .collect::<String>();
    let upstream = service_fn(move |_req: Request<Full<Bytes>>| {
        let body = without_usage.clone();
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap(),
            )
        }
    });
    let svc = ServiceBuilder::new()
        .layer(budget.clone())
        .layer(meter)
        .service(upstream);
    let res = svc.oneshot(openai_request()).await.unwrap();
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap();
    let record = records.recv().await.unwrap();
    assert_eq!(record.cost, None, "{record:?}");
    let (spent, reserved) = budget.spend("daily", "dave").unwrap();
    assert_eq!(reserved, Money::ZERO);
    assert!(spent > Money::ZERO, "a stream with unknown usage was free");
}

/// An answer from another model than the one asked for (a fallback upstream) is priced at
/// the model that answered: its record, its cost header and the budget's spend agree to
/// the pico-dollar, and a model with no price is charged the whole reservation.
#[tokio::test]
async fn an_answer_from_another_model_settles_the_answering_models_cost() {
    for (answered, cost) in [
        (
            "claude-opus-4-7",
            Some(Money::from_picos(
                3 * 5_000_000 + 12_304 * 6_250_000 + 550 * 25_000_000,
            )),
        ),
        ("claude-from-the-future-9", None),
    ] {
        let (budget, _, _) = layers();
        let (tx, mut records) = mpsc::unbounded_channel();
        let (recorder, _shutdown) = UsageRecorder::spawn(Forward(tx), RecorderConfig::default());
        let meter = CostMeterLayer::new(PriceTable::builtin(), recorder).cost_headers(Some(4096));
        let body = format!(
            r#"{{"type":"message","model":"{answered}","content":[],"stop_reason":"end_turn",
            "usage":{{"input_tokens":3,"cache_creation_input_tokens":12304,"output_tokens":550}}}}"#
        );
        let upstream = service_fn(move |_req: Request<Full<Bytes>>| {
            let body = body.clone();
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("content-type", "application/json; charset=utf-8")
                        .body(Full::new(Bytes::from(body)))
                        .unwrap(),
                )
            }
        });
        let svc = ServiceBuilder::new()
            .layer(budget.clone())
            .layer(meter)
            .service(upstream);
        let res = svc.oneshot(request()).await.unwrap();
        let header = res.headers()["x-palisade-cost-usd"]
            .to_str()
            .unwrap()
            .to_owned();
        res.into_body().collect().await.unwrap();
        let record = records.recv().await.unwrap();
        assert_eq!(record.model.as_deref(), Some(answered));
        assert_eq!(record.cost, cost, "{answered}");
        let (spent, held) = budget.spend("daily", "carol").unwrap();
        assert_eq!(held, Money::ZERO, "{answered}: nothing left held");
        match cost {
            Some(cost) => {
                assert_eq!(header, cost.dollars_string());
                assert_eq!(spent, cost, "{answered}: charged what the record says");
            }
            None => {
                assert_eq!(header, "unknown");
                assert!(spent > Money::ZERO, "{answered}: unknown is not free");
            }
        }
    }
}

/// A per-user budget and a global one, each its own layer.
fn nested_budgets() -> (BudgetLayer, BudgetLayer) {
    let users = BudgetLayer::builder()
        .budget(Budget::new(
            "daily",
            Scope::User,
            Period::Day,
            Money::parse_dollars("1").unwrap(),
        ))
        .build()
        .unwrap();
    let everyone = BudgetLayer::builder()
        .budget(Budget::new(
            "all",
            Scope::Global,
            Period::Day,
            Money::parse_dollars("5").unwrap(),
        ))
        .build()
        .unwrap();
    (users, everyone)
}

/// An upstream answering one JSON message that costs $0.054399 (the request's model).
async fn known_usage<B>(_req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            r#"{"type":"message","model":"claude-3-7-sonnet-20250219","content":[],
            "usage":{"input_tokens":3,"cache_creation_input_tokens":12304,"output_tokens":550}}"#,
        )))
        .unwrap())
}

const KNOWN_COST: Money = Money::from_nanos(54_399_000);

/// Two plain budget layers nested above the meter: each account is charged the actual
/// cost, and neither keeps anything reserved (the outer reservation used to be replaced by
/// the inner one in the request extensions, then charged in full).
#[tokio::test]
async fn two_nested_budget_layers_each_charge_exactly_the_actual_cost() {
    let (users, everyone) = nested_budgets();
    let (_, meter, mut records) = layers();
    let svc = ServiceBuilder::new()
        .layer(users.clone())
        .layer(everyone.clone())
        .layer(meter)
        .service(service_fn(known_usage::<Full<Bytes>>));
    let res = svc.oneshot(request()).await.unwrap();
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap();
    assert_eq!(records.recv().await.unwrap().cost, Some(KNOWN_COST));
    assert_spent(&users, &everyone, KNOWN_COST);
}

/// The same with both layers split (start and gate each), gates above the meter.
#[tokio::test]
async fn two_nested_split_budget_layers_each_charge_exactly_the_actual_cost() {
    use palisade::cost::budget::StartBody;
    let (users, everyone) = nested_budgets();
    let (_, meter, mut records) = layers();
    let (start_users, gate_users) = users.split();
    let (start_all, gate_all) = everyone.split();
    let svc = ServiceBuilder::new()
        .layer(start_users)
        .layer(start_all)
        .layer(gate_users)
        .layer(gate_all)
        .layer(meter)
        .service(service_fn(known_usage::<StartBody<StartBody<Full<Bytes>>>>));
    let res = svc.oneshot(request()).await.unwrap();
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap();
    assert_eq!(records.recv().await.unwrap().cost, Some(KNOWN_COST));
    assert_spent(&users, &everyone, KNOWN_COST);
}

/// The inner layer refuses (its global budget is blocked): the request never reaches the
/// upstream, so the outer layer's reservation is released, not charged; released once, so
/// the next request, let through, is charged exactly its cost.
#[tokio::test]
async fn a_refusal_by_the_inner_budget_layer_releases_the_outer_reservation_once() {
    let (users, everyone) = nested_budgets();
    let (_, meter, mut records) = layers();
    let svc = ServiceBuilder::new()
        .layer(users.clone())
        .layer(everyone.clone())
        .layer(meter)
        .service(service_fn(known_usage::<Full<Bytes>>));
    assert!(everyone.set_limit("all", "*", Some(Money::ZERO)));
    let res = svc.clone().oneshot(request()).await.unwrap();
    assert_eq!(res.status(), 429);
    res.into_body().collect().await.unwrap();
    assert_spent(&users, &everyone, Money::ZERO);

    assert!(everyone.clear_limit("all", "*"));
    let res = svc.oneshot(request()).await.unwrap();
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap();
    assert_eq!(records.recv().await.unwrap().cost, Some(KNOWN_COST));
    assert_spent(&users, &everyone, KNOWN_COST);
}

/// The same refusal with both layers split.
#[tokio::test]
async fn a_refusal_by_the_inner_split_budget_layer_releases_the_outer_reservation() {
    use palisade::cost::budget::StartBody;
    let (users, everyone) = nested_budgets();
    let (start_users, gate_users) = users.split();
    let (start_all, gate_all) = everyone.split();
    let svc = ServiceBuilder::new()
        .layer(start_users)
        .layer(start_all)
        .layer(gate_users)
        .layer(gate_all)
        .service(service_fn(known_usage::<StartBody<StartBody<Full<Bytes>>>>));
    assert!(everyone.set_limit("all", "*", Some(Money::ZERO)));
    let res = svc.oneshot(request()).await.unwrap();
    assert_eq!(res.status(), 429);
    res.into_body().collect().await.unwrap();
    assert_spent(&users, &everyone, Money::ZERO);
}

/// Both accounts of [`nested_budgets`] have spent `spent` and hold nothing.
#[track_caller]
fn assert_spent(users: &BudgetLayer, everyone: &BudgetLayer, spent: Money) {
    assert_eq!(users.spend("daily", "carol"), Some((spent, Money::ZERO)));
    assert_eq!(everyone.spend("all", "*"), Some((spent, Money::ZERO)));
}

/// The global budget of [`nested_budgets`] ($5 a day) on a [`SlowReserve`] store.
fn slow_everyone() -> BudgetLayer {
    BudgetLayer::builder()
        .budget(Budget::new(
            "all",
            Scope::Global,
            Period::Day,
            Money::parse_dollars("5").unwrap(),
        ))
        .store(SlowReserve(palisade::cost::budget::MemoryBudgetStore::new()))
        .build()
        .unwrap()
}

/// A memory store whose reservations answer after a second: the time a network store
/// takes, during which the client may go away.
struct SlowReserve(palisade::cost::budget::MemoryBudgetStore);

impl palisade::cost::budget::BudgetStore for SlowReserve {
    fn reserve<'a>(
        &'a self,
        charges: &'a [palisade::cost::budget::Charge],
        amount: Money,
        now: std::time::SystemTime,
    ) -> palisade::cost::budget::BoxFuture<
        'a,
        Result<palisade::cost::budget::Reserve, palisade::cost::budget::BudgetStoreError>,
    > {
        Box::pin(async move {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            self.0.reserve(charges, amount, now).await
        })
    }

    fn settle(
        &self,
        charges: Arc<[palisade::cost::budget::Charge]>,
        reserved: Money,
        actual: Money,
        now: std::time::SystemTime,
    ) -> palisade::cost::budget::BoxFuture<
        'static,
        Result<Vec<palisade::cost::budget::Crossing>, palisade::cost::budget::BudgetStoreError>,
    > {
        self.0.settle(charges, reserved, actual, now)
    }

    fn spend(
        &self,
        charge: &palisade::cost::budget::Charge,
        now: std::time::SystemTime,
    ) -> Option<(Money, Money)> {
        self.0.spend(charge, now)
    }
}

/// The client goes away while the inner layer waits for its store: the request never
/// reached the upstream, so the outer layer's reservation is released, as the inner
/// layer's is, not charged in full.
#[tokio::test(start_paused = true)]
async fn a_request_gone_while_the_inner_layer_reserves_releases_the_outer_reservation() {
    let users = nested_budgets().0;
    let everyone = slow_everyone();
    let svc = ServiceBuilder::new()
        .layer(users.clone())
        .layer(everyone.clone())
        .service(service_fn(known_usage::<Full<Bytes>>));
    let call = svc.oneshot(request());
    let gone = tokio::time::timeout(std::time::Duration::from_millis(100), call).await;
    assert!(
        gone.is_err(),
        "the client left before the inner store answered"
    );
    // the inner store answers after its request is gone: released in the background
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(everyone.spend("all", "*"), Some((Money::ZERO, Money::ZERO)));
    assert_eq!(
        users.spend("daily", "carol"),
        Some((Money::ZERO, Money::ZERO))
    );
}

/// The same with the inner layer split: the client goes away while its gate waits for the
/// start's decision.
#[tokio::test(start_paused = true)]
async fn a_request_gone_at_the_inner_budget_gate_releases_the_outer_reservation() {
    use palisade::cost::budget::StartBody;
    let users = nested_budgets().0;
    let everyone = slow_everyone();
    let (start_all, gate_all) = everyone.split();
    let svc = ServiceBuilder::new()
        .layer(users.clone())
        .layer(start_all)
        .layer(gate_all)
        .service(service_fn(known_usage::<StartBody<Full<Bytes>>>));
    let call = svc.oneshot(request());
    let gone = tokio::time::timeout(std::time::Duration::from_millis(100), call).await;
    assert!(
        gone.is_err(),
        "the client left before the inner store answered"
    );
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(everyone.spend("all", "*"), Some((Money::ZERO, Money::ZERO)));
    assert_eq!(
        users.spend("daily", "carol"),
        Some((Money::ZERO, Money::ZERO))
    );
}

/// A retry between two budget layers: the first attempt's 429 refunds the inner
/// reservation, and the retried attempt, answered, is charged to both accounts; the outer
/// account is not left uncharged by the refund of an attempt the request outlived.
#[tokio::test(start_paused = true)]
async fn a_retry_between_nested_budget_layers_charges_the_outer_account_the_answer() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (users, everyone) = nested_budgets();
    let (_, meter, mut records) = layers();
    let calls = Arc::new(AtomicUsize::new(0));
    let upstream = {
        let calls = Arc::clone(&calls);
        service_fn(move |req: Request<axum::body::Body>| {
            let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    return Ok::<_, Infallible>(
                        Response::builder()
                            .status(429)
                            .header("retry-after", "1")
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from_static(
                                br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
                            )))
                            .unwrap(),
                    );
                }
                known_usage(req).await
            }
        })
    };
    let svc = ServiceBuilder::new()
        .layer(users.clone())
        .layer(
            palisade::retry::RetryLayer::builder()
                .max_retries(1)
                .build()
                .unwrap(),
        )
        .map_request(|r: Request<palisade::retry::ReplayBody<Full<Bytes>>>| {
            r.map(axum::body::Body::new)
        })
        .layer(everyone.clone())
        .layer(meter)
        .service(upstream);
    let res = svc.oneshot(request()).await.unwrap();
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(records.recv().await.unwrap().cost, None);
    assert_eq!(records.recv().await.unwrap().cost, Some(KNOWN_COST));
    assert_eq!(everyone.spend("all", "*"), Some((KNOWN_COST, Money::ZERO)));
    assert_eq!(
        users.spend("daily", "carol"),
        Some((KNOWN_COST, Money::ZERO))
    );
}

/// A plain layer between a split layer's start and its gate refuses: the start's
/// reservation, never taken by its gate, is released.
#[tokio::test]
async fn a_refusal_by_a_plain_layer_inside_a_split_start_releases_the_start_reservation() {
    use palisade::cost::budget::StartBody;
    let (users, everyone) = nested_budgets();
    let (start_users, gate_users) = users.split();
    let svc = ServiceBuilder::new()
        .layer(start_users)
        .layer(everyone.clone())
        .layer(gate_users)
        .service(service_fn(known_usage::<StartBody<Full<Bytes>>>));
    assert!(everyone.set_limit("all", "*", Some(Money::ZERO)));
    let res = svc.oneshot(request()).await.unwrap();
    assert_eq!(res.status(), 429);
    res.into_body().collect().await.unwrap();
    tokio::task::yield_now().await;
    assert_spent(&users, &everyone, Money::ZERO);
}

/// Three levels, a split one between two plain ones: each account is charged the actual
/// cost once, nothing left reserved.
#[tokio::test]
async fn three_nested_budget_layers_each_charge_exactly_the_actual_cost() {
    use palisade::cost::budget::StartBody;
    let (users, everyone) = nested_budgets();
    let third = BudgetLayer::builder()
        .budget(Budget::new(
            "monthly",
            Scope::Global,
            Period::Month,
            Money::parse_dollars("50").unwrap(),
        ))
        .build()
        .unwrap();
    let (_, meter, mut records) = layers();
    let (start_all, gate_all) = everyone.split();
    let svc = ServiceBuilder::new()
        .layer(users.clone())
        .layer(start_all)
        .layer(gate_all)
        .layer(third.clone())
        .layer(meter)
        .service(service_fn(known_usage::<StartBody<Full<Bytes>>>));
    let res = svc.oneshot(request()).await.unwrap();
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap();
    assert_eq!(records.recv().await.unwrap().cost, Some(KNOWN_COST));
    assert_spent(&users, &everyone, KNOWN_COST);
    assert_eq!(third.spend("monthly", "*"), Some((KNOWN_COST, Money::ZERO)));
}
