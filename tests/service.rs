//! The verification-service example, started on 127.0.0.1 on a free port
//! and driven over HTTP by a real client (ureq): enroll, verify, errors mapped
//! to status codes, lockout with Retry-After, revoke; split custody with the
//! user key as a request field.

mod common;
#[path = "../examples/verification_service.rs"]
#[allow(dead_code)]
mod service;

use common::{Fixture, Rng, DIM};
use serde_json::{json, Value};
use std::sync::Arc;

const TOKEN: &str = "operator-token-for-the-test-0123456789";

fn post(base: &str, path: &str, body: Value) -> (u16, Value, Option<String>) {
    post_as(base, path, Some(TOKEN), body)
}

fn post_as(
    base: &str,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> (u16, Value, Option<String>) {
    let mut req = ureq::post(&format!("{base}{path}"));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let r = match req.send_json(body) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{path}: {e}"),
    };
    let retry = r.header("retry-after").map(str::to_owned);
    let status = r.status();
    let v: Value = r.into_json().unwrap_or(Value::Null);
    (status, v, retry)
}

#[test]
fn service_maps_the_store_onto_http() {
    // The system clock: the service computes Retry-After from it.
    let f = Fixture::new(8);
    let store =
        Arc::new(bioseal::Store::open(f.config().clock(bioseal::SystemClock)).expect("open"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    rt.spawn(async move { axum::serve(listener, service::app(store, TOKEN.into())).await });

    let mut rng = Rng(4242);
    let alice = rng.unit(DIM);
    let expires = bioseal::Clock::now(&bioseal::SystemClock).unix_secs() + 30 * 86_400;
    let enroll = |subject: &str, v: &[f32]| {
        post(
            &base,
            "/enroll",
            json!({
                "subject": subject, "embedding": v, "purposes": ["identity-verification"],
                "expires_unix": expires, "evidence_sha256": "ab".repeat(32),
            }),
        )
    };
    let verify = |subject: &str, purpose: &str, v: &[f32]| {
        post(
            &base,
            "/verify",
            json!({"subject": subject, "purpose": purpose, "embedding": v}),
        )
    };

    // Operator routes without the token, or with a wrong one: 401, and
    // nothing enrolled.
    let body = json!({
        "subject": "alice", "embedding": alice, "purposes": ["identity-verification"],
        "expires_unix": expires, "evidence_sha256": "ab".repeat(32),
    });
    assert_eq!(post_as(&base, "/enroll", None, body.clone()).0, 401);
    assert_eq!(
        post_as(
            &base,
            "/enroll",
            Some("operator-token-for-the-test-0123456788"),
            body
        )
        .0,
        401
    );
    assert_eq!(
        post_as(&base, "/revoke", None, json!({"subject": "alice"})).0,
        401
    );
    assert_eq!(
        post_as(&base, "/reset", Some("x"), json!({"subject": "alice"})).0,
        401
    );
    assert_eq!(verify("alice", "identity-verification", &alice).0, 404);

    let (s, b, _) = enroll("alice", &alice);
    assert_eq!((s, b["status"].as_str()), (201, Some("enrolled")));
    // Enrolling again (another face) is refused.
    assert_eq!(enroll("alice", &rng.unit(DIM)).0, 409);
    // add-template: only after a match; needs no operator token.
    let second = rng.unit(DIM);
    let (s, b, _) = post_as(
        &base,
        "/add-template",
        None,
        json!({"subject": "alice", "purpose": "identity-verification",
               "probe": rng.noisy(&alice, 0.2), "embedding": second}),
    );
    assert_eq!((s, b["decision"].as_str()), (200, Some("match")));
    let (s, b, _) = verify("alice", "identity-verification", &second);
    assert_eq!((s, b["decision"].as_str()), (200, Some("match")));
    let (s, b, _) = verify("alice", "identity-verification", &rng.noisy(&alice, 0.2));
    assert_eq!((s, b["decision"].as_str()), (200, Some("match")));
    let (s, b, _) = verify("alice", "identity-verification", &rng.unit(DIM));
    assert_eq!((s, b["decision"].as_str()), (200, Some("no-match")));
    // Errors → status codes, with a message and no input echoed back.
    assert_eq!(verify("bob", "identity-verification", &alice).0, 404);
    assert_eq!(verify("alice", "marketing", &alice).0, 403);
    let (s, b, _) = verify("alice", "identity-verification", &alice[..DIM - 1]);
    assert_eq!(s, 422);
    assert!(b["error"]
        .as_str()
        .is_some_and(|m| m.contains("wrong dimension")));
    assert_eq!(enroll("carol", &vec![0.0; DIM]).0, 422);
    let (s, _, _) = post(&base, "/verify", json!({"subject": "alice"}));
    assert!((400..500).contains(&s), "malformed request: {s}");
    // Lockout: four more failures make five; the sixth attempt waits 30 s.
    for _ in 0..4 {
        assert_eq!(
            verify("alice", "identity-verification", &rng.unit(DIM)).0,
            200
        );
    }
    let (s, _, retry) = verify("alice", "identity-verification", &alice);
    assert_eq!(s, 429);
    let retry: u64 = retry.and_then(|r| r.parse().ok()).expect("Retry-After");
    assert!((28..=30).contains(&retry), "{retry}");
    // The operator resets the counter.
    assert_eq!(post(&base, "/reset", json!({"subject": "alice"})).0, 200);
    let (s, b, _) = verify("alice", "identity-verification", &alice);
    assert_eq!((s, b["decision"].as_str()), (200, Some("match")));
    // Revoke: shredded, then unknown.
    let (s, b, _) = post(&base, "/revoke", json!({"subject": "alice"}));
    assert_eq!((s, b["shred"].as_str()), (200, Some("shredded")));
    assert_eq!(verify("alice", "identity-verification", &alice).0, 404);

    // Split custody: the user key as a request field (64 hex digits).
    let key: String = (0u8..32).map(|i| format!("{:02x}", i * 7 + 3)).collect();
    let other: String = (0u8..32).map(|i| format!("{:02x}", i * 5 + 1)).collect();
    let dana = rng.unit(DIM);
    let (s, _, _) = post(
        &base,
        "/enroll",
        json!({
            "subject": "dana", "embedding": dana, "purposes": ["identity-verification"],
            "expires_unix": expires, "evidence_sha256": "ab".repeat(32), "user_key": key,
        }),
    );
    assert_eq!(s, 201);
    let verify_key = |k: Option<&str>, v: &[f32]| {
        let mut body =
            json!({"subject": "dana", "purpose": "identity-verification", "embedding": v});
        if let Some(k) = k {
            body["user_key"] = json!(k);
        }
        post_as(&base, "/verify", None, body)
    };
    let (s, b, _) = verify_key(Some(&key), &rng.noisy(&dana, 0.2));
    assert_eq!((s, b["decision"].as_str()), (200, Some("match")));
    let (s, b, _) = verify_key(Some(&other), &dana);
    assert_eq!(s, 401);
    assert!(
        b["error"].as_str().is_some_and(|m| m.contains("user key")),
        "{b}"
    );
    assert_eq!(verify_key(None, &dana).0, 401);
    assert_eq!(verify_key(Some("abcd"), &dana).0, 422);
    let (s, _, _) = post_as(
        &base,
        "/rekey",
        None,
        json!({"subject": "dana", "user_key": key, "new_user_key": other}),
    );
    assert_eq!(s, 200);
    assert_eq!(verify_key(Some(&key), &dana).0, 401);
    let (s, b, _) = verify_key(Some(&other), &dana);
    assert_eq!((s, b["decision"].as_str()), (200, Some("match")));
    rt.shutdown_background();
}
